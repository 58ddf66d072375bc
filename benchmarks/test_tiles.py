"""The tile-map benchmark's byte model, on the CPU: a quick run end to end and the model on a map worked by hand."""

from __future__ import annotations

import json

import pytest
import tiles
import torch


def test_byte_model_of_a_hand_made_map():
    """Cells (32 x 32) of a 64 x 128 weight: task 1 owns the left half of the top row of cells, task 2 the rest of the
    top row, the bottom row is task 3's but for its last cell, task 1's. Tiles of 32 x 64 (two cells): top-left {1},
    top-right {2}, bottom-left {3}, bottom-right {1, 3}."""
    ids = torch.zeros(64, 128, dtype=torch.uint8)
    ids[:32, :64], ids[:32, 64:], ids[32:, :] = 1, 2, 3
    ids[32:, 96:] = 1
    cells = tiles.tile_map(ids)
    assert tiles.tile_reads(cells, 1, (32, 64)) == {"tiles_read": 0.5, "tiles_with_ids": 0.25}
    assert tiles.tile_reads(cells, 2, (32, 64)) == {"tiles_read": 0.75, "tiles_with_ids": 0.25}
    assert tiles.tile_reads(cells, 3, (32, 64)) == {"tiles_read": 1.0, "tiles_with_ids": 0.0}
    # One 64 x 64 tile spans both rows: {1, 3} and {1, 2, 3}; task 1 reads both, with ids.
    assert tiles.tile_reads(cells, 1, (64, 64)) == {"tiles_read": 1.0, "tiles_with_ids": 1.0}
    assert tiles.tile_reads(cells, 1, (32, 32)) == {"tiles_read": 3 / 8, "tiles_with_ids": 0.0}


def test_quick_run_writes_the_byte_model(tmp_path):
    assert tiles.main(["--out", str(tmp_path), "--quick"]) == 0
    data = json.loads((tmp_path / "tiles.json").read_text())
    assert set(data["byte_model"]) == set(tiles.TIMED)

    def model(packing, task, tile):
        return next(r for r in data["byte_model"][packing] if r["task"] == task and r["tile"] == list(tile))

    # 128 x 128 blocks, a third per task: tiles no larger than a block are single-owner, read by their owner's tasks.
    for task in (1, 2, 3):
        row = model("block128", task, (128, 128))
        assert row["tiles_read"] == pytest.approx(task / 3) and row["tiles_with_ids"] == 0
        assert row["predicted_vs_premasked"] == pytest.approx(task / 3)
    # Unstructured: every tile mixes owners; the latest task reads no ids, the others all of them.
    assert model("element", 3, (64, 64))["predicted_vs_premasked"] == 1.0
    assert model("element", 1, (64, 64))["predicted_vs_premasked"] == 1.5
    assert data["results"] == []  # timings only on a GPU


def test_warm_latency_rows_call_each_method_once_untimed(monkeypatch):
    """``--warm`` (the GPU session's compile pass) runs each method once and times and returns nothing."""
    calls = []
    real = tiles.masked_linear
    monkeypatch.setattr(tiles, "masked_linear", lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    monkeypatch.setattr(tiles.timing, "latency_row", lambda *args, **kwargs: pytest.fail("a warm run timed a call"))
    task_ids = tiles.packed_ids(torch.randn(64, 96), "block32")
    weight = torch.where(task_ids != 0, torch.randn(64, 96), 0.0).half()
    assert tiles.latency_rows(weight, task_ids, "block32", 2, 1, "cpu", 2, warm=True) == []
    assert [sorted(kwargs) for kwargs in calls] == [["free_weights_zero", "tile_map"], []]
