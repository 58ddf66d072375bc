"""Pure-PyTorch reference semantics of the masked ops: the spec every kernel is tested against.

The effective weight of task ``t`` is ``where((task_ids != 0) & (task_ids <= t), weight, 0)``: a select, not a
multiply, so an Inf or NaN stored in a weight that task ``t`` does not own never reaches task ``t``'s output.
Everything here runs in any floating dtype, float64 included, on any device.

Mixed-task batches: ``task`` may be a 1-D integer tensor ``tasks`` with one entry per row (per image for conv; for
linear, per row of the input with its leading dimensions flattened). Row ``i`` is then the single-task op on row
``i`` with task ``tasks[i]``, and each epilogue argument is either a ``[out]`` vector shared by every task or a
``[num_tasks, out]`` table whose row ``tasks[i] - 1`` row ``i`` uses. The reference runs the single-task op once per
task present, on that task's rows (:func:`per_task_rows`), so its rows are bitwise those of per-task calls.

A tile map (:func:`tile_map`) summarises which tasks own weights in each cell of a fixed grid over a weight; kernels
given one skip tiles a task does not use and read no ids where every owner is visible to the task. It changes which
bytes are read, never a result: the ops here ignore it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import TILE_CELL


def gemm_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as the kernels' ``[out, K]`` operand: a Linear's ``[out, in]`` as it is, a Conv2d's
    ``[out, in/groups, kh, kw]`` with K ordered (kh, kw, channel), channels fastest."""
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 4:
        return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    raise ValueError(f"expected a 2-D linear or 4-D conv weight, got shape {tuple(tensor.shape)}")


