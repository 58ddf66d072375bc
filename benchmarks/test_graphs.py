"""The whole-model graphs benchmark (graphs.py) on the CPU: a quick run (tiny models, reference path) end to end,
what it records, and its report."""

from __future__ import annotations

import json

import graphs


def test_quick_run_checks_both_models_against_their_dense_twins(tmp_path, monkeypatch):
    probes = []
    monkeypatch.setattr(graphs, "reduce_overhead_probe", lambda *args: probes.append(args) or {"model": "probe"})
    assert graphs.main(["--out", str(tmp_path), "--quick"]) == 0
    data = json.loads((tmp_path / "graphs.json").read_text())
    rows = {row["model"]: row for row in data["results"]}
    assert list(rows) == ["resnet50", "bert_base_encoder", "probe"] and len(probes) == 1
    assert rows["resnet50"]["packed_layers"] == 54 and rows["bert_base_encoder"]["packed_layers"] == 12
    for name in ("resnet50", "bert_base_encoder"):
        row = rows[name]
        assert row["error"] < 1e-5 and row["packed_eager_ms"] > 0 and row["dense_eager_ms"] > 0
        assert row["eager_ratio"] == row["packed_eager_ms"] / row["dense_eager_ms"]
        assert "packed_graph_ms" not in row  # graphs need CUDA
    assert data["autotune"] is False
    report = graphs.write_report(tmp_path / "graphs.json")[0].read_text()
    assert "| resnet50 |" in report and "**CPU smoke run" in report


def test_bert_encoder_is_bert_base():
    model = graphs.models.BertEncoder()
    linears = [m for m in model.modules() if isinstance(m, graphs.torch.nn.Linear)]
    assert len(model.layers) == 12 and len(linears) == 72
    assert model.hidden == 768 and {tuple(m.weight.shape) for m in linears} == {(768, 768), (3072, 768), (768, 3072)}
    assert sum(p.numel() for p in model.parameters()) == 85_054_464  # BERT-base's encoder
