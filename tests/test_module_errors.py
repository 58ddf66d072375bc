"""Bad inputs at the module level: each raises an error that names the problem.

A task outside 1..num_tasks, an input of the wrong dtype, shape or device, and a pack loaded into a model of another
architecture. The dtype and device checks run on both kernel backends (Triton under the interpreter on the CPU).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

import packnet
import packnet_kernels
from packnet.models import Classifier
from packnet.pruning import magnitude_task_ids

NUM_TASKS = 3
HAS_KERNELS = all(importlib.util.find_spec(f"packnet_kernels.{name}") is not None for name in ("linear", "conv2d"))
BACKENDS = [
    "reference",
    pytest.param(
        "triton",
        marks=[
            pytest.mark.interpreter,
            pytest.mark.skipif(not HAS_KERNELS, reason="the Triton kernels are not written yet"),
        ],
    ),
]


def _device(backend: str) -> str:
    """Where a module of ``backend`` computes: the Triton backend on the GPU when there is one (without one, the
    CPU under the interpreter), the reference on the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _linear(backend="reference", dtype=torch.float32, device="cpu", num_tasks=NUM_TASKS) -> packnet.PackedLinear:
    torch.manual_seed(0)
    dense = nn.Linear(6, 5, device=device, dtype=dtype)
    return packnet.PackedLinear.from_dense(
        dense, magnitude_task_ids(dense.weight, num_tasks, 0.5), num_tasks, backend=backend
    )


def _conv(backend="reference", dtype=torch.float32, device="cpu") -> packnet.PackedConv2d:
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, 3, padding=1, device=device, dtype=dtype)
    return packnet.PackedConv2d.from_dense(
        dense, magnitude_task_ids(dense.weight, NUM_TASKS, 0.5), NUM_TASKS, backend=backend
    )


def _model(backend="reference") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    ids = {name: magnitude_task_ids(model.get_submodule(name).weight, NUM_TASKS, 0.5) for name in ("0", "3")}
    return packnet.swap_packed_(model, ids, NUM_TASKS, backend=backend)


@pytest.fixture(scope="module")
def mlp_pack(tmp_path_factory):
    """A 2-task pack of packnet.mlp(in_features=6, hidden=8, depth=1) and its path."""
    torch.manual_seed(0)
    trainer = packnet.PackNet(packnet.mlp(in_features=6, hidden=8, depth=1), head="head")
    data = [(torch.randn(8, 6), torch.randint(0, 2, (8,)))]
    for _ in range(2):
        trainer.learn_task(data, lambda params: torch.optim.SGD(params, lr=0.1), 1, show_progress=False)
    path = tmp_path_factory.mktemp("packs") / "mlp.pack"
    packnet.save_pack(packnet.compile_pack(trainer), path)
    return path


# ------------------------------------------------------------------------------------------------ task out of range
@pytest.mark.parametrize("task", [0, -1, NUM_TASKS + 1, 255, 256])
@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv2d"])
def test_task_outside_the_range_names_the_range(make, task):
    layer = make()
    x = torch.randn(2, 6) if isinstance(layer, packnet.PackedLinear) else torch.randn(2, 4, 4, 4)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}: task {task} is outside 1\.\.3 \(this model holds 3 tasks\)"):
        layer(x, task=task)
    with pytest.raises(ValueError, match=rf"task {task} is outside 1\.\.3"):
        packnet.set_task(layer, task)
    assert layer.active_task is None  # a refused set_task changes nothing


def test_one_task_model_says_task_singular():
    with pytest.raises(ValueError, match=r"task 2 is outside 1\.\.1 \(this model holds 1 task\)"):
        _linear(num_tasks=1)(torch.randn(1, 6), task=2)


