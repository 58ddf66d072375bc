"""Serve a packed model as CUDA graphs: one graph per batch-size bucket and task, replayed for each call.

An eager packed model pays the host for every layer of every call (Python, the checks, each launch); a CUDA graph
records the launches of one forward once and replays them with one call, so a small batch runs at the sum of its
kernels. :func:`cuda_graphs` captures ``model`` for each batch bucket and each task it is asked for:

- an int task ``t``: one graph per bucket that runs task ``t`` (the task is part of the recording);
- :data:`MIXED`: one graph per bucket whose task tensor is an input like the batch, so that one graph serves every
  mix of tasks (and every single task, as a tensor of one value). Every module must then take a task tensor on the
  device without reading it on the host, which a graph cannot record: packed linears do, and packed convs with 16
  or more channels per group; a :class:`~packnet.TaskSwitch` (per-task heads and norms left unfused), module-held
  per-task values (:class:`~packnet.TaskParameters`) and thinner grouped convs run per task and are refused.

A call with ``b`` samples replays the graph of the smallest bucket holding ``b``: the batch is copied into the
graph's input (rows past ``b`` keep what they held: samples are independent in an eval-mode model), and the first
``b`` rows of each output are returned (copies, unless ``clone_outputs=False``: then views of the graph's own output,
overwritten by its next replay). Capture runs the model eagerly a few times on a side stream first, so that kernels
compile and autotune, and plans and workspaces exist, outside the recording.

``torch.compile(model, mode="reduce-overhead")`` is the other route to CUDA graphs: the packed layers trace into one
graph with no breaks (``fullgraph=True``) whether the task is set with :func:`packnet.set_task` or passed as a
tensor; its cudagraphs then need a CUDA machine and Inductor's support of our Triton kernels (see
``benchmarks/graphs.py``, which measures both routes on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .modules import task_modules

__all__ = ["MIXED", "GraphedModel", "cuda_graphs"]

# The task entry that captures graphs taking a task tensor as an input (one graph for every mix of tasks).
MIXED = "mixed"


class _CudaGraphCapture:
    """Records a forward as a ``torch.cuda.CUDAGraph`` (all graphs of one model share a memory pool; they replay one
    at a time on the caller's stream)."""

    def __init__(self, device: torch.device, warmup: int):
        self.device = device
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, forward):
        """``(replay, outputs)``: ``forward()`` warmed up on a side stream, then recorded; ``replay()`` reruns the
        recording, rewriting ``outputs`` in place."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = forward()
        return graph.replay, outputs


class _Graph:
    """One captured forward: its input buffer, its task buffer (mixed graphs), its outputs and how to replay it."""

    __slots__ = ("inputs", "tasks", "outputs", "replay")


def _tree(value, fn):
    """``fn`` applied to every tensor of ``value`` (tensors, tuples, lists, dicts and ``ModelOutput``-like mappings)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        mapped = {key: _tree(item, fn) for key, item in value.items()}
        return mapped if type(value) is dict else type(value)(**mapped)
    if isinstance(value, (tuple, list)):
        mapped = [_tree(item, fn) for item in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    return value


class GraphedModel:
    """A packed model served by CUDA graphs (see the module docstring); call it as the model: ``graphed(x, task=t)``.

    Args:
        model: a packed model in eval mode (:func:`packnet.compile_pack`, :func:`packnet.load_pack`,
            :func:`packnet.swap_packed_`), on the device of ``example``.
        example: one batch as the model takes it (its first dimension the batch): the shape past the batch, dtype,
            device and memory format every call must match. Its values are not used.
        tasks: the graphs to capture per bucket: ints (one graph per task) and/or :data:`MIXED` (one graph taking a
            task tensor).
        batch_sizes: the buckets (default: powers of two up to ``example``'s batch, and that batch).
        capture: what records and replays one forward (default: CUDA graphs on ``example``'s device with ``warmup``
            eager runs first; tests on a CPU pass a stand-in with the same ``capture(forward) -> (replay, outputs)``).
        clone_outputs: return copies of the graph's outputs (default) rather than views of them.
        task_dtype: dtype of a mixed graph's task buffer.

    Raises:
        ValueError: a model in training mode, with no packed modules, an empty or out-of-range task list, bad batch
            sizes; at call time an input or task the graphs were not captured for.
        TypeError: ``example`` is not a tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        tasks: Iterable[int | str],
        *,
        batch_sizes: Sequence[int] | None = None,
        capture=None,
        warmup: int = 3,
        clone_outputs: bool = True,
        task_dtype: torch.dtype = torch.int64,
    ):
        if not isinstance(example, torch.Tensor) or example.dim() < 1:
            raise TypeError(f"cuda_graphs: example must be a batch tensor [batch, ...], got {type(example).__name__}")
        if model.training:
            raise ValueError(
                "cuda_graphs: the model is in training mode (a graph would replay its batch statistics' updates);"
                " call model.eval() first"
            )
        modules = task_modules(model)
        if not modules:
            raise ValueError("cuda_graphs: the model has no packed modules (compile or swap_packed_ it first)")
        self.num_tasks = min(module.num_tasks for module in modules)
        self.model = model
        self.sample_shape = tuple(example.shape[1:])
        self.dtype, self.device = example.dtype, example.device
        self.channels_last = (
            example.dim() == 4
            and not example.is_contiguous()
            and example.is_contiguous(memory_format=torch.channels_last)
        )
        self.clone_outputs = clone_outputs
        self.task_dtype = task_dtype
        self.tasks = self._check_tasks(tasks)
        if MIXED in self.tasks:
            _check_mixed_graph(model)
        self.batch_sizes = self._check_batch_sizes(example.shape[0], batch_sizes)
        if capture is None:
            if example.device.type != "cuda":
                raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA model and example, got {example.device}")
            capture = _CudaGraphCapture(example.device, warmup)
        self._graphs: dict[tuple[int, int | str], _Graph] = {}
        with torch.no_grad():
            for batch in self.batch_sizes:
                for task in self.tasks:
                    self._graphs[(batch, task)] = self._capture(capture, batch, task)

    def _check_tasks(self, tasks) -> tuple[int | str, ...]:
        tasks = tuple(tasks) if not isinstance(tasks, (str, int)) else (tasks,)
        if not tasks:
            raise ValueError(f"cuda_graphs: give the tasks to capture (ints in 1..{self.num_tasks} and/or 'mixed')")
        for task in tasks:
            if task == MIXED:
                continue
            if isinstance(task, bool) or not isinstance(task, int) or not 1 <= task <= self.num_tasks:
                raise ValueError(f"cuda_graphs: task {task!r} is neither 'mixed' nor an int in 1..{self.num_tasks}")
        return tuple(dict.fromkeys(tasks))

    @staticmethod
    def _check_batch_sizes(largest: int, batch_sizes) -> tuple[int, ...]:
        if batch_sizes is None:
            if largest < 1:
                raise ValueError("cuda_graphs: the example batch is empty; give batch_sizes or a non-empty example")
            sizes, size = [], 1
            while size < largest:
                sizes.append(size)
                size *= 2
            batch_sizes = [*sizes, largest]
        sizes = sorted(set(batch_sizes))
        if not sizes or any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in sizes):
            raise ValueError(f"cuda_graphs: batch_sizes must be positive ints, got {list(batch_sizes)!r}")
        return tuple(sizes)

    def _capture(self, capture, batch: int, task) -> _Graph:
        graph = _Graph()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        graph.inputs = torch.zeros((batch, *self.sample_shape), dtype=self.dtype, device=self.device)
        graph.inputs = graph.inputs.contiguous(memory_format=memory_format)
        graph.tasks = None
        if task == MIXED:
            graph.tasks = torch.ones(batch, dtype=self.task_dtype, device=self.device)

        def forward():
            return self.model(graph.inputs, task=task if graph.tasks is None else graph.tasks)

        graph.replay, graph.outputs = capture.capture(forward)
        return graph

    @property
    def keys(self) -> list[tuple[int, int | str]]:
        """The captured graphs: ``(batch bucket, task or 'mixed')``."""
        return list(self._graphs)

    def bucket(self, batch: int) -> int:
        """The bucket a batch of ``batch`` samples replays: the smallest captured size holding it.

        Raises:
            ValueError: ``batch`` larger than every bucket, or not positive.
        """
        for size in self.batch_sizes:
            if batch <= size:
                if batch < 1:
                    break
                return size
        raise ValueError(
            f"cuda_graphs: a batch of {batch} has no graph (captured batch sizes {list(self.batch_sizes)}); capture a"
            " larger bucket (batch_sizes=...) or run the model eagerly"
        )

    def graph_key(self, batch: int, task) -> tuple[int, int | str]:
        """The key of the graph a call of ``batch`` samples with ``task`` replays: its int task's graph, else the
        bucket's mixed graph.

        Raises:
            ValueError: no captured graph serves it.
        """
        bucket = self.bucket(batch)
        if not isinstance(task, torch.Tensor) and (bucket, task) in self._graphs:
            return bucket, task
        if (bucket, MIXED) in self._graphs:
            return bucket, MIXED
        raise ValueError(
            f"cuda_graphs: no graph for task {task!r} (captured: {list(self.tasks)}); capture it, or 'mixed' for task"
            " tensors and any task"
        )

    def __call__(self, x: torch.Tensor, task: int | torch.Tensor):
        """``model(x, task=task)`` by replaying a graph. ``task``: an int, or an integer tensor ``[batch]`` (one task
        per sample; needs a mixed graph). Returns the model's outputs for ``x``'s rows.

        Raises:
            ValueError: ``x`` not shaped, typed or placed as the example; a task outside 1..num_tasks (ints), a task
                tensor of the wrong length or device; no graph for the batch or task.
            TypeError: a task that is neither an int nor an integer tensor.
        """
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.sample_shape or x.dim() < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"cuda_graphs: the graphs take [batch, *{self.sample_shape}] inputs, got {shape}")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"cuda_graphs: the graphs take {self.dtype} inputs on {self.device}, got {x.dtype} on {x.device}"
            )
        batch = x.shape[0]
        if isinstance(task, torch.Tensor):
            if task.dtype.is_floating_point or task.dtype == torch.bool or task.dim() != 1 or task.shape[0] != batch:
                raise ValueError(
                    f"cuda_graphs: a task tensor must be 1-D integer with one task per sample ({batch}), got"
                    f" {task.dtype} {tuple(task.shape)}"
                )
            if task.device != self.device:
                raise ValueError(f"cuda_graphs: the task tensor is on {task.device}, the graphs on {self.device}")
        elif isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"cuda_graphs: task must be an int or an integer tensor, got {type(task).__name__}")
        elif not 1 <= task <= self.num_tasks:
            raise ValueError(f"cuda_graphs: task {task} is outside 1..{self.num_tasks}")
        graph = self._graphs[self.graph_key(batch, task)]
        graph.inputs[:batch].copy_(x)
        if graph.tasks is not None:
            if isinstance(task, torch.Tensor):
                graph.tasks[:batch].copy_(task)
            else:
                graph.tasks[:batch].fill_(task)
        graph.replay()
        if self.clone_outputs:
            return _tree(graph.outputs, lambda tensor: tensor[:batch].clone())
        return _tree(graph.outputs, lambda tensor: tensor[:batch])


def _check_mixed_graph(model: nn.Module) -> None:
    """Refuse modules that read a task tensor on the host (a CUDA graph cannot record that)."""
    from packnet_kernels.conv2d import mixed_kernel_applies

    from .modules import PackedConv2d, TaskParameters, TaskSwitch

    for name, module in model.named_modules():
        per_task = isinstance(module, (TaskSwitch, TaskParameters))
        if isinstance(module, PackedConv2d):
            groups = module.groups
            per_task = not mixed_kernel_applies(module.in_channels // groups, module.out_channels // groups, groups)
        if per_task:
            raise ValueError(
                f"cuda_graphs: {name or 'the model'} ({type(module).__name__}) runs a mixed batch one task at a time,"
                " reading the tasks on the host, which a CUDA graph cannot record; capture int tasks instead"
                " (tasks=[1, 2, ...]: one graph per task)"
            )


def cuda_graphs(
    model: nn.Module,
    example: torch.Tensor,
    tasks: Iterable[int | str],
    *,
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 3,
    clone_outputs: bool = True,
) -> GraphedModel:
    """Capture ``model`` as CUDA graphs, one per batch bucket and task of ``tasks`` (ints, and/or :data:`MIXED` for
    one graph per bucket taking a task tensor); returns the :class:`GraphedModel` to call instead of ``model``.

    Example::

        graphed = packnet.cuda_graphs(model.eval(), torch.empty(32, 3, 224, 224, device="cuda"), tasks=["mixed"])
        logits = graphed(images, task=torch.tensor([1, 3, 2], device="cuda"))  # any 1..32 images, any tasks

    See :class:`GraphedModel` for the arguments and errors.
    """
    return GraphedModel(model, example, tasks, batch_sizes=batch_sizes, warmup=warmup, clone_outputs=clone_outputs)
