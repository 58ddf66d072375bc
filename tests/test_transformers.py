"""The models people use, used as they are: tiny random-init Hugging Face models built from their configs (no
download) and torchvision's ViT and ConvNeXt, each trained for two tasks with PackNet, packed, saved, loaded, run
per task and in mixed batches, and exported to the plain model.

torchvision: the PyPI wheel that matches the CPU torch is a CUDA build whose C ops cannot load;
``packnet.compat.import_torchvision`` (called by conftest.py before transformers is imported) makes its Python model
classes importable. Its tests are skipped where torchvision is not installed.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import packnet

transformers = pytest.importorskip("transformers")

VOCAB, LABELS, BATCH, SEQUENCE = 40, 3, 6, 5
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")


# ----------------------------------------------------------------------------------------------------- the models
def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=LABELS,
    )
    return transformers.BertForSequenceClassification(config), "classifier"


def _distilbert():
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=LABELS
    )
    return transformers.DistilBertForSequenceClassification(config), "classifier"


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        num_labels=LABELS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.GPT2ForSequenceClassification(config), "score"


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=LABELS,
        pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config), "score"


def _vit():
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=LABELS,
    )
    return transformers.ViTForImageClassification(config), "classifier"


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=LABELS
    )
    return model, "heads"


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=LABELS), "classifier"


# name -> (builder, input kind, is a transformers model, holds nn.MultiheadAttention)
MODELS = {
    "bert": (_bert, "tokens", True, False),
    "distilbert": (_distilbert, "tokens", True, False),
    "gpt2": (_gpt2, "tokens", True, False),
    "llama": (_llama, "tokens", True, False),
    "vit": (_vit, "gray", True, False),
    "torchvision_vit": (_torchvision_vit, "rgb8", False, True),
    "convnext": (_convnext, "rgb32", False, False),
}
FAMILIES = [
    pytest.param(name, marks=needs_torchvision) if not MODELS[name][2] else name
    for name in MODELS
    if name != "distilbert"
]


def _inputs(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "tokens":
        return torch.randint(1, VOCAB, (BATCH, SEQUENCE), generator=generator)
    channels, side = {"gray": (1, 8), "rgb8": (3, 8), "rgb32": (3, 32)}[kind]
    return torch.randn(BATCH, channels, side, side, generator=generator)


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _loss(output, targets):
    return F.cross_entropy(_logits(output), targets)


def _train(model: nn.Module, head: str, inputs, **options) -> packnet.PackNet:
    """Two tasks on ``model``; task 1's outputs are checked bit for bit after task 2."""
    trainer = packnet.PackNet(model, prune_ratio=0.5, head=head, **options)
    task1 = None
    for task in (1, 2):
        targets = torch.randint(0, LABELS, (BATCH,), generator=torch.Generator().manual_seed(10 + task))
        trainer.learn_task(
            [(inputs, targets)],
            lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=1e-3),
            epochs=2,
            finetune_epochs=1,
            loss_fn=_loss,
            show_progress=False,
        )
        if task == 1:
            task1 = _logits(trainer.predict(inputs, 1))
    assert torch.equal(_logits(trainer.predict(inputs, 1)), task1)
    return trainer


@functools.cache
def _trained(name: str):
    """``(trainer, inputs, per-task outputs of the trained model)``, trained once per test session."""
    build, kind, _, _ = MODELS[name]
    torch.manual_seed(0)
    model, head = build()
    inputs = _inputs(kind)
    trainer = _train(model, head, inputs)
    with torch.no_grad():
        expected = {task: _logits(trainer.predict(inputs, task)) for task in (1, 2)}
    assert not torch.equal(expected[1], expected[2])
    return trainer, inputs, expected


def _run(model, inputs, task):
    with torch.no_grad():
        return _logits(model(inputs, task=task))


# ----------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", FAMILIES)
def test_two_tasks_compile_save_and_load_equal_per_task(name, tmp_path):
    """The compiled model computes each task as the trained one did (bit for bit, but for nn.MultiheadAttention,
    replaced by scaled_dot_product_attention); the saved pack, checked at save time on a default probe (integer
    tokens for token models), loads into the plain architecture with the same outputs bit for bit."""
    trainer, inputs, expected = _trained(name)
    packed = packnet.compile_pack(trainer)
    for task in (1, 2):
        got = _run(packed, inputs, task)
        if MODELS[name][3]:
            torch.testing.assert_close(got, expected[task], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, expected[task]), task
    meta = packnet.save_pack(packed, tmp_path / "model.pack")
    if MODELS[name][1] == "tokens":
        assert meta["input_spec"] == {"shape": [SEQUENCE], "dtype": "int64", "high": int(inputs.max()) + 1}
    torch.manual_seed(123)  # another initialisation: everything must come from the pack
    skeleton, _ = MODELS[name][0]()
    loaded = packnet.load_pack(tmp_path / "model.pack", model=skeleton)
    for task in (1, 2):
        assert torch.equal(_run(loaded, inputs, task), _run(packed, inputs, task)), task


