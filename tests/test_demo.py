"""The Split-Digits demo, end to end through the CLI."""

import contextlib
import io
import json
import logging
import subprocess
import sys
import warnings

import pytest

from packnet.cli import main as cli_main


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's JSON, its output directory, its printed report, and every warning and WARNING log it gave."""
    out = tmp_path_factory.mktemp("demo")
    handler, stdout = _Records(), io.StringIO()
    logging.getLogger("packnet").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            status = cli_main(["demo", "--out", str(out), "--json", str(out / "demo.json"), "--epochs", "4"])
    finally:
        logging.getLogger("packnet").removeHandler(handler)
    assert status == 0
    ours = [w for w in caught if "packnet" in w.filename or issubclass(w.category, UserWarning)]
    return json.loads((out / "demo.json").read_text()), out, stdout.getvalue(), ours, handler.records


@pytest.fixture(scope="module")
def demo_result(demo_run):
    return demo_run[0], demo_run[1]


def test_packnet_never_forgets_and_learns_every_task(demo_result):
    result, _ = demo_result
    matrix = result["accuracy"]["packnet"]
    for task, row in enumerate(matrix):
        assert row[:task] == [None] * task
        assert row[task:] == [row[task]] * (len(row) - task)  # the same accuracy at every later stage
        assert row[task] >= 0.9


def test_pack_is_saved_checked_and_timed(demo_result):
    result, out = demo_result
    assert (out / "split_digits.pack").is_file()
    assert len(result["checks"]) == 5
    for check in result["checks"]:
        assert check["unfused_equal_to_trainer"] and check["reloaded_equal_to_saved"]
        assert check["accuracy_pack"] == pytest.approx(check["accuracy_trained"], abs=0.01)
    assert result["size"]["pack_file_bytes"] < result["size"]["separate_networks_bytes"]
    assert {row["layer"] for row in result["timing"]["layers"]} == {
        "features.0",
        "features.3",
        "features.6",
        "features.10",
    }
    assert all(row["packed_ms"] > 0 for row in result["timing"]["layers"])
    assert result["folding"] == {"norms": 4, "folded": 4, "method": "fx"}


def test_finetuning_baseline_is_reported(demo_result):
    result, _ = demo_result
    matrix = result["accuracy"]["finetuning"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert all(0.0 <= acc <= 1.0 for row in matrix for acc in row if acc is not None)


def test_python_dash_m_entry_point_shows_help():
    completed = subprocess.run([sys.executable, "-m", "packnet", "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and "demo" in completed.stdout and "inspect" in completed.stdout


def test_block_pruning_and_the_mixed_batch_are_reported(demo_result):
    result, _ = demo_result
    blocks = result["accuracy"]["packnet_blocks"]
    for task, row in enumerate(blocks):
        assert row[task:] == [row[task]] * (len(row) - task)  # block pruning forgets nothing either
    element, block = result["tiles_touched"]["element"], result["tiles_touched"]["block"]
    assert element == [1.0] * 5  # unstructured: every cell holds some weight of task 1
    assert block == sorted(block) and block[0] < 0.8 and block[-1] == 1.0
    mixed = result["mixed_batch"]
    # One forward over every task's test images: each task's rows score exactly what the same pack scores on that
    # task alone (the demo also checks the rows bit for bit).
    assert mixed["accuracy_per_task"] == [check["accuracy_pack"] for check in result["checks"]]
    assert mixed["rows"] > 5 * 50


def test_a_vit_learns_the_five_tasks_and_is_packed_beside_the_cnn(demo_result):
    """The ViT (8 tokens of 8 pixels, nn.MultiheadAttention blocks) forgets nothing, is saved, reloaded bit for bit,
    stays close to the trained model, and serves all five tasks in one mixed batch, row for row its tasks' own runs."""
    result, out = demo_result
    matrix = result["accuracy"]["vit"]
    for task, row in enumerate(matrix):
        assert row[task:] == [row[task]] * (len(row) - task)
        assert row[task] >= 0.85
    vit = result["vit"]
    assert (out / "split_digits_vit.pack").is_file()
    assert vit["pack_file_bytes"] < 5 * vit["one_network_bytes"]
    assert all(check["reloaded_equal_to_saved"] and check["max_abs_diff_to_trainer"] <= 1e-4 for check in vit["checks"])
    assert vit["mixed_batch"]["accuracy_per_task"] == [check["accuracy_pack"] for check in vit["checks"]]


def test_the_demo_warns_of_nothing_a_user_must_act_on(demo_run):
    """The block run's full layers are expected (its layers are 1 to 9 blocks): the report explains them, no warning
    or log line does."""
    result, _, report, caught, records = demo_run
    assert [str(w.message) for w in caught] == [] and [r.getMessage() for r in records] == []
    starved = result["no_weights_of_their_own"]
    owners = {row["layer"]: row["owned"] for row in result["ownership_blocks"]}
    for task in range(1, 6):
        assert starved.get(str(task), []) == [layer for layer, owned in owners.items() if owned[task] == 0]
    assert "later tasks own no weight in some layers (task 2: features.0;" in report


def _tables(report: str) -> list[list[str]]:
    """The report's tables: runs of two or more indented lines, each starting with its header."""
    tables, current = [], []
    for line in report.splitlines() + [""]:
        if line.startswith("  ") and not line.startswith("  (") and not line.startswith("  mean"):
            current.append(line)
        else:
            if len(current) > 1:
                tables.append(current)
            current = []
    return tables


def test_the_report_tables_are_aligned(demo_run):
    _, _, report, _, _ = demo_run
    tables = _tables(report)
    assert len(tables) == 8  # 4 accuracy matrices (the CNN three ways, the ViT), the tiles, 2 ownerships, the timing
    for table in tables:
        assert len({len(line) for line in table}) == 1, table  # every column padded to one width
        header = table[0].split()
        assert header[0] in ("task", "layer"), table
    assert "packnet_blockstask" not in report and "PackNet, 32x32 block pruning:" in report
