"""``packnet bench``: where it writes (``--out``, by default ./packnet-bench, never the package or the checkout's
committed results), overwriting only with ``--force``, a short table with units on stdout, and Ctrl-C. The stages'
subprocesses are replaced by a fake that writes what each would (one real stage runs at the end)."""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

import pytest

from packnet import bench
from packnet.cli import main as cli_main

TODAY = datetime.date.today().isoformat()
HEADLINE_ROW = {"layer": "fc", "op": "linear", "dtype": "float16", "batch": 1, "task": 3, "ok": True, "bytes": 3}


def _benchmarks_json() -> dict:
    """A minimal pytest-benchmark JSON, as the layers and models stages write it."""
    info = {
        "kind": "model",
        "model": "tiny",
        "dtype": "fp32",
        "batch": 2,
        "task": 1,
        "method": "packnet",
        "weight_bytes": 4096,
    }
    entry = {"group": "tiny", "name": "test_model[tiny]", "params": {}, "extra_info": {**info, "median_ms": 1.5}}
    entry["stats"] = {"min": 1e-3, "median": 1.5e-3, "max": 2e-3, "rounds": 3}
    return {"machine_info": {}, "benchmarks": [entry]}


def _fake_suite(calls: list, headline_status: int = 0, interrupt: str | None = None):
    """Stands in for the stages' subprocesses (``bench._run_logged``): writes what each would write and a log line,
    records the command lines; ``interrupt`` names a stage that is stopped by Ctrl-C halfway through."""

    def run_logged(command, log_path, env):
        calls.append(command)
        log_path.write_text("output of the stage\n")
        if command[1].endswith("headline.py"):
            path = Path(command[command.index("--json") + 1])
            results = [
                {**HEADLINE_ROW, "method": method, "graph_ms": ms, "event_ms": 3 * ms, "graph_spread": 0.01}
                for method, ms in (("packnet", 0.0496), ("dense_masking", 0.0881), ("premasked", 0.0246))
            ]
            path.write_text(json.dumps({"device": {"device": "cuda", "gpu_name": "Test GPU"}, "results": results}))
            if interrupt == "headline":
                path.with_suffix(".tmp").write_text('{"device": ')  # a results file caught mid-rewrite
                raise KeyboardInterrupt
            return headline_status
        target = next(part for part in command if part.startswith("--benchmark-json="))
        Path(target.split("=", 1)[1]).write_text(json.dumps(_benchmarks_json()))
        if interrupt == "models":
            raise KeyboardInterrupt
        return 0

    return run_logged


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def fake_suite(monkeypatch):
    calls: list = []
    monkeypatch.setattr(bench, "_run_logged", _fake_suite(calls))
    monkeypatch.setattr(bench, "_gpu_name", lambda: "Test GPU 80GB")
    return calls


def _committed_results() -> list[str]:
    return sorted(path.name for path in (bench.BENCH_DIR / "results").iterdir())


