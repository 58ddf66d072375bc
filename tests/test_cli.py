"""The packnet command line: version, help, argument checks, export safety, output checks before training,
progress bars only on a terminal."""

from __future__ import annotations

import argparse
import io
import os
import stat

import pytest
import torch

import packnet
from packnet.cli import build_parser
from packnet.cli import main as cli_main


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory):
    """A 2-task small_cnn pack (4 BatchNorms)."""
    torch.manual_seed(0)
    trainer = packnet.PackNet(packnet.small_cnn(width=2), head="head")
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))]
    for _ in range(2):
        trainer.learn_task(data, lambda params: torch.optim.SGD(params, lr=0.1), 1, show_progress=False)
    path = tmp_path_factory.mktemp("cli") / "model.pack"
    packnet.save_pack(packnet.compile_pack(trainer), path)
    return path


def _export(pack_path, out, *extra) -> int:
    return cli_main(["export", str(pack_path), "--task", "2", "--out", str(out), *extra])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"packnet {packnet.__version__}"


def test_every_argument_has_help():
    parsers, missing = [build_parser()], []
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
                missing += [f"{parser.prog} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["demo", "--finetune-epochs", "-1"], "argument --finetune-epochs: must be 0 or more, got -1"),
        (["demo", "--prune-ratio", "1"], r"argument --prune-ratio: must be in [0, 1), got 1.0"),
        (["export", "x.pack", "--task", "0", "--out", "y.safetensors"], "argument --task: must be at least 1, got 0"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_export_refuses_to_overwrite_its_input(pack_path, capsys):
    before = pack_path.read_bytes()
    assert _export(pack_path, pack_path, "--force") == 2
    assert "is the input pack itself; refusing to overwrite it" in capsys.readouterr().err
    assert pack_path.read_bytes() == before


def test_export_overwrites_only_with_force(pack_path, tmp_path, capsys):
    out = tmp_path / "task2.safetensors"
    out.write_bytes(b"keep me")
    assert _export(pack_path, out) == 2
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert _export(pack_path, out, "--force") == 0
    from safetensors.torch import load_file

    assert load_file(out).keys() == packnet.read_pack(pack_path).task_state_dict(2).keys()


@pytest.mark.parametrize("name", ["task2.pt", "task2.pth", "task2.bin", "task2.pack"])
def test_export_refuses_a_name_that_promises_another_format(pack_path, tmp_path, capsys, name):
    assert _export(pack_path, tmp_path / name) == 2
    assert "name it .safetensors" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_export_warns_on_an_unusual_extension(pack_path, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="packnet"):
        assert _export(pack_path, tmp_path / "task2.weights") == 0
    assert "does not end in .safetensors" in caplog.text


def test_export_into_a_missing_directory_is_one_line(pack_path, tmp_path, capsys):
    assert _export(pack_path, tmp_path / "missing" / "task2.safetensors") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_export_into_a_read_only_directory_is_one_line(pack_path, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert _export(pack_path, locked / "task2.safetensors") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err


def test_exported_file_mode_follows_the_umask(pack_path, tmp_path):
    previous = os.umask(0o027)
    try:
        assert _export(pack_path, tmp_path / "task2.safetensors") == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "task2.safetensors").st_mode) == 0o640


@pytest.mark.parametrize("bad", ["out_is_a_file", "json_is_a_directory", "out_under_a_file"])
def test_demo_checks_its_outputs_before_training(tmp_path, monkeypatch, capsys, bad):
    def must_not_train(*args, **kwargs):
        raise AssertionError("the demo started training before checking its outputs")

    monkeypatch.setattr("packnet.demo.run_demo", must_not_train)
    (tmp_path / "file").write_text("x")
    argv = {
        "out_is_a_file": ["--out", str(tmp_path / "file")],
        "json_is_a_directory": ["--out", str(tmp_path / "out"), "--json", str(tmp_path)],
        "out_under_a_file": ["--out", str(tmp_path / "file" / "out")],
    }[bad]
    assert cli_main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("packnet demo: ") and err.count("\n") == 1


def test_no_progress_reaches_the_demo(tmp_path, monkeypatch):
    seen = {}

    def fake_run_demo(out_dir, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr("packnet.demo.run_demo", fake_run_demo)
    assert cli_main(["demo", "--out", str(tmp_path), "--no-progress"]) == 2
    assert seen["show_progress"] is False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_only_on_a_terminal(monkeypatch, terminal):
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    trainer = packnet.PackNet(packnet.mlp(in_features=4, hidden=4, depth=1), head="head")
    data = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    trainer.learn_task(data, lambda params: torch.optim.SGD(params, lr=0.1), 2, show_progress=True)
    assert ("task 1 train" in stream.getvalue()) is terminal


def test_inspect_reports_folded_norms(pack_path, capsys):
    assert cli_main(["inspect", str(pack_path)]) == 0
    out = capsys.readouterr().out
    assert "folded norms: 4 of 4 BatchNorms fold on load (torch.fx graph)" in out
    assert "shared state: 0 tensors   per-task state: 23 tensors per task" in out
