"""Helpers for training PackNet under ``torch.distributed`` (DistributedDataParallel launched by ``torchrun``).

:class:`packnet.PackNet` accepts a DDP-wrapped model and keeps every rank in step by itself: after the random
re-initialisation at the start of a task, after pruning and when a task is frozen it broadcasts the shared weights,
their task ids and the per-task state (biases, BatchNorm statistics, head) from rank 0 of the DDP's process group.
The functions here set a process up from ``torchrun``'s environment, wrap a model and shard data.

Nothing here touches CUDA or the process group at import time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "DeviceBatches",
    "broadcast_",
    "cleanup",
    "ddp_group",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "mean_across_ranks",
    "wrap_ddp",
]


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group, 0 outside distributed runs."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group, 1 outside distributed runs."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a plain single-process run: the process that logs, shows progress and saves."""
    return get_rank() == 0


def init_from_env(backend: str | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment; returns this process's device.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by ``torchrun``).
    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise. With CUDA, the process uses
    GPU ``LOCAL_RANK`` (one process per GPU). Calling it again in an initialised process only returns the device.

    Raises:
        RuntimeError: the torchrun variables are missing (the script was not started by ``torchrun``).
    """
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_from_env: environment variables {missing} are not set; launch with "
            "`torchrun --nproc_per_node=N script.py` (or `python -m torch.distributed.run ...`)"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return device


def cleanup() -> None:
    """Leave the process group (no-op outside one)."""
    if is_distributed():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device | str | None = None, **ddp_kwargs) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it in ``DistributedDataParallel`` for :class:`packnet.PackNet`.

    On a CUDA device the wrapper gets ``device_ids=[device]``. Extra keyword arguments go to DDP. DDP broadcasts
    rank 0's parameters and buffers here, so the ranks may build the model with different seeds.
    """
    if not is_distributed():
        raise RuntimeError("wrap_ddp: no process group; call packnet.distributed.init_from_env() first")
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = model.to(device)
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device])
        ddp_kwargs.setdefault("output_device", device)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def ddp_group(model: nn.Module):
    """The process group of a ``DistributedDataParallel`` model with more than one rank, else None."""
    if not isinstance(model, nn.parallel.DistributedDataParallel) or not is_distributed():
        return None
    group = model.process_group
    return group if dist.get_world_size(group) > 1 else None


def broadcast_(tensors: Iterable[torch.Tensor], group=None, src_rank: int = 0) -> None:
    """Overwrite ``tensors`` in place with their values on rank ``src_rank`` of ``group`` (its group rank).

    Every rank must pass tensors of the same shapes, dtypes and order. Tensors of one dtype and device travel in
    one flat buffer, so a model's state costs a few collectives, not one per tensor.
    """
    src = dist.get_global_rank(group, src_rank) if group is not None else src_rank
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    with torch.no_grad():
        for same_kind in buckets.values():
            flat = torch.cat([tensor.detach().reshape(-1) for tensor in same_kind])
            dist.broadcast(flat, src, group=group)
            offset = 0
            for tensor in same_kind:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


def mean_across_ranks(value: float, group=None, device: torch.device | str = "cpu") -> float:
    """The mean of a Python float over the ranks of ``group`` (identical on every rank)."""
    buffer = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(buffer, group=group)
    return float(buffer) / dist.get_world_size(group)


class DeviceBatches:
    """The ``(inputs, targets)`` batches of ``data`` (e.g. a ``DataLoader``) moved to ``device`` as they are drawn.

    ``sampler`` is ``data``'s own, so :meth:`packnet.PackNet.train_epochs` still finds a ``DistributedSampler`` and
    calls its ``set_epoch`` before every pass.
    """

    def __init__(self, data: Iterable, device: torch.device | str):
        self.data = data
        self.device = torch.device(device)

    @property
    def sampler(self):
        return getattr(self.data, "sampler", None)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in self.data:
            yield inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
