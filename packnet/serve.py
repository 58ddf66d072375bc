"""Serve a pack with Ray Serve: one endpoint for every task, requests of different tasks batched into one forward.

One deployment (:class:`PackServer`) loads the pack once per replica (on the replica's GPU when Ray gives it one),
gathers requests with ``@serve.batch`` and runs each batch as one mixed-task forward: a task tensor with one task
per row, so that requests for five tasks arriving together cost one pass over the shared weights. With
``batching="by_task"`` the same deployment keeps one batch queue per task instead (the yardstick mixed batching is
measured against).

HTTP (JSON): ``POST /predict`` with ``{"task": 2, "inputs": [...]}`` (inputs nested lists of shape
``[batch, *input_shape]``) answers ``{"task": 2, "outputs": [...]}``; ``GET /tasks`` lists the tasks with their
input and output shapes; ``GET /healthz`` says the replica is up and which pack it serves; ``GET /stats`` gives the
replica's metrics as JSON. Errors answer ``{"error": "one line"}`` with a 4xx status; a bad request is refused
before it joins a batch, and a failure inside a batch is retried request by request, so it fails alone. Python
callers use a Ray Serve handle: ``handle.predict.remote(task, inputs)`` returns the outputs as a tensor.

Ray is imported inside the functions that need it: ``import packnet.serve`` works without Ray (the request checks
are plain Python), and the library never imports this module itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "APP_NAME",
    "BATCHING_MODES",
    "DEPLOYMENT_NAME",
    "PackServer",
    "RequestError",
    "ServeConfig",
    "ServedPack",
    "ServeMetrics",
    "app_builder",
    "build_app",
    "inputs_to_tensor",
    "load_served_pack",
    "parse_predict_body",
    "run_batch",
    "start",
]

log = logging.getLogger(__name__)

APP_NAME = "packnet"
DEPLOYMENT_NAME = "PackServer"
BATCHING_MODES = ("mixed", "by_task")

# Why a request was refused: the ``reason`` label of the rejection counter, one per kind of mistake.
REJECTION_REASONS = (
    "malformed_json",  # 400: not JSON, not UTF-8, NaN/Infinity literals, nested too deep
    "bad_request",  # 400: not an object, a field missing or unknown
    "bad_task",  # 422: task not an integer
    "unknown_task",  # 404: task not in the pack
    "bad_shape",  # 422: inputs not nested lists of [batch, *input_shape]
    "bad_dtype",  # 422: a value that is not a number (string, boolean, null, object), or a tensor of such a dtype
    "non_finite",  # 422: inf or nan in the inputs (e.g. 1e999)
    "out_of_range",  # 422: a value the pack's dtype cannot hold
    "too_large",  # 413: body over max_request_bytes (Content-Length or counted while streaming), rows over max_rows
    "not_found",  # 404: no such path
    "method_not_allowed",  # 405
    "pack_changed",  # 409: a reload changed the task set or input shape while the request waited
    "non_finite_output",  # 422: the model's outputs for these inputs are not finite (overflow)
    "internal",  # 500: the forward failed for this request alone
)

# Histogram bucket boundaries (upper bounds; one more bucket holds what lies above the last).
BATCH_REQUEST_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_ROW_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TASKS_PER_BATCH_BOUNDARIES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 128, 255)
LATENCY_MS_BOUNDARIES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
FORWARD_MS_BOUNDARIES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


# ------------------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class ServeConfig:
    """How a replica batches and what it accepts.

    Attributes:
        max_batch: most requests in one batch (``@serve.batch``'s ``max_batch_size``), 1+.
        batch_wait_ms: longest a batch waits for more requests after its first, in ms (0+).
        batching: ``"mixed"`` (one queue, any tasks in a batch, one forward with a task tensor) or ``"by_task"``
            (one queue per task, each batch of one task).
        max_request_bytes: largest HTTP body accepted, in bytes; larger ones get a 413.
        max_rows: most samples (rows of ``inputs``) in one request; more get a 413.
        input_shape: per-sample input shape when the pack records none (or to check it against the pack's).
        backend: kernel backend of the packed layers (``"auto"``: Triton on CUDA, the reference elsewhere).
        watch_s: poll the pack file every ``watch_s`` seconds and reload it when it changed (0: never).
        imports: modules each replica imports before loading (e.g. one calling ``packnet.register_builder``).
    """

    max_batch: int = 32
    batch_wait_ms: float = 5.0
    batching: str = "mixed"
    max_request_bytes: int = 16 * 1024 * 1024
    max_rows: int = 256
    input_shape: tuple[int, ...] | None = None
    backend: str = "auto"
    watch_s: float = 0.0
    imports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")

        whole("max_batch", self.max_batch, 1)
        whole("max_request_bytes", self.max_request_bytes, 1)
        whole("max_rows", self.max_rows, 1)
        for name in ("batch_wait_ms", "watch_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number of at least 0, got {value!r}")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {list(BATCHING_MODES)}, got {self.batching!r}")
        if self.backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {self.backend!r}")
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not all(type(dim) is int and dim >= 1 for dim in shape):
                raise ValueError(f"input_shape must be positive integers, got {self.input_shape!r}")
            object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "imports", tuple(self.imports))


# -------------------------------------------------------------------------------------------------------- the errors
class RequestError(ValueError):
    """A request the server refuses (or, status 500, one whose forward failed alone).

    Attributes:
        status: the HTTP status (4xx; 500 for ``internal``).
        reason: one of :data:`REJECTION_REASONS`, the label of the rejection counter.
        message: one line: what is wrong, the value, what to send instead.
    """

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def __reduce__(self):  # crosses process boundaries (a Ray handle's caller) with its fields
        return (type(self), (self.status, self.reason, self.message))


def _kind(value: Any) -> str:
    """A short description of a JSON value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------------------------------------ the checks
class _NonStandardConstant(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NonStandardConstant(name)


def parse_predict_body(body: bytes) -> tuple[Any, Any]:
    """The ``task`` and ``inputs`` of a ``POST /predict`` body, as parsed JSON values (checked later).

    Strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's parser and Starlette's accept) are refused,
    as are fields other than ``task`` and ``inputs``.

    Raises:
        RequestError: 400 ``malformed_json`` or ``bad_request``.
    """
    if not body.strip():
        raise RequestError(400, "bad_request", 'empty body; send {"task": T, "inputs": [[...], ...]}')
    try:
        document = json.loads(body, parse_constant=_refuse_constant)
    except _NonStandardConstant as error:
        raise RequestError(
            400, "malformed_json", f"{error} is not a JSON value; every input must be a finite number"
        ) from None
    except RecursionError:
        raise RequestError(400, "malformed_json", "the body nests too deeply to be parsed") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise RequestError(
            400, "bad_request", f'the body must be a JSON object {{"task": T, "inputs": [...]}}, got {_kind(document)}'
        )
    unknown = sorted(set(document) - {"task", "inputs"})
    if unknown:
        raise RequestError(400, "bad_request", f'unknown field(s) {unknown}; the body holds "task" and "inputs" only')
    for name in ("task", "inputs"):
        if name not in document:
            raise RequestError(400, "bad_request", f'missing field "{name}"; send {{"task": T, "inputs": [...]}}')
    return document["task"], document["inputs"]


def check_task(task: Any, num_tasks: int) -> int:
    """``task`` as an int in 1..num_tasks.

    Raises:
        RequestError: 422 ``bad_task`` (not an integer: a float, string, boolean...) or 404 ``unknown_task``.
    """
    if isinstance(task, bool) or not isinstance(task, int):
        raise RequestError(422, "bad_task", f"task must be an integer in 1..{num_tasks}, got {_kind(task)}")
    if not 1 <= task <= num_tasks:
        raise RequestError(
            404,
            "unknown_task",
            f"task {task} is not in this pack, which holds tasks 1..{num_tasks} (GET /tasks lists them)",
        )
    return task


def _index(path: Sequence[int]) -> str:
    return "inputs" + "".join(f"[{i}]" for i in path)


def _first_shape_mismatch(value: Any, expected: Sequence[int], path: tuple[int, ...] = ()) -> str | None:
    """Where nested lists ``value`` first differ from ``expected`` (a full shape), or None."""
    if not expected:
        if isinstance(value, list):
            return f"{_index(path)} is a list, where a number belongs"
        return None
    if not isinstance(value, list):
        return f"{_index(path)} is {_kind(value)}, where a list of {expected[0]} belongs"
    if len(value) != expected[0]:
        return f"{_index(path)} holds {len(value)} items, expected {expected[0]}"
    for i, item in enumerate(value):
        found = _first_shape_mismatch(item, expected[1:], (*path, i))
        if found:
            return found
    return None


def _first_non_number(value: Any, path: tuple[int, ...] = ()) -> str | None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_number(item, (*path, i))
            if found:
                return found
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{_index(path)} is {_kind(value)}, expected a number"
    return None


def _check_values(values: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise 422 unless every value of ``values`` (float64) is finite and fits ``dtype``."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        where = tuple(int(i) for i in (~finite).nonzero()[0])
        raise RequestError(
            422, "non_finite", f"{_index(where)} is {float(values[where])}; every input must be a finite number"
        )
    if values.numel():
        limit = torch.finfo(dtype).max
        too_big = values.abs() > limit
        if bool(too_big.any()):
            where = tuple(int(i) for i in too_big.nonzero()[0])
            raise RequestError(
                422,
                "out_of_range",
                f"{_index(where)} = {float(values[where]):g} is outside the range of the pack's"
                f" {str(dtype).removeprefix('torch.')} (|x| <= {limit:g})",
            )


def inputs_to_tensor(inputs: Any, input_shape: Sequence[int], dtype: torch.dtype, max_rows: int) -> torch.Tensor:
    """Check ``inputs`` and return them as a CPU tensor ``[batch, *input_shape]`` of ``dtype``.

    ``inputs`` are nested lists of numbers (parsed JSON) or, from a Python caller, a tensor or NumPy array of a real
    (floating or integer) dtype. Values are checked finite and within ``dtype``'s range before the cast.

    Raises:
        RequestError: 422 ``bad_shape``, ``bad_dtype``, ``non_finite``, ``out_of_range``, or 413 ``too_large``
            (more than ``max_rows`` rows).
    """
    input_shape = tuple(input_shape)
    wanted = f"[batch, {', '.join(map(str, input_shape))}]" if input_shape else "[batch]"
    if type(inputs).__module__ == "numpy" and type(inputs).__name__ == "ndarray":
        try:
            inputs = torch.from_numpy(inputs)
        except TypeError as error:
            raise RequestError(422, "bad_dtype", f"inputs must hold real numbers, got a NumPy array: {error}") from None
    if isinstance(inputs, torch.Tensor):
        if inputs.dtype == torch.bool or inputs.is_complex():
            raise RequestError(422, "bad_dtype", f"inputs must hold real numbers, got a tensor of {inputs.dtype}")
        if inputs.dim() == 0 or tuple(inputs.shape[1:]) != input_shape:
            raise RequestError(
                422, "bad_shape", f"inputs must have shape {wanted}, got a tensor of shape {list(inputs.shape)}"
            )
        rows = inputs.shape[0]
        if rows > max_rows:
            raise RequestError(
                413, "too_large", f"inputs hold {rows} rows, more than the {max_rows} a request may hold; split it"
            )
        if rows == 0:
            raise RequestError(422, "bad_shape", "inputs hold no row; send at least one sample")
        values = inputs.detach().to("cpu", torch.float64)
        _check_values(values, dtype)
        return values.to(dtype)
    if not isinstance(inputs, list):
        raise RequestError(422, "bad_shape", f"inputs must be nested lists of shape {wanted}, got {_kind(inputs)}")
    rows = len(inputs)
    if rows > max_rows:
        raise RequestError(
            413, "too_large", f"inputs hold {rows} rows, more than the {max_rows} a request may hold; split it"
        )
    if rows == 0:
        raise RequestError(422, "bad_shape", "inputs hold no row; send at least one sample")
    expected = (rows, *input_shape)
    # Fast path: one pass per nesting level over lists; the slow walks below only run to describe a mistake.
    level: list = [inputs]
    for size in expected:
        if not all(type(item) is list and len(item) == size for item in level):
            raise RequestError(
                422, "bad_shape", f"inputs must have shape {wanted}: {_first_shape_mismatch(inputs, expected)}"
            )
        level = [child for item in level for child in item]
    if not all(type(value) is float or type(value) is int for value in level):
        # isinstance would let booleans through (Python's True is the number 1); type() does not.
        deeper = _first_shape_mismatch(inputs, expected)  # lists nested deeper than [batch, *input_shape]
        if deeper:
            raise RequestError(422, "bad_shape", f"inputs must have shape {wanted}: {deeper}")
        raise RequestError(422, "bad_dtype", _first_non_number(inputs) or "a value is not a plain number")
    try:
        values = torch.tensor(level, dtype=torch.float64)
    except (OverflowError, RuntimeError):  # an integer beyond a double (JSON allows any number of digits)
        where = next(i for i, value in enumerate(level) if type(value) is int and abs(value) > 2**1023)
        position = []
        for size in reversed(expected):
            position.append(where % size)
            where //= size
        raise RequestError(
            422, "out_of_range", f"{_index(position[::-1])} is an integer too large for any float dtype"
        ) from None
    values = values.reshape(expected)
    _check_values(values, dtype)
    return values.to(dtype)


# ------------------------------------------------------------------------------------------------------ the served pack
@dataclass
class ServedPack:
    """A pack loaded for serving, validated and warmed up.

    Attributes:
        path: the pack file.
        model: the packed model, in eval mode, on ``device``.
        num_tasks: tasks held (1..num_tasks).
        input_shape: per-sample input shape.
        output_shapes: per task (index task-1), the per-sample output shape.
        dtype: the pack's dtype; inputs are cast to it.
        device: where the model runs.
        sha256: the checksum recorded in the pack.
        signature: ``(inode, size, mtime_ns)`` of the file when it was read.
        generation: 1 for the first load, one more for each accepted reload.
    """

    path: str
    model: nn.Module
    num_tasks: int
    input_shape: tuple[int, ...]
    output_shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    device: torch.device
    sha256: str
    signature: tuple[int, int, int]
    generation: int = 1

    def describe_tasks(self) -> list[dict]:
        return [
            {
                "task": task,
                "input_shape": list(self.input_shape),
                "output_shape": list(shape),
                "output_size": math.prod(shape),
            }
            for task, shape in enumerate(self.output_shapes, 1)
        ]


def file_signature(path: str) -> tuple[int, int, int]:
    """``(inode, size, mtime_ns)``: changes whenever a file is replaced (``save_pack`` renames) or rewritten."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def load_served_pack(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    input_shape: Sequence[int] | None = None,
    backend: str = "auto",
    generation: int = 1,
) -> ServedPack:
    """Read, validate, build and warm up the pack at ``path`` for serving.

    On top of :func:`packnet.read_pack`'s checks (format, checksum, dtypes, shapes, ids, free weights) and the
    rebuild's (architecture, module tree), every task runs once on a probe of two samples, and a mixed batch of
    every task runs once when all tasks share one output shape: a pack that loads here answers requests.

    Raises:
        PackFormatError: the file is not a valid pack or does not rebuild.
        OSError: the file cannot be read.
        ValueError: no input shape is known (the pack records none and ``input_shape`` is None), ``input_shape``
            differs from the pack's, or a task's forward fails or does not return a tensor ``[batch, ...]``.
    """
    from .pack import build_packed_model, read_pack

    path = os.fspath(path)
    signature = file_signature(path)
    pack = read_pack(path)
    recorded = None if pack.input_shape is None else tuple(pack.input_shape)
    given = None if input_shape is None else tuple(input_shape)
    if recorded is not None and given is not None and recorded != given:
        raise ValueError(f"{path}: input shape {list(given)} was given but the pack records {list(recorded)}")
    shape = recorded or given
    if shape is None:
        raise ValueError(
            f"{path}: the pack records no input shape; give it (input_shape=(1, 8, 8) or --input-shape 1,8,8)"
        )
    device = torch.device(device)
    model = build_packed_model(pack, backend=backend).to(device)
    probe = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0)).to(device, pack.dtype)
    output_shapes = []
    with torch.inference_mode():
        for task in range(1, pack.num_tasks + 1):
            try:
                outputs = model(probe, task=task)
            except Exception as error:  # noqa: BLE001 - the model's own forward may raise anything
                raise ValueError(
                    f"{path}: task {task} fails on a probe input: {type(error).__name__}: {error}"
                ) from None
            if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1 or outputs.shape[0] != len(probe):
                got = type(outputs).__name__ if not isinstance(outputs, torch.Tensor) else list(outputs.shape)
                raise ValueError(
                    f"{path}: task {task}'s forward must return a tensor [batch, ...] to be served, got {got}"
                )
            output_shapes.append(tuple(outputs.shape[1:]))
        if len(set(output_shapes)) == 1 and pack.num_tasks > 1:
            tasks = torch.arange(1, pack.num_tasks + 1, device=device)
            mixed_probe = probe[:1].expand(pack.num_tasks, *shape).contiguous()
            try:
                model(mixed_probe, task=tasks)
            except Exception as error:  # noqa: BLE001
                raise ValueError(f"{path}: a mixed-task probe batch fails: {_one_line(error)}") from None
    return ServedPack(
        path=path,
        model=model,
        num_tasks=pack.num_tasks,
        input_shape=tuple(shape),
        output_shapes=output_shapes,
        dtype=pack.dtype,
        device=device,
        sha256=pack.meta.get("sha256", ""),
        signature=signature,
        generation=generation,
    )


# --------------------------------------------------------------------------------------------------------- batching
@dataclass
class _Pending:
    """A checked request waiting for its batch: ``inputs [rows, *input_shape]`` in the pack's dtype, on the CPU."""

    task: int
    inputs: torch.Tensor
    received: float = field(default_factory=time.perf_counter)


@dataclass
class BatchReport:
    """What one batch was: its request and row counts and the distinct tasks it held."""

    requests: int
    rows: int
    tasks: int


def _forward(served: ServedPack, group: list[_Pending], mixed: bool) -> list[torch.Tensor]:
    inputs = torch.cat([request.inputs for request in group]).to(served.device)
    distinct = {request.task for request in group}
    if mixed and len(distinct) > 1:
        task: int | torch.Tensor = torch.cat(
            [torch.full((len(request.inputs),), request.task, dtype=torch.int64) for request in group]
        ).to(served.device)
    else:
        task = group[0].task  # one task: the plain single-task path (identical row for row)
    with torch.inference_mode():
        outputs = served.model(inputs, task=task).cpu()
    return list(outputs.split([len(request.inputs) for request in group]))


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_batch(
    served: ServedPack, requests: list[_Pending], mixed: bool = True
) -> tuple[list[torch.Tensor | RequestError], BatchReport]:
    """Run ``requests`` in as few forwards as possible; one result per request, in order.

    Mixed: every request whose task shares an output shape runs in one forward with a task tensor (one group for
    packs whose heads have one output size). Otherwise one forward per task. A request the current pack cannot run
    any more (a reload changed the tasks or the input shape after it was checked) gets a 409; when a group's forward
    raises, each of its requests runs alone so the failure stays with the request that causes it (a 500). Outputs
    that are not finite give that request a 422.

    Returns:
        The per-request outputs (``[rows, *output_shape]`` CPU tensors) or :class:`RequestError`, and the batch's
        report (requests that reached a forward, their rows, their distinct tasks).
    """
    results: list[torch.Tensor | RequestError | None] = [None] * len(requests)
    groups: dict[Any, list[int]] = {}
    for index, request in enumerate(requests):
        if request.task > served.num_tasks or tuple(request.inputs.shape[1:]) != served.input_shape:
            results[index] = RequestError(
                409,
                "pack_changed",
                f"the pack was reloaded while the request waited and no longer takes task {request.task} with inputs"
                f" {list(request.inputs.shape)}; GET /tasks and send again",
            )
            continue
        key = served.output_shapes[request.task - 1] if mixed else request.task
        groups.setdefault(key, []).append(index)
    ran = [index for group in groups.values() for index in group]
    report = BatchReport(
        requests=len(ran),
        rows=sum(len(requests[index].inputs) for index in ran),
        tasks=len({requests[index].task for index in ran}),
    )
    for indices in groups.values():
        group = [requests[index] for index in indices]
        try:
            outputs = _forward(served, group, mixed)
        except Exception as error:  # noqa: BLE001 - isolate whatever failed: rerun each request alone
            if len(group) == 1:
                log.exception("task %d: the forward failed", group[0].task)
                outputs = [
                    RequestError(500, "internal", f"task {group[0].task}: the forward failed: {_one_line(error)}")
                ]
            else:
                log.warning("a batch of %d requests failed (%s); running each alone", len(group), _one_line(error))
                outputs = []
                for request in group:
                    try:
                        outputs.append(_forward(served, [request], mixed)[0])
                    except Exception as single_error:  # noqa: BLE001
                        log.exception("task %d: the forward failed", request.task)
                        outputs.append(
                            RequestError(
                                500, "internal", f"task {request.task}: the forward failed: {_one_line(single_error)}"
                            )
                        )
        for index, output in zip(indices, outputs, strict=True):
            if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
                rows = sorted({int(row) for row in (~torch.isfinite(output)).nonzero()[:, 0]})
                output = RequestError(
                    422,
                    "non_finite_output",
                    f"task {requests[index].task}'s outputs for rows {rows[:8]} of the inputs are not finite in the"
                    f" pack's {str(served.dtype).removeprefix('torch.')}: inputs outside what the model handles",
                )
            results[index] = output
    return results, report  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------- metrics
class _Histogram:
    """Counts per bucket (upper bounds ``boundaries``, then one for the rest), with the count and sum."""

    def __init__(self, boundaries: Sequence[float]):
        self.boundaries = tuple(boundaries)
        self.counts = [0] * (len(self.boundaries) + 1)
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        bucket = next((i for i, bound in enumerate(self.boundaries) if value <= bound), len(self.boundaries))
        self.counts[bucket] += 1
        self.count += 1
        self.sum += value

    def as_dict(self) -> dict:
        return {
            "boundaries": list(self.boundaries),
            "counts": list(self.counts),
            "count": self.count,
            "sum": self.sum,
            "mean": self.sum / self.count if self.count else None,
        }


class ServeMetrics:
    """The replica's metrics, kept here (``GET /stats``, ``handle.stats``) and, inside a Ray Serve replica, exported
    through Ray's metrics (Prometheus, tagged with the application, deployment and replica):

    - ``packnet_serve_batch_requests`` / ``packnet_serve_batch_rows``: histograms of requests and rows per batch;
    - ``packnet_serve_tasks_per_batch``: histogram of distinct tasks per batch;
    - ``packnet_serve_forward_ms``: histogram of a batch's time in the model (its forwards, copies and checks);
    - ``packnet_serve_latency_ms`` (tag ``task``): time from a request's arrival at the replica to its answer;
    - ``packnet_serve_requests`` (tag ``task``): requests answered with outputs;
    - ``packnet_serve_rejected`` (tag ``reason``): requests refused, by :data:`REJECTION_REASONS`;
    - ``packnet_serve_reloads`` (tag ``outcome``: ``accepted``/``refused``): pack reloads.
    """

    def __init__(self, export: bool = False):
        self._lock = threading.Lock()
        self.batch_requests = _Histogram(BATCH_REQUEST_BOUNDARIES)
        self.batch_rows = _Histogram(BATCH_ROW_BOUNDARIES)
        self.tasks_per_batch = _Histogram(TASKS_PER_BATCH_BOUNDARIES)
        self.forward_ms = _Histogram(FORWARD_MS_BOUNDARIES)
        self.latency_ms: dict[int, _Histogram] = {}
        self.served: dict[int, int] = {}
        self.rejected: dict[str, int] = {}
        self.reloads = {"accepted": 0, "refused": 0}
        self._ray = None
        if export:
            from ray.serve import metrics

            self._ray = {
                "batch_requests": metrics.Histogram(
                    "packnet_serve_batch_requests", "requests per batch", list(BATCH_REQUEST_BOUNDARIES)
                ),
                "batch_rows": metrics.Histogram(
                    "packnet_serve_batch_rows", "rows (samples) per batch", list(BATCH_ROW_BOUNDARIES)
                ),
                "tasks_per_batch": metrics.Histogram(
                    "packnet_serve_tasks_per_batch", "distinct tasks per batch", list(TASKS_PER_BATCH_BOUNDARIES)
                ),
                "forward_ms": metrics.Histogram(
                    "packnet_serve_forward_ms", "a batch's time in the model, ms", list(FORWARD_MS_BOUNDARIES)
                ),
                "latency_ms": metrics.Histogram(
                    "packnet_serve_latency_ms",
                    "time from a request's arrival at the replica to its answer, ms",
                    list(LATENCY_MS_BOUNDARIES),
                    tag_keys=("task",),
                ),
                "served": metrics.Counter(
                    "packnet_serve_requests", "requests answered with outputs", tag_keys=("task",)
                ),
                "rejected": metrics.Counter(
                    "packnet_serve_rejected", "requests refused, by reason", tag_keys=("reason",)
                ),
                "reloads": metrics.Counter("packnet_serve_reloads", "pack reloads", tag_keys=("outcome",)),
            }

    def record_batch(self, report: BatchReport, forward_ms: float) -> None:
        if not report.requests:
            return
        with self._lock:
            self.batch_requests.observe(report.requests)
            self.batch_rows.observe(report.rows)
            self.tasks_per_batch.observe(report.tasks)
            self.forward_ms.observe(forward_ms)
            if self._ray:
                self._ray["batch_requests"].observe(report.requests)
                self._ray["batch_rows"].observe(report.rows)
                self._ray["tasks_per_batch"].observe(report.tasks)
                self._ray["forward_ms"].observe(forward_ms)

    def record_served(self, task: int, latency_ms: float) -> None:
        with self._lock:
            self.latency_ms.setdefault(task, _Histogram(LATENCY_MS_BOUNDARIES)).observe(latency_ms)
            self.served[task] = self.served.get(task, 0) + 1
            if self._ray:
                self._ray["latency_ms"].observe(latency_ms, tags={"task": str(task)})
                self._ray["served"].inc(tags={"task": str(task)})

    def record_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            if self._ray:
                self._ray["rejected"].inc(tags={"reason": reason})

    def record_reload(self, accepted: bool) -> None:
        outcome = "accepted" if accepted else "refused"
        with self._lock:
            self.reloads[outcome] += 1
            if self._ray:
                self._ray["reloads"].inc(tags={"outcome": outcome})

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "batch_requests": self.batch_requests.as_dict(),
                "batch_rows": self.batch_rows.as_dict(),
                "tasks_per_batch": self.tasks_per_batch.as_dict(),
                "forward_ms": self.forward_ms.as_dict(),
                "latency_ms": {str(task): hist.as_dict() for task, hist in sorted(self.latency_ms.items())},
                "served": {str(task): count for task, count in sorted(self.served.items())},
                "rejected": dict(sorted(self.rejected.items())),
                "reloads": dict(self.reloads),
            }


# ------------------------------------------------------------------------------------------------------- the replica
def _json_response(document: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(
        json.dumps(document, allow_nan=False, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed ``limit`` bytes: at once from its
    Content-Length, else (a chunked body) counted as it streams in."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise RequestError(400, "bad_request", f"Content-Length {length!r} is not a byte count")
        if int(length) > limit:
            raise RequestError(
                413, "too_large", f"the body is {int(length)} bytes, more than the {limit} accepted; split the request"
            )
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise RequestError(
                413, "too_large", f"the body exceeds the {limit} bytes accepted (counted as it streamed); split it"
            )
        chunks.append(chunk)
    return b"".join(chunks)


_ROUTES = {"/predict": "POST", "/tasks": "GET", "/healthz": "GET", "/stats": "GET"}


class PackServer:
    """The Ray Serve deployment's class: one pack per replica, requests batched with ``@serve.batch``.

    Built by :func:`build_app`; construct it yourself only inside a Ray Serve replica (``serve.batch`` needs one).

    Args:
        pack_path: the pack file (readable on every node a replica may run on).
        config: a :class:`ServeConfig`.
    """

    def __init__(self, pack_path: str, config: ServeConfig | None = None):
        from ray import serve

        self._config = config or ServeConfig()
        for module in self._config.imports:
            importlib.import_module(module)
        self._device = _replica_device()
        self._served = load_served_pack(
            pack_path, self._device, input_shape=self._config.input_shape, backend=self._config.backend
        )
        self._metrics = ServeMetrics(export=True)
        # One thread runs every forward, in arrival order of batches: the model's active task is per model, not per
        # thread, and one device runs one batch at a time anyway. The event loop stays free to gather the next one.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="packnet-forward")
        self._batch = serve.batch(
            max_batch_size=self._config.max_batch, batch_wait_timeout_s=self._config.batch_wait_ms / 1000
        )
        self._mixed_queue = self._batch(self._run_batch) if self._config.batching == "mixed" else None
        self._task_queues: dict[int, Callable] = {}
        self._reload_lock = threading.Lock()
        self._refused_signature: tuple | None = None
        self._last_reload: dict | None = None
        self._stop = threading.Event()
        if self._config.watch_s > 0:
            threading.Thread(target=self._watch, name="packnet-pack-watch", daemon=True).start()
        log.info(
            "serving %s: %d tasks, input %s, %s, on %s, %s batching",
            pack_path,
            self._served.num_tasks,
            list(self._served.input_shape),
            self._served.dtype,
            self._device,
            self._config.batching,
        )

    # -- batching
    async def _run_batch(self, requests: list[_Pending]) -> list:
        loop = asyncio.get_running_loop()
        served = self._served  # one snapshot per batch: a reload swaps it between batches
        mixed = self._config.batching == "mixed"

        def timed():
            started = time.perf_counter()
            outcome = run_batch(served, requests, mixed)
            return outcome, (time.perf_counter() - started) * 1000

        (results, report), forward_ms = await loop.run_in_executor(self._executor, timed)
        self._metrics.record_batch(report, forward_ms)
        return results

    def _queue_for(self, task: int) -> Callable:
        if self._mixed_queue is not None:
            return self._mixed_queue
        queue = self._task_queues.get(task)
        if queue is None:
            queue = self._task_queues[task] = self._batch(self._run_batch)
        return queue

    async def _predict_checked(self, task: Any, inputs: Any, received: float) -> torch.Tensor:
        served = self._served
        task = check_task(task, served.num_tasks)
        tensor = inputs_to_tensor(inputs, served.input_shape, served.dtype, self._config.max_rows)
        result = await self._queue_for(task)(_Pending(task, tensor, received))
        if isinstance(result, BaseException):
            raise result
        self._metrics.record_served(task, (time.perf_counter() - received) * 1000)
        return result

    # -- the handle API
    async def predict(self, task: int, inputs: Any) -> torch.Tensor:
        """Task ``task``'s outputs ``[batch, *output_shape]`` (a CPU tensor) for ``inputs`` ``[batch,
        *input_shape]`` (a tensor, NumPy array or nested lists), batched with other callers' requests.

        Raises:
            RequestError: the request is refused (its ``status`` and ``reason`` say why), as over HTTP.
        """
        received = time.perf_counter()
        try:
            return await self._predict_checked(task, inputs, received)
        except RequestError as error:
            self._metrics.record_rejected(error.reason)
            raise

    def tasks(self) -> list[dict]:
        """Per task: ``{"task", "input_shape", "output_shape", "output_size"}``."""
        return self._served.describe_tasks()

    def health(self) -> dict:
        served = self._served
        return {
            "status": "ok",
            "num_tasks": served.num_tasks,
            "sha256": served.sha256,
            "generation": served.generation,
            "device": str(served.device),
            "batching": self._config.batching,
            "torch_threads": torch.get_num_threads(),
        }

    def stats(self) -> dict:
        """This replica's metrics (see :class:`ServeMetrics`), its pack and the last reload's outcome."""
        from ray import serve

        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests) there is no context
            replica = None
        return {
            "replica": replica,
            **self.health(),
            "config": {key: value for key, value in dataclasses.asdict(self._config).items()},
            "metrics": self._metrics.as_dict(),
            "last_reload": self._last_reload,
        }

    async def reload(self) -> dict:
        """Reload the pack file now; the new pack replaces the served one only if it validates (see
        :func:`load_served_pack`), else the replica goes on serving the one it has.

        Returns:
            ``{"reloaded": bool, "sha256": served checksum, "num_tasks": ..., "generation": ..., "error": str|None}``.
        """
        return await asyncio.to_thread(self._reload)

    def _reload(self) -> dict:
        with self._reload_lock:
            current = self._served
            try:
                new = load_served_pack(
                    current.path,
                    self._device,
                    input_shape=self._config.input_shape,
                    backend=self._config.backend,
                    generation=current.generation + 1,
                )
            except Exception as error:  # noqa: BLE001 - any failure to load refuses the reload, nothing else
                try:
                    self._refused_signature = file_signature(current.path)
                except OSError:
                    self._refused_signature = None
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                self._metrics.record_reload(False)
                log.error("refusing to reload %s: %s; still serving sha256 %s", current.path, message, current.sha256)
                outcome = {"reloaded": False, "error": f"{type(error).__name__}: {message}"}
            else:
                self._served = new
                self._refused_signature = None
                self._metrics.record_reload(True)
                log.info(
                    "reloaded %s: %d tasks, sha256 %s (generation %d)",
                    new.path,
                    new.num_tasks,
                    new.sha256,
                    new.generation,
                )
                outcome = {"reloaded": True, "error": None}
            served = self._served
            outcome.update(
                {
                    "sha256": served.sha256,
                    "num_tasks": served.num_tasks,
                    "generation": served.generation,
                    "at": time.time(),
                }
            )
            self._last_reload = outcome
            return outcome

    def _watch(self) -> None:
        """Poll the file's signature; reload when it differs from the served one and from the last refused one."""
        while not self._stop.wait(self._config.watch_s):
            try:
                signature = file_signature(self._served.path)
            except OSError:
                continue  # being replaced, or gone: keep serving what we have
            if signature != self._served.signature and signature != self._refused_signature:
                self._reload()

    def check_health(self) -> None:
        """Ray Serve's health check: the replica holds a pack and its forward thread is alive."""
        if self._served is None or self._executor._shutdown:  # noqa: SLF001
            raise RuntimeError("the replica has no pack loaded or its forward thread is gone")

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # -- HTTP
    async def __call__(self, request):
        """The HTTP routes: ``POST /predict``, ``GET /tasks``, ``GET /healthz``, ``GET /stats``."""
        received = time.perf_counter()
        path = request.url.path
        prefix = (request.scope.get("root_path") or "").rstrip("/")
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :]
        path = path.rstrip("/") or "/"
        try:
            method = _ROUTES.get(path)
            if method is None:
                raise RequestError(404, "not_found", f"no route {path}; try POST /predict, GET /tasks, GET /healthz")
            if request.method != method:
                raise RequestError(405, "method_not_allowed", f"{path} takes {method}, not {request.method}")
            if path == "/predict":
                body = await _read_body(request, self._config.max_request_bytes)
                task, inputs = parse_predict_body(body)
                outputs = await self._predict_checked(task, inputs, received)
                return _json_response({"task": task, "outputs": outputs.tolist()})
            if path == "/tasks":
                return _json_response({"tasks": self.tasks(), "dtype": str(self._served.dtype).removeprefix("torch.")})
            if path == "/healthz":
                return _json_response(self.health())
            return _json_response(self.stats())
        except RequestError as error:
            self._metrics.record_rejected(error.reason)
            headers = {"Allow": _ROUTES[path]} if error.status == 405 else None
            return _json_response({"error": error.message}, error.status, headers)
        except Exception as error:  # noqa: BLE001 - never let one request take the replica down
            log.exception("%s %s failed", request.method, path)
            self._metrics.record_rejected("internal")
            return _json_response({"error": f"internal error: {_one_line(error)}"}, 500)


def _replica_device() -> torch.device:
    """The GPU Ray assigned to this replica, else the CPU."""
    try:
        import ray

        gpus = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - outside Ray
        gpus = []
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------------------------- the application
def _config_from(**kwargs) -> ServeConfig:
    if kwargs.get("batching") == "by-task":
        kwargs["batching"] = "by_task"
    return ServeConfig(**kwargs)


def validate_pack(pack: str | os.PathLike, config: ServeConfig) -> ServedPack:
    """Load ``pack`` here on the CPU exactly as a replica will (imports included): a bad pack fails in a second with
    one line instead of making Ray Serve retry a failing replica for a minute."""
    for module in config.imports:
        importlib.import_module(module)
    return load_served_pack(pack, "cpu", input_shape=config.input_shape, backend="reference")


def build_app(
    pack: str | os.PathLike,
    *,
    replicas: int = 1,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = 1.0,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    batching: str = "mixed",
    max_request_bytes: int = 16 * 1024 * 1024,
    max_rows: int = 256,
    input_shape: Sequence[int] | None = None,
    backend: str = "auto",
    watch_s: float = 0.0,
    imports: Sequence[str] = (),
    max_ongoing_requests: int | None = None,
    access_log: bool = True,
    deployment_options: dict | None = None,
    validate: bool = True,
):
    """The Ray Serve application serving ``pack``: ``serve.run(build_app("model.pack"))``.

    Args:
        pack: the pack file; every node a replica may run on must read it at this path.
        replicas: replicas of the deployment (ignored when ``deployment_options`` holds an ``autoscaling_config``).
        gpus_per_replica: GPUs per replica (fractions share one); None: 1 when the Ray cluster (or, before
            ``ray.init``, this machine) has a GPU, else 0.
        cpus_per_replica: CPUs Ray reserves per replica.
        max_batch, batch_wait_ms, batching, max_request_bytes, max_rows, input_shape, backend, watch_s, imports:
            see :class:`ServeConfig` (``batching`` also takes ``"by-task"``).
        max_ongoing_requests: requests a replica takes at once (caps what a batch can gather); default
            ``2 * max_batch``.
        access_log: Ray Serve's per-request access log lines.
        deployment_options: further ``serve.deployment`` options (``autoscaling_config``, ``health_check_period_s``,
            ...), applied last.
        validate: load the pack here first (see :func:`validate_pack`).

    Raises:
        ValueError: a bad option; PackFormatError/OSError/ValueError from validation.
        ImportError: Ray Serve is not installed (``pip install 'packnet[serve]'``).
    """
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise ImportError(f"serving needs Ray Serve: pip install 'packnet[serve]' ({error})") from None
    path = os.path.abspath(os.fspath(pack))
    config = _config_from(
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        batching=batching,
        max_request_bytes=max_request_bytes,
        max_rows=max_rows,
        input_shape=None if input_shape is None else tuple(input_shape),
        backend=backend,
        watch_s=watch_s,
        imports=tuple(imports),
    )
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer of at least 1, got {replicas!r}")
    if validate:
        validate_pack(path, config)
    if gpus_per_replica is None:
        if ray.is_initialized():
            gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        else:
            gpus_per_replica = 1.0 if torch.cuda.is_available() else 0.0
    if not 0 <= gpus_per_replica < math.inf or not 0 <= cpus_per_replica < math.inf:
        raise ValueError(
            f"gpus_per_replica and cpus_per_replica must be 0 or more, got {gpus_per_replica}, {cpus_per_replica}"
        )
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "num_replicas": replicas,
        "max_ongoing_requests": max_ongoing_requests or 2 * config.max_batch,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "logging_config": {"enable_access_log": access_log},
    }
    options.update(deployment_options or {})
    if "autoscaling_config" in (deployment_options or {}) and "num_replicas" not in (deployment_options or {}):
        options.pop("num_replicas")
    return serve.deployment(PackServer, **options).bind(path, config)


def _parse_shape(value: Any) -> tuple[int, ...]:
    """``"1,8,8"``, ``"1x8x8"`` or (from a Serve config file) ``[1, 8, 8]``."""
    parts = value if isinstance(value, (list, tuple)) else str(value).replace("x", ",").split(",")
    try:
        return tuple(int(part) for part in parts if str(part).strip())
    except ValueError:
        raise ValueError(f"input shape must be integers like 1,8,8, got {value!r}") from None


def _parse_names(value: Any) -> tuple[str, ...]:
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(part).strip() for part in parts if str(part).strip())


def _parse_flag(value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("1", "true", "yes", "on")


_BUILDER_TYPES: dict[str, Callable[[Any], Any]] = {
    "replicas": int,
    "gpus_per_replica": float,
    "cpus_per_replica": float,
    "max_batch": int,
    "batch_wait_ms": float,
    "batching": str,
    "max_request_bytes": int,
    "max_rows": int,
    "input_shape": _parse_shape,
    "backend": str,
    "watch_s": float,
    "imports": _parse_names,
    "max_ongoing_requests": int,
    "access_log": _parse_flag,
}


def app_builder(args: dict[str, str]):
    """Ray Serve's application builder: ``serve run packnet.serve:app_builder pack=/shared/model.pack max_batch=64``
    or ``import_path: packnet.serve:app_builder`` with ``args:`` in a Serve config file (``serve deploy``).

    ``args`` are :func:`build_app`'s keyword arguments as strings (or the values a config file gives), plus
    ``pack``; the pack is validated where the builder runs when it can be read there.

    Raises:
        ValueError: no ``pack``, an unknown key or a value that does not parse.
    """
    args = dict(args)
    if "pack" not in args:
        raise ValueError("app_builder needs pack=PATH (the pack file, readable on every node)")
    pack = args.pop("pack")
    unknown = sorted(set(args) - set(_BUILDER_TYPES))
    if unknown:
        raise ValueError(f"app_builder: unknown argument(s) {unknown}; known: {sorted(_BUILDER_TYPES)}")
    kwargs = {}
    for key, text in args.items():
        try:
            kwargs[key] = _BUILDER_TYPES[key](text)
        except ValueError as error:
            raise ValueError(f"app_builder: {key}={text!r} does not parse ({error})") from None
    return build_app(pack, validate=os.path.exists(pack), **kwargs)


# --------------------------------------------------------------------------------------------------- running it
def _check_port_free(host: str, port: int) -> None:
    """Raise OSError (one line) when ``host:port`` cannot be bound: Serve's proxy would fail there only later."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(f"cannot serve on {host}:{port}: {error.strerror or error}; pass another --port") from None


@dataclass
class RunningServer:
    """A started Serve application (see :func:`start`); :meth:`stop` undoes what :func:`start` did."""

    url: str
    app_name: str
    gcs_address: str
    started_ray: bool
    served: ServedPack
    handle: Any

    def stop(self) -> None:
        """Delete the application; when :func:`start` started Ray itself, shut Serve and Ray down too."""
        import ray
        from ray import serve

        if self.started_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(self.app_name)


def start(
    pack: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
    num_cpus: int | None = None,
    metrics_port: int | None = None,
    **app_options,
) -> RunningServer:
    """Validate ``pack``, start Ray (or join ``address``), start Serve's HTTP proxy on ``host:port`` and deploy
    :func:`build_app`'s application; returns once it answers.

    Without ``address`` a new local Ray starts (its node address is 127.0.0.1 and its files go under
    ``RAY_TMPDIR`` when set). With ``address`` (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``) the
    application is added to that cluster; if Serve already runs there, its HTTP host and port stay as they are.
    ``metrics_port`` (local Ray only) is where Ray's metrics agent serves Prometheus text, this application's
    ``packnet_serve_*`` metrics among Ray Serve's own (a cluster's nodes set theirs with ``ray start
    --metrics-export-port``).

    Raises:
        PackFormatError, OSError, ValueError: the pack does not validate (before Ray starts).
        ImportError: Ray Serve is not installed.
    """
    config_keys = {f.name for f in dataclasses.fields(ServeConfig)}
    served = validate_pack(pack, _config_from(**{k: v for k, v in app_options.items() if k in config_keys}))
    started_ray = address is None
    if started_ray:
        _check_port_free(host, port)
        # A single-machine Ray on the loopback address (Ray's own switch for machines that are not cluster nodes,
        # read when Ray is first imported): its processes talk over 127.0.0.1, not the machine's network address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise ImportError(f"serving needs Ray Serve: pip install 'packnet[serve]' ({error})") from None
    if started_ray:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=metrics_port,
        )
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(pack, validate=False, **app_options)
        handle = serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
    except BaseException:
        if started_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        raise
    prefix = "" if route_prefix == "/" else route_prefix
    return RunningServer(
        url=f"http://{host}:{port}{prefix}",
        app_name=app_name,
        gcs_address=ray.get_runtime_context().gcs_address,
        started_ray=started_ray,
        served=served,
        handle=handle,
    )
