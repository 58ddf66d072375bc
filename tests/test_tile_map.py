"""Tile maps: the builder against a brute-force count, and the kernels' skip and no-predicate paths against the
predicate path, bit for bit, under the interpreter (the compiled kernels on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from packnet_kernels import masked_linear, tile_map
from packnet_kernels.reference import TILE_CELL, gemm_matrix

linear = pytest.importorskip("packnet_kernels.linear")

CELL_ROWS, CELL_COLS = TILE_CELL


def _brute_force(task_ids: torch.Tensor) -> torch.Tensor:
    """One cell at a time, in plain Python: the smallest and largest nonzero id, (0, 0) when all free."""
    matrix = gemm_matrix(task_ids).tolist()
    rows, cols = len(matrix), len(matrix[0]) if matrix else 0
    grid_rows, grid_cols = -(-rows // CELL_ROWS), -(-cols // CELL_COLS)
    result = torch.zeros(2, grid_rows, grid_cols, dtype=torch.uint8)
    for cell_row in range(grid_rows):
        for cell_col in range(grid_cols):
            owners = [
                matrix[r][c]
                for r in range(cell_row * CELL_ROWS, min(rows, (cell_row + 1) * CELL_ROWS))
                for c in range(cell_col * CELL_COLS, min(cols, (cell_col + 1) * CELL_COLS))
                if matrix[r][c]
            ]
            if owners:
                result[0, cell_row, cell_col], result[1, cell_row, cell_col] = min(owners), max(owners)
    return result


def _random_ids(shape, seed, high=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=generator, dtype=torch.uint8)


def _adversarial_ids() -> list[torch.Tensor]:
    """One owner per cell at a random spot, owners on the cells' borders, 255, all free, tails of 1 element."""
    generator = torch.Generator().manual_seed(5)
    one_per_cell = torch.zeros(70, 100, dtype=torch.uint8)
    for cell_row in range(0, 70, CELL_ROWS):
        for cell_col in range(0, 100, CELL_COLS):
            r = cell_row + int(torch.randint(0, min(CELL_ROWS, 70 - cell_row), (1,), generator=generator))
            c = cell_col + int(torch.randint(0, min(CELL_COLS, 100 - cell_col), (1,), generator=generator))
            one_per_cell[r, c] = int(torch.randint(1, 256, (1,), generator=generator))
    borders = torch.zeros(65, 65, dtype=torch.uint8)
    for index, (r, c) in enumerate([(31, 31), (31, 32), (32, 31), (32, 32), (63, 0), (64, 64), (0, 63), (64, 0)]):
        borders[r, c] = index + 1
    borders[0, 0] = 255
    tail = torch.zeros(33, 33, dtype=torch.uint8)
    tail[32, 32] = 9
    return [one_per_cell, borders, torch.zeros(40, 40, dtype=torch.uint8), tail, torch.full((1, 1), 255).byte()]


@pytest.mark.parametrize(
    "task_ids",
    [_random_ids((1, 1), 0), _random_ids((31, 33), 1), _random_ids((64, 64), 2), _random_ids((65, 97), 3, 256)]
    + _adversarial_ids()
    + [_random_ids((20, 6, 3, 3), 4), _random_ids((8, 1, 5, 5), 6)],
    ids=lambda ids: "x".join(map(str, ids.shape)),
)
def test_tile_map_matches_brute_force(task_ids):
    assert torch.equal(tile_map(task_ids), _brute_force(task_ids))


def test_tile_map_of_a_trained_pack():
    """Every layer of the golden pack (trained, then pruned per task): the map against the brute force."""
    from pathlib import Path

    tensors = load_file(Path(__file__).parent / "data" / "golden_v1.pack")
    id_tensors = [tensor for name, tensor in tensors.items() if name.endswith("task_ids")]
    assert id_tensors
    for task_ids in id_tensors:
        assert torch.equal(tile_map(task_ids), _brute_force(task_ids))


