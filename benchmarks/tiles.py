"""What the tile map saves each task: the bytes it reads (from the map, on any machine) and, on a GPU, its latency.

    python benchmarks/tiles.py (--out DIR | --json FILE) [--quick] [--budget-s SECONDS] [--warm]

One transformer MLP up projection (4096 -> 11008, fp16) packed for 3 tasks three ways: block-structured PackNet with
128 x 128 blocks (as large as the small-batch kernel tiles) and with 32 x 32 blocks (the map's cells), each task
keeping a third of the blocks, and unstructured (nested 50 % magnitude pruning, as in the headline benchmark).

For each packing and task, the byte model: the fraction of the weight's tiles the task reads, the fraction that also
need ids, and the predicted time against pre-masked dense (small batches are memory-bound: bytes read over the 2
bytes per element pre-masked dense reads), for the kernels' tile sizes. On a GPU, at batch 1 and 16, the latency
(CUDA-graph replay, the pure GPU time) of: the packed kernel with the tile map (as a ``PackedLinear`` runs it),
without it, pre-masked dense (cuBLAS on one masked copy per task) and the same task's weight as a ``torch.sparse`` BSR
tensor (128 x 128 blocks; ``F.linear`` runs PyTorch's own block-sparse kernel): what a user who knows block sparsity
would try. The JSON is rewritten after every case; ``write_report`` (run by ``packnet bench --stage tiles``) turns it
into Markdown.
"""

from __future__ import annotations

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
from packnet_kernels import masked_linear, tile_map  # noqa: E402
from packnet_kernels.reference import TILE_CELL, effective_weight  # noqa: E402

NUM_TASKS = 3
# Block pruning that leaves each of 3 tasks a third of the blocks: task 1 releases 2/3 of them, task 2 half of what
# it receives, task 3 nothing.
BLOCK_SHARES = (2 / 3, 1 / 2, 0.0)
UNSTRUCTURED_RATIO = 0.5
# Packing name -> pruning granularity. A kernel tile skips only when none of its blocks holds a weight of the task, so
# blocks smaller than the tiles leave little to skip (the byte model shows how little).
PACKINGS = {"block128": (128, 128), "block32": (32, 32), "element": "element"}
# The packings timed on a GPU, in order (the 32 x 32 one only shows the byte model's point).
TIMED = ("block128", "element", "block32")
# BSR blocks of the peer: the block-structured packing's blocks.
BSR_BLOCK = (128, 128)
# Weight tiles of the kernels (rows x K): the small-batch regime's smallest and largest, and the large regime's.
KERNEL_TILES = ((64, 64), (128, 128), (128, 256))
BATCHES = (1, 16)
LAYER = (11008, 4096)
QUICK_LAYER = (384, 512)


def packed_ids(weight: torch.Tensor, packing: str) -> torch.Tensor:
    """Task ids of ``weight`` for 3 tasks under one of :data:`PACKINGS`: blocks (a third of them each) or nested
    50 % magnitude pruning of elements."""
    granularity = PACKINGS[packing]
    if granularity == "element":
        return magnitude_task_ids(weight, NUM_TASKS, UNSTRUCTURED_RATIO)
    return magnitude_task_ids(weight, NUM_TASKS, BLOCK_SHARES, granularity=granularity)