@pytest.mark.parametrize("name", FAMILIES)
def test_a_mixed_batch_equals_per_task_runs_row_for_row(name):
    """A ``[B]`` task tensor is one task per sample, spread over its tokens or patches inside the packed layers;
    ``[1, S]`` position ids and broadcast buffers pass through. Each row equals the run of its task alone on its
    rows, bit for bit."""
    trainer, inputs, _ = _trained(name)
    packed = packnet.compile_pack(trainer)
    tasks = torch.tensor([1, 2, 2, 1, 2, 1])
    mixed = _run(packed, inputs, tasks)
    for task in (1, 2):
        rows = (tasks == task).nonzero().squeeze(1)
        assert torch.equal(mixed[rows], _run(packed, inputs[rows], task)), task
    with packnet.set_task(packed, tasks), torch.no_grad():
        assert torch.equal(_logits(packed(inputs)), mixed)


@pytest.mark.parametrize("name", ["distilbert", *FAMILIES])
def test_a_task_argument_selects_that_task(name):
    """Every HF forward takes ``**kwargs``: ``packed(x, task=t)`` once ran the active task and said nothing. Each
    way to choose a task gives exactly that task's outputs."""
    trainer, inputs, _ = _trained(name)
    packed = packnet.compile_pack(trainer)
    with torch.no_grad():
        expected = {task: _run(packed, inputs, task) for task in (1, 2)}
        assert not torch.equal(expected[1], expected[2])
        for active, asked in ((1, 2), (2, 1)):
            packnet.set_task(packed, active)
            assert torch.equal(_logits(packed(inputs, task=asked)), expected[asked])
            assert torch.equal(_logits(packed(inputs)), expected[active])
            with packnet.set_task(packed, asked):
                assert torch.equal(_logits(packed(inputs)), expected[asked])
        if MODELS[name][1] == "tokens":
            assert torch.equal(packed(input_ids=inputs, task=2).logits, expected[2])
        with pytest.raises(ValueError, match=r"task 3 is outside 1\.\.2"):
            packed(inputs, task=3)


@pytest.mark.parametrize("name", [name for name in MODELS if MODELS[name][2]])
def test_an_exported_task_loads_with_from_pretrained_bitwise(name, tmp_path):
    """``export_task_state_dict(packed, t)`` is a plain state dict of task t: loaded into the plain model and saved
    with ``save_pretrained``, ``from_pretrained`` gives back task t's outputs bit for bit."""
    trainer, inputs, expected = _trained(name)
    packed = packnet.compile_pack(trainer)
    model_class = type(trainer.net)
    for task in (1, 2):
        plain = model_class(trainer.net.config)
        plain.load_state_dict(packnet.export_task_state_dict(packed, task), strict=True)
        plain.save_pretrained(tmp_path / f"task{task}")
        reloaded = model_class.from_pretrained(tmp_path / f"task{task}").eval()
        with torch.no_grad():
            assert torch.equal(_logits(reloaded(inputs)), expected[task]), task
            assert torch.equal(_logits(reloaded(inputs)), _run(packed, inputs, task)), task


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_save_pretrained_on_a_packed_model_says_what_to_do(name, tmp_path):
    """A packed model's save_pretrained would write every task's shared weight under the plain names (a checkpoint
    the plain model loads without complaint, wrongly): it refuses and names the two ways that work."""
    packed = packnet.compile_pack(_trained(name)[0])
    for save in (packed.save_pretrained, packed.push_to_hub):
        with pytest.raises(TypeError, match=r"packnet\.save_pack.*export_task_state_dict"):
            save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_keyword_inputs_train_and_probe_as_a_dict(tmp_path):
    """A batch of keyword inputs (``input_ids`` and ``attention_mask``) trains as ``model(**inputs)``; the trainer
    records each input's shape, dtype and range, and save_pack's default probe is such a dict."""
    torch.manual_seed(0)
    model, head = _bert()
    tokens = _inputs("tokens")
    mask = torch.ones_like(tokens)
    mask[0, -2:] = 0
    inputs = {"input_ids": tokens, "attention_mask": mask}
    trainer = _train(model, head, inputs)
    assert trainer.input_spec == {
        "keywords": {
            "input_ids": {"shape": [SEQUENCE], "dtype": "int64", "high": int(tokens.max()) + 1},
            "attention_mask": {"shape": [SEQUENCE], "dtype": "int64", "high": 2},
        }
    }
    packed = packnet.compile_pack(trainer)
    meta = packnet.save_pack(packed, tmp_path / "bert.pack")
    assert meta["input_spec"] == trainer.input_spec
    loaded = packnet.load_pack(tmp_path / "bert.pack", model=_bert()[0])
    with torch.no_grad():
        for task in (1, 2):
            assert torch.equal(loaded(**inputs, task=task).logits, trainer.predict(inputs, task).logits)


