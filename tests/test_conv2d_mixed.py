"""Mixed-task conv batches in one launch (``MIXED`` in ``packnet_kernels/conv2d.py``): the images sorted by task, their
pixels laid out in tiles of one task each (``_pixel_tiles``), each tile running the single-task loop for its task.

The tile table against a plain construction; the kernel (interpreter on the CPU) against per-task runs, image for
image, and the float64 reference; and, under the interpreter, every dot it runs: one per step and tile, on that
tile's task's pixels and that task's weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES

from packnet_kernels import compact_task_ids, masked_conv2d, tile_map
from packnet_kernels.reference import task_mask

conv2d = pytest.importorskip("packnet_kernels.conv2d")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under the interpreter a mixed tile is the single-task one (same rows, same steps): bitwise the per-task runs.
BITWISE = DEVICE == "cpu"


def _tolerance(dtype):
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def _expected_tiles(sorted_tasks: list[int], pixels: int, block_m: int, max_task: int) -> list[tuple[int, int, int]]:
    """``(first sorted pixel, rows, task)`` per tile, written out plainly: each run of one (clamped) task its own
    tiles, the last one padded; invalid tasks take task 0."""
    tiles, start = [], 0
    while start < len(sorted_tasks):
        key = min(max(sorted_tasks[start], 0), max_task + 1)
        end = start
        while end < len(sorted_tasks) and min(max(sorted_tasks[end], 0), max_task + 1) == key:
            end += 1
        for first in range(start * pixels, end * pixels, block_m):
            tiles.append((first, min(block_m, end * pixels - first), key if 1 <= key <= max_task else 0))
        start = end
    return tiles


MIXES = {
    "random": lambda n, g: torch.randint(1, 6, (n,), generator=g),
    "one_task": lambda n, g: torch.full((n,), 4),
    "absent_2_and_4": lambda n, g: torch.tensor([1, 3, 5])[torch.randint(0, 3, (n,), generator=g)],
    "255_tasks": lambda n, g: torch.randint(1, 256, (n,), generator=g),
    "every_task_once": lambda n, g: torch.randperm(n, generator=g) % 255 + 1,
    "invalid": lambda n, g: torch.randint(-2, 9, (n,), generator=g),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize(
    ("images", "pixels", "block_m"), [(1, 1, 32), (7, 15, 32), (13, 49, 64), (31, 5, 64), (255, 3, 32), (300, 1, 64)]
)
def test_pixel_tiles_hold_one_task_each(mix, images, pixels, block_m):
    """Every sorted pixel in exactly one tile, every tile of one task, a task's tiles as few as its pixels need (the
    last padded), and the launch's bound of tiles never exceeded."""
    tasks = MIXES[mix](images, torch.Generator().manual_seed(images * pixels)).to(DEVICE)
    max_task = 5 if mix == "invalid" else 255
    sorted_tasks = torch.sort(tasks, stable=True).values
    bound = -(-images * pixels // block_m) + conv2d._task_runs(images, max_task) - 1
    table = conv2d._pixel_tiles(sorted_tasks, pixels, block_m, max_task, bound).cpu()
    assert table.dtype == torch.int64 and table.shape == (bound, 3)
    expected = _expected_tiles(sorted_tasks.tolist(), pixels, block_m, max_task)
    assert len(expected) <= bound
    assert table[: len(expected)].tolist() == [list(tile) for tile in expected]
    assert not table[len(expected) :, 1:].any()  # tiles past the last run: no rows, task 0


def _layer(batch, cin, cout, kernel, size, dtype, max_id, seed):
    generator = torch.Generator().manual_seed(seed)
    layout = torch.channels_last
    shape = (cout, cin, kernel, kernel)
    task_ids = torch.randint(0, max_id + 1, shape, generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(shape, generator=generator)).to(dtype)
    x = torch.randn(batch, cin, *size, generator=generator).to(dtype)
    x, weight, task_ids = (t.to(DEVICE).contiguous(memory_format=layout) for t in (x, weight, task_ids))
    return x, weight, task_ids


def _per_task(x, weight, task_ids, tasks, tables, geometry, **kwargs):
    """Each task's images run as a single-task call, scattered back: what splitting the batch by task gives."""
    out = None
    for task in tasks.unique().tolist():
        rows = tasks == task
        vectors = [None if table is None else table[task - 1] for table in tables]
        one = masked_conv2d(x[rows], weight, task_ids, task, vectors[0], *geometry, scale=vectors[1], shift=vectors[2],
                            backend="triton", **kwargs)  # fmt: skip
        out = torch.empty((x.shape[0], *one.shape[1:]), dtype=one.dtype, device=one.device) if out is None else out
        out[rows] = one
    return out


# (images, in, out, kernel, image size, mix, dtype, ids): prime batches, images of odd pixel counts (tasks end
# mid-tile), one and many tasks, absent tasks, compact ids and the tile map (32 channels: the map's cells apply).
CASES = [
    (5, 16, 20, 3, (3, 5), "random", torch.float16, "uint8"),
    (7, 32, 16, 1, (5, 7), "random", torch.float32, "tilemap"),
    (3, 16, 24, 3, (7, 7), "one_task", torch.bfloat16, "uint8"),
    (11, 16, 16, 1, (3, 3), "absent_2_and_4", torch.float32, "ids4"),
    (13, 16, 16, 1, (1, 3), "255_tasks", torch.float16, "uint8"),
    (255, 16, 16, 1, (1, 2), "every_task_once", torch.float32, "uint8"),
    (2, 32, 32, 3, (4, 5), "random", torch.float32, "ids4-tilemap"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c[:6]) + f"-{c[7]}")
def test_mixed_conv_equals_per_task_runs(case):
    """Image for image the per-task runs (bitwise under the interpreter, where a mixed tile is a single-task tile of
    the sorted images) and, within the dtype's tolerance, the float64 reference; per-task epilogue tables."""
    batch, cin, cout, kernel, size, mix, dtype, ids = case
    max_id = 255 if mix in ("255_tasks", "every_task_once") else 5
    x, weight, task_ids = _layer(batch, cin, cout, kernel, size, dtype, max_id, seed=batch * cin)
    tasks = MIXES[mix](batch, torch.Generator().manual_seed(batch)).to(DEVICE)
    tables = [None, None, None]
    if max_id == 5:
        generator = torch.Generator().manual_seed(3)
        tables = [(0.5 + torch.rand(5, cout, generator=generator)).to(dtype).to(DEVICE) for _ in range(3)]
    kwargs = {"relu": True}
    if "tilemap" in ids:
        kwargs.update(tile_map=tile_map(task_ids), free_weights_zero=True)
    kernel_ids = compact_task_ids(task_ids, max_id) if "ids4" in ids else task_ids
    geometry = (1, kernel // 2)
    got = masked_conv2d(x, weight, kernel_ids, tasks, tables[0], *geometry, scale=tables[1], shift=tables[2],
                        backend="triton", **kwargs)  # fmt: skip
    alone = _per_task(x, weight, kernel_ids, tasks, tables, geometry, **kwargs)
    if BITWISE:
        assert torch.equal(got, alone)
    else:
        torch.testing.assert_close(got, alone, **_tolerance(dtype))
    double = [None if table is None else table.double() for table in tables]
    kwargs.pop("tile_map", None), kwargs.pop("free_weights_zero", None)
    expected = masked_conv2d(x.double(), weight.double(), task_ids, tasks, double[0], *geometry, scale=double[1],
                             shift=double[2], backend="reference", **kwargs)  # fmt: skip
    torch.testing.assert_close(got.double(), expected, **_tolerance(dtype))


@pytest.mark.interpreter
def test_other_tasks_nan_and_invalid_tasks_stay_out():
    """NaN and Inf in weights of task 4 reach task 4's and 5's images only; images of a task outside 1..max_task (the
    tables' 5 rows) come out NaN, the others are untouched."""
    x, weight, task_ids = _layer(9, 16, 16, 3, (3, 4), torch.float32, 5, seed=4)
    task_ids[:, 3], task_ids[:, 5] = 4, 4
    weight[:, 3], weight[:, 5] = float("nan"), float("inf")
    tasks = torch.tensor([1, 4, 2, 5, 3, 1, 4, 2, 3], device=DEVICE)
    got = masked_conv2d(x, weight, task_ids, tasks, None, 1, 1, backend="triton").cpu()
    later = tasks.cpu() >= 4
    assert (~got[later].isfinite()).any(dim=(1, 2, 3)).all() and got[~later].isfinite().all()
    bias = torch.randn(5, 16, device=DEVICE)
    bad_tasks = torch.tensor([1, 7, 2, 0, 3, 1, -1, 2, 3], device=DEVICE)
    weight[:, 3], weight[:, 5] = 1.0, 1.0
    bad = conv2d._launch(x, weight, task_ids, 0, bias, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, True,
                         tasks=bad_tasks).cpu()  # fmt: skip
    invalid = torch.tensor([False, True, False, True, False, False, True, False, False])
    assert bad[invalid].isnan().all() and not bad[~invalid].isnan().any()
    good = torch.where(invalid.to(DEVICE), 1, bad_tasks)
    expected = masked_conv2d(x, weight, task_ids, good, bias, 1, 1, backend="triton").cpu()
    if BITWISE:
        assert torch.equal(bad[~invalid], expected[~invalid])


def _record_dots(monkeypatch) -> list:
    """The interpreter's dots of every kernel launched after this: ``(left operand, right operand)`` as numpy."""
    from triton.runtime.interpreter import InterpreterBuilder

    dots = []
    create_dot = InterpreterBuilder.create_dot

    def record(self, a, b, *args):
        dots.append((a.data.copy(), b.data.copy()))
        return create_dot(self, a, b, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", record)
    return dots


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("tasks", "pixels"),
    [([3] * 5, (3, 5)), ([2, 5, 2, 1, 5, 5, 2], (3, 5)), ([4, 1, 7, 2, 9, 3, 8, 6, 5, 10, 11], (2, 3))],
    ids=["1-task", "3-tasks", "11-tasks"],
)
def test_each_tile_runs_one_masked_dot_per_step_on_its_task_pixels(tasks, pixels, monkeypatch):
    """A 1x1 conv over 32 channels (2 steps of 16) whose images hold their task's number in every input: each dot's
    left operand holds one task's pixels only (at most a tile of them, zero rows past that task's last pixel) and its
    right operand is that task's masked weight; the dots are 2 per tile of each task's padded pixel count."""
    if DEVICE != "cpu":
        pytest.skip("reads the interpreter's dots")
    block_m, block_n, block_k = (conv2d._INTERPRETER_CONFIGS["gemm"][key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    assert (block_m, block_n, block_k) == (32, 16, 16)
    image_tasks = torch.tensor(tasks)
    generator = torch.Generator().manual_seed(len(tasks))
    task_ids = torch.randint(0, 12, (16, 32, 1, 1), generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(16, 32, 1, 1, generator=generator))
    x = image_tasks.float()[:, None, None, None].expand(len(tasks), 32, *pixels).contiguous()
    layout = torch.channels_last
    x, weight, task_ids = (t.contiguous(memory_format=layout) for t in (x, weight, task_ids))
    dots = _record_dots(monkeypatch)
    got = masked_conv2d(x, weight, task_ids, image_tasks, backend="triton")
    per_image = pixels[0] * pixels[1]
    matrix = weight.reshape(16, 32).T  # [channels, out]
    dots_per_task = {}
    for step, (left, right) in enumerate(dots):
        rows = left.any(axis=1)
        values = set(left[rows][:, 0].tolist())
        assert len(values) == 1, f"dot {step} mixes the pixels of tasks {values}"
        task = int(values.pop())
        dots_per_task[task] = dots_per_task.get(task, 0) + 1
        assert rows[: rows.sum()].all(), f"dot {step}: a tile's rows are its task's pixels, then padding"
        channels = slice((step % 2) * block_k, (step % 2 + 1) * block_k)
        owned = task_mask(task_ids.reshape(16, 32), task).T[channels]
        assert torch.equal(torch.from_numpy(right), torch.where(owned, matrix[channels], 0.0))
    # 2 steps per tile, each task's tiles as many as its pixels need.
    counts = {task: tasks.count(task) for task in set(tasks)}
    assert dots_per_task == {task: 2 * -(-count * per_image // block_m) for task, count in counts.items()}
    expected = masked_conv2d(x.double(), weight.double(), task_ids, image_tasks, backend="reference")
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float32))


@pytest.mark.interpreter
def test_a_forward_sorts_once_and_lays_out_pixel_tiles_once_per_resolution(monkeypatch):
    """The packed convs of one forward share the linear layers' sort of the task tensor and, per output resolution,
    one pixel-tile table; a forward gives, image for image, the per-task forwards."""
    import torch.nn as nn

    import packnet
    from packnet_kernels import linear

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16 * 9, 4),
    )  # fmt: skip
    ids = {name: torch.randint(1, 4, module.weight.shape, dtype=torch.uint8) for name, module in model.named_children()
           if isinstance(module, (nn.Conv2d, nn.Linear))}  # fmt: skip
    packnet.swap_packed_(model, ids, num_tasks=3, backend="triton")
    model = model.to(DEVICE)
    sorts, tables = [], []
    sort, pixel_tiles = torch.sort, conv2d._pixel_tiles
    monkeypatch.setattr(linear.torch, "sort", lambda *args, **kwargs: sorts.append(1) or sort(*args, **kwargs))
    monkeypatch.setattr(conv2d, "_pixel_tiles", lambda *args: tables.append(args[1]) or pixel_tiles(*args))
    linear.release_workspaces()
    x = torch.randn(7, 16, 5, 5, device=DEVICE)
    tasks = torch.tensor([3, 1, 2, 3, 3, 1, 2], device=DEVICE)
    with torch.no_grad():
        got = model(x, task=tasks)
        assert len(sorts) == 1 and tables == [25, 9]  # 5x5 outputs twice, then 3x3
        for task in (1, 2, 3):
            rows = tasks == task
            torch.testing.assert_close(got[rows], model(x[rows], task=task), **_tolerance(torch.float32))