def tile_map(task_ids: torch.Tensor, cell: tuple[int, int] = TILE_CELL) -> torch.Tensor:
    """Per cell of ``gemm_matrix(task_ids)`` (``cell`` = rows x columns; the last row and column of cells may be
    partial), the smallest and the largest nonzero task id, both 0 when every id in the cell is 0 (free).

    Returns ``[2, ceil(out / cell[0]), ceil(K / cell[1])]`` uint8: plane 0 the smallest, plane 1 the largest.
    """
    if task_ids.dtype != torch.uint8:
        raise TypeError(f"task_ids must be torch.uint8, got {task_ids.dtype}")
    ids = gemm_matrix(task_ids).to(torch.int16)
    rows, cols = ids.shape
    cell_rows, cell_cols = cell
    grid_rows, grid_cols = -(-rows // cell_rows), -(-cols // cell_cols)
    padded = ids.new_zeros(grid_rows * cell_rows, grid_cols * cell_cols)  # padding is free
    padded[:rows, :cols] = ids
    cells = padded.reshape(grid_rows, cell_rows, grid_cols, cell_cols).transpose(1, 2)
    largest = cells.amax(dim=(2, 3))
    smallest = torch.where(cells == 0, 256, cells).amin(dim=(2, 3))
    smallest = torch.where(smallest == 256, 0, smallest)
    return torch.stack([smallest, largest]).to(torch.uint8)


def task_mask(task_ids: torch.Tensor, task: int) -> torch.Tensor:
    """Boolean mask of the elements task ``task`` may use: ``(task_ids != 0) & (task_ids <= task)``."""
    return (task_ids != 0) & (task_ids <= task)


def effective_weight(weight: torch.Tensor, task_ids: torch.Tensor, task: int) -> torch.Tensor:
    """``where(task_mask(task_ids, task), weight, 0)``, same shape and dtype as ``weight``."""
    return torch.where(task_mask(task_ids, task), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def apply_epilogue(
    y: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    relu: bool,
    channel_dim: int,
) -> torch.Tensor:
    """``y * scale[c] + shift[c]`` (each optional, per output channel ``c`` along ``channel_dim``), then ReLU."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    if scale is not None:
        y = y * scale.reshape(shape)
    if shift is not None:
        y = y + shift.reshape(shape)
    if relu:
        y = torch.relu(y)
    return y


def task_vector(vector: torch.Tensor | None, task: int) -> torch.Tensor | None:
    """Task ``task``'s epilogue vector: ``vector`` itself when it is ``[out]`` (shared), row ``task - 1`` of a
    ``[num_tasks, out]`` table."""
    return vector if vector is None or vector.dim() == 1 else vector[task - 1]


def empty_rows_like(part: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised tensor of ``rows`` rows shaped like ``part`` beyond dimension 0, laid out in memory as
    ``part`` is (channels_last stays channels_last), so a result assembled from per-task parts has the layout a
    single-task run gives, and the ops after it compute exactly what they compute on that."""
    order = sorted(range(part.dim()), key=lambda dim: -part.stride(dim))  # outermost first; stable for ties
    sizes = [rows if dim == 0 else part.shape[dim] for dim in range(part.dim())]
    dense = part.new_empty([sizes[dim] for dim in order])
    return dense.permute([order.index(dim) for dim in range(part.dim())])


def per_task_rows(op, x: torch.Tensor, tasks: torch.Tensor, vectors: tuple) -> torch.Tensor:
    """Row ``i`` of the result is row ``i`` of ``op(x[rows of task t], t, *task vectors of t)`` with ``t =
    tasks[i]``: ``op`` runs once per distinct task (in increasing order) on the rows of that task.

    ``x [rows, ...]``, ``tasks [rows]`` integer with values in 1..255 (checked: raises ``ValueError``), ``vectors``
    epilogue vectors or tables (:func:`task_vector`). Reads the task values on the host (a device sync on a GPU)."""
    if tasks.numel() and (int(tasks.min()) < 1 or int(tasks.max()) > 255):
        raise ValueError(f"every task must be in 1..255, got tasks {tasks.tolist()}")
    tables = [vector.shape[0] for vector in vectors if vector is not None and vector.dim() == 2]
    if tasks.numel() and tables and int(tasks.max()) > min(tables):
        raise ValueError(f"task {int(tasks.max())} has no row in a per-task epilogue table of {min(tables)} rows")
    if tasks.numel() == 0:
        return op(x, 1, *(task_vector(vector, 1) for vector in vectors))
    result = None
    for task in torch.unique(tasks).tolist():
        rows = (tasks == task).nonzero().squeeze(1).to(x.device)
        part = op(x[rows], task, *(task_vector(vector, task) for vector in vectors))
        if result is None:
            result = empty_rows_like(part, x.shape[0])
        result[rows] = part
    return result


def masked_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task: int | torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """``relu?((x @ W_t^T + bias) * scale + shift)`` with ``W_t = effective_weight(weight, task_ids, task)``.

    Shapes: ``x [..., in]``, ``weight``/``task_ids`` ``[out, in]``, ``bias``/``scale``/``shift`` ``[out]``;
    returns ``[..., out]`` in ``x``'s dtype. A mixed batch: ``task`` an integer tensor with one task per row of
    ``x.reshape(-1, in)``, and ``bias``/``scale``/``shift`` each ``[out]`` or ``[num_tasks, out]`` (module docstring).
    """
    if isinstance(task, torch.Tensor):
        rows = x.reshape(-1, x.shape[-1])

        def single(rows_of_task, row_task, *vectors):
            return masked_linear_ref(
                rows_of_task, weight, task_ids, row_task, *vectors[:1], scale=vectors[1], shift=vectors[2], relu=relu
            )

        y = per_task_rows(single, rows, task.reshape(-1), (bias, scale, shift))
        return y.reshape(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, effective_weight(weight, task_ids, task), bias)
    return apply_epilogue(y, scale, shift, relu, channel_dim=-1)


def masked_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task: int | torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """``relu?((conv2d(x, W_t) + bias) * scale + shift)`` with ``W_t = effective_weight(weight, task_ids, task)``.

    Shapes: ``x [N, C, H, W]``, ``weight``/``task_ids`` ``[out, C/groups, kh, kw]``, ``bias``/``scale``/``shift``
    ``[out]``; returns ``[N, out, H_out, W_out]``. ``stride``/``padding``/``dilation`` as in ``F.conv2d``. A mixed
    batch: ``task`` an integer tensor ``[N]``, one task per image, and ``bias``/``scale``/``shift`` each ``[out]`` or
    ``[num_tasks, out]`` (module docstring).
    """
    if isinstance(task, torch.Tensor):

        def single(images, image_task, *vectors):
            return masked_conv2d_ref(
                images,
                weight,
                task_ids,
                image_task,
                vectors[0],
                stride,
                padding,
                dilation,
                groups,
                scale=vectors[1],
                shift=vectors[2],
                relu=relu,
            )

        return per_task_rows(single, x, task, (bias, scale, shift))
    y = F.conv2d(x, effective_weight(weight, task_ids, task), bias, stride, padding, dilation, groups)
    return apply_epilogue(y, scale, shift, relu, channel_dim=1)


def masked_embedding_ref(
    indices: torch.Tensor, weight: torch.Tensor, task_ids: torch.Tensor, task: int | torch.Tensor
) -> torch.Tensor:
    """``F.embedding(indices, W_t)`` with ``W_t = effective_weight(weight, task_ids, task)``, reading only the rows
    looked up: ``where(task_mask(task_ids[indices], task), weight[indices], 0)``.

    Shapes: ``indices [...]`` integer, ``weight``/``task_ids`` ``[num_embeddings, dim]``; returns ``[..., dim]`` in
    ``weight``'s dtype. A mixed batch: ``task`` an integer tensor with one task per element of ``indices.reshape(-1)``.
    The select is elementwise, so a mixed batch's row ``i`` is bitwise the single-task lookup of task ``task[i]``.
    """
    rows = weight[indices]
    ids = task_ids[indices]
    if isinstance(task, torch.Tensor):
        task = task.reshape(*indices.shape, 1).to(torch.int16)
    owned = (ids != 0) & (ids.to(torch.int16) <= task)
    return torch.where(owned, rows, torch.zeros((), dtype=weight.dtype, device=weight.device))