@pytest.mark.parametrize(
    ("task", "shown"),
    [(True, "bool True"), (2.0, "float 2.0"), ("2", "str '2'"), (torch.tensor(2), "Tensor tensor\\(2\\)")],
    ids=["bool", "float", "str", "tensor"],
)
def test_task_of_the_wrong_type_names_the_type(task, shown):
    model = _model()
    with pytest.raises(TypeError, match=rf"task must be an int, got {shown}"):
        packnet.set_task(model, task)
    with pytest.raises(TypeError, match=rf"PackedLinear: task must be an int, got {shown}"):
        model[3](torch.randn(1, 96), task=task)


def test_no_active_task_says_how_to_set_one():
    with pytest.raises(RuntimeError, match=r"PackedConv2d: no active task; call packnet\.set_task\(model, t\)"):
        _model()(torch.randn(1, 4, 4, 4))
    switch = packnet.TaskSwitch([nn.Identity(), nn.Identity()])
    with pytest.raises(RuntimeError, match="TaskSwitch: no active task"):
        switch(torch.zeros(1))
    with pytest.raises(ValueError, match=r"TaskSwitch: task 3 is outside 1\.\.2"):
        switch(torch.zeros(1), task=3)


def test_set_task_is_all_or_nothing_across_modules():
    """A model whose modules hold different task counts: a task some cannot run is refused before any change."""
    one_task = packnet.PackedLinear.from_dense(nn.Linear(5, 2), torch.ones(2, 5, dtype=torch.uint8), 1)
    model = nn.Sequential(_linear(num_tasks=3), nn.ReLU(), one_task)
    with pytest.raises(ValueError, match=r"task 2 is outside 1\.\.1"):
        packnet.set_task(model, 2)
    assert model[0].active_task is None and model[2].active_task is None


def test_loaded_pack_task_errors(mlp_pack):
    model = packnet.load_pack(mlp_pack)
    with pytest.raises(ValueError, match=r"task 3 is outside 1\.\.2 \(this model holds 2 tasks\)"):
        packnet.set_task(model, 3)
    pack = packnet.read_pack(mlp_pack)
    with pytest.raises(ValueError, match=r"task must be in 1\.\.2, got 3"):
        pack.task_state_dict(3)
    with pytest.raises(ValueError, match=r"task must be in 1\.\.2, got 0"):
        packnet.export_task_state_dict(model, 0)


def test_trainer_task_errors():
    trainer = packnet.PackNet(packnet.mlp(in_features=6, hidden=8, depth=1), head="head")
    trainer.learn_task([(torch.randn(4, 6), torch.randint(0, 2, (4,)))], torch.optim.SGD, 1, show_progress=False)
    with pytest.raises(ValueError, match=r"task must be a finished task in 1\.\.1, got 2"):
        trainer.predict(torch.randn(1, 6), 2)
    with pytest.raises(TypeError, match=r"task must be an int, got bool True"):
        trainer.predict(torch.randn(1, 6), True)
    with pytest.raises(TypeError, match=r"task must be an int, got str '1'"):
        trainer.task_state_dict("1")


# ------------------------------------------------------------------------------------------------ dtype, shape, device
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64], ids=lambda d: str(d).removeprefix("torch.")
)
def test_input_of_the_wrong_dtype_names_both_dtypes(backend, dtype):
    device = _device(backend)
    linear, conv = _linear(backend, device=device), _conv(backend, device=device)
    with pytest.raises(
        TypeError, match=rf"masked_linear: input dtype {dtype} does not match weight dtype torch\.float32"
    ):
        linear(torch.ones(2, 6, dtype=dtype, device=device), task=1)
    with pytest.raises(
        TypeError, match=rf"masked_conv2d: input dtype {dtype} does not match weight dtype torch\.float32"
    ):
        conv(torch.ones(1, 4, 4, 4, dtype=dtype, device=device), task=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_pack_rejects_float32_input(mlp_pack, backend):
    device = _device(backend)
    model = packnet.load_pack(mlp_pack, backend=backend)
    model.to(device=device, dtype=torch.bfloat16)
    with packnet.set_task(model, 1):
        assert model(torch.randn(2, 6, dtype=torch.bfloat16, device=device)).dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"input dtype torch\.float32 does not match weight dtype torch\.bfloat16"):
            model(torch.randn(2, 6, device=device))


