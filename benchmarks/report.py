"""Turn a pytest-benchmark JSON of this suite into a Markdown report and a latency-vs-batch plot.

The suite puts everything the report needs in each benchmark's ``extra_info``:

- every entry: ``kind`` (``"layer"``, ``"model"`` or ``"limit"``), ``device``, ``gpu_name``, ``torch``, ``triton``,
  ``cuda``;
- ``layer``: ``layer``, ``shape``, ``op``, ``dtype``, ``batch``, ``task``, ``method``, ``median_ms``, ``gbps``,
  ``tflops``, ``bound``, ``limit_fraction``, ``speedup_vs_dense_masking``, ``speedup_vs_premasked`` and, for
  ``compiled_masking``, ``inductor_launches`` and ``prologue_fused``;
- ``model``: ``model``, ``dtype``, ``batch``, ``task``, ``method``, ``median_ms``, ``weight_bytes``, ``peak_bytes``
  and the two speedups;
- ``limit``: ``copy_gbps`` and ``matmul_tflops`` (``{dtype: TFLOP/s}``).

A speedup is ``baseline_ms / method_ms`` measured side by side: above 1 the method is faster than the baseline.
Entries without ``median_ms`` fall back to pytest-benchmark's own median.

Usage: ``python benchmarks/report.py RESULTS.json [OUT.md] [OUT.png]``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("packnet.bench")

METHOD_ORDER = ("packnet", "packnet_nomask", "dense_masking", "torch_prune", "premasked", "compiled_masking")
METHOD_LABELS = {
    "packnet": "packnet",
    "packnet_nomask": "packnet, mask off",
    "dense_masking": "dense masking",
    "torch_prune": "torch prune",
    "premasked": "pre-masked dense",
    "compiled_masking": "compiled masking",
    "dense_copies": "3 dense copies",
}
DTYPE_ORDER = ("fp16", "bf16", "fp32")


def load(path: str | Path) -> dict:
    """The rows of a pytest-benchmark JSON, split by kind: ``{"layer": [...], "model": [...], "limit": [...],
    "meta": {...}}``. Each row is the entry's ``extra_info`` with ``median_ms`` filled in."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    rows: dict = {"layer": [], "model": [], "limit": [], "host": [], "meta": {"datetime": data.get("datetime")}}
    for entry in data.get("benchmarks", []):
        info = dict(entry.get("extra_info") or {})
        if info.get("median_ms") is None and entry.get("stats"):
            info["median_ms"] = entry["stats"]["median"] * 1e3
        info.setdefault("name", entry.get("name"))
        kind = info.get("kind")
        if kind in ("layer", "model", "limit"):
            rows[kind].append(info)
        elif info.get("host_us") is not None:  # benchmarks/test_host_path.py: the host side of one call
            rows["host"].append(info)
        else:
            log.warning("skipping benchmark %s: no 'kind' in extra_info", entry.get("name"))
        for key in ("device", "gpu_name", "torch", "triton", "cuda"):
            if info.get(key) is not None:
                rows["meta"].setdefault(key, info[key])
    return rows


def device_label(meta: dict) -> str:
    return meta.get("gpu_name") or meta.get("device") or "unknown device"


def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _number(value: float) -> str:
    """Three significant digits without an exponent: 1530, 15.3, 0.153."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _unstable(by_method: dict[str, dict]) -> str:
    """The methods of one group whose latency spread was flagged unstable, or ``-``."""
    return ", ".join(METHOD_LABELS.get(m, m) for m, row in by_method.items() if row.get("unstable")) or "-"


def on_gpu(meta: dict) -> bool:
    """Whether the results are GPU measurements (a CPU run times the reference path, not the kernels)."""
    return meta.get("device") == "cuda" or bool(meta.get("gpu_name"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _first_seen(rows: list[dict], key: str) -> dict[str, int]:
    """Rank of each value of ``key`` by first appearance: the suite's own order (models, then layers by family)."""
    order: dict[str, int] = {}
    for row in rows:
        order.setdefault(row[key], len(order))
    return order


def _dtype_rank(dtype: str) -> int:
    return DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else len(DTYPE_ORDER)