def test_conv_maps_follow_the_kernel_layout():
    """A conv weight's map covers (kh, kw, channel)-ordered columns: an owner at channel c of tap (r, s) lands in
    column ((r * kw + s) * channels + c) // 32."""
    task_ids = torch.zeros(4, 40, 3, 3, dtype=torch.uint8)
    task_ids[1, 5, 2, 1] = 7  # tap (2, 1) = tap 7: column 7 * 40 + 5 = 285 -> cell 8
    cells = tile_map(task_ids)
    assert cells.shape == (2, 1, -(-360 // 32))
    assert cells[1, 0].nonzero().flatten().tolist() == [8] and cells[1, 0, 8] == 7


def test_tile_map_rejects_other_dtypes():
    with pytest.raises(TypeError, match="uint8"):
        tile_map(torch.zeros(4, 4, dtype=torch.int32))


def _block_ids(rows, cols, seed, block=(32, 32), num_tasks=3):
    """Ids that are constant over 32x32 blocks (what block-structured pruning makes), with free blocks and a few
    blocks that mix owners, so that skipped, raw and checked tiles all occur."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, num_tasks + 1, (-(-rows // block[0]), -(-cols // block[1])), generator=generator)
    ids = grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols].to(torch.uint8)
    mixed = torch.randint(0, num_tasks + 1, (rows, cols), generator=generator, dtype=torch.uint8)
    ids[: block[0], : block[1]] = mixed[: block[0], : block[1]]  # one mixed block
    return ids


def _linear_case(m, n, k, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    task_ids = _block_ids(n, k, seed)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    weight = torch.where(task_ids == 0, torch.zeros((), dtype=dtype), weight)
    x = torch.randn(m, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    return x.to(device), weight.to(device), task_ids.to(device), bias.to(device)


# (M, N, K): small-regime split-K with a ragged split, small-regime tails, large-regime tails and a large split.
LINEAR_SHAPES = [(1, 96, 200), (5, 65, 129), (20, 97, 70), (23, 40, 257)]


# Every shape in fp32, and one small-regime and one large-regime shape in each 16-bit dtype.
LINEAR_CASES = [(shape, torch.float32) for shape in LINEAR_SHAPES] + [
    (LINEAR_SHAPES[0], torch.float16),
    (LINEAR_SHAPES[2], torch.float16),
    (LINEAR_SHAPES[1], torch.bfloat16),
    (LINEAR_SHAPES[3], torch.bfloat16),
]


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("shape", "dtype"), LINEAR_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
)
def test_linear_tile_paths_equal_the_predicate_path(shape, dtype, kernel_device):
    x, weight, task_ids, bias = _linear_case(*shape, dtype, kernel_device, seed=sum(shape))
    cells = tile_map(task_ids)
    for task in (1, 2, 3):
        expected = masked_linear(x, weight, task_ids, task, bias, relu=True, backend="triton")
        for free_weights_zero in (False, True):
            got = masked_linear(
                x,
                weight,
                task_ids,
                task,
                bias,
                relu=True,
                tile_map=cells,
                free_weights_zero=free_weights_zero,
                backend="triton",
            )
            assert torch.equal(got, expected), (task, free_weights_zero)


@pytest.mark.interpreter
@pytest.mark.parametrize("m", [1, 20], ids=["small", "large"])
def test_linear_obeys_the_map(m, kernel_device):
    """The kernel reads what the map says and nothing else. A map claiming a block holds only task 3 makes tasks 1
    and 2 skip it (its weights never reach them, although the ids give them some); a map claiming every owner is
    task 1 makes task 1 read raw weights without ids when free weights are declared zero."""
    n, k = 64, 128
    x, weight, task_ids, _ = _linear_case(m, n, k, torch.float32, kernel_device, seed=3)
    task_ids = torch.ones_like(task_ids)  # task 1 owns everything
    truth = tile_map(task_ids)
    lying = truth.clone()
    # Every row of K 0..63 "only task 3": a whole K step of any tile (a step is skipped only when all its cells are).
    lying[:, :, :2] = 3
    skipped = weight.clone()
    skipped[:, : 2 * CELL_COLS] = 0
    for task in (1, 2):
        got = masked_linear(x, weight, task_ids, task, tile_map=lying, backend="triton")
        assert torch.equal(got, masked_linear(x, skipped, task_ids, task, backend="triton"))
    task_ids[5, 7], weight[5, 7] = 2, 2.5  # a task-2 weight task 1 must not see, unless the map says it owns all
    honest = masked_linear(
        x, weight, task_ids, 1, tile_map=tile_map(task_ids), free_weights_zero=True, backend="triton"
    )
    raw = masked_linear(x, weight, task_ids, 1, tile_map=truth, free_weights_zero=True, backend="triton")
    assert torch.equal(honest, masked_linear(x, weight, task_ids, 1, backend="triton"))
    assert torch.equal(raw, masked_linear(x, weight, torch.ones_like(task_ids), 1, backend="triton"))
    assert not torch.equal(raw, honest)


@pytest.mark.interpreter
@pytest.mark.parametrize("m", [1, 20], ids=["small", "large"])
def test_nan_in_free_weights_stays_out_without_the_zero_guarantee(m, kernel_device):
    """NaN and Inf planted in free weights: with ``free_weights_zero=False`` every tile keeps its predicate, so the
    outputs equal the predicate path's and stay finite."""
    x, weight, task_ids, bias = _linear_case(m, 96, 200, torch.float16, kernel_device, seed=11)
    poisoned = weight.clone()
    free = task_ids == 0
    poisoned[free] = (
        torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=weight.dtype)
        .repeat(int(free.sum()) // 3 + 1)[: int(free.sum())]
        .to(weight.device)
    )
    cells = tile_map(task_ids)
    for task in (1, 2, 3):
        got = masked_linear(x, poisoned, task_ids, task, bias, tile_map=cells, backend="triton")
        assert torch.isfinite(got).all()
        assert torch.equal(got, masked_linear(x, weight, task_ids, task, bias, backend="triton"))


def test_bad_tile_maps_are_refused(kernel_device):
    x, weight, task_ids, _ = _linear_case(2, 40, 70, torch.float32, kernel_device, seed=1)
    cells = tile_map(task_ids)
    cases = [
        (dict(tile_map=cells[:, :1]), ValueError, r"shape \(2, 2, 3\)"),
        (dict(tile_map=cells.int()), ValueError, "contiguous uint8"),
        (dict(tile_map=cells.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "contiguous"),
        (dict(tile_map=cells.tolist()), TypeError, "tensor or None"),
        (dict(free_weights_zero=True), ValueError, "needs a tile_map"),
        (dict(tile_map=cells, free_weights_zero=1), TypeError, "must be a bool"),
    ]
    for backend in ("triton", "reference"):
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message):
                masked_linear(x, weight, task_ids, 1, backend=backend, **kwargs)


def _packed_linear(device, seed=2):
    import packnet

    x, weight, task_ids, bias = _linear_case(3, 64, 100, torch.float32, device, seed=seed)
    layer = packnet.PackedLinear(100, 64, 3, device=device, backend="triton")
    layer.load_packed(weight, task_ids, [bias, bias * 2, bias * 3])
    return layer, x


@pytest.mark.interpreter
def test_packed_linear_uses_a_map_it_keeps_current(kernel_device):
    """The layer's map-driven outputs equal the plain predicate path for every task; modifying the ids or weights
    in place (their version counters move) rebuilds the map and rechecks the free weights before the next call."""
    layer, x = _packed_linear(kernel_device)

    def both(task):
        layer.use_tile_map = True
        mapped = layer(x, task=task)
        layer.use_tile_map = False
        plain = layer(x, task=task)
        layer.use_tile_map = True
        return mapped, plain

    for task in (1, 2, 3):
        assert torch.equal(*both(task))
    cells, free_weights_zero = layer.tile_map_state()
    assert free_weights_zero and torch.equal(cells, tile_map(layer.task_ids))
    assert layer.tile_map_state()[0] is cells  # reused while nothing changed
    with torch.no_grad():
        layer.task_ids[:CELL_ROWS, :CELL_COLS] = 3  # block (0, 0) now belongs to task 3 alone
    assert not torch.equal(layer.tile_map_state()[0], cells)
    for task in (1, 2, 3):
        assert torch.equal(*both(task))
    with torch.no_grad():
        layer.weight[layer.task_ids == 0] = float("nan")  # free weights no longer zero
    assert layer.tile_map_state()[1] is False
    for task in (1, 2, 3):
        mapped, plain = both(task)
        assert torch.isfinite(mapped).all() and torch.equal(mapped, plain)
    assert not any("tile" in key for key in layer.state_dict())


@pytest.mark.interpreter
def test_refresh_tile_map_after_writes_no_version_counter_sees(kernel_device):
    """A block handed from task 3 to task 1 through ``.data`` (its version counter stays): after
    ``refresh_tile_map`` task 1 reads it, as the predicate path does."""
    layer, x = _packed_linear(kernel_device)
    with torch.no_grad():
        layer.task_ids[:CELL_ROWS, :CELL_COLS] = 3  # block (0, 0) belongs to task 3 alone
        layer.weight[:CELL_ROWS, :CELL_COLS] = 1.0
    layer(x, task=1)  # the map now says task 1 may skip block (0, 0)
    version = layer.task_ids._version
    layer.task_ids.data[:CELL_ROWS, :CELL_COLS] = 1
    assert layer.task_ids._version == version
    layer.refresh_tile_map()
    mapped = layer(x, task=1)
    layer.use_tile_map = False
    assert torch.equal(mapped, layer(x, task=1))


def test_reference_path_builds_no_map():
    layer, x = _packed_linear("cpu")
    layer.backend = "auto"  # CPU tensors: the reference runs, which has no use for a map
    layer(x, task=1)
    assert layer._tile_state is None


@pytest.mark.interpreter
def test_packed_linear_with_a_map_compiles_to_one_graph(kernel_device):
    from torch._dynamo.testing import CompileCounterWithBackend

    layer, x = _packed_linear(kernel_device)
    expected = layer(x, task=2)  # the eager call makes the map the compiled graph uses
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda inputs: layer(inputs, task=2), backend=counter, fullgraph=True)
    assert torch.equal(compiled(x), expected)
    assert counter.frame_count == 1


def _conv_case(batch, in_channels, out_channels, kernel, groups, dtype, device, seed):
    """A conv whose ids are block-structured over the kernels' ``[out, kh * kw * C/groups]`` layout."""
    generator = torch.Generator().manual_seed(seed)
    cin_per_group = in_channels // groups
    matrix = _block_ids(out_channels, kernel * kernel * cin_per_group, seed)
    task_ids = matrix.reshape(out_channels, kernel, kernel, cin_per_group).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(gemm_matrix(task_ids), matrix)
    weight = torch.randn(task_ids.shape, generator=generator).to(dtype)
    weight = torch.where(task_ids == 0, torch.zeros((), dtype=dtype), weight)
    x = torch.randn(batch, in_channels, 5, 4, generator=generator).to(dtype)
    layout = torch.channels_last
    return (
        x.to(device).contiguous(memory_format=layout),
        weight.to(device).contiguous(memory_format=layout),
        task_ids.to(device).contiguous(memory_format=layout),
    )


# (batch, in, out, kernel, groups): a 3x3 over 32 channels, a grouped 3x3 with 32 channels and outputs per group,
# a 1x1 over 64 channels; and a 3x3 over 16 channels, whose taps do not start on cell columns (map not used).
CONV_CASES = [(1, 32, 40, 3, 1), (1, 64, 64, 3, 2), (2, 64, 33, 1, 1), (1, 16, 24, 3, 1)]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv_tile_paths_equal_the_predicate_path(case, kernel_device):
    from packnet_kernels import masked_conv2d
    from packnet_kernels.conv2d import tile_map_applies

    batch, in_channels, out_channels, kernel, groups = case
    x, weight, task_ids = _conv_case(*case, torch.float16, kernel_device, seed=in_channels + out_channels)
    assert tile_map_applies(in_channels // groups, out_channels // groups, groups) == (in_channels // groups >= 32)
    cells = tile_map(task_ids)
    # Tasks 1 and 2 meet skipped, raw and checked tiles; the last task's raw path is the linear tests'.
    for task in (1, 2):
        expected = masked_conv2d(x, weight, task_ids, task, None, 1, 1, 1, groups, relu=True, backend="triton")
        for free_weights_zero in (False, True):
            got = masked_conv2d(
                x,
                weight,
                task_ids,
                task,
                None,
                1,
                1,
                1,
                groups,
                relu=True,
                tile_map=cells,
                free_weights_zero=free_weights_zero,
                backend="triton",
            )
            assert torch.equal(got, expected), (task, free_weights_zero)


@pytest.mark.interpreter
def test_conv_obeys_the_map(kernel_device):
    """A map claiming the first cell (output channels 0..31, tap (0, 0), channels 0..31) holds only task 3 makes task 1
    skip it; a map claiming task 1 owns every cell makes task 1 read raw weights when free weights are zero."""
    from packnet_kernels import masked_conv2d

    x, weight, task_ids = _conv_case(1, 32, 32, 3, 1, torch.float32, kernel_device, seed=4)
    task_ids = torch.ones_like(task_ids)
    lying = tile_map(task_ids)
    lying[:, 0, 0] = 3
    skipped = weight.clone()
    skipped[:, :, 0, 0] = 0
    got = masked_conv2d(x, weight, task_ids, 1, None, 1, 1, tile_map=lying, backend="triton")
    assert torch.equal(got, masked_conv2d(x, skipped, task_ids, 1, None, 1, 1, backend="triton"))
    task_ids[3, 5, 1, 2], weight[3, 5, 1, 2] = 2, 2.5
    raw = masked_conv2d(
        x,
        weight,
        task_ids,
        1,
        None,
        1,
        1,
        tile_map=tile_map(torch.ones_like(task_ids)),
        free_weights_zero=True,
        backend="triton",
    )
    assert torch.equal(raw, masked_conv2d(x, weight, torch.ones_like(task_ids), 1, None, 1, 1, backend="triton"))
    assert not torch.equal(raw, masked_conv2d(x, weight, task_ids, 1, None, 1, 1, backend="triton"))
