"""Compiling, saving, loading and exporting packs."""

import errno
import json
import os
import struct

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.cli import main as cli_main

NUM_TASKS = 3


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    trainer = packnet.PackNet(packnet.small_cnn(width=4), prune_ratio=0.5, head="head")
    generator = torch.Generator().manual_seed(1)
    for _ in range(NUM_TASKS):
        data = [(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 2, (16,), generator=generator))]
        trainer.learn_task(data, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 2, 1, show_progress=False)
    probe = torch.randn(12, 1, 8, 8, generator=generator)
    outputs = {task: trainer.predict(probe, task) for task in range(1, NUM_TASKS + 1)}
    return trainer, probe, outputs


def _outputs(model, probe):
    results = {}
    with torch.no_grad():
        for task in range(1, NUM_TASKS + 1):
            with packnet.set_task(model, task):
                results[task] = model(probe)
    return results


def test_unfused_pack_equals_the_trained_model_bit_for_bit(trained):
    trainer, probe, expected = trained
    model = packnet.compile_pack(trainer, fuse=False)
    for task, output in _outputs(model, probe).items():
        assert torch.equal(output, expected[task]), task


def test_fused_pack_folds_batchnorm_and_relu(trained):
    trainer, probe, expected = trained
    model = packnet.compile_pack(trainer, fuse=True)
    convs = [m for m in model.modules() if isinstance(m, packnet.PackedConv2d)]
    assert len(convs) == 3 and all(conv.scale is not None and conv.relu for conv in convs)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in model.modules())
    for task, output in _outputs(model, probe).items():
        torch.testing.assert_close(output, expected[task], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_saved_and_loaded_pack_gives_identical_outputs(trained, tmp_path, fuse, dtype):
    trainer, probe, _ = trained
    model = packnet.compile_pack(trainer, dtype=dtype, fuse=fuse)
    path = tmp_path / "model.pack"
    meta = packnet.save_pack(model, path)
    assert meta["num_tasks"] == NUM_TASKS and meta["dtype"] == str(dtype).removeprefix("torch.")
    assert os.listdir(tmp_path) == ["model.pack"]  # the temporary file was renamed, nothing left behind
    loaded = packnet.load_pack(path, fuse=fuse)
    probe = probe.to(dtype)
    before, after = _outputs(model, probe), _outputs(loaded, probe)
    for task in before:
        assert torch.equal(before[task], after[task]), task
    # Saving the loaded model writes the same tensors (fused epilogues keep the unfused parameters).
    assert packnet.save_pack(loaded, tmp_path / "again.pack")["sha256"] == meta["sha256"]


def test_pack_is_smaller_than_separate_networks(trained, tmp_path):
    trainer, _, _ = trained
    path = tmp_path / "model.pack"
    packnet.save_pack(packnet.compile_pack(trainer), path)
    dense = sum(t.numel() * t.element_size() for t in packnet.small_cnn(width=4).state_dict().values())
    assert os.path.getsize(path) < NUM_TASKS * dense


def test_export_task_state_dict_runs_in_the_plain_model(trained):
    trainer, probe, expected = trained
    model = packnet.compile_pack(trainer)
    plain = packnet.small_cnn(width=4).eval()
    for task in range(1, NUM_TASKS + 1):
        plain.load_state_dict(packnet.export_task_state_dict(model, task))
        with torch.no_grad():
            assert torch.equal(plain(probe), expected[task])
    assert packnet.export_task_state_dict(model, 2).keys() == plain.state_dict().keys()


def test_user_model_needs_its_skeleton(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 7), nn.ReLU())
            self.head = nn.Linear(7, 2)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    trainer = packnet.PackNet(Net(), head="head")
    data = [(torch.randn(8, 5), torch.randint(0, 2, (8,)))]
    for _ in range(2):
        trainer.learn_task(data, lambda p: torch.optim.Adam(p, lr=1e-2), 1, show_progress=False)
    path = tmp_path / "user.pack"
    packnet.save_pack(packnet.compile_pack(trainer), path)
    with pytest.raises(packnet.PackFormatError, match="records no architecture spec; pass the model skeleton"):
        packnet.load_pack(path)
    loaded = packnet.load_pack(path, model=Net())
    x = torch.randn(3, 5)
    with packnet.set_task(loaded, 2):
        assert torch.equal(loaded(x), trainer.predict(x, 2))
    with pytest.raises(
        packnet.PackFormatError, match="not the pack's architecture: module <root> is a Net in the pack"
    ):
        packnet.load_pack(path, model=packnet.mlp(in_features=5, hidden=9, depth=1))


