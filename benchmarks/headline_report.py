"""Markdown table, target check and plot of a ``benchmarks/headline.py`` result.

    python benchmarks/headline_report.py RESULTS.json        # writes RESULTS.md and RESULTS.png beside it

Speeds compare pure GPU times (CUDA-graph replay), which is what the kernels control; the event times (what one eager
call costs, host launch included) and the packed call's host time sit beside them. The targets are the GPU issue's,
checked on the fp16 rows; a CPU result gets the table alone (its numbers are not kernel numbers).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

METHOD_LABELS = {
    "packnet": "packed kernel",
    "packnet_tilemap": "packed kernel, tile map",
    "packnet_compact": "packed kernel, tile map, compact ids (v8)",
    "packnet_nomask": "kernel, no predicate",
    "dense_masking": "dense masking (mask precomputed)",
    "dense_masking_ids": "dense masking (mask from ids)",
    "torch_prune": "torch.nn.utils.prune",
    "premasked": "pre-masked cuBLAS/cuDNN",
}
HOST_TARGET_US = 15.0


def load(path: str | Path) -> dict:
    """``{"device", "limits", "cases": {(layer, dtype, batch, task): {method: row}}}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    cases: dict = defaultdict(dict)
    for row in data["results"]:
        cases[(row["layer"], row["dtype"], row["batch"], row["task"])][row["method"]] = row
    return {"device": data["device"], "limits": data.get("limits"), "cases": dict(cases), "raw": data}


def _us(row: dict | None, key: str) -> str:
    value = None if row is None else row.get(key)
    return "-" if value is None else f"{value * 1e3:.1f}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def targets(cases: dict) -> list[tuple[str, str, bool | None]]:
    """``(target, measured, met)`` per GPU-issue target, from the fp16 rows' graph times (host time: event rows)."""
    checks: dict = defaultdict(list)
    last_task = max((task for (_, _, _, task) in cases), default=0)
    for (layer, dtype, batch, task), methods in cases.items():
        if dtype != "float16" or "packnet" not in methods:
            continue
        packed = methods["packnet"].get("graph_ms")
        masking = _ratio(methods.get("dense_masking", {}).get("graph_ms"), packed)
        premasked = _ratio(methods.get("premasked", {}).get("graph_ms"), packed)
        op = methods["packnet"]["op"]
        name = f"{layer} b{batch} t{task}"
        if op == "linear" and batch <= 256:
            checks["linear batch <= 256: >= 2.0x dense masking"].append((name, masking, 2.0))
            checks["linear batch <= 256: >= 0.6x pre-masked"].append((name, premasked, 0.6))
            if task == last_task:
                # What a packed layer runs: with its tile map the latest task reads no ids.
                mapped = methods.get("packnet_tilemap", methods["packnet"]).get("graph_ms")
                latest = _ratio(methods.get("premasked", {}).get("graph_ms"), mapped)
                checks["linear batch <= 256, latest task: >= 0.9x pre-masked"].append((name, latest, 0.9))
        elif op == "linear":
            checks["linear batch >= 4096: >= 0.85x pre-masked"].append((name, premasked, 0.85))
        elif batch == 1:
            checks["conv batch 1: >= 1.5x dense masking"].append((name, masking, 1.5))
        else:
            checks["conv batch 64: >= 0.8x pre-masked"].append((name, premasked, 0.8))
        host = methods["packnet"].get("host_us")
        checks[f"host time per packed call <= {HOST_TARGET_US:.0f} us"].append(
            (name, None if host is None else HOST_TARGET_US / host, 1.0)
        )
    results = []
    for target, entries in checks.items():
        measured = [(name, value) for name, value, _ in entries if value is not None]
        if not measured:
            results.append((target, "not measured", None))
            continue
        threshold = entries[0][2]
        worst_name, worst = min(measured, key=lambda item: item[1])
        met = sum(value >= threshold for _, value in measured)
        if target.startswith("host"):
            summary = f"{met}/{len(measured)} cases; worst {worst_name}: {HOST_TARGET_US / worst:.0f} us"
        else:
            summary = f"{met}/{len(measured)} cases; worst {worst_name}: {worst:.2f}x"
        results.append((target, summary, met == len(measured)))
    return results


