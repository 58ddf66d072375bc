"""State outside the packed layers (norms, unpacked layers, bare parameters and buffers) is saved, and save_pack
checks what it wrote before putting it in place."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.pruning import magnitude_task_ids

NUM_TASKS = 3


class ScaleAndOffset(nn.Module):
    """A user module with a bare parameter, a persistent buffer and a non-persistent buffer."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))
        self.register_buffer("offset", torch.zeros(channels, 1, 1))
        self.register_buffer("sign", torch.tensor(-1.0), persistent=False)

    def forward(self, x):
        return self.sign * (x * self.scale + self.offset)


def _conv_model(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), middle, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def _linear_model(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), middle, nn.ReLU(), nn.Linear(16, 4))


# Every module type a pack holds outside its packed layers, each in a model whose input it shapes: (factory, input).
MODULE_TYPES = {
    "BatchNorm2d": (lambda: _conv_model(nn.BatchNorm2d(8)), (3, 4, 4)),
    "BatchNorm1d": (lambda: _linear_model(nn.BatchNorm1d(16)), (12,)),
    "LayerNorm": (lambda: _linear_model(nn.LayerNorm(16)), (12,)),
    "GroupNorm": (lambda: _conv_model(nn.GroupNorm(2, 8)), (3, 4, 4)),
    "InstanceNorm2d": (lambda: _conv_model(nn.InstanceNorm2d(8, affine=True, track_running_stats=True)), (3, 4, 4)),
    "PReLU": (lambda: _linear_model(nn.PReLU(16)), (12,)),
    "unpacked Linear": (lambda: _linear_model(nn.Linear(16, 16)), (12,)),
    "depthwise Conv2d": (lambda: _conv_model(nn.Conv2d(8, 8, 3, padding=1, groups=8)), (3, 4, 4)),
    "bare parameter and buffers": (lambda: _conv_model(ScaleAndOffset(8)), (3, 4, 4)),
}


def _randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and floating buffer values unlike a fresh module's (running variances stay positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and tensor.dim():
                values = torch.rand(tensor.shape, generator=generator) + 0.5
                tensor.copy_(values if "var" in name else values - 1.0)
    return model.eval()


def _swapped(make, seed: int = 0) -> nn.Module:
    """The model with its first and last layers packed (3 tasks); every other module stays as it is."""
    model = _randomize_(make(), seed)
    names = ["0", str(len(model) - 1)]
    ids = {name: magnitude_task_ids(model.get_submodule(name).weight, NUM_TASKS, 0.5) for name in names}
    return packnet.swap_packed_(model, ids, NUM_TASKS, backend="reference")


def _outputs(model, probe):
    results = []
    with torch.no_grad():
        for task in range(1, NUM_TASKS + 1):
            with packnet.set_task(model, task):
                results.append(model(probe))
    return results


