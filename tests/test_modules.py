"""PackedLinear, PackedConv2d, TaskSwitch, set_task and swap_packed_."""

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.pruning import magnitude_task_ids
from packnet_kernels import masked_conv2d_ref, masked_linear_ref


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 4))


def _packed(num_tasks=3):
    model = _model()
    ids = {name: magnitude_task_ids(model.get_submodule(name).weight, num_tasks, 0.5) for name in ("0", "3")}
    return packnet.swap_packed_(model, ids, num_tasks, backend="reference"), ids


def test_swap_packed_replaces_layers_and_matches_the_reference():
    reference_model = _model()
    model, ids = _packed()
    assert isinstance(model[0], packnet.PackedConv2d) and isinstance(model[3], packnet.PackedLinear)
    x = torch.randn(2, 3, 5, 5)
    for task in (1, 2, 3):
        hidden = masked_conv2d_ref(x, reference_model[0].weight, ids["0"], task, reference_model[0].bias, 1, 1)
        expected = masked_linear_ref(
            torch.relu(hidden).flatten(1), reference_model[3].weight, ids["3"], task, reference_model[3].bias
        )
        with packnet.set_task(model, task):
            assert torch.equal(model(x), expected)


def test_free_weights_are_stored_as_exact_zeros():
    model, ids = _packed()
    assert torch.equal(model[3].weight[ids["3"] == 0], torch.zeros(int((ids["3"] == 0).sum())))


def _k_contiguous(conv: packnet.PackedConv2d) -> bool:
    return all(
        t.is_contiguous(memory_format=torch.channels_last) and t.stride(1) == 1 for t in (conv.weight, conv.task_ids)
    )


def test_conv_weights_use_pytorchs_layout_on_the_cpu_and_survive_dtype_moves():
    model, ids = _packed()
    conv = model[0]
    conv.to(torch.float64)
    assert conv.weight.is_contiguous() and conv.task_ids.is_contiguous() and conv.weight.stride(1) != 1
    assert torch.equal(conv.task_ids, ids["0"])


@pytest.mark.gpu
def test_conv_weights_are_k_contiguous_on_cuda_and_outputs_unchanged():
    """On CUDA a packed conv holds [out, kh, kw, in] in memory (the kernel's vector loads); back on the CPU, the
    default layout. Values, shapes and the saved pack are the same either way."""
    model, ids = _packed()
    x = torch.randn(2, 3, 5, 5)
    with packnet.set_task(model, 2):
        cpu_output = model(x)
        model.cuda()
        assert _k_contiguous(model[0]) and torch.equal(model[0].task_ids.cpu(), ids["0"])
        torch.testing.assert_close(model(x.cuda()).cpu(), cpu_output, atol=1e-5, rtol=1e-5)
        model.cpu()
        assert model[0].weight.is_contiguous() and not _k_contiguous(model[0])
        assert torch.equal(model(x), cpu_output)


def test_set_task_is_persistent_or_scoped_and_per_call_overrides():
    model, _ = _packed()
    x = torch.randn(2, 3, 5, 5)
    packnet.set_task(model, 1)
    y1 = model(x)
    with packnet.set_task(model, 3):
        y3 = model(x)
        assert model[0].active_task == 3
    assert model[0].active_task == 1 and torch.equal(model(x), y1)
    assert not torch.equal(y1, y3)
    assert torch.equal(model[0](x, task=3), model[0](x, task=3))
    assert not torch.equal(model[0](x, task=3), model[0](x))


def test_task_errors_name_the_problem():
    model, _ = _packed(num_tasks=3)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="no active task"):
        model(x)
    with pytest.raises(ValueError, match=r"task 4 is outside 1\.\.3"):
        packnet.set_task(model, 4)
    with pytest.raises(ValueError, match=r"task 0 is outside 1\.\.3"):
        model[0](x, task=0)
    with pytest.raises(TypeError, match="task must be an int"):
        packnet.set_task(model, "2")
    with pytest.raises(ValueError, match="no packed modules"):
        packnet.set_task(_model(), 1)
    packnet.set_task(model, 2)
    with pytest.raises(TypeError, match=r"input dtype torch\.float64 does not match weight dtype torch\.float32"):
        model(x.double())


def test_swap_packed_errors():
    model = _model()
    with pytest.raises(KeyError, match="no submodule 'nope'"):
        packnet.swap_packed_(model, {"nope": torch.zeros(1, dtype=torch.uint8)}, 2)
    with pytest.raises(TypeError, match="'1' is a ReLU"):
        packnet.swap_packed_(model, {"1": torch.zeros(1, dtype=torch.uint8)}, 2)
    with pytest.raises(ValueError, match="task_ids hold task 3 but the layer has 2"):
        packnet.swap_packed_(model, {"3": torch.full((4, 150), 3, dtype=torch.uint8)}, 2)
    with pytest.raises(ValueError, match=r"num_tasks must be an int in 1\.\.255"):
        packnet.swap_packed_(model, {}, 0)


def test_task_switch_runs_the_active_copy():
    switch = packnet.TaskSwitch([nn.Linear(3, 2) for _ in range(2)])
    x = torch.randn(4, 3)
    assert torch.equal(switch(x, task=2), switch.per_task[1](x))
    with packnet.set_task(switch, 1):
        assert torch.equal(switch(x), switch.per_task[0](x))