def test_results_go_to_packnet_bench_under_the_current_directory(fake_suite, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _committed_results()
    assert _args().out == "packnet-bench"
    assert bench.run(_args("--stage", "models")) == 0
    stem = f"test-gpu-80gb-{TODAY}-models"
    assert sorted(path.name for path in (tmp_path / "packnet-bench").iterdir()) == [
        f"{stem}.json",
        f"{stem}.log",
        f"{stem}.md",
    ]
    assert _committed_results() == before  # nothing lands in the checkout's benchmarks/results/


def test_bench_runs_the_chosen_stages_and_reports_each(fake_suite, tmp_path):
    args = _args("--out", str(tmp_path), "--stage", "headline", "--stage", "models", "--budget-s", "300")
    assert bench.run(args) == 0
    assert fake_suite[0][1].endswith("headline.py") and fake_suite[0][-2:] == ["--budget-s", "300.0"]
    assert fake_suite[1][3].endswith("test_models.py") and len(fake_suite) == 2
    stem = f"test-gpu-80gb-{TODAY}"
    written = sorted(path.name for path in tmp_path.iterdir())
    expected = [f"{stem}-headline.{ext}" for ext in ("json", "log", "md", "png")]
    assert written == sorted(expected + [f"{stem}-models.{ext}" for ext in ("json", "log", "md")])
    assert (tmp_path / f"{stem}-headline.md").read_text().startswith("# Headline benchmark: Test GPU")


def test_an_earlier_run_is_overwritten_only_with_force(fake_suite, tmp_path, capsys):
    assert bench.run(_args("--out", str(tmp_path), "--stage", "models")) == 0
    results = tmp_path / f"test-gpu-80gb-{TODAY}-models.json"
    results.write_text("an earlier run")
    with pytest.raises(FileExistsError, match=rf"{results.name} exists .*; pass --force to overwrite it"):
        bench.run(_args("--out", str(tmp_path), "--stage", "models"))
    assert results.read_text() == "an earlier run" and len(fake_suite) == 1  # refused before running anything
    capsys.readouterr()
    assert cli_main(["bench", "--out", str(tmp_path), "--stage", "models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("packnet bench: --out ") and err.count("\n") == 1 and "--force" in err
    assert bench.run(_args("--out", str(tmp_path), "--stage", "models", "--force")) == 0
    assert json.loads(results.read_text())["benchmarks"]


def test_out_that_is_a_file_is_refused(fake_suite, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--out .*file exists and is not a directory"):
        bench.run(_args("--out", str(tmp_path / "file")))
    assert fake_suite == []


def test_stdout_is_a_short_table_with_units(fake_suite, tmp_path, capsys):
    assert bench.run(_args("--out", str(tmp_path), "--stage", "headline", "--stage", "models")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"packnet bench on Test GPU 80GB, results in {tmp_path}/"
    assert lines[1].split() == ["stage", "result", "measured", "wall", "time", "report"]
    assert re.fullmatch(r"headline +ok +1 cases +\d+\.\d s +\S+-headline\.md", lines[2])
    assert re.fullmatch(r"models +ok +1 benchmarks +\d+\.\d s +\S+-models\.md", lines[3])
    assert lines[5].startswith("headline, float16, task 3 of 3, time per call (CUDA-graph replay")
    assert lines[7].split() == ["fc", "1", "49.6", "us", "88.1", "us", "24.6", "us", "1.78x", "0.50x"]
    assert "nan" not in out.lower() and not re.search(r"\d\.\d{4,}", out)  # no bare long floats
    assert len({len(line) for line in lines[1:4]}) <= 3  # the stage table's columns line up (rstripped rows)
    assert [line.index("result") for line in lines[1:2]] == [lines[2].index("ok")]


def test_a_stage_cut_short_keeps_and_reports_what_it_measured(monkeypatch, tmp_path, capsys):
    """A headline stage stopped by a time limit (status 124) keeps and reports the cases it measured."""
    monkeypatch.setattr(bench, "_run_logged", _fake_suite([], headline_status=124))
    monkeypatch.setattr(bench, "_gpu_name", lambda: None)
    assert bench.run(_args("--out", str(tmp_path), "--stage", "headline")) == 124
    assert "| fc | float16 | 1 | 3 |" in (tmp_path / f"cpu-{TODAY}-headline.md").read_text()
    assert "cut short (exit 124)" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["headline", "models"])
def test_ctrl_c_removes_the_stage_in_progress_and_keeps_finished_ones(monkeypatch, tmp_path, capsys, stage):
    monkeypatch.setattr(bench, "_run_logged", _fake_suite([], interrupt=stage))
    monkeypatch.setattr(bench, "_gpu_name", lambda: None)
    first = "tiles" if stage == "headline" else "headline"
    if first == "tiles":
        monkeypatch.setattr(bench, "_run_script_stage", _tiles_only(bench._run_script_stage))
    status = cli_main(["bench", "--out", str(tmp_path), "--stage", first, "--stage", stage])
    assert status == 130
    assert capsys.readouterr().err == "packnet bench: interrupted (Ctrl-C); no partial file was left\n"
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left and all(f"-{first}." in name for name in left)  # the finished stage's files, none of the other's


def _tiles_only(real):
    """The tiles stage as a fake writing its byte model; other script stages as they are (the fake suite)."""

    def run_script_stage(stage, json_path, args, env):
        if stage != "tiles":
            return real(stage, json_path, args, env)
        json_path.write_text(json.dumps({"device": {}, "byte_model": {"element": [{}]}, "results": []}))
        json_path.with_suffix(".md").write_text("# tiles\n")
        return 0, json_path.with_suffix(".md")

    return run_script_stage


def test_a_real_stage_end_to_end(tmp_path, monkeypatch, capsys):
    """The tiles stage for real (its byte model runs anywhere in seconds), from another directory with the default
    --out: results, report and log in ./packnet-bench there, nothing new in the checkout."""
    monkeypatch.chdir(tmp_path)
    checkout = sorted(path.name for path in bench.REPO_ROOT.iterdir())
    assert cli_main(["bench", "--quick", "--stage", "tiles"]) == 0
    stem = tmp_path / "packnet-bench" / f"{bench.device_slug(bench._gpu_name())}-{TODAY}-tiles"
    assert json.loads(stem.with_suffix(".json").read_text())["byte_model"]
    assert stem.with_suffix(".md").is_file() and "reads" in stem.with_suffix(".log").read_text()
    assert sorted(path.name for path in bench.REPO_ROOT.iterdir()) == checkout
    out = capsys.readouterr().out
    assert re.search(r"^tiles +ok +\d+ byte-model rows +\d+\.\d s +packnet-bench/\S+-tiles\.md$", out, re.MULTILINE), (
        out
    )