def test_load_errors_name_the_problem(trained, tmp_path):
    trainer, _, _ = trained
    path = tmp_path / "model.pack"
    packnet.save_pack(packnet.compile_pack(trainer), path)
    with pytest.raises(packnet.PackFormatError, match=r"the pack is for architecture .*'width': 4.*'width': 8"):
        packnet.load_pack(path, model=packnet.small_cnn(width=8))
    unnamed = packnet.small_cnn(width=8)
    del unnamed.packnet_arch
    with pytest.raises(
        packnet.PackFormatError, match=r"'features.0' \(Conv2d\) holds weight \(4, 1, 3, 3\) in the pack"
    ):
        packnet.load_pack(path, model=unnamed)
    with pytest.raises(FileNotFoundError, match=r"no pack at .*missing\.pack: no such file"):
        packnet.load_pack(tmp_path / "missing.pack")
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a pack file"):
        packnet.load_pack(tmp_path)
    (tmp_path / "empty.pack").write_bytes(b"")
    with pytest.raises(packnet.PackFormatError, match="too short"):
        packnet.load_pack(tmp_path / "empty.pack")
    header = json.dumps({"__metadata__": {"other": "tool"}}).encode()
    (tmp_path / "plain.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(packnet.PackFormatError, match="not a packnet pack"):
        packnet.load_pack(tmp_path / "plain.safetensors")


def test_failed_save_keeps_the_previous_file(trained, tmp_path, monkeypatch):
    trainer, _, _ = trained
    path = tmp_path / "model.pack"
    model = packnet.compile_pack(trainer)
    packnet.save_pack(model, path)
    original = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("packnet.pack.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        packnet.save_pack(model, path)
    assert path.read_bytes() == original and os.listdir(tmp_path) == ["model.pack"]


def test_cli_inspect_and_export(trained, tmp_path, capsys):
    trainer, probe, expected = trained
    path = tmp_path / "model.pack"
    packnet.save_pack(packnet.compile_pack(trainer), path)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tasks: 3" in out and "features.0" in out and "features.10" in out
    exported = tmp_path / "task2.safetensors"
    assert cli_main(["export", str(path), "--task", "2", "--out", str(exported)]) == 0
    from safetensors.torch import load_file

    plain = packnet.small_cnn(width=4).eval()
    plain.load_state_dict(load_file(exported))
    with torch.no_grad():
        assert torch.equal(plain(probe), expected[2])
    (tmp_path / "junk.pack").write_bytes(b"\x00" * 32)
    assert cli_main(["inspect", str(tmp_path / "junk.pack")]) == 2
    assert "invalid pack" in capsys.readouterr().err


def test_save_on_a_read_only_file_system_names_the_file_asked_for(trained, tmp_path, monkeypatch):
    """The error of a directory that refuses new files names the pack's path, not the hidden temporary file."""
    trainer, _, _ = trained

    def read_only(prefix="", suffix="", dir=None):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, f"{prefix}x1y2{suffix}"))

    monkeypatch.setattr("packnet.pack.tempfile.mkstemp", read_only)
    path = tmp_path / "model.pack"
    with pytest.raises(OSError, match=r"^cannot write .*model\.pack: read-only file system$") as error:
        packnet.save_pack(packnet.compile_pack(trainer), path)
    assert error.value.errno == errno.EROFS and ".packnet-" not in str(error.value)


def test_a_file_of_another_kind_is_not_a_pack(tmp_path):
    notes = tmp_path / "notes.pack"
    notes.write_text("a text file, renamed\n")
    with pytest.raises(packnet.PackFormatError, match=r"notes\.pack: not a pack \(nor any safetensors file\)"):
        packnet.read_pack(notes)