def test_save_compares_model_outputs_field_by_field(tmp_path):
    """The save-time check reads every field of a ModelOutput: a pack whose hidden states differ while the logits
    agree is refused, and names the field."""
    packed = packnet.compile_pack(_trained("bert")[0])
    probe = {"input_ids": _inputs("tokens"), "output_hidden_states": True}
    with pytest.raises(TypeError, match="dict of keyword inputs"):
        packnet.save_pack(packed, tmp_path / "bert.pack", probe=probe)  # a bool is not an input tensor
    original = packnet.pack.build_packed_model

    def tampered(*args, **kwargs):
        rebuilt = original(*args, **kwargs)
        layer = rebuilt.bert.encoder.layer[1].output.dense
        with torch.no_grad():
            layer.bias[1] += 1.0  # task 2's last block: its hidden state moves
        return rebuilt

    packnet.pack.build_packed_model = tampered
    try:
        with pytest.raises(packnet.PackSaveError, match=r"task 2's outputs on the probe input differ \(output\.logits"):
            packnet.save_pack(packed, tmp_path / "bert.pack")
    finally:
        packnet.pack.build_packed_model = original
    assert not (tmp_path / "bert.pack").exists()


def test_census_names_what_each_task_stores():
    """GPT-2: the Conv1D projections and both embeddings are packed; each task stores biases, LayerNorms and its
    head. With share=is_norm the LayerNorms are stored once."""
    torch.manual_seed(0)
    model, head = _gpt2()
    report = packnet.census(model, head=head)
    rows = {row.module: row for row in report.rows}
    assert rows["transformer.h.0.attn.c_attn"].packed == "transformers_conv1d"
    assert rows["transformer.h.0.attn.c_attn"].per_task == ("bias",)
    assert rows["transformer.wte"].packed == rows["transformer.wpe"].packed == "embedding"
    assert rows["transformer.ln_f"].per_task == ("weight", "bias") and rows["score"].per_task == ("weight",)
    assert report.packed_values == sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if name in packnet.PackNet(model, head=head).layers
    )
    shared = packnet.census(model, head=head, share=packnet.is_norm)
    assert shared.per_task_values == report.per_task_values - 5 * 2 * 16  # 5 LayerNorms of 16 weights and biases
    assert shared.shared_values == 5 * 2 * 16
    assert "packed transformers_conv1d" in report.table()


@pytest.mark.parametrize("name", ["llama", pytest.param("convnext", marks=needs_torchvision)])
def test_shared_norms_train_with_task_1_and_stay_put(name, tmp_path):
    """``share=packnet.is_norm``: one copy of every norm for all tasks, trained with task 1 and frozen after it
    (momentum and weight decay included); the pack stores it once, and the loaded model matches per task. ConvNeXt's
    head holds a LayerNorm: reset for every task, it is per task whatever the filter says."""
    build, kind, _, _ = MODELS[name]
    torch.manual_seed(0)
    model, head = build()
    inputs = _inputs(kind)
    norm_names = [  # a norm inside the head stays per task
        name for name, module in model.named_modules() if packnet.is_norm(name, module) and not name.startswith(head)
    ]
    before = {key: value.clone() for key, value in model.state_dict().items() if key.rpartition(".")[0] in norm_names}
    trainer = _train(model, head, inputs, share=packnet.is_norm)
    pack = packnet.pack.pack_from_trainer(trainer)
    assert set(pack.shared_state) == set(before) and not set(pack.task_states[0]) & set(before)
    assert any(not torch.equal(pack.shared_state[key], before[key]) for key in before)  # trained with task 1
    live = trainer.net.state_dict()
    assert all(torch.equal(live[key], pack.shared_state[key]) for key in before)  # unmoved by task 2
    packed = packnet.compile_pack(trainer)
    packnet.save_pack(packed, tmp_path / "shared.pack")
    loaded = packnet.load_pack(tmp_path / "shared.pack", model=build()[0])
    for task in (1, 2):
        assert torch.equal(_run(loaded, inputs, task), _logits(trainer.predict(inputs, task))), task


@needs_torchvision
def test_a_builder_that_cannot_run_on_meta_loads_on_the_cpu(tmp_path):
    """torchvision's RegNet reads tensor values while it builds ("Cannot copy out of meta tensor"): load_pack then
    builds it on the CPU instead of refusing."""
    from torchvision.models.regnet import BlockParams, RegNet

    def tiny_regnet(num_classes: int = LABELS) -> nn.Module:
        params = BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=8)
        model = RegNet(params, num_classes=num_classes, stem_width=8)
        model.packnet_input_shape = (3, 16, 16)
        return model

    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):
        tiny_regnet()
    build = packnet.register_builder("test_tiny_regnet", tiny_regnet)
    torch.manual_seed(0)
    inputs = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    trainer = _train(build(), "fc", inputs)
    unfused = packnet.compile_pack(trainer, fuse=False)
    for task in (1, 2):
        assert torch.equal(_run(unfused, inputs, task), trainer.predict(inputs, task)), task
    packed = packnet.compile_pack(trainer)
    assert packed.packnet_folding["folded"] == packed.packnet_folding["norms"] > 0
    packnet.save_pack(packed, tmp_path / "regnet.pack")
    loaded = packnet.load_pack(tmp_path / "regnet.pack")  # no skeleton: rebuilt from the registered builder
    for task in (1, 2):
        assert torch.equal(_run(loaded, inputs, task), _run(packed, inputs, task)), task