@pytest.mark.parametrize("kind", sorted(MODULE_TYPES))
def test_swapped_model_saves_and_loads_every_module_state(kind, tmp_path):
    make, input_shape = MODULE_TYPES[kind]
    model = _swapped(make)
    probe = torch.randn(5, *input_shape, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "model.pack"
    meta = packnet.save_pack(model, path, probe=probe)
    unpacked = {key for key in model.state_dict() if not key.startswith(("0.", f"{len(model) - 1}."))}
    assert set(meta["shared_keys"]) == unpacked and unpacked
    # A fresh skeleton of other values: everything the outputs depend on must come from the file.
    loaded = packnet.load_pack(path, model=_randomize_(make(), seed=7), fuse=False, backend="reference")
    for task, (want, got) in enumerate(zip(_outputs(model, probe), _outputs(loaded, probe), strict=True), 1):
        assert torch.equal(want, got), (kind, task)
    assert packnet.read_pack(path).shared_state.keys() == unpacked


def test_shared_batchnorm_is_folded_on_load_and_saved_back_as_shared(tmp_path):
    model = _swapped(MODULE_TYPES["BatchNorm2d"][0])
    probe = torch.randn(4, 3, 4, 4)
    path = tmp_path / "model.pack"
    meta = packnet.save_pack(model, path, probe=probe)
    fused = packnet.load_pack(path, model=_conv_model(nn.BatchNorm2d(8)), backend="reference")
    assert fused.packnet_folding == {"norms": 1, "folded": 1, "method": "fx"}
    assert fused[0].scale is not None and fused[0].relu and isinstance(fused[1], nn.Identity)
    for want, got in zip(_outputs(model, probe), _outputs(fused, probe), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = packnet.save_pack(fused, tmp_path / "again.pack")  # no probe: the first save recorded its shape
    assert again["sha256"] == meta["sha256"] and again["shared_keys"] == meta["shared_keys"]


def test_per_task_layer_norm_from_the_trainer_round_trips(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    trainer = packnet.PackNet(net, head="3")
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        data = [(torch.randn(8, 6, generator=generator), torch.randint(0, 2, (8,), generator=generator))]
        trainer.learn_task(data, lambda params: torch.optim.SGD(params, lr=0.5), 2, show_progress=False)
    assert trainer.input_shape == (6,)
    path = tmp_path / "model.pack"
    meta = packnet.save_pack(packnet.compile_pack(trainer), path)  # probe drawn from the recorded input shape
    assert meta["input_shape"] == [6] and "1.weight" in meta["task_keys"] and meta["shared_keys"] == []
    loaded = packnet.load_pack(path, model=nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)))
    x = torch.randn(4, 6)
    for task in (1, 2):
        with packnet.set_task(loaded, task):
            assert torch.equal(loaded(x), trainer.predict(x, task))


def test_save_without_a_probe_or_input_shape_says_what_to_pass(tmp_path):
    model = _swapped(MODULE_TYPES["LayerNorm"][0])
    with pytest.raises(ValueError, match=r"records no input shape; pass probe=<a small batch of inputs>"):
        packnet.save_pack(model, tmp_path / "model.pack")
    with pytest.raises(
        TypeError, match=r"probe must be a tensor \(a batch of inputs\) or a dict of keyword inputs .*, got list"
    ):
        packnet.save_pack(model, tmp_path / "model.pack", probe=[1.0])
    assert os.listdir(tmp_path) == []


def test_a_probe_the_model_does_not_accept_is_named(tmp_path):
    model = _swapped(MODULE_TYPES["LayerNorm"][0])
    with pytest.raises(
        ValueError, match=r"running the model on a probe input of shape \(2, 5\) and dtype torch.float32"
    ):
        packnet.save_pack(model, tmp_path / "model.pack", probe=torch.randn(2, 5))
    assert os.listdir(tmp_path) == []


def test_hand_built_packed_model_cannot_be_checked(tmp_path):
    model = nn.Sequential(packnet.PackedLinear(4, 2, NUM_TASKS))
    with pytest.raises(ValueError, match="records no plain architecture"):
        packnet.save_pack(model, tmp_path / "model.pack", probe=torch.randn(2, 4))


def _drop_shared_state(pack):
    pack.shared_state.clear()
    return pack


def _shift_a_running_mean(pack):
    pack.shared_state["1.running_mean"] = pack.shared_state["1.running_mean"] + 1.0
    return pack


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # What save_pack did before shared state was written: the file lacks the BatchNorm and cannot load.
        (_drop_shared_state, r"the file written does not read back \(shared state does not match|missing"),
        (_shift_a_running_mean, r"task 1's outputs on the probe input differ"),
    ],
    ids=["state_left_out", "state_changed"],
)
def test_a_pack_that_does_not_reproduce_the_model_is_not_saved(tmp_path, monkeypatch, damage, message):
    model = _swapped(MODULE_TYPES["BatchNorm2d"][0])
    path = tmp_path / "model.pack"
    original = packnet.pack.pack_from_model
    monkeypatch.setattr("packnet.pack.pack_from_model", lambda model: damage(original(model)))
    with pytest.raises(packnet.PackSaveError, match=message):
        packnet.save_pack(model, path, probe=torch.randn(2, 3, 4, 4))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_pack_file_mode_follows_the_umask(tmp_path, umask):
    model = _swapped(MODULE_TYPES["LayerNorm"][0])
    previous = os.umask(umask)
    try:
        packnet.save_pack(model, tmp_path / "model.pack", probe=torch.randn(2, 12))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "model.pack").st_mode) == 0o666 & ~umask


def test_save_into_a_missing_directory_names_it(tmp_path):
    model = _swapped(MODULE_TYPES["LayerNorm"][0])
    with pytest.raises(FileNotFoundError, match=r"directory .*nowhere does not exist"):
        packnet.save_pack(model, tmp_path / "nowhere" / "model.pack", probe=torch.randn(2, 12))


def test_the_reported_case_swapped_small_cnn_saves_and_loads_without_a_skeleton(tmp_path):
    """swap_packed_ then save_pack on a model with BatchNorm used to write a pack missing every BatchNorm."""
    model = _randomize_(packnet.small_cnn(width=4), seed=2)
    names = ["features.0", "features.3", "features.6", "features.10"]
    ids = {name: magnitude_task_ids(model.get_submodule(name).weight, NUM_TASKS, 0.5) for name in names}
    packnet.swap_packed_(model, ids, NUM_TASKS, backend="reference")
    meta = packnet.save_pack(model, tmp_path / "model.pack")  # the builder recorded the input shape
    assert meta["input_shape"] == [1, 8, 8] and len(meta["shared_keys"]) == 4 * 5 + 2  # 4 BatchNorms and the head
    loaded = packnet.load_pack(tmp_path / "model.pack", fuse=False, backend="reference")
    probe = torch.randn(6, 1, 8, 8)
    for want, got in zip(_outputs(model, probe), _outputs(loaded, probe), strict=True):
        assert torch.equal(want, got)
