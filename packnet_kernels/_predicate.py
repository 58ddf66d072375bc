"""The task predicate shared by every kernel: which weights a task may use."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def task_owns(ids, active_task):
    """``(ids != 0) & (ids <= active_task)`` for a uint8 ``ids`` tile and an int ``active_task`` in 1..255.

    One unsigned byte compare per element instead of a widening and two compares: ``ids - 1`` wraps the free id 0
    to 255, which no task exceeds, and maps an owner k to k - 1, which is below ``active_task`` exactly when
    k <= active_task.
    """
    return (ids - 1) < active_task.to(tl.uint8)