def markdown(rows: dict) -> str:
    """The report: device and versions, measured limits, one layer table (latency per method, packnet's speedups and
    fraction of the binding limit), the torch.compile fusion findings, and the model table."""
    meta = rows["meta"]
    lines = [f"# packnet benchmarks: {device_label(meta)}", ""]
    lines.append(
        f"torch {meta.get('torch', '?')}, triton {meta.get('triton') or 'n/a'}, CUDA {meta.get('cuda') or 'n/a'}"
        + (f", run {meta['datetime']}" if meta.get("datetime") else "")
        + "."
    )
    lines.append("")
    lines.append(
        "Latencies are medians in milliseconds (CUDA events on a GPU). A speedup is the baseline's time over the "
        "method's, both measured side by side in the same run: above 1 the method is faster. `spread` is packnet's "
        "interquartile range over its median; `unstable` lists the methods whose spread exceeds 10 % (their ratios "
        "are not to be trusted)."
    )
    if not on_gpu(meta):
        lines += [
            "",
            "**CPU run: these numbers are not kernel numbers.** Packed layers run the PyTorch reference here, not the "
            "Triton kernels; the run checks that the suite works. No plot is drawn.",
        ]

    if rows["limit"]:
        limit = rows["limit"][0]
        lines += ["", "## Measured limits", ""]
        table = [["device-to-device copy", f"{limit['copy_gbps']:.0f} GB/s (read + write)"]]
        for dtype, rate in sorted(limit.get("matmul_tflops", {}).items()):
            size = limit.get("matmul_size", "?")
            table.append([f"matmul {size}^3 {dtype}", f"{rate:.1f} TFLOP/s"])
        lines += _table(["limit", "value"], table)

    layer_rows = rows["layer"]
    if layer_rows:
        methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in layer_rows)]
        grouped: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for row in layer_rows:
            grouped[(row["layer"], row["dtype"], row["batch"], row["task"])][row["method"]] = row
        lines += ["", "## Layers", ""]
        lines.append(
            "packnet's speedups over dense masking and over pre-masked dense, its achieved rate and the fraction of "
            "the binding measured limit (copy bandwidth when memory-bound, the matmul rate when compute-bound)."
        )
        lines.append("")
        header = ["layer", "shape", "dtype", "batch", "task", *(METHOD_LABELS[m] + " ms" for m in methods)]
        header += ["vs dense masking", "vs pre-masked", "packnet rate", "of limit", "spread", "unstable"]
        table = []
        layer_rank = _first_seen(layer_rows, "layer")
        for key in sorted(grouped, key=lambda k: (layer_rank[k[0]], _dtype_rank(k[1]), k[2], k[3])):
            by_method = grouped[key]
            any_row = next(iter(by_method.values()))
            cells = [key[0], any_row.get("shape", ""), key[1], str(key[2]), str(key[3])]
            cells += [_ms(by_method[m]["median_ms"]) if m in by_method else "-" for m in methods]
            ours = by_method.get("packnet")
            if ours is not None:
                rate = (
                    f"{_number(ours['gbps'])} GB/s"
                    if ours.get("bound") == "memory"
                    else f"{_number(ours.get('tflops', 0))} TFLOP/s"
                )
                cells += [
                    _ratio(ours.get("speedup_vs_dense_masking")),
                    _ratio(ours.get("speedup_vs_premasked")),
                    rate if "gbps" in ours else "-",
                    f"{100 * ours['limit_fraction']:.0f} % ({ours['bound']})" if "limit_fraction" in ours else "-",
                    _percent(ours.get("spread")),
                ]
            else:
                cells += ["-"] * 5
            cells.append(_unstable(by_method))
            table.append(cells)
        lines += _table(header, table)

        compiled = [row for row in layer_rows if row["method"] == "compiled_masking"]
        if compiled:
            lines += ["", "## torch.compile of dense masking", ""]
            lines.append(
                "Whether Inductor fused the mask into the GEMM/conv as a prologue, and the kernels it launched."
            )
            lines.append("")
            table = [
                [
                    row["layer"],
                    row["dtype"],
                    str(row["batch"]),
                    "yes" if row.get("prologue_fused") else "no",
                    ", ".join(f"`{name}`" for name in row.get("inductor_launches", [])) or "-",
                    _ratio(row.get("speedup_vs_dense_masking")),
                ]
                for row in sorted(compiled, key=lambda r: (layer_rank[r["layer"]], _dtype_rank(r["dtype"]), r["batch"]))
            ]
            lines += _table(["layer", "dtype", "batch", "mask fused", "launches", "vs dense masking"], table)

    if rows["model"]:
        lines += ["", "## Models (3 tasks)", ""]
        lines.append(
            "Weight memory is what serving all three tasks keeps resident; peak is the extra memory one forward "
            "allocates (activations and any masked weight copies)."
        )
        lines.append("")
        table = []
        model_rank = _first_seen(rows["model"], "model")
        for row in sorted(
            rows["model"],
            key=lambda r: (
                model_rank[r["model"]],
                _dtype_rank(r["dtype"]),
                r["batch"],
                r["task"],
                _method_rank(r["method"]),
            ),
        ):
            peak = row.get("peak_bytes")
            table.append(
                [
                    row["model"],
                    row["dtype"],
                    str(row["batch"]),
                    str(row["task"]),
                    METHOD_LABELS.get(row["method"], row["method"]),
                    _ms(row["median_ms"]),
                    f"{row['weight_bytes'] / 2**20:.1f}",
                    "-" if peak is None else f"{peak / 2**20:.1f}",
                    _ratio(row.get("speedup_vs_dense_masking")),
                    _ratio(row.get("speedup_vs_premasked")),
                    _percent(row.get("spread")) + (" unstable" if row.get("unstable") else ""),
                ]
            )
        header = ["model", "dtype", "batch", "task", "method", "ms", "weights MiB", "peak MiB"]
        lines += _table([*header, "vs dense masking", "vs dense copies", "spread"], table)
    if rows.get("host"):
        lines += ["", "## Host path", ""]
        lines.append(
            "Host time of one packed call's checks and launch preparation, the Triton launch itself replaced by a"
            " no-op (`benchmarks/test_host_path.py`; median over 2000 calls)."
        )
        lines.append("")
        lines += _table(["benchmark", "host time"], [[r["name"], f"{r['host_us']:.1f} us"] for r in rows["host"]])
    return "\n".join(lines) + "\n"


