"""Mixed-task conv batches: one launch for images of several tasks against splitting the batch by task.

    python benchmarks/mixed_conv.py (--out DIR | --json FILE) [--quick] [--budget-s SECONDS] [--warm]

A ResNet-50 layer-3 3x3 conv (256 -> 256 channels, 14x14 images, padding 1, fp16, channels_last) packed for 8 tasks
(each owning an eighth of the weights, by magnitude). A batch of B images (B = 8, 64, 256) spread over k tasks
(k = 1, 2, 4, 8; images dealt round-robin, then shuffled: ``mixed.row_tasks_for``) is served by:

- ``mixed``: ``masked_conv2d(x, W, ids, image_tasks)``, one launch whatever the mix, with the sort of the images by
  task and their pixel-tile table built in the call (what the first conv of a forward pays);
- ``mixed_kernel``: the same launch with the sort and the table prepared beforehand (what every later conv of the
  same resolution in that forward pays: they reuse both);
- ``one_task``: the same B images all of the latest task, one launch (what a mixed batch should cost about as much
  as);
- ``split_by_task``: one packed call per task present on its images, scattered back.

Each output is checked against the float64 reference first. On a GPU, times are CUDA-graph replays (pure GPU time)
and single eager calls between CUDA events; on the CPU only the checks and event times of the reference path run
(not kernel numbers). The JSON is rewritten after every case; ``write_report`` turns it into Markdown.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import headline  # noqa: E402
import mixed  # noqa: E402
import timing  # noqa: E402

from packnet.pruning import magnitude_task_ids  # noqa: E402
from packnet_kernels import masked_conv2d  # noqa: E402

NUM_TASKS = mixed.NUM_TASKS
BATCHES = (8, 64, 256)
TASK_COUNTS = (1, 2, 4, 8)
# (in channels, out channels, image size)
LAYER = (256, 256, 14)
QUICK_LAYER = (16, 16, 5)
QUICK_BATCHES = (3, 7)


@contextlib.contextmanager
def _prepared_tiles(prepared):
    """Inside: every mixed conv launch takes ``prepared`` (image order, pixel tiles) instead of building its own."""
    from packnet_kernels import conv2d

    saved = conv2d._mixed_tiles
    conv2d._mixed_tiles = lambda *args, **kwargs: prepared
    try:
        yield
    finally:
        conv2d._mixed_tiles = saved


def build_methods(x, weight, task_ids, image_tasks) -> dict:
    """``{method: fn(i)}`` for one batch; the per-task image indices are prepared outside the timed calls."""
    device = x[0].device
    rows_of = {task: (image_tasks == task).nonzero().squeeze(1).to(device) for task in image_tasks.unique().tolist()}
    device_tasks = image_tasks.to(device)
    rotations = len(x)

    def conv(inputs, task):
        return masked_conv2d(inputs, weight, task_ids, task, padding=1)

    def split(i):
        inputs = x[i % rotations]
        out = inputs.new_empty(inputs.shape[0], weight.shape[0], *inputs.shape[2:])
        for task, rows in rows_of.items():
            out[rows] = conv(inputs[rows], task)
        return out

    # The launch's own sort and tile table, built once here (on the CPU the reference path runs and ignores them).
    from packnet_kernels import conv2d

    plan = conv2d._plan(x[0], weight, task_ids, None, None, None, (1, 1), [1, 1, 1, 1], (1, 1), 1, False, True, None,
                        False, device_tasks)  # fmt: skip
    prepared = conv2d._mixed_tiles(device_tasks, plan[3], reuse=False)

    def kernel_only(i):
        with _prepared_tiles(prepared):
            return conv(x[i % rotations], device_tasks)

    methods = {"mixed": lambda i: conv(x[i % rotations], device_tasks), "mixed_kernel": kernel_only}
    methods["one_task"] = lambda i: conv(x[i % rotations], NUM_TASKS)
    methods["split_by_task"] = split
    return methods


def run_case(weight, task_ids, batch, task_count, size, device, l2_bytes, warm: bool = False) -> list[dict]:
    """One (batch, task count): each method checked against the float64 reference, then timed; with ``warm`` each
    method only runs once (compiling its kernels) and no row is returned. Inputs rotate over 4 L2 caches."""
    generator = torch.Generator(device=device).manual_seed(batch * 100 + task_count)
    shape = (batch, weight.shape[1], size, size)
    rotations = timing.rotation_count(2 * math.prod(shape) * weight.element_size(), l2_bytes, device)
    x = [
        torch.randn(shape, generator=generator, device=device)
        .to(weight.dtype)
        .contiguous(memory_format=torch.channels_last)
        for _ in range(rotations)
    ]
    image_tasks = mixed.row_tasks_for(batch, task_count, seed=batch + task_count)
    methods = build_methods(x, weight, task_ids, image_tasks)
    if warm:
        timing.call_each_once(methods, device)
        return []
    double = (x[0].double(), weight.double(), task_ids)
    expected = masked_conv2d(*double, image_tasks.to(device), padding=1, backend="reference")
    one_task_expected = masked_conv2d(*double, NUM_TASKS, padding=1, backend="reference")
    rows = []
    for method, fn in methods.items():
        row = {"batch": batch, "tasks": task_count, "method": method}
        try:
            reference = one_task_expected if method == "one_task" else expected
            row["error"] = timing.normwise_error(fn(0), reference)
            row["ok"] = bool(row["error"] <= headline.MAX_ERROR[weight.dtype])
            row.update(timing.latency_row(fn, device, rotations))
        except Exception as error:  # a failing method is a result too; the others still run
            row.update(ok=False, note=f"{type(error).__name__}: {str(error)[:300]}")
        rows.append(row)
    return rows


def markdown(data: dict) -> str:
    device = data["device"]
    key = "graph_ms" if device.get("device") == "cuda" else "event_ms"
    cin, cout, size = data["layer"]
    lines = [
        f"# Mixed-task conv batches ({device.get('gpu_name') or 'CPU'})",
        "",
        f"3x3 conv {cin} -> {cout}, {size}x{size} images, {data['dtype']}, {NUM_TASKS} tasks. Microseconds, "
        + (
            "CUDA-graph replay (pure GPU time)."
            if key == "graph_ms"
            else "event times of the CPU reference path: **not kernel numbers**."
        )  # fmt: skip
        + " `mixed / one` is the mixed launch's time over one task's; `vs split` splitting by task's over it.",
        "",
        "| batch | tasks | mixed | mixed kernel | one task | split by task | mixed / one | vs split |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases: dict = {}
    for row in data["results"]:
        cases.setdefault((row["batch"], row["tasks"]), {})[row["method"]] = row
    for (batch, count), methods in cases.items():

        def value(method, methods=methods):
            return methods.get(method, {}).get(key)

        def us(method):
            return "-" if not value(method) else f"{value(method) * 1e3:.1f}"

        def ratio(top, bottom):
            return "-" if not value(top) or not value(bottom) else f"{value(top) / value(bottom):.2f}x"

        failed = [m for m, row in methods.items() if not row.get("ok")]
        lines.append(
            f"| {batch} | {count} | {us('mixed')} | {us('mixed_kernel')} | {us('one_task')} | {us('split_by_task')} "
            f"| {ratio('mixed', 'one_task')} | {ratio('split_by_task', 'mixed')}"
            + (f" FAILED: {', '.join(failed)}" if failed else "")
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(json_path: str | Path) -> list[Path]:
    """``<json>.md`` beside the results."""
    return timing.markdown_report(json_path, markdown)


def main(argv=None) -> int:
    args, path = timing.stage_arguments(
        argv,
        __doc__.split("\n\n")[0],
        "mixed_conv.json",
        "a small layer and batches (a CPU smoke run)",
        "start no new case after this many seconds",
    )
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    cin, cout, size = QUICK_LAYER if quick else LAYER
    dtype = torch.float16 if device == "cuda" else torch.float32
    result = {
        "device": timing.device_info(device),
        "layer": [cin, cout, size],
        "dtype": str(dtype).removeprefix("torch."),
        "results": [],
        "skipped": [],
    }
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(cout, cin, 3, 3, generator=generator) / math.sqrt(9 * cin)
    task_ids = magnitude_task_ids(base, NUM_TASKS, mixed.EQUAL_SHARES).to(device)
    layout = torch.channels_last
    weight = base.to(device=device, dtype=dtype).contiguous(memory_format=layout)
    task_ids = task_ids.contiguous(memory_format=layout)
    l2_bytes = result["device"].get("l2_bytes") or 0
    for batch in QUICK_BATCHES if quick else BATCHES:
        for task_count in TASK_COUNTS:
            if args.warm:
                run_case(weight, task_ids, batch, task_count, size, device, l2_bytes, warm=True)
                continue
            if time.perf_counter() - started > args.budget_s:
                result["skipped"].append([batch, task_count])
                continue
            rows = run_case(weight, task_ids, batch, task_count, size, device, l2_bytes)
            result["results"].extend(rows)
            timing.write_json(path, result)
            key = "graph_ms" if device == "cuda" else "event_ms"
            summary = "  ".join(f"{row['method']} {timing.format_us(row.get(key))}" for row in rows)
            ok = "ok" if all(row.get("ok") for row in rows) else "FAILED"
            kind = key.removesuffix("_ms")
            print(f"batch {batch:<4d} {task_count} task(s)  {summary}  ({kind} times) {ok}", flush=True)
    timing.write_json(path, result)
    failed = [row for row in result["results"] if not row.get("ok")]
    for row in failed:
        print(f"FAILED b{row['batch']} k{row['tasks']} {row['method']}: {row.get('note', row.get('error'))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
