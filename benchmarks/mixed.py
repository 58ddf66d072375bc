"""Mixed-task batches: one launch for rows of several tasks against splitting the batch by task.

    python benchmarks/mixed.py (--out DIR | --json FILE) [--quick] [--budget-s SECONDS] [--warm]
    python benchmarks/mixed.py model --out DIR      (the byte-and-step model's predictions: mixed_model.py)

A transformer MLP up projection (4096 -> 11008, fp16) packed for 8 tasks (each owning an eighth of the weights, by
magnitude). A batch of B rows (B = 8, 64, 256) spread over k tasks (k = 1, 2, 4, 8; rows dealt round-robin, then
shuffled) is served by:

- ``mixed``: ``masked_linear(x, W, ids, row_tasks)``, one launch whatever the mix;
- ``one_task``: the same B rows all of the latest task, one launch (what a mixed batch should cost about as much as);
- ``split_by_task``: one packed call per task present on its rows, scattered back (what a server does today);
- ``dense_masking_by_task``: the same split with ``F.linear(x_t, W * mask_t)``, masks precomputed;
- at B = 8, 64 and 256, ``mixed_ids4`` and ``one_task_ids4``: ``mixed`` and ``one_task`` on the 4-bit compact ids
  a packed layer of 8 tasks keeps on a GPU (``compact_task_ids``; the fields loop, and for mixes of many tasks the
  slots, each task's mask compiled in).

Each output is checked against the float64 reference first. On a GPU, times are CUDA-graph replays (pure GPU time)
and single eager calls between CUDA events; on the CPU only the checks and event times of the reference path run (not
kernel numbers). The JSON is rewritten after every case; ``write_report`` (run by ``packnet bench --stage mixed``)
turns it into Markdown with the issue's targets.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import headline  # noqa: E402
import timing  # noqa: E402

from packnet.pruning import magnitude_task_ids  # noqa: E402
from packnet_kernels import compact_task_ids, masked_linear, task_mask  # noqa: E402
from packnet_kernels.reference import masked_linear_ref  # noqa: E402

NUM_TASKS = 8
# Task t keeps 1 / (9 - t) of what reaches it: an eighth of the weight each, none free.
EQUAL_SHARES = tuple((NUM_TASKS - task) / (NUM_TASKS + 1 - task) for task in range(1, NUM_TASKS + 1))
BATCHES = (8, 64, 256)
TASK_COUNTS = (1, 2, 4, 8)
LAYER = (11008, 4096)
QUICK_LAYER = (96, 80)
QUICK_BATCHES = (8, 13)
# Batches that also run on 4-bit compact ids (each compiles the grouped kernel with its per-task loops).
COMPACT_BATCHES = (8, 13, 64, 256)
COMPACT_BITS = 4


def row_tasks_for(batch: int, task_count: int, seed: int) -> torch.Tensor:
    """``[batch]`` int64: the last ``task_count`` tasks dealt round-robin over the rows, then shuffled."""
    first = NUM_TASKS - task_count + 1
    tasks = first + torch.arange(batch) % task_count
    return tasks[torch.randperm(batch, generator=torch.Generator().manual_seed(seed))]


def build_methods(x, weight, task_ids, row_tasks, compact=None) -> dict:
    """``{method: fn(i)}`` for one batch; the per-task row indices and masks are prepared outside the timed calls.
    ``compact``: the ids in their compact layout, for the ``_ids4`` methods."""
    device = x[0].device
    present = torch.unique(row_tasks).tolist()
    rows_of = {task: (row_tasks == task).nonzero().squeeze(1).to(device) for task in present}
    masks = {task: task_mask(task_ids, task).to(weight.dtype) for task in present}
    device_tasks = row_tasks.to(device)
    rotations = len(x)

    def split(i, linear):
        inputs = x[i % rotations]
        out = inputs.new_empty(inputs.shape[0], weight.shape[0])
        for task, rows in rows_of.items():
            out[rows] = linear(inputs[rows], task)
        return out

    methods = {
        "mixed": lambda i: masked_linear(x[i % rotations], weight, task_ids, device_tasks),
        "one_task": lambda i: masked_linear(x[i % rotations], weight, task_ids, NUM_TASKS),
        "split_by_task": lambda i: split(i, lambda rows, task: masked_linear(rows, weight, task_ids, task)),
        "dense_masking_by_task": lambda i: split(i, lambda rows, task: F.linear(rows, weight * masks[task])),
    }
    if compact is not None:
        methods["mixed_ids4"] = lambda i: masked_linear(x[i % rotations], weight, compact, device_tasks)
        methods["one_task_ids4"] = lambda i: masked_linear(x[i % rotations], weight, compact, NUM_TASKS)
    return methods


def run_case(weight, task_ids, batch, task_count, device, rotations, warm: bool = False, compact=None) -> list[dict]:
    """One (batch, task count): each method checked against the float64 reference, then timed; with ``warm`` each
    method only runs once (compiling its kernels) and no row is returned. ``compact``: see :func:`build_methods`."""
    generator = torch.Generator(device=device).manual_seed(batch * 100 + task_count)
    x = [
        torch.randn(batch, weight.shape[1], generator=generator, device=device).to(weight.dtype)
        for _ in range(rotations)
    ]
    row_tasks = row_tasks_for(batch, task_count, seed=batch + task_count)
    if warm:
        timing.call_each_once(build_methods(x, weight, task_ids, row_tasks, compact), device)
        return []
    expected = masked_linear_ref(x[0].double(), weight.double(), task_ids, row_tasks.to(device))
    one_task_expected = masked_linear_ref(x[0].double(), weight.double(), task_ids, NUM_TASKS)
    rows = []
    for method, fn in build_methods(x, weight, task_ids, row_tasks, compact).items():
        row = {"batch": batch, "tasks": task_count, "method": method}
        try:
            reference = one_task_expected if method.startswith("one_task") else expected
            row["error"] = timing.normwise_error(fn(0), reference)
            row["ok"] = bool(row["error"] <= headline.MAX_ERROR[weight.dtype])
            row.update(timing.latency_row(fn, device, rotations))
        except Exception as error:  # a failing method is a result too; the others still run
            row.update(ok=False, note=f"{type(error).__name__}: {str(error)[:300]}")
        rows.append(row)
    return rows


def targets(results: list[dict]) -> list[tuple[str, float | None, bool | None]]:
    """The issue's targets at k = 8 tasks (graph times): ``(target, ratio, met)``, B = 64 and B = 256 on uint8 ids
    and on 4-bit compact ids (each against one task on the same ids; splitting by task runs uint8 ids)."""
    by = {(r["batch"], r["tasks"], r["method"]): r.get("graph_ms") for r in results}
    split = by.get((64, 8, "split_by_task"))
    rows = []
    for suffix, ids in (("", "uint8 ids"), ("_ids4", "4-bit ids")):
        mixed, one = by.get((64, 8, "mixed" + suffix)), by.get((64, 8, "one_task" + suffix))
        cost = None if not mixed or not one else mixed / one
        speedup = None if not mixed or not split else split / mixed
        wide, wide_one = by.get((256, 8, "mixed" + suffix)), by.get((256, 8, "one_task" + suffix))
        wide_cost = None if not wide or not wide_one else wide / wide_one
        rows += [
            (f"64 rows over 8 tasks within 1.3x of 64 rows of one task ({ids})", cost,
             None if cost is None else cost <= 1.3),
            (f"64 rows over 8 tasks >= 4x faster than splitting by task ({ids})", speedup,
             None if speedup is None else speedup >= 4),
            (f"256 rows over 8 tasks within 1.5x of 256 rows of one task ({ids})", wide_cost,
             None if wide_cost is None else wide_cost <= 1.5),
        ]  # fmt: skip
    return rows


def markdown(data: dict) -> str:
    device = data["device"]
    key = "graph_ms" if device.get("device") == "cuda" else "event_ms"
    lines = [
        f"# Mixed-task batches ({device.get('gpu_name') or 'CPU'})",
        "",
        f"Layer {data['layer'][1]} -> {data['layer'][0]}, {data['dtype']}, {NUM_TASKS} tasks. Microseconds, "
        + (
            "CUDA-graph replay (pure GPU time)."
            if key == "graph_ms"
            else "event times of the CPU reference path: **not kernel numbers**."
        )  # fmt: skip
        + " `vs split` is splitting by task's time over the mixed launch's.",
        "",
        "| batch | tasks | mixed | one task | mixed, 4-bit ids | one task, 4-bit ids | split by task "
        "| dense masking by task | vs split | spread |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases: dict = {}
    for row in data["results"]:
        cases.setdefault((row["batch"], row["tasks"]), {})[row["method"]] = row
    for (batch, count), methods in cases.items():

        def us(method, methods=methods):
            value = methods.get(method, {}).get(key)
            return "-" if not value else f"{value * 1e3:.1f}"

        mixed, split = methods.get("mixed", {}).get(key), methods.get("split_by_task", {}).get(key)
        ratio = "-" if not mixed or not split else f"{split / mixed:.2f}x"
        spread = methods.get("mixed", {}).get("graph_spread" if key == "graph_ms" else "event_spread")
        failed = [m for m, row in methods.items() if not row.get("ok")]
        lines.append(
            f"| {batch} | {count} | {us('mixed')} | {us('one_task')} | {us('mixed_ids4')} | {us('one_task_ids4')} "
            f"| {us('split_by_task')} "
            f"| {us('dense_masking_by_task')} | {ratio} | {'-' if spread is None else f'{100 * spread:.0f} %'}"
            + (f" FAILED: {', '.join(failed)}" if failed else "")
            + " |"
        )
    if key == "graph_ms":
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        for target, value, met in targets(data["results"]):
            lines.append(f"| {target} | {'-' if value is None else f'{value:.2f}x'} | {'-' if met is None else met} |")
        lines += model_check(data)
    return "\n".join(lines) + "\n"


def model_check(data: dict) -> list[str]:
    """The mixed launches' times against the byte-and-step model's predictions for the grouped kernel (v2, uint8
    ids: `results/mixed-model-predictions.json`), when the run is of the model's layer."""
    path = Path(__file__).resolve().parent / "results" / "mixed-model-predictions.json"
    if not path.exists() or tuple(data["layer"]) != LAYER:
        return []
    predicted = {
        (case["batch"], case["tasks"]): case["v2_predicted_us"] for case in json.loads(path.read_text())["cases"]
    }
    predicted_ids4 = {
        (case["batch"], case["tasks"]): case.get("v2_ids4_predicted_us")
        for case in json.loads(path.read_text())["cases"]
    }
    header = "| batch | tasks | ids | mixed measured | v2 predicted | error |"
    lines = ["", header, "|---:|---:|---|---:|---:|---:|"]
    for row in data["results"]:
        models = {"mixed": (predicted, "uint8"), "mixed_ids4": (predicted_ids4, "4-bit")}
        if row["method"] not in models:
            continue
        table, ids = models[row["method"]]
        value, model = row.get("graph_ms"), table.get((row["batch"], row["tasks"]))
        if not value or model is None:
            continue
        measured, error = value * 1e3, 100 * (model / (value * 1e3) - 1)
        lines.append(f"| {row['batch']} | {row['tasks']} | {ids} | {measured:.1f} | {model:.1f} | {error:+.0f} % |")
    return lines if len(lines) > 3 else []