@pytest.mark.interpreter
@pytest.mark.skipif(not HAS_KERNELS, reason="the Triton kernels are not written yet")
def test_triton_backend_names_the_dtypes_it_supports():
    device = _device("triton")
    layer = _linear("triton", dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match=r"weight dtype torch\.float64 is not supported; allowed: torch\.float32"):
        layer(torch.ones(2, 6, dtype=torch.float64, device=device), task=1)
    assert _linear("reference", dtype=torch.float64)(torch.ones(2, 6, dtype=torch.float64), task=1).shape == (2, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_of_the_wrong_shape_names_the_expected_size(backend):
    device = _device(backend)
    linear, conv = _linear(backend, device=device), _conv(backend, device=device)
    with pytest.raises(ValueError, match=r"masked_linear: input's last dimension must equal in_features=6, got shape"):
        linear(torch.ones(2, 7, device=device), task=1)
    with pytest.raises(ValueError, match=r"masked_conv2d: input has 3 channels but weight expects in/groups=4"):
        conv(torch.ones(1, 3, 4, 4, device=device), task=1)
    with pytest.raises(ValueError, match=r"masked_conv2d: input must be 4-D \[N, C, H, W\], got shape \(4, 4, 4\)"):
        conv(torch.ones(4, 4, 4, device=device), task=1)


def test_input_on_another_device_names_both_devices():
    """The meta device stands in for a second device, so this runs without a GPU."""
    with pytest.raises(ValueError, match=r"masked_linear: weight is on cpu but the input is on meta"):
        _linear()(torch.ones(2, 6, device="meta"), task=1)
    with pytest.raises(ValueError, match=r"masked_conv2d: weight is on cpu but the input is on meta"):
        _conv()(torch.ones(1, 4, 4, 4, device="meta"), task=1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_input_on_the_gpu_for_a_cpu_module_and_back(backend):
    if backend == "triton" and not HAS_KERNELS:
        pytest.skip("the Triton kernels are not written yet")
    with pytest.raises(ValueError, match=r"masked_linear: weight is on cpu but the input is on cuda:0"):
        _linear(backend)(torch.ones(2, 6, device="cuda"), task=1)
    with pytest.raises(ValueError, match=r"masked_conv2d: weight is on cpu but the input is on cuda:0"):
        _conv(backend)(torch.ones(1, 4, 4, 4, device="cuda"), task=1)
    on_gpu = _linear(backend, device="cuda")
    if backend == "triton":  # forced Triton on a CPU input: the interpreter may be on, so either message is right
        match = r"weight is on cuda:0 but the input is on cpu|backend='triton' needs CUDA tensors"
    else:
        match = r"masked_linear: weight is on cuda:0 but the input is on cpu"
    with pytest.raises((ValueError, RuntimeError), match=match):
        on_gpu(torch.ones(2, 6), task=1)


# ------------------------------------------------------------------------------------------------ another architecture
def test_pack_of_another_builder(mlp_pack):
    with pytest.raises(
        packnet.PackFormatError,
        match=r"the pack is for architecture \{'builder': 'mlp'.* the model given is .*small_cnn",
    ):
        packnet.load_pack(mlp_pack, model=packnet.small_cnn())


def test_pack_of_the_same_builder_with_other_sizes(mlp_pack):
    with pytest.raises(packnet.PackFormatError, match=r"the pack is for architecture .*'hidden': 8.* 'hidden': 9"):
        packnet.load_pack(mlp_pack, model=packnet.mlp(in_features=6, hidden=9, depth=1))


def _unregistered(features: nn.Module, head: nn.Module) -> nn.Module:
    """A model of mlp's classes built by hand: no architecture spec, so only the fingerprint (format 2) or the
    layer and state checks (format 1) can tell it apart."""
    return Classifier(features, head)


_FP = r"the model given is not the pack's architecture: "


@pytest.mark.parametrize(
    ("skeleton", "fingerprint_message", "state_message"),
    [
        (
            lambda: _unregistered(nn.Sequential(nn.Linear(6, 9), nn.ReLU()), nn.Linear(9, 2)),
            _FP + r"module 'features\.0' \(Linear\) holds weight \(8, 6\), bias \(8,\) in the pack but weight"
            r" \(9, 6\), bias \(9,\) in the model",
            r"pack layer 'features\.0' has weight shape \(8, 6\) but the model's is \(9, 6\): the pack is for another",
        ),
        (
            lambda: _unregistered(nn.Sequential(nn.ReLU(), nn.Linear(6, 8)), nn.Linear(8, 2)),
            _FP + r"module 'features\.0' is a Linear in the pack but a ReLU in the model",
            r"pack layer 'features\.0' is a ReLU in the model, not Linear/Conv2d",
        ),
        (
            lambda: _unregistered(nn.Sequential(), nn.Linear(8, 2)),
            _FP + r"the pack's module 'features\.0' \(Linear\) is missing from the model",
            r"pack layer 'features\.0' is not a module",
        ),
        (
            lambda: _unregistered(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)), nn.Linear(8, 2)),
            _FP + r"module 'features\.1' is a ReLU in the pack but a BatchNorm1d in the model",
            r"task 1's state does not match the model: missing \['features\.1\.bias', ",
        ),
        (
            lambda: _unregistered(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 3)),
            _FP + r"module 'head' \(Linear\) holds weight \(2, 8\), bias \(2,\) in the pack but weight \(3, 8\)",
            r"task 1's 'head\.bias' has shape \(2,\) but the model's is \(3,\): the pack is for another architecture",
        ),
        (
            lambda: _unregistered(nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU()), nn.Linear(8, 2)),
            _FP + r"module 'features\.0' \(Linear\) holds weight \(8, 6\), bias \(8,\) in the pack but weight"
            r" \(8, 6\) in the model",
            r"task 1's state does not match the model: missing \[\], unexpected \['features\.0\.bias'\]",
        ),
    ],
    ids=["layer_shape", "layer_kind", "layer_missing", "extra_state", "head_shape", "no_bias"],
)
def test_pack_into_a_skeleton_of_another_architecture(mlp_pack, skeleton, fingerprint_message, state_message):
    with pytest.raises(packnet.PackFormatError, match=fingerprint_message):
        packnet.load_pack(mlp_pack, model=skeleton())
    with pytest.raises(packnet.PackFormatError, match=fingerprint_message):
        packnet.build_packed_model(packnet.read_pack(mlp_pack), skeleton())
    # A format-1 pack has no fingerprint: the layer and state checks still refuse the skeleton by name.
    pack = packnet.read_pack(mlp_pack)
    pack.fingerprint = None
    with pytest.raises(packnet.PackFormatError, match=state_message):
        packnet.build_packed_model(pack, skeleton())


