"""The packnet command line: version, help, argument checks, export safety, output checks before training,
progress bars only on a terminal."""

from __future__ import annotations

import argparse
import errno
import io
import os
import signal
import stat
import subprocess
import sys
import time

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


# ------------------------------------------------------------------------------------------------ bad input, one line
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["export", "x.pack", "--task", "two", "--out", "y.safetensors"],
            "argument --task: must be a whole number, got 'two'",
        ),
        (["demo", "--epochs", "ten"], "argument --epochs: must be a whole number, got 'ten'"),
        (["demo", "--finetune-epochs", "1.5"], "argument --finetune-epochs: must be a whole number, got '1.5'"),
        (["demo", "--prune-ratio", "half"], "argument --prune-ratio: must be a number in [0, 1), got 'half'"),
    ],
)
def test_words_where_numbers_belong_get_a_readable_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "_int" not in err and "_ratio" not in err


def _one_error_line(capsys, prefix: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith(prefix) and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_inspect_a_missing_file_says_so(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "missing.pack")]) == 2
    err = _one_error_line(capsys, "packnet inspect: ")
    assert "no pack at" in err and "missing.pack: no such file" in err and "invalid pack" not in err


def test_inspect_a_text_file_named_pack_says_it_is_not_a_pack(tmp_path, capsys):
    (tmp_path / "notes.pack").write_text("these are my notes\n")
    assert cli_main(["inspect", str(tmp_path / "notes.pack")]) == 2
    err = _one_error_line(capsys, "packnet inspect: ")
    assert "notes.pack: not a pack (nor any safetensors file): it starts with b'these are my'" in err
    assert "header length" not in err


def test_inspect_into_a_closed_pipe_ends_quietly(pack_path):
    """`packnet inspect PACK | head -1`: the reader goes away before packnet is done writing."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "packnet", "inspect", str(pack_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=_env(),
        )
    finally:
        os.close(write_end)
    assert completed.returncode == 141 and completed.stderr == ""


def test_export_refuses_a_directory_before_any_warning(pack_path, tmp_path, capsys, caplog):
    with caplog.at_level("WARNING", logger="packnet"):
        assert _export(pack_path, tmp_path) == 2
    err = _one_error_line(capsys, "packnet export: ")
    assert f"--out {tmp_path} is a directory; give a file name, e.g. {tmp_path}/task.safetensors" in err
    assert caplog.records == []


def test_export_of_a_task_the_pack_does_not_hold(pack_path, tmp_path, capsys):
    assert cli_main(["export", str(pack_path), "--task", "3", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert f"--task 3: {pack_path} holds tasks 1..2" in _one_error_line(capsys, "packnet export: ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "is not writable"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    ],
    ids=["permissions", "read_only_file_system"],
)
def test_export_into_an_unwritable_directory_names_the_target(
    pack_path, tmp_path, capsys, monkeypatch, failure, message
):
    """A read-only directory (also for root, who may write anywhere) or file system: the error names the file asked
    for, never the hidden temporary file it would have been written through."""
    out = tmp_path / "task2.safetensors"

    def refuse(prefix="", suffix="", dir=None):
        failure.filename = os.path.join(dir, f"{prefix}abc123{suffix}")
        raise failure

    monkeypatch.setattr("packnet.pack.tempfile.mkstemp", refuse)
    assert _export(pack_path, out) == 2
    err = _one_error_line(capsys, "packnet export: ")
    assert f"cannot write {out}" in err and message in err and ".packnet-" not in err and ".tmp" not in err


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_in_the_demo_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("packnet.demo.run_demo", interrupted)
    assert cli_main(["demo", "--out", str(tmp_path / "out")]) == 130
    assert _one_error_line(capsys, "packnet demo: interrupted (Ctrl-C)")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_writing_an_export_leaves_no_file(pack_path, tmp_path, monkeypatch, capsys):
    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", half_written)
    assert _export(pack_path, tmp_path / "task2.safetensors") == 130
    assert _one_error_line(capsys, "packnet export: interrupted (Ctrl-C)")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_writing_the_demo_json_leaves_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("packnet.demo.run_demo", lambda out_dir, **kwargs: {"figures": 1})
    monkeypatch.setattr("packnet.demo.format_report", lambda result: "report")

    def half_written(path, text):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr("packnet.cli._write_text", half_written)
    assert cli_main(["demo", "--out", str(tmp_path), "--json", str(tmp_path / "demo.json")]) == 130
    assert _one_error_line(capsys, "packnet demo: interrupted (Ctrl-C)")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_a_real_demo_run(tmp_path):
    """SIGINT to `python -m packnet demo` a moment after it started (importing, or training): one line on stderr,
    exit status 130, and no file in its output directory."""
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "packnet",
            "demo",
            "--out",
            str(out),
            "--json",
            str(out / "demo.json"),
            "--epochs",
            "50",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        # The test runner may have been started with SIGINT ignored (a background job): give the demo the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr == "packnet demo: interrupted (Ctrl-C); no partial file was left\n" and stdout == ""
    assert not out.exists() or os.listdir(out) == []


def _env() -> dict:
    """The environment of a `python -m packnet` child: this checkout first on the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