def test_compiled_model_has_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    model, _ = _packed()
    packnet.set_task(model, 2)
    x = torch.randn(2, 3, 5, 5)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    assert torch.equal(compiled(x), model(x))
    assert counter.frame_count == 1


class _KeywordArgumentsNet(nn.Module):
    """A forward taking ``**kwargs``, as every Hugging Face model's does: it ignores a ``task`` among them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, **kwargs):
        return self.head(torch.relu(self.body(x)))


def test_a_task_argument_is_never_lost_in_a_forwards_keyword_arguments():
    """``model(x, task=t)`` runs task t in every packed module, also when the forward takes ``**kwargs`` (once it
    silently ran the active task): two trained tasks, task 1 active, ``task=2`` must give task 2's outputs."""
    torch.manual_seed(0)
    trainer = packnet.PackNet(_KeywordArgumentsNet(), prune_ratio=0.5, head="head")
    x = torch.randn(16, 6)
    for task in (1, 2):
        targets = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(task))
        trainer.learn_task([(x, targets)], lambda p: torch.optim.SGD(p, lr=0.5), epochs=3, show_progress=False)
    packed = packnet.compile_pack(trainer)
    with torch.no_grad():
        expected = {task: trainer.predict(x, task) for task in (1, 2)}
        assert not torch.equal(expected[1], expected[2])
        packnet.set_task(packed, 1)
        assert torch.equal(packed(x, task=2), expected[2])
        assert torch.equal(packed(x, task=torch.tensor([2] * 16)), expected[2])
        assert torch.equal(packed(x), expected[1])  # the call's task was for that call only
        with packnet.set_task(packed, 2):
            assert torch.equal(packed(x, task=1), expected[1]) and torch.equal(packed(x), expected[2])
        with pytest.raises(ValueError, match=r"task 3 is outside 1\.\.2"):
            packed(x, task=3)
        with pytest.raises(TypeError, match="task must be an int"):
            packed(x, task="2")


def test_task_switch_broadcasts_one_sample_and_merges_structured_outputs():
    """A per-task module called on a ``[1, S]`` buffer (a position embedding left per task) meets ``B`` tasks as
    ``B`` samples, each its task's result; tuple and dict outputs (a ModelOutput) are put back row by row."""
    torch.manual_seed(0)
    switch = packnet.TaskSwitch([nn.Embedding(6, 4), nn.Embedding(6, 4)])
    positions = torch.arange(5).unsqueeze(0)
    tasks = torch.tensor([2, 1, 2])
    out = switch(positions, task=tasks)
    assert out.shape == (3, 5, 4)
    for row, task in enumerate(tasks.tolist()):
        assert torch.equal(out[row], switch.per_task[task - 1](positions)[0])

    class Pair(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return {"double": x * self.scale, "parts": (x + self.scale, None)}

    pairs = packnet.TaskSwitch([Pair(1.0), Pair(2.0)])
    x = torch.randn(3, 2)
    merged = pairs(x, task=tasks)
    assert torch.equal(merged["double"], x * tasks[:, None].float())
    assert torch.equal(merged["parts"][0], x + tasks[:, None].float()) and merged["parts"][1] is None
    with pytest.raises(ValueError, match="2 tasks for an input of 3 rows"):
        pairs(x, task=torch.tensor([1, 2]))


def test_per_sample_task_tensors_spread_over_tokens():
    """A ``[B]`` task tensor for a ``[B, S, H]`` input is one task per sample; ``B * S`` entries are one per row; any
    other length names both options."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    packed = packnet.PackedLinear.from_dense(linear, magnitude_task_ids(linear.weight, 2, 0.5), 2, backend="reference")
    x = torch.randn(3, 5, 4)
    tasks = torch.tensor([2, 1, 2])
    per_sample = packed(x, task=tasks)
    for row, task in enumerate(tasks.tolist()):
        assert torch.equal(per_sample[row], packed(x[row], task=task))
    per_row = tasks.repeat_interleave(5)
    assert torch.equal(packed(x, task=per_row), per_sample)
    assert torch.equal(packed(x[:1], task=tasks), packed(x[:1].expand(3, 5, 4), task=tasks))
    with pytest.raises(ValueError, match=r"4 tasks for an input of shape \(3, 5, 4\): give one task per sample"):
        packed(x, task=torch.tensor([1, 2, 1, 2]))


def test_own_parameters_beside_packed_children_are_kept_per_task():
    """A module holding a parameter of its own beside a packed child reads its active task's value (the class keeps
    its name and forward); in a mixed batch it runs once per task present, so any use of the value is right."""
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x) * self.scale

    model = Scaled()
    packnet.swap_packed_(model, {"linear": magnitude_task_ids(model.linear.weight, 2, 0.5)}, 2, backend="reference")
    holder = packnet.modules.hold_task_state(model, {"scale": [torch.ones(3), torch.full((3,), 2.0)]})
    assert type(model).__name__ == "Scaled" and isinstance(holder, packnet.TaskParameters)
    assert "scale" not in dict(model.named_parameters()) and "packnet_task_state.scale" in model.state_dict()
    x = torch.randn(4, 4)
    with torch.no_grad():
        one, two = model(x, task=1), model(x, task=2)
        assert torch.equal(two, model.linear(x, task=2) * 2.0) and torch.equal(one, model.linear(x, task=1))
        tasks = torch.tensor([2, 1, 1, 2])
        mixed = model(x, task=tasks)
        for task in (1, 2):
            rows = tasks == task
            assert torch.equal(mixed[rows], model(x[rows], task=task))