def _method_rank(method: str) -> int:
    order = (*METHOD_ORDER, "dense_copies")
    return order.index(method) if method in order else len(order)


def plot(rows: dict, path: str | Path, dtype: str | None = None, task: int | None = None) -> Path:
    """Latency vs batch size per method (log-log), one panel per layer shape, for one dtype (default: the one with
    the most layers) and one task (default: the middle one of those measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_rows = rows["layer"]
    if not layer_rows:
        raise ValueError("no layer results to plot")
    if dtype is None:
        counts: dict[str, set] = defaultdict(set)
        for row in layer_rows:
            counts[row["dtype"]].add(row["layer"])
        dtype = max(counts, key=lambda d: (len(counts[d]), -_dtype_rank(d)))
    tasks = sorted({row["task"] for row in layer_rows if row["dtype"] == dtype})
    task = tasks[len(tasks) // 2] if task is None else task
    selected = [row for row in layer_rows if row["dtype"] == dtype and row["task"] == task]
    layer_rank = _first_seen(layer_rows, "layer")
    layers = sorted({row["layer"] for row in selected}, key=layer_rank.__getitem__)
    columns = min(4, len(layers))
    grid_rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(4.2 * columns, 3.4 * grid_rows), squeeze=False)
    for axis, layer in zip(axes.flat, layers, strict=False):
        shape = ""
        for method in METHOD_ORDER:
            points = sorted(
                (r["batch"], r["median_ms"]) for r in selected if r["layer"] == layer and r["method"] == method
            )
            if points:
                shape = next(r.get("shape", "") for r in selected if r["layer"] == layer)
                batches, latencies = zip(*points, strict=True)
                axis.plot(batches, latencies, marker="o", label=METHOD_LABELS[method])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"{layer}\n{shape}", fontsize=9)
        axis.set_xlabel("batch")
        axis.set_ylabel("ms")
        axis.grid(True, which="both", alpha=0.3)
    for axis in list(axes.flat)[len(layers) :]:
        axis.set_visible(False)
    figure.suptitle(f"{device_label(rows['meta'])}: latency vs batch, {dtype}, task {task}", fontsize=11)
    # The legend goes under the panels, so that it never covers the title or a curve.
    # Methods measured on some layers only (compiled masking) still get their legend entry.
    legend: dict = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.tight_layout(rect=(0, 0.45 / (3.4 * grid_rows), 1, 1))
    figure.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(6, len(legend)), frameon=False)
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(json_path: str | Path, md_path: str | Path, png_path: str | Path | None) -> dict:
    """Write the Markdown report, and the plot when ``png_path`` is given and there are GPU layer results (a CPU
    run's latencies are the reference path's: a plot of them would be noise)."""
    rows = load(json_path)
    Path(md_path).write_text(markdown(rows), encoding="utf-8")
    written = {"md": Path(md_path)}
    if png_path is not None and rows["layer"] and on_gpu(rows["meta"]):
        written["png"] = plot(rows, png_path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    json_path = Path(argv[0])
    md_path = Path(argv[1]) if len(argv) > 1 else json_path.with_suffix(".md")
    png_path = Path(argv[2]) if len(argv) > 2 else json_path.with_suffix(".png")
    for path in write_report(json_path, md_path, png_path).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
