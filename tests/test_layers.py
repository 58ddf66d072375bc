"""The packed layers beyond Linear and Conv2d (packnet.layers): Conv1d through the conv kernel, transformers'
Conv1D through a transposed view, Embedding lookups, MultiheadAttention; and how a trainer and a pack handle them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import packnet
from packnet.layers import kind_of, pack_layer
from packnet.pruning import magnitude_task_ids
from packnet_kernels import effective_weight, masked_embedding

NUM_TASKS = 3


def _ids(weight: torch.Tensor) -> torch.Tensor:
    return magnitude_task_ids(weight.detach(), NUM_TASKS, 0.5)


def _biases(out: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(out, generator=generator) for _ in range(NUM_TASKS)]


# ------------------------------------------------------------------------------------------------------- Conv1d
CONV1D_CASES = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
    "strided_padded": dict(in_channels=4, out_channels=6, kernel_size=5, stride=2, padding=2),
    "dilated_grouped": dict(in_channels=4, out_channels=8, kernel_size=3, dilation=2, groups=2, padding=1),
    "same": dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", bias=False),
    "depthwise": dict(in_channels=32, out_channels=32, kernel_size=3, groups=32, padding=1),
    "wide": dict(in_channels=32, out_channels=40, kernel_size=3, padding=1),
}


@pytest.mark.parametrize("case", CONV1D_CASES)
def test_packed_conv1d_is_conv1d_of_the_tasks_weights(case):
    """Each task gives ``F.conv1d`` with that task's effective weight and its own bias, bit for bit (the reference
    runs ``F.conv2d`` on height-1 views); unbatched ``[C, L]`` inputs too."""
    torch.manual_seed(0)
    conv = nn.Conv1d(**CONV1D_CASES[case])
    ids = _ids(conv.weight)
    biases = _biases(conv.out_channels) if conv.bias is not None else None
    packed = packnet.PackedConv1d.from_dense(conv, ids, NUM_TASKS, biases, backend="reference")
    x = torch.randn(3, conv.in_channels, 11)
    for task in range(1, NUM_TASKS + 1):
        weight = effective_weight(conv.weight.detach(), ids, task)
        bias = None if biases is None else biases[task - 1]
        want = F.conv1d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        got = packed(x, task=task)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(packed(x[0], task=task), packed(x[:1], task=task)[0])


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["plain", "strided_padded", "dilated_grouped", "depthwise", "wide"])
def test_packed_conv1d_runs_the_conv2d_kernel(case, kernel_device):
    """The Triton conv2d kernel computes a 1-D conv as a 2-D conv of height 1: it matches the reference, per task
    and in a mixed batch (one launch), with the tile map on."""
    torch.manual_seed(0)
    conv = nn.Conv1d(**CONV1D_CASES[case])
    ids = _ids(conv.weight)
    kernel = packnet.PackedConv1d.from_dense(conv, ids, NUM_TASKS, _biases(conv.out_channels), backend="triton")
    reference = packnet.PackedConv1d.from_dense(conv, ids, NUM_TASKS, _biases(conv.out_channels), "reference")
    kernel.to(kernel_device)
    x = torch.randn(4, conv.in_channels, 13)
    tasks = torch.tensor([3, 1, 2, 1])
    for task in (1, 2, 3, tasks):
        got = kernel(x.to(kernel_device), task=task if isinstance(task, int) else task.to(kernel_device))
        torch.testing.assert_close(got.cpu(), reference(x, task=task), rtol=2e-3, atol=2e-3)


def test_a_conv1d_model_trains_packs_and_loads(tmp_path):
    """Conv1d through the trainer (element and block pruning) and packs: task 1 bitwise after task 2; the compiled,
    saved and loaded models give the trained outputs, also in a mixed batch."""
    for granularity in ("element", (4, 4)):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2), nn.Flatten()
        )
        model.append(nn.Linear(8 * 7, 3))
        x = torch.randn(6, 2, 16)
        trainer = packnet.PackNet(model, head="5", prune_granularity=granularity)
        assert trainer.kinds == {"0": "conv1d", "3": "conv1d"}
        first = None
        for task in (1, 2):
            targets = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(task))
            trainer.learn_task(
                [(x, targets)], lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), epochs=2, show_progress=False
            )
            first = trainer.predict(x, 1) if task == 1 else first
        assert torch.equal(trainer.predict(x, 1), first)
        packed = packnet.compile_pack(trainer, backend="reference")
        assert packed.packnet_folding["folded"] == 1
        packnet.save_pack(packed, tmp_path / "conv1d.pack")
        meta = packnet.read_pack(tmp_path / "conv1d.pack").meta
        assert [layer["kind"] for layer in meta["layers"]] == ["conv1d", "conv1d"]
        loaded = packnet.load_pack(tmp_path / "conv1d.pack", model=trainer.skeleton())
        with torch.no_grad():
            for task in (1, 2):
                torch.testing.assert_close(packed(x, task=task), trainer.predict(x, task), rtol=1e-5, atol=1e-5)
                assert torch.equal(loaded(x, task=task), packed(x, task=task))
            mixed = loaded(x, task=torch.tensor([1, 2, 1, 2, 2, 1]))
            for task in (1, 2):
                rows = torch.tensor([1, 2, 1, 2, 2, 1]) == task
                assert torch.equal(mixed[rows], loaded(x[rows], task=task))


# ------------------------------------------------------------------------------------------ transformers' Conv1D
class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as it is written (``y = x @ W + b``, ``W [in, out]``); recognised by its
    class name and module, so tests without transformers still cover it."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


def test_transformers_conv1d_is_packed_in_its_own_layout_and_read_transposed():
    """The packed weight and ids keep Conv1D's ``[in, out]`` layout (exports need no transpose); the kernels get
    transposed views of that very storage (no copy, per call or at pack time); each task equals the plain Conv1D
    with its effective weight bit for bit."""
    torch.manual_seed(0)
    plain = Conv1D(12, 8)
    assert kind_of(plain) == "transformers_conv1d"
    ids = _ids(plain.weight)
    packed = pack_layer("transformers_conv1d", plain, ids, NUM_TASKS, _biases(12), backend="reference")
    assert packed.weight.shape == (8, 12) and packed.task_ids.shape == (8, 12)
    weight_view, ids_view = packed.kernel_operands()
    assert weight_view.shape == (12, 8) and weight_view.data_ptr() == packed.weight.data_ptr()
    assert ids_view.data_ptr() == packed.task_ids.data_ptr()
    x = torch.randn(2, 5, 8)
    for task in range(1, NUM_TASKS + 1):
        with torch.no_grad():
            plain.weight.copy_(effective_weight(packed.weight, ids, task))
            plain.bias.copy_(_biases(12)[task - 1])
            assert torch.equal(packed(x, task=task), plain(x))


@pytest.mark.interpreter
def test_transformers_conv1d_runs_the_linear_kernel_on_the_transposed_view(kernel_device):
    torch.manual_seed(0)
    plain = Conv1D(40, 48)
    ids = _ids(plain.weight)
    kernel = pack_layer("transformers_conv1d", plain, ids, NUM_TASKS, _biases(40), backend="triton").to(kernel_device)
    reference = pack_layer("transformers_conv1d", plain, ids, NUM_TASKS, _biases(40), backend="reference")
    x = torch.randn(3, 7, 48)
    for task in (1, 3, torch.tensor([2, 1, 3])):
        got = kernel(x.to(kernel_device), task=task if isinstance(task, int) else task.to(kernel_device))
        torch.testing.assert_close(got.cpu(), reference(x, task=task), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------------- Embedding
def test_embedding_lookup_masks_rows_by_their_ids():
    """Row ``i`` of task ``t`` is ``W[i]`` where its ids say task ``t`` may use it, else 0: bit for bit
    ``F.embedding`` of the effective table; an Inf or NaN in a weight task ``t`` does not own never reaches it."""
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 6, padding_idx=0)
    ids = _ids(embedding.weight)
    packed = packnet.PackedEmbedding.from_dense(embedding, ids, NUM_TASKS)
    with torch.no_grad():
        packed.weight[ids == 3] = float("nan")
    tokens = torch.randint(0, 10, (4, 7))
    for task in (1, 2):
        table = effective_weight(packed.weight, ids, task)
        assert torch.equal(packed(tokens, task=task), F.embedding(tokens, table))
    assert packed(tokens, task=3).isnan().any()


def test_embedding_mixed_batches_per_sample_per_index_and_broadcast():
    """A ``[B]`` task tensor with ``[B, S]`` tokens is one task per sample; ``[1, S]`` ids (position ids) meet it
    expanded to ``B`` samples; a tensor of one task per index is per index. Each row is the single-task lookup."""
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 6)
    packed = packnet.PackedEmbedding.from_dense(embedding, _ids(embedding.weight), NUM_TASKS)
    tokens = torch.randint(0, 10, (4, 5))
    tasks = torch.tensor([2, 1, 3, 2])
    mixed = packed(tokens, task=tasks)
    positions = torch.arange(5).unsqueeze(0)
    broadcast = packed(positions, task=tasks)
    assert broadcast.shape == (4, 5, 6)
    for row, task in enumerate(tasks.tolist()):
        assert torch.equal(mixed[row], packed(tokens[row], task=task))
        assert torch.equal(broadcast[row], packed(positions[0], task=task))
    per_index = torch.randint(1, 4, (20,))
    assert torch.equal(
        packed(tokens, task=per_index).reshape(20, 6),
        torch.stack([packed(token, task=int(task)) for token, task in zip(tokens.reshape(-1), per_index, strict=True)]),
    )
    with pytest.raises(ValueError, match=r"3 tasks for an input of shape \(4, 5\)"):
        packed(tokens, task=torch.tensor([1, 2, 3]))


def test_embedding_errors():
    with pytest.raises(ValueError, match="max_norm renormalises the table"):
        packnet.PackedEmbedding.from_dense(nn.Embedding(4, 2, max_norm=1.0), torch.ones(4, 2, dtype=torch.uint8), 1)
    weight, ids = torch.randn(4, 2), torch.ones(4, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"index 4 is outside 0\.\.3"):
        masked_embedding(torch.tensor([0, 4]), weight, ids, 1)
    with pytest.raises(TypeError, match="indices must be torch.int64 or torch.int32"):
        masked_embedding(torch.tensor([0.0]), weight, ids, 1)
    with pytest.raises(ValueError, match=r"task must be in 1\.\.255"):
        masked_embedding(torch.tensor([0]), weight, ids, 0)
    with pytest.raises(ValueError, match=r"every task must be in 1\.\.255, got 0"):
        masked_embedding(torch.tensor([0, 1]), weight, ids, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_embedding(torch.tensor([0]), weight, ids, 1, backend="cuda")


# ------------------------------------------------------------------------------------------- MultiheadAttention
def _attention_pair(batch_first: bool, bias: bool = True):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first).eval()
    ids = _ids(attention.in_proj_weight)
    out_ids = _ids(attention.out_proj.weight)
    packed = packnet.PackedMultiheadAttention.from_dense(attention, ids, NUM_TASKS)
    packed.out_proj = packnet.PackedLinear.from_dense(attention.out_proj, out_ids, NUM_TASKS)
    return attention, packed, ids, out_ids


def _plain_for_task(attention, ids, out_ids, task):
    plain = nn.MultiheadAttention(8, 2, bias=attention.in_proj_bias is not None, batch_first=attention.batch_first)
    plain.load_state_dict(attention.state_dict())
    with torch.no_grad():
        plain.in_proj_weight.copy_(effective_weight(attention.in_proj_weight, ids, task))
        plain.out_proj.weight.copy_(effective_weight(attention.out_proj.weight, out_ids, task))
    return plain.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_packed_attention_matches_torch_attention(batch_first, need_weights):
    """Self- and cross-attention, key padding and attention masks (bool and float), averaged or per-head weights,
    unbatched inputs: each task's outputs are ``nn.MultiheadAttention``'s with that task's weights (close: torch's
    fused paths order the arithmetic differently)."""
    attention, packed, ids, out_ids = _attention_pair(batch_first)
    batch, length, source = 3, 5, 4
    shape = (batch, length, 8) if batch_first else (length, batch, 8)
    query = torch.randn(shape)
    memory = torch.randn((batch, source, 8) if batch_first else (source, batch, 8))
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[0, -1] = True
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    calls = [
        ((query, query, query), {}),
        ((query, memory, memory), {"key_padding_mask": padding}),
        ((query, query, query), {"attn_mask": causal, "average_attn_weights": False}),
        ((query, memory, memory), {"attn_mask": torch.randn(batch * 2, length, source)}),
    ]
    for task in (1, 3):
        plain = _plain_for_task(attention, ids, out_ids, task)
        for args, kwargs in calls:
            with torch.no_grad():
                want = plain(*args, need_weights=need_weights, **kwargs)
                got = packed(*args, need_weights=need_weights, task=task, **kwargs)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
            else:
                assert got[1] is None
        unbatched = torch.randn(length, 8)
        with torch.no_grad():
            torch.testing.assert_close(
                packed(unbatched, unbatched, unbatched, task=task)[0],
                plain(unbatched, unbatched, unbatched)[0],
                rtol=1e-5,
                atol=1e-5,
            )


def test_packed_attention_mixed_batch_is_one_task_per_sample():
    attention, packed, _, _ = _attention_pair(batch_first=False)
    x = torch.randn(5, 4, 8)  # sequence first: the batch is dimension 1
    tasks = torch.tensor([2, 1, 3, 2])
    with torch.no_grad():
        mixed = packed(x, x, x, need_weights=False, task=tasks)[0]
        for task in (1, 2, 3):
            rows = tasks == task
            part = x[:, rows]
            assert torch.equal(mixed[:, rows], packed(part, part, part, need_weights=False, task=task)[0]), task
    with pytest.raises(ValueError, match="2 tasks for a batch of 4 samples"):
        packed(x, x, x, task=torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="is_causal=True is a hint and needs attn_mask"):
        packed(x, x, x, is_causal=True, task=1)


def test_attention_that_cannot_be_packed_is_refused_or_left_per_task():
    """kdim != embed_dim (separate q/k/v weights) is not packable: the default filter leaves the attention, and its
    out_proj with it, per task (the attention reads out_proj.weight itself); a filter that picks that out_proj is
    refused, as is swapping it alone."""
    model = nn.Sequential()
    model.attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    model.head = nn.Linear(8, 2)
    trainer = packnet.PackNet(model, head=None)
    assert "attention" not in trainer.layers and "attention.out_proj" not in trainer.layers
    with pytest.raises(ValueError, match="is the out_proj of nn.MultiheadAttention 'attention'"):
        packnet.PackNet(model, prunable=lambda name, module: isinstance(module, nn.Linear))
    with pytest.raises(ValueError, match="kdim/vdim differ from embed_dim"):
        packnet.PackNet(model, prunable=lambda name, module: name == "attention")
    plain = nn.Sequential()
    plain.attention = nn.MultiheadAttention(8, 2)
    with pytest.raises(TypeError, match="whose forward reads its weight directly"):
        packnet.swap_packed_(plain, {"attention.out_proj": torch.ones(8, 8, dtype=torch.uint8)}, 1)


def test_block_pruning_of_a_transformers_conv1d_follows_the_kernels_layout():
    """Block pruning cuts blocks of the weight as the kernels read it: for Conv1D's ``[in, out]`` storage, blocks of
    its transposed ``[out, in]`` view, so each block of that view has one owner."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 12), nn.ReLU(), nn.Linear(16, 2))
    trainer = packnet.PackNet(model, head="2", prune_granularity=(4, 6))
    assert trainer.kinds == {"0": "transformers_conv1d"}
    x = torch.randn(8, 12)
    for _ in range(2):
        trainer.learn_task(
            [(x, torch.randint(0, 2, (8,)))], lambda p: torch.optim.SGD(p, lr=0.1), 1, show_progress=False
        )
    blocks = trainer.task_ids["0"].t().reshape(4, 4, 2, 6).permute(0, 2, 1, 3).reshape(8, 24)
    assert all(len(set(row.tolist())) == 1 for row in blocks)
    assert set(blocks[:, 0].tolist()) == {0, 1, 2}