def test_skeleton_of_another_class_is_refused_before_anything_is_copied(mlp_pack, monkeypatch):
    class Lookalike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.head = nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.features(x))

    def no_copy(*args, **kwargs):
        raise AssertionError("a tensor was copied before the skeleton was checked")

    monkeypatch.setattr(torch.Tensor, "copy_", no_copy)
    monkeypatch.setattr("packnet.pack.copy.deepcopy", no_copy)
    with pytest.raises(
        packnet.PackFormatError, match=_FP + r"module <root> is a Classifier in the pack but a Lookalike"
    ):
        packnet.load_pack(mlp_pack, model=Lookalike())


def test_the_matching_skeleton_loads(mlp_pack):
    """The skeletons above differ from this one in one respect each, so they fail for the reason they name."""
    model = packnet.load_pack(mlp_pack, model=_unregistered(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 2)))
    with packnet.set_task(model, 2):
        assert model(torch.randn(3, 6)).shape == (3, 2)


def test_packed_layer_refuses_tensors_of_another_shape():
    layer = _linear()
    with pytest.raises(ValueError, match=r"PackedLinear: expected weight and task_ids of shape \(5, 6\), got \(6, 5\)"):
        layer.load_packed(torch.zeros(6, 5), torch.zeros(6, 5, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"PackedLinear: task_ids must be torch\.uint8, got torch\.int64"):
        layer.load_packed(torch.zeros(5, 6), torch.zeros(5, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"PackedLinear: expected 3 per-task biases"):
        layer.load_packed(torch.zeros(5, 6), torch.zeros(5, 6, dtype=torch.uint8), [torch.zeros(5)])


# ---------------------------------------------------------------------------------------------- inputs a user mixes up
def test_numpy_input_is_a_type_error_that_says_how_to_convert(mlp_pack):
    import numpy as np

    model = packnet.load_pack(mlp_pack)
    with pytest.raises(
        TypeError,
        match=r"^layer 'features\.0' \(PackedLinear\) of Classifier: input must be a torch\.Tensor, got numpy\.ndarray;"
        r" convert it with torch\.from_numpy\(x\)$",
    ):
        model(np.zeros((2, 6), dtype=np.float32), task=1)
    with pytest.raises(TypeError, match=r"^PackedLinear: input must be a torch\.Tensor, got list$"):
        _linear()([[0.0] * 6], task=1)
    with pytest.raises(TypeError, match=r"^masked_conv2d: x must be a torch\.Tensor, got numpy\.ndarray; convert it"):
        conv = _conv()
        packnet_kernels.masked_conv2d(np.zeros((1, 4, 4, 4)), conv.weight, conv.task_ids, 1)


def test_a_wrong_input_size_names_the_layer_and_the_callers_shape(tmp_path):
    """A 16x16 image for a model trained on 8x8 ones: the convs take it, the first linear layer cannot; the message
    names that layer, the shape the caller gave and the one the model takes."""
    torch.manual_seed(0)
    trainer = packnet.PackNet(packnet.small_cnn(width=2), head="head")
    trainer.learn_task([(torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4,)))], torch.optim.SGD, 1, show_progress=False)
    model = packnet.compile_pack(trainer)
    with pytest.raises(
        ValueError,
        match=r"^layer 'features\.10' \(PackedLinear\) of Classifier: input's last dimension must equal in_features=16,"
        r" got shape \(4, 64\); the model was called with an input of shape \(4, 1, 16, 16\) and takes"
        r" \(batch, 1, 8, 8\)$",
    ):
        model(torch.zeros(4, 1, 16, 16), task=1)
    with pytest.raises(
        ValueError,
        match=r"^layer 'features\.0' \(PackedConv2d\) of Classifier: input has 3 channels but weight expects .*; the"
        r" model was called with an input of shape \(4, 3, 8, 8\) and takes \(batch, 1, 8, 8\)$",
    ):
        with packnet.set_task(model, 1):
            model(torch.zeros(4, 3, 8, 8))
    # Errors that are not about the input's size name the layer, nothing more.
    with pytest.raises(TypeError, match=r"^layer 'features\.0' \(PackedConv2d\) of Classifier: input dtype"):
        model(torch.zeros(4, 1, 8, 8, dtype=torch.float64), task=1)
    # The model still runs afterwards: the failed calls left nothing behind.
    assert model(torch.zeros(4, 1, 8, 8), task=1).shape == (4, 2)
    from packnet.modules import _model_calls

    assert _model_calls() == []


@pytest.mark.parametrize(("task", "shown"), [("2", "str '2'"), (2.0, "float 2.0"), (True, "bool True")])
def test_export_task_of_the_wrong_type_is_a_type_error(mlp_pack, task, shown):
    model = packnet.load_pack(mlp_pack)
    with pytest.raises(TypeError, match=rf"task must be an int in 1\.\.2, got {shown}"):
        packnet.export_task_state_dict(model, task)
    with pytest.raises(TypeError, match=rf"task must be an int in 1\.\.2, got {shown}"):
        packnet.read_pack(mlp_pack).task_state_dict(task)