def markdown(report: dict) -> str:
    device, limits, cases = report["device"], report["limits"], report["cases"]
    lines = [
        f"# Headline benchmark: {device.get('gpu_name') or 'CPU'}",
        "",
        f"torch {device.get('torch')}, triton {device.get('triton')}, CUDA {device.get('cuda')}, "
        f"driver {device.get('driver', '-')}, {device.get('sm_count', '-')} SMs.",
    ]
    if limits:
        rates = ", ".join(
            f"{name} {rate:.0f} TFLOP/s" if rate >= 10 else f"{name} {rate:.2g} TFLOP/s"
            for name, rate in limits["matmul_tflops"].items()
        )
        lines.append(
            f"Measured limits: copy {limits['copy_gbps']:.0f} GB/s (read + write); {limits['matmul_size']}^3 matmul "
            f"{rates}."
        )
    on_gpu = device.get("device") == "cuda"
    # A CPU run has no CUDA graphs: its method columns give one eager call's time instead.
    key = "graph_ms" if on_gpu else "event_ms"
    if not on_gpu:
        lines += ["", "**CPU run: these numbers are not kernel numbers** (the reference path); no targets, no plot."]
    timed = (
        "Times in microseconds: pure GPU time from CUDA-graph replay; `event` is one eager call between CUDA events "
        "(host launch included), `host` the host time to issue one packed call."
        if on_gpu
        else "Times in microseconds, each one eager call's wall-clock time on the CPU (no CUDA graphs, no host column)."
    )
    lines += [
        "",
        f"{timed} `vs masking` and `vs pre-masked` are speeds relative to the packed kernel's (> 1 means the packed "
        "kernel is faster). `spread` is the packed time's interquartile range over its median; a method whose time "
        "spreads more than 10 % is listed as `unstable` under notes (its ratios are not to be trusted), and a method "
        "whose check against the float64 reference failed as `FAILED`.",
        "",
        "| layer | dtype | batch | task | packed | spread | packed event | host | with tile map | no predicate "
        "| masking | masking (ids) | prune | pre-masked | vs masking | vs pre-masked | packed GB/s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    unstable_rows = 0
    for (layer, dtype, batch, task), methods in cases.items():
        packed = methods.get("packnet", {})
        failed = [m for m, row in methods.items() if not row.get("ok")]
        unstable = [m for m, row in methods.items() if row.get("unstable")]
        unstable_rows += bool(unstable)
        graph = packed.get("graph_ms")
        quoted = packed.get(key)
        spread = packed.get("graph_spread" if graph else "event_spread")
        gbps = None if not graph else packed["bytes"] / graph / 1e6
        host = packed.get("host_us")
        notes = "; ".join(
            [f"FAILED: {', '.join(failed)}"] * bool(failed) + [f"unstable: {', '.join(unstable)}"] * bool(unstable)
        )
        lines.append(
            f"| {layer} | {dtype} | {batch} | {task} | {_us(packed, key)} "
            f"| {'-' if spread is None else f'{100 * spread:.0f} %'} | {_us(packed, 'event_ms')} "
            f"| {_fmt(host, 0)} | {_us(methods.get('packnet_tilemap'), key)} "
            f"| {_us(methods.get('packnet_nomask'), key)} "
            f"| {_us(methods.get('dense_masking'), key)} | {_us(methods.get('dense_masking_ids'), key)} "
            f"| {_us(methods.get('torch_prune'), key)} | {_us(methods.get('premasked'), key)} "
            f"| {_fmt(_ratio(methods.get('dense_masking', {}).get(key), quoted))} "
            f"| {_fmt(_ratio(methods.get('premasked', {}).get(key), quoted))} | {_fmt(gbps, 0)} | {notes} |"
        )
    if unstable_rows:
        lines += ["", f"{unstable_rows} of {len(cases)} rows have an unstable method (spread over 10 %)."]
    skipped = report["raw"].get("skipped") or []
    if skipped:
        lines += ["", f"{len(skipped)} cases were not run (time budget)."]
    if device.get("device") == "cuda":
        lines += ["", "## Targets (fp16, graph times)", "", "| target | measured | met |", "|---|---|---|"]
        for target, summary, met in targets(cases):
            lines.append(f"| {target} | {summary} | {'-' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, png_path: str | Path) -> Path:
    """Speed relative to pre-masked cuBLAS/cuDNN (graph times) per fp16 case of the last task, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    last_task = max(task for (_, _, _, task) in cases)
    keys = [key for key in cases if key[1] == "float16" and key[3] == last_task] or [
        key for key in cases if key[3] == last_task
    ]
    methods = [m for m in ("packnet", "dense_masking", "torch_prune", "packnet_nomask") if m != "premasked"]
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(keys)), 4.8))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        values = []
        for key in keys:
            row, ceiling = cases[key].get(method, {}), cases[key].get("premasked", {})
            values.append(_ratio(ceiling.get("graph_ms"), row.get("graph_ms")) or 0.0)
        positions = [i + (index - (len(methods) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(positions, values, width, label=METHOD_LABELS[method])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.67, color="gray", linestyle="--", linewidth=0.8, label="byte floor of a 3-byte element (0.67)")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{layer}\nb{batch}" for layer, _, batch, _ in keys], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed relative to pre-masked (higher is better)")
    ax.set_title(f"{report['device'].get('gpu_name')}, {keys[0][1] if keys else ''}, task {last_task} (graph replay)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)


def write_report(json_path: str | Path) -> list[Path]:
    report = load(json_path)
    md_path = Path(json_path).with_suffix(".md")
    md_path.write_text(markdown(report), encoding="utf-8")
    written = [md_path]
    if report["device"].get("device") == "cuda" and report["cases"]:
        written.append(plot(report, Path(json_path).with_suffix(".png")))
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for path in write_report(argv[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