def tile_reads(cells: torch.Tensor, task: int, tile: tuple[int, int]) -> dict:
    """The byte model of one task from its layer's tile map ``cells`` (``[2, rows, cols]`` of cells), for kernel
    tiles of ``tile`` weight elements: the fraction of tiles read (some owner in 1..task) and the fraction read with
    their ids (some owner above the task), free weights being zero."""
    per_tile = (tile[0] // TILE_CELL[0], tile[1] // TILE_CELL[1])
    smallest, largest = cells.int()
    rows, cols = smallest.shape
    grid = (-(-rows // per_tile[0]), -(-cols // per_tile[1]))

    def tiles(plane, fill):
        padded = plane.new_full((grid[0] * per_tile[0], grid[1] * per_tile[1]), fill)
        padded[:rows, :cols] = plane
        return padded.reshape(grid[0], per_tile[0], grid[1], per_tile[1])

    owner_min = tiles(torch.where(largest == 0, 256, smallest), 256).amin(dim=(1, 3))
    owner_max = tiles(largest, 0).amax(dim=(1, 3))
    used = owner_min <= task
    checked = used & (owner_max > task)
    count = used.numel()
    return {"tiles_read": float(used.sum()) / count, "tiles_with_ids": float(checked.sum()) / count}


def byte_model(task_ids: torch.Tensor, element: int) -> list[dict]:
    """Per task and kernel tile size: fractions of tiles read and with ids, the bytes read per weight element, and
    the predicted time against pre-masked dense (2 bytes per element in fp16)."""
    cells = tile_map(task_ids)
    rows = []
    for task in range(1, NUM_TASKS + 1):
        for tile in KERNEL_TILES:
            reads = tile_reads(cells, task, tile)
            per_element = reads["tiles_read"] * element + reads["tiles_with_ids"] * 1
            rows.append(
                {
                    "task": task,
                    "tile": list(tile),
                    **reads,
                    "bytes_per_element": per_element,
                    "predicted_vs_premasked": per_element / element,
                    "owned_fraction": float(((task_ids != 0) & (task_ids <= task)).float().mean()),
                }
            )
    return rows


def latency_rows(weight, task_ids, packing, batch, task, device, rotations, warm: bool = False) -> list[dict]:
    """Graph-replay and event times of each method for one (packing, batch, task); each output checked first. With
    ``warm`` each method only runs once (compiling its kernels) and no row is returned."""
    generator = torch.Generator(device=device).manual_seed(batch * 10 + task)
    xs = [torch.randn(batch, weight.shape[1], generator=generator, device=device).half() for _ in range(rotations)]
    cells = tile_map(task_ids).contiguous()
    premasked = effective_weight(weight, task_ids, task)
    expected = F.linear(xs[0].double(), premasked.double())
    methods = {
        "packnet_tilemap": lambda i: masked_linear(
            xs[i % rotations], weight, task_ids, task, tile_map=cells, free_weights_zero=True
        ),
        "packnet": lambda i: masked_linear(xs[i % rotations], weight, task_ids, task),
        "premasked": lambda i: F.linear(xs[i % rotations], premasked),
    }
    if device == "cuda":
        bsr = premasked.to_sparse_bsr(BSR_BLOCK)
        methods["bsr"] = lambda i: F.linear(xs[i % rotations], bsr)
    if warm:
        timing.call_each_once(methods, device)
        return []
    rows = []
    for method, fn in methods.items():
        row = {"packing": packing, "batch": batch, "task": task, "method": method}
        try:
            row["error"] = timing.normwise_error(fn(0), expected)
            row["ok"] = bool(row["error"] <= headline.MAX_ERROR[torch.float16])
            row.update(timing.latency_row(fn, device, rotations))
        except Exception as error:  # a failing method is a result too (BSR support varies by version)
            row.update(ok=False, note=f"{type(error).__name__}: {str(error)[:300]}")
        rows.append(row)
    return rows


def markdown(data: dict) -> str:
    """The byte model per packing, task and tile size, and (GPU runs) the latency table with each method's time
    against pre-masked dense."""
    device = data["device"]
    lines = [
        f"# Tile map: what each task reads ({device.get('gpu_name') or 'CPU'})",
        "",
        f"Layer {data['layer'][1]} -> {data['layer'][0]}, fp16, 3 tasks. Byte model: the fraction of kernel tiles a "
        "task reads and the fraction it reads with ids; predicted time = bytes per weight element / 2 (pre-masked "
        "dense reads 2).",
        "",
        "| packing | task | owned | tile | tiles read | with ids | predicted vs pre-masked |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for packing, rows in data["byte_model"].items():
        for row in rows:
            lines.append(
                f"| {packing} | {row['task']} | {100 * row['owned_fraction']:.0f} % "
                f"| {row['tile'][0]}x{row['tile'][1]} "
                f"| {100 * row['tiles_read']:.1f} % | {100 * row['tiles_with_ids']:.1f} % "
                f"| {row['predicted_vs_premasked']:.2f}x |"
            )
    if data["results"]:
        lines += [
            "",
            "Latency in microseconds, CUDA-graph replay; `x pre-masked` is the time over pre-masked dense's.",
            "",
            "| packing | batch | task | method | us | x pre-masked | spread |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        base = {
            (r["packing"], r["batch"], r["task"]): r.get("graph_ms")
            for r in data["results"]
            if r["method"] == "premasked"
        }
        for row in data["results"]:
            ms, ref = row.get("graph_ms"), base.get((row["packing"], row["batch"], row["task"]))
            ratio = "-" if not ms or not ref else f"{ms / ref:.2f}x"
            note = "" if row.get("ok") else f" FAILED: {row.get('note', 'wrong result')}"
            spread = row.get("graph_spread")
            lines.append(
                f"| {row['packing']} | {row['batch']} | {row['task']} | {row['method']} "
                f"| {'-' if not ms else f'{ms * 1e3:.1f}'} | {ratio} "
                f"| {'-' if spread is None else f'{100 * spread:.0f} %'}{' unstable' if row.get('unstable') else ''}"
                f"{note} |"
            )
    else:
        lines += ["", "No latencies: they are measured on a GPU only; the byte model above holds on any machine."]
    return "\n".join(lines) + "\n"


def write_report(json_path: str | Path) -> list[Path]:
    """``<json>.md`` beside the results."""
    return timing.markdown_report(json_path, markdown)


def main(argv=None) -> int:
    args, path = timing.stage_arguments(
        argv,
        __doc__.split("\n\n")[0],
        "tiles.json",
        "a small layer (a CPU smoke run)",
        "start no new timed case after this many seconds",
    )
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_features, in_features = QUICK_LAYER if args.quick else LAYER
    result = {
        "device": timing.device_info(device),
        "layer": [out_features, in_features],
        "byte_model": {},
        "results": [],
        "skipped": [],
    }

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
    for packing in TIMED:
        task_ids = packed_ids(base, packing)
        result["byte_model"][packing] = byte_model(task_ids, element=2)
        for row in result["byte_model"][packing]:
            if row["tile"] == list(KERNEL_TILES[0]):
                print(
                    f"{packing:8s} task {row['task']}: reads {100 * row['tiles_read']:5.1f} % of tiles, "
                    f"{100 * row['tiles_with_ids']:5.1f} % with ids: predicted {row['predicted_vs_premasked']:.2f}x "
                    "the time of pre-masked dense",
                    flush=True,
                )
        timing.write_json(path, result)
        if device != "cuda":
            continue  # the kernels' latency is a GPU measurement; the byte model above is the CPU part
        weight = torch.where(task_ids != 0, base, 0.0).to(device=device, dtype=torch.float16)
        ids = task_ids.to(device)
        # The weight (90 MB in fp16, 135 MB with ids) already spans L2; the inputs rotate.
        rotations = timing.MAX_ROTATIONS[device]
        for batch in BATCHES:
            for task in range(1, NUM_TASKS + 1):
                if args.warm:
                    latency_rows(weight, ids, packing, batch, task, device, rotations, warm=True)
                    continue
                if time.perf_counter() - started > args.budget_s:
                    result["skipped"].append([packing, batch, task])
                    continue
                rows = latency_rows(weight, ids, packing, batch, task, device, rotations)
                result["results"].extend(rows)
                timing.write_json(path, result)
                times = {row["method"]: row.get("graph_ms") for row in rows}
                summary = "  ".join(f"{method} {timing.format_us(ms)}" for method, ms in times.items())
                print(f"{packing:8s} batch {batch:<3d} task {task}  {summary}  (graph times)", flush=True)
    failed = [row for row in result["results"] if not row.get("ok") and row["method"] != "bsr"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