def write_report(json_path: str | Path) -> list[Path]:
    """``<json>.md`` beside the results."""
    return timing.markdown_report(json_path, markdown)


def main(argv=None) -> int:
    args, path = timing.stage_arguments(
        argv,
        __doc__.split("\n\n")[0],
        "mixed.json",
        "a small layer and batches (a CPU smoke run)",
        "start no new case after this many seconds",
    )
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    out_features, in_features = QUICK_LAYER if quick else LAYER
    dtype = torch.float16 if device == "cuda" else torch.float32
    result = {
        "device": timing.device_info(device),
        "layer": [out_features, in_features],
        "dtype": str(dtype).removeprefix("torch."),
        "results": [],
        "skipped": [],
    }
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
    task_ids = magnitude_task_ids(base, NUM_TASKS, EQUAL_SHARES).to(device)
    weight = base.to(device=device, dtype=dtype)
    compact = compact_task_ids(task_ids, NUM_TASKS, COMPACT_BITS)
    # The weight (90 MB in fp16, 135 MB with ids) already spans L2; the inputs rotate.
    rotations = timing.MAX_ROTATIONS[device]
    for batch in QUICK_BATCHES if quick else BATCHES:
        for task_count in TASK_COUNTS:
            ids4 = compact if batch in COMPACT_BATCHES else None
            if args.warm:
                run_case(weight, task_ids, batch, task_count, device, rotations, warm=True, compact=ids4)
                continue
            if time.perf_counter() - started > args.budget_s:
                result["skipped"].append([batch, task_count])
                continue
            rows = run_case(weight, task_ids, batch, task_count, device, rotations, compact=ids4)
            result["results"].extend(rows)
            timing.write_json(path, result)
            key = "graph_ms" if device == "cuda" else "event_ms"
            summary = "  ".join(f"{row['method']} {timing.format_us(row.get(key))}" for row in rows)
            ok = "ok" if all(row.get("ok") for row in rows) else "FAILED"
            tasks = f"{task_count} task{'s' if task_count > 1 else ''}"
            print(f"batch {batch:<4d} {tasks:<7}  {summary}  ({key.removesuffix('_ms')} times) {ok}", flush=True)
    timing.write_json(path, result)
    failed = [row for row in result["results"] if not row.get("ok")]
    for row in failed:
        print(f"FAILED b{row['batch']} k{row['tasks']} {row['method']}: {row.get('note', row.get('error'))}")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["model"]:  # the byte-and-step model's predictions (benchmarks/mixed_model.py)
        import mixed_model

        sys.exit(mixed_model.main(["predict", *sys.argv[2:]]))
    sys.exit(main())
