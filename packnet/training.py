"""The PackNet training loop: train on free weights, prune by magnitude, fine-tune, freeze; repeat per task.

The model stays a plain ``nn.Module``. For every prunable layer (``nn.Linear``/``nn.Conv2d`` picked by a filter) the
trainer keeps a ``uint8`` task-id tensor beside the weight; everything else in the model's state (biases, BatchNorm
parameters and running statistics, the classifier head) is stored per task. Frozen weights are restored after every
optimizer step, so no optimizer (momentum, weight decay, Adam moments) can move them.

Under DistributedDataParallel (``torchrun``) pass the DDP-wrapped model: every rank runs the same calls on its
shard of the data, and the trainer keeps the ranks identical by broadcasting from rank 0 whatever DDP does not
synchronise (the random re-initialisation of free weights and head, the pruning decision, BatchNorm statistics).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from packnet_kernels import MAX_TASKS, effective_weight

from .distributed import broadcast_, ddp_group, is_main_process, mean_across_ranks
from .layers import KINDS, kind_of, packable_problem
from .pruning import check_granularity, prune_ratio_for, release_smallest, release_smallest_blocks

__all__ = ["CapacityWarning", "LayerOwnership", "PackNet", "default_prunable", "input_spec", "is_norm"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class CapacityWarning(UserWarning):
    """A task starts with no free weight in any prunable layer: earlier tasks kept them all, so it can train only its
    own state (biases, norms, head) on their frozen weights. Raise ``prune_ratio`` (or, with block pruning, use
    smaller blocks) so that each task releases more for the next."""


def default_prunable(name: str, module: nn.Module) -> bool:
    """The default layer filter: every module of a packable kind (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``,
    ``nn.Embedding``, transformers' ``Conv1D``, ``nn.MultiheadAttention``: :mod:`packnet.layers`) that can be packed
    as it is configured."""
    return kind_of(module) is not None and packable_problem(module) is None


_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm(name: str, module: nn.Module) -> bool:
    """A filter for ``PackNet(share=...)``: normalisation layers (BatchNorm, InstanceNorm, LayerNorm, GroupNorm,
    RMSNorm, and classes named ``*Norm``/``*Norm2d`` such as transformers' ``LlamaRMSNorm``)."""
    class_name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or class_name.endswith(("Norm", "Norm1d", "Norm2d", "NormNd"))


def _tensor_spec(tensor: torch.Tensor) -> dict[str, Any]:
    spec = {"shape": list(tensor.shape[1:]), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if not tensor.is_floating_point() and not tensor.is_complex() and tensor.numel():
        spec["high"] = int(tensor.max()) + 1  # a probe drawn below this takes values the model was given
    return spec


def input_spec(inputs) -> dict[str, Any] | None:
    """What a batch of model inputs looks like, for drawing probe inputs: ``{"shape": [...], "dtype": name}`` (per
    sample, no batch dimension; integer inputs add ``"high"``, one more than the largest value seen) for a tensor,
    ``{"keywords": {name: spec}}`` for a dict of keyword inputs (``model(**inputs)``, e.g. ``input_ids`` and
    ``attention_mask``). None for anything else."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
        return _tensor_spec(inputs)
    if (
        isinstance(inputs, Mapping)
        and inputs
        and all(
            isinstance(key, str) and isinstance(value, torch.Tensor) and value.dim() >= 1
            for key, value in inputs.items()
        )
    ):
        return {"keywords": {key: _tensor_spec(value) for key, value in inputs.items()}}
    return None


def call_model(model: nn.Module, inputs):
    """``model(**inputs)`` for a dict of keyword inputs, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@dataclass(frozen=True)
class LayerOwnership:
    """How one prunable layer's weights are shared out: ``owned[k]`` weights belong to task k (index 0 = free)."""

    layer: str
    shape: tuple[int, ...]
    owned: tuple[int, ...]

    @property
    def total(self) -> int:
        return math.prod(self.shape)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper, or ``model`` itself."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class PackNet:
    """Train one network on tasks 1, 2, ... without forgetting (Mallya & Lazebnik, 2018).

    Args:
        model: any ``nn.Module``; it is trained in place. It may be wrapped in ``DistributedDataParallel``; the
            trainer then keeps all ranks identical (see :meth:`learn_task`).
        prune_ratio: fraction of a task's weights released after training it: a float, or one float per task.
        prune_granularity: ``"element"`` (the default: PackNet's unstructured magnitude pruning) or ``(rows, cols)``
            to prune whole blocks of the weight as the kernels read it, by their L2 norm
            (:func:`packnet.pruning.release_smallest_blocks`; ``prune_ratio`` is then the fraction of the task's
            blocks). With ``(32, 32)`` every block has one owner, so a packed layer's early tasks skip the tiles of
            later ones.
        prunable: ``(name, module) -> bool`` picking the shared layers; default :func:`default_prunable` (every
            ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, transformers' ``Conv1D`` and
            ``nn.MultiheadAttention`` outside ``head``). An attention's ``out_proj`` is shared only with its
            attention (``nn.MultiheadAttention`` reads its weight directly).
        head: qualified name of the classifier head. Its parameters are per task and re-initialised (its modules'
            ``reset_parameters``) when a new task starts; other per-task state starts from the previous task's.
        share: ``(name, module) -> bool`` picking modules whose own state (parameters and buffers, e.g. a norm's)
            is one copy shared by all tasks instead of one per task: trained with task 1 and frozen after it, as in
            the original PackNet. Default: none, every norm is per task; :func:`is_norm` shares all norms outside
            ``head`` (a head is per task whatever the filter says).

    Everything in the model's state that is neither a shared layer's weight nor shared by ``share`` is stored per
    task (biases, norms, class tokens, position embeddings, layer scales, the head).

    Raises:
        ValueError: a bad ``prune_ratio`` or ``prune_granularity``, an unknown ``head``, no prunable layer, a
            picked layer that cannot be packed as configured, or a picked attention ``out_proj`` without its
            attention.
        TypeError: the filter picked a module of no packable kind.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prune_ratio: float | Sequence[float] = 0.5,
        prune_granularity: str | tuple[int, int] = "element",
        prunable: Callable[[str, nn.Module], bool] | None = None,
        head: str | None = None,
        share: Callable[[str, nn.Module], bool] | None = None,
    ):
        self.model = model
        self.prune_ratio = prune_ratio
        prune_ratio_for(prune_ratio, 1)
        self.prune_granularity = check_granularity(prune_granularity)
        net = _unwrap(model)
        if head is not None:
            try:
                net.get_submodule(head)
            except AttributeError as error:
                raise ValueError(f"head {head!r} is not a submodule of the model") from error
        self.head = head
        picker = prunable or default_prunable
        self.layers: dict[str, nn.Module] = {}
        self.kinds: dict[str, str] = {}
        for name, module in net.named_modules():
            if head is not None and (name == head or name.startswith(head + ".")):
                continue
            if name and picker(name, module):
                kind = kind_of(module)
                if kind is None:
                    raise TypeError(
                        f"prunable layer {name!r} is a {type(module).__name__}; only Linear/Conv1d/Conv2d/Embedding,"
                        " transformers' Conv1D and MultiheadAttention can be shared"
                    )
                problem = packable_problem(module)
                if problem:
                    raise ValueError(f"prunable layer {name!r} ({type(module).__name__}) cannot be packed: {problem}")
                self.layers[name] = module
                self.kinds[name] = kind
        self._drop_lone_out_projections(net, user_filter=prunable is not None)
        if not self.layers:
            raise ValueError("the model has no prunable layer (Linear, Conv1d, Conv2d, Embedding, Conv1D, attention)")
        # The shared weights themselves: a layer's ``weight`` (an attention's ``in_proj_weight``).
        self.weights: dict[str, nn.Parameter] = {
            name: getattr(layer, KINDS[self.kinds[name]].weight_key) for name, layer in self.layers.items()
        }
        self.task_ids = {
            name: torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device)
            for name, weight in self.weights.items()
        }
        self.shared_keys = {f"{name}.{KINDS[self.kinds[name]].weight_key}" for name in self.layers}
        # Spread of a fresh weight for the kinds whose own initialisation is a normal draw (embeddings, transformers'
        # Conv1D): the standard deviation the model's weights had when the trainer was made (e.g. a transformers
        # config's initializer_range), so later tasks' free weights start at the scale the model was built with.
        self._init_std = {
            name: float(self.weights[name].detach().float().std())
            for name, kind in self.kinds.items()
            if kind in ("embedding", "transformers_conv1d") and self.weights[name].numel() > 1
        }
        self.state_shared_keys = self._shared_state_keys(net, share)
        self.shared_state: dict[str, torch.Tensor] = {}
        self.task_states: list[dict[str, torch.Tensor]] = []
        self.current_task = 0  # the task being trained, 0 when none
        self._frozen_weights: dict[str, torch.Tensor] = {}
        self._trainable_masks: dict[str, torch.Tensor] = {}
        self._frozen_shared: dict[str, torch.Tensor] = {}
        self._epochs_run = 0  # passes over the data so far, for DistributedSampler.set_epoch
        # Per-sample shape of the first training input (no batch dimension), recorded into packs so that
        # save_pack can draw a probe input; None until a tensor input is seen.
        self.input_shape: tuple[int, ...] | None = None
        # What the first training batch looked like (shape, dtype, value range; see input_spec), for probes.
        self.input_spec: dict[str, Any] | None = None

    def _drop_lone_out_projections(self, net: nn.Module, user_filter: bool) -> None:
        """An ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself: its ``out_proj`` is shared only with it.
        The default filter then keeps such an ``out_proj`` per task; a user's filter that picked it is refused."""
        for name, module in net.named_modules():
            if not isinstance(module, nn.MultiheadAttention) or name in self.layers:
                continue
            out_proj = f"{name}.out_proj" if name else "out_proj"
            if out_proj in self.layers:
                if user_filter:
                    raise ValueError(
                        f"prunable layer {out_proj!r} is the out_proj of nn.MultiheadAttention {name!r}, which reads"
                        " its weight directly: pick the attention too, or neither"
                    )
                del self.layers[out_proj], self.kinds[out_proj]

    def _shared_state_keys(self, net: nn.Module, share) -> set[str]:
        """State-dict keys of the modules ``share`` picks (their own parameters and buffers, not packed weights)."""
        if share is None:
            return set()
        keys = set()
        for name, module in net.named_modules():
            in_head = self.head is not None and (name == self.head or name.startswith(self.head + "."))
            if name in self.layers or in_head or not share(name, module):  # a head is per task by definition
                continue
            prefix = f"{name}." if name else ""
            own = [key for key, value in module._parameters.items() if value is not None]
            own += [
                key
                for key, value in module._buffers.items()
                if value is not None and key not in module._non_persistent_buffers_set
            ]
            keys |= {prefix + key for key in own} - self.shared_keys
        return keys

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_tasks(self) -> int:
        """Number of tasks trained and frozen."""
        return len(self.task_states)

    @property
    def net(self) -> nn.Module:
        return _unwrap(self.model)

    def _task_specific_state(self) -> dict[str, torch.Tensor]:
        excluded = self.shared_keys | self.state_shared_keys
        return {key: value for key, value in self.net.state_dict().items() if key not in excluded}

    def _state_shared(self) -> dict[str, torch.Tensor]:
        """The model's live tensors of the state ``share`` made one for all tasks."""
        state = self.net.state_dict()
        return {key: state[key] for key in sorted(self.state_shared_keys)}

    def _load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self._task_specific_state()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)

    def _sync_ranks(self) -> None:
        """Under DDP, copy rank 0's shared weights, task ids and per-task state to every rank.

        DDP keeps parameters equal through identical updates, but not what the trainer changes outside the
        optimizer: free weights and the head re-drawn from each rank's random generator, BatchNorm statistics of
        each rank's own batches, and (robustly, though equal weights imply it) the pruning decision.
        """
        group = ddp_group(self.model)
        if group is None:
            return
        tensors = list(self.weights.values()) + list(self.task_ids.values())
        tensors += list(self._task_specific_state().values()) + list(self._state_shared().values())
        broadcast_(tensors, group)

    def _trainable(self, name: str) -> torch.Tensor:
        return self._trainable_masks[name]

    def ownership(self) -> list[LayerOwnership]:
        """Per-layer counts of weights owned by each task (index 0 = free)."""
        minlength = max(self.num_tasks, self.current_task) + 1
        return [
            LayerOwnership(
                name, tuple(ids.shape), tuple(torch.bincount(ids.flatten().long(), minlength=minlength).tolist())
            )
            for name, ids in self.task_ids.items()
        ]

    # ------------------------------------------------------------------ the task life cycle
    def start_task(self) -> int:
        """Give every free weight to the next task, re-initialise those weights and the head; returns the task.

        Warns with :class:`CapacityWarning` when no layer has a free weight left for the new task.

        Raises:
            RuntimeError: a task is still being trained. ValueError: 255 tasks are trained already.
        """
        if self.current_task:
            raise RuntimeError(f"task {self.current_task} is still being trained; call end_task() first")
        task = self.num_tasks + 1
        if task > MAX_TASKS:
            raise ValueError(f"a pack holds at most {MAX_TASKS} tasks")
        if self.num_tasks:
            self._load_task_state(self.task_states[-1])
            if self.head is not None:
                for module in self.net.get_submodule(self.head).modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        full = []  # layers without a free weight for this task
        with torch.no_grad():
            for name, weight in self.weights.items():
                free = self.task_ids[name] == 0
                if not bool(free.any()):
                    full.append(name)
                weight.copy_(torch.where(free, self._fresh_weight(name), weight))
                self.task_ids[name][free] = task
        self._sync_ranks()
        self.current_task = task
        self._snapshot_frozen()
        self._report_capacity(task, full)
        return task

    def _fresh_weight(self, name: str) -> torch.Tensor:
        """A new draw of layer ``name``'s whole weight, as its module type initialises it: kaiming-uniform (``a =
        sqrt(5)``) for Linear and convs, xavier-uniform for an attention's ``in_proj_weight``, a normal draw with
        the model's own spread for embeddings and transformers' ``Conv1D`` (an embedding's ``padding_idx`` row 0)."""
        weight, kind = self.weights[name], self.kinds[name]
        fresh = torch.empty_like(weight)
        if kind == "multihead_attention":
            nn.init.xavier_uniform_(fresh)
        elif kind == "transformers_conv1d":
            nn.init.normal_(fresh, std=self._init_std.get(name, 0.02))
        elif kind == "embedding":
            nn.init.normal_(fresh, std=self._init_std.get(name, 1.0))
            padding_idx = self.layers[name].padding_idx
            if padding_idx is not None:
                fresh[padding_idx] = 0
        else:
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # nn.Linear/nn.Conv*d's own initialisation
        return fresh

    def _report_capacity(self, task: int, full: list[str]) -> None:
        """Warn (:class:`CapacityWarning`) when ``task`` gets no free weight in any layer: it then learns only its own
        state, which a user should change. Some layers full while others still have room is normal for small
        layers (a log line at INFO)."""
        if not full:
            return
        if len(full) < len(self.layers):
            log.info(
                "task %d: no free weight left in %s; it uses the frozen weights of tasks 1..%d there and trains its"
                " other layers",
                task,
                ", ".join(full),
                task - 1,
            )
            return
        fix = f"a larger prune_ratio than {self.prune_ratio!r}"
        if self.prune_granularity != "element":
            fix += f", or blocks smaller than {self.prune_granularity}"
        warnings.warn(
            CapacityWarning(
                f"task {task} starts with no free weight in any of the {len(full)} prunable layers: it trains only its"
                f" own state (biases, norms, head) on the frozen weights of tasks 1..{task - 1}; to leave room for"
                f" later tasks, release more of each task's weights ({fix})"
            ),
            stacklevel=3,
        )

    def _snapshot_frozen(self) -> None:
        """Record the values of the weights the current task may not change, and which ones it may; after task 1,
        the state ``share`` made one for all tasks is frozen too."""
        self._frozen_weights = {name: weight.detach().clone() for name, weight in self.weights.items()}
        self._trainable_masks = {name: ids == self.current_task for name, ids in self.task_ids.items()}
        self._frozen_shared = (
            {key: value.detach().clone() for key, value in self._state_shared().items()} if self.num_tasks else {}
        )

    def restore_frozen_(self) -> None:
        """Put back every weight the current task may not change (other tasks' and released ones), and after task 1
        the state shared by all tasks (``share``: an optimizer, or a norm's running statistics, may have moved it)."""
        with torch.no_grad():
            for name, weight in self.weights.items():
                weight.copy_(torch.where(self._trainable(name), weight, self._frozen_weights[name]))
            if self._frozen_shared:
                live = self._state_shared()
                for key, value in self._frozen_shared.items():
                    live[key].copy_(value)

    def _mask_gradients_(self) -> None:
        for name, weight in self.weights.items():
            if weight.grad is not None:
                weight.grad.mul_(self._trainable(name))

    def _release_blocks(self, name: str, ratio: float) -> torch.Tensor:
        """:func:`release_smallest_blocks` on layer ``name``'s weight as the kernels read it (a transposed view of
        transformers' ``Conv1D``, a height-1 view of a 1-D conv), returned in the stored layout."""
        weight, ids, kind = self.weights[name], self.task_ids[name], self.kinds[name]
        if kind == "transformers_conv1d":
            release = release_smallest_blocks(weight.t(), ids.t(), self.current_task, ratio, self.prune_granularity)
            return release.t().contiguous()
        if kind == "conv1d":
            release = release_smallest_blocks(
                weight.unsqueeze(2), ids.unsqueeze(2), self.current_task, ratio, self.prune_granularity
            )
            return release.squeeze(2).contiguous()
        return release_smallest_blocks(weight, ids, self.current_task, ratio, self.prune_granularity)

    def prune(self, prune_ratio: float | None = None) -> dict[str, int]:
        """Release the smallest-magnitude fraction of the current task's weights (or blocks, with a block
        ``prune_granularity``) in each layer: set to 0, id 0.

        Returns the number of weights released per layer.
        """
        if not self.current_task:
            raise RuntimeError("no task is being trained; call start_task() first")
        ratio = prune_ratio_for(self.prune_ratio, self.current_task) if prune_ratio is None else prune_ratio
        released_counts = {}
        with torch.no_grad():
            for name, weight in self.weights.items():
                if self.prune_granularity == "element":
                    release = release_smallest(weight, self.task_ids[name], self.current_task, ratio)
                else:
                    release = self._release_blocks(name, ratio)
                weight.masked_fill_(release, 0.0)
                self.task_ids[name][release] = 0
                released_counts[name] = int(release.sum())
        self._sync_ranks()
        self._snapshot_frozen()
        return released_counts

    def end_task(self) -> int:
        """Freeze the current task: store its per-task state (after task 1, also the state shared by all tasks);
        returns the task."""
        if not self.current_task:
            raise RuntimeError("no task is being trained")
        self.restore_frozen_()
        self._sync_ranks()  # above all the BatchNorm statistics, which each rank gathered on its own batches
        self.task_states.append({key: value.detach().clone() for key, value in self._task_specific_state().items()})
        if self.num_tasks == 1:
            self.shared_state = {key: value.detach().clone() for key, value in self._state_shared().items()}
        task, self.current_task = self.current_task, 0
        self._frozen_weights, self._trainable_masks, self._frozen_shared = {}, {}, {}
        return task

    # ------------------------------------------------------------------ training
    def train_epochs(
        self,
        data: Iterable,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        desc: str = "train",
        show_progress: bool = True,
    ) -> float:
        """Train the current task for ``epochs`` passes over ``data`` (an iterable of ``(inputs, targets)``; a dict
        of inputs is passed as keyword arguments, ``model(**inputs)``). ``loss_fn(output, targets)`` gets the model's
        output as it is (for a transformers model a ``ModelOutput``: use ``output.logits``).

        Gradients of weights the task does not own are zeroed and those weights are restored after every step.
        Returns the mean loss of the last epoch (under DDP, averaged over the ranks). A progress bar is shown when
        ``show_progress``, on rank 0 only, and only when stderr is a terminal (so logs stay free of bar updates). A
        ``torch.utils.data.DataLoader`` with a ``DistributedSampler`` gets ``set_epoch`` before each pass.
        """
        if not self.current_task:
            raise RuntimeError("no task is being trained; call start_task() first")
        self.model.train()
        mean_loss = float("nan")
        group = ddp_group(self.model)
        show_progress = show_progress and is_main_process()
        # disable=None: tqdm shows the bar on a terminal only.
        bar = tqdm(
            range(epochs), desc=f"task {self.current_task} {desc}", leave=False, disable=None if show_progress else True
        )
        for _ in bar:
            sampler = getattr(data, "sampler", None)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(self._epochs_run)
            self._epochs_run += 1
            total, batches = 0.0, 0
            for inputs, targets in data:
                if self.input_spec is None:
                    self.input_spec = input_spec(inputs)
                if self.input_shape is None and isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
                    self.input_shape = tuple(inputs.shape[1:])
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(call_model(self.model, inputs), targets)
                loss.backward()
                self._mask_gradients_()
                optimizer.step()
                self.restore_frozen_()
                total += float(loss.detach())
                batches += 1
            mean_loss = total / max(batches, 1)
            if group is not None:
                device = next(iter(self.layers.values())).weight.device
                mean_loss = mean_across_ranks(mean_loss, group, device)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        return mean_loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current task trains: shared weights (masked per element) and all per-task parameters."""
        return [param for param in self.model.parameters() if param.requires_grad]

    def learn_task(
        self,
        data: Iterable,
        optimizer: OptimizerFactory | torch.optim.Optimizer,
        epochs: int,
        finetune_epochs: int = 0,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        prune_ratio: float | None = None,
        show_progress: bool = True,
    ) -> int:
        """Run one whole task: start, train, prune, fine-tune the kept weights, freeze. Returns the task number.

        ``optimizer`` is an optimizer or a factory ``params -> optimizer`` (called once for training and once more
        for fine-tuning, so the fine-tune starts with fresh moments). Under DDP every rank calls this with its shard
        of the data (the same number of batches on every rank, e.g. a ``DistributedSampler`` with
        ``drop_last=True``); weights, task ids and per-task state are broadcast from rank 0 when the task starts,
        after pruning and when it is frozen, so every rank ends with the same network.
        """
        make = optimizer if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer) else None
        task = self.start_task()
        opt = make(self.trainable_parameters()) if make else optimizer
        self.train_epochs(data, opt, epochs, loss_fn, "train", show_progress)
        released = self.prune(prune_ratio)
        log.info("task %d: released %d weights", task, sum(released.values()))
        if finetune_epochs:
            opt = make(self.trainable_parameters()) if make else optimizer
            self.train_epochs(data, opt, finetune_epochs, loss_fn, "finetune", show_progress)
        return self.end_task()

    # ------------------------------------------------------------------ inference on the trainer
    @contextlib.contextmanager
    def task(self, task: int) -> Iterator[nn.Module]:
        """Context in which the model computes task ``task``: its state, the weights of tasks 1..task, eval mode.

        Everything (weights, per-task state, train/eval mode) is put back on exit.

        Raises:
            TypeError: ``task`` is not an int. ValueError: ``task`` is not a finished task (tasks count from 1).
        """
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int, got {type(task).__name__} {task!r}")
        if not 1 <= task <= self.num_tasks:
            raise ValueError(f"task must be a finished task in 1..{self.num_tasks}, got {task}")
        saved_state = {key: value.detach().clone() for key, value in self._task_specific_state().items()}
        saved_weights = {name: weight.detach().clone() for name, weight in self.weights.items()}
        was_training = self.model.training
        try:
            self._load_task_state(self.task_states[task - 1])
            with torch.no_grad():
                for name, weight in self.weights.items():
                    weight.copy_(effective_weight(weight, self.task_ids[name], task))
            self.model.eval()
            yield self.net
        finally:
            self._load_task_state(saved_state)
            with torch.no_grad():
                for name, weight in self.weights.items():
                    weight.copy_(saved_weights[name])
            self.model.train(was_training)

    @torch.no_grad()
    def predict(self, inputs, task: int):
        """The model's output for ``task`` on ``inputs`` (a tensor, or a dict of keyword inputs); raises as
        :meth:`task`."""
        with self.task(task) as net:
            return call_model(net, inputs)

    # ------------------------------------------------------------------ export
    def skeleton(self) -> nn.Module:
        """A deep copy of the plain model (no DDP wrapper), for building packs."""
        return copy.deepcopy(self.net)

    def task_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        """A plain ``state_dict`` of the model for ``task`` alone: masked weights, that task's own state and the
        state shared by all tasks.

        Raises:
            TypeError: ``task`` is not an int. ValueError: ``task`` outside 1..num_tasks.
        """
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int, got {type(task).__name__} {task!r}")
        if not 1 <= task <= self.num_tasks:
            raise ValueError(f"task must be in 1..{self.num_tasks}, got {task}")
        state = dict(self.shared_state)
        state.update(self.task_states[task - 1])
        for name, weight in self.weights.items():
            key = f"{name}.{KINDS[self.kinds[name]].weight_key}"
            state[key] = effective_weight(weight.detach(), self.task_ids[name], task).clone()
        return state

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path) -> dict[str, Any]:
        """Write the trainer between two tasks to ``path`` (one safetensors file, no pickle); returns its metadata.

        The file holds the model's whole state, every task id, each task's state and the shared state, the
        settings (prune ratio, granularity, head, the layers and the shared keys), the passes run so far, what the
        inputs look like, and the random generators (torch's CPU and CUDA ones, Python's ``random``, NumPy's
        global one), so that the tasks trained after :meth:`load_checkpoint` come out bit for bit as they would
        have without the interruption (same data, same optimizer factory). Written atomically, with a SHA-256 of
        the tensors. An optimizer given as an object, not a factory, keeps state of its own that is not saved.

        Raises:
            RuntimeError: a task is being trained (save after ``end_task``/``learn_task``).
        """
        import json
        import random

        from safetensors.torch import save_file

        from .pack import PRODUCER, _digest, write_file_atomically

        if self.current_task:
            raise RuntimeError(
                f"task {self.current_task} is being trained; save a checkpoint between tasks (after end_task)"
            )
        tensors = {f"model/{key}": value for key, value in self.net.state_dict().items()}
        tensors.update({f"task_ids/{name}": ids for name, ids in self.task_ids.items()})
        for task, state in enumerate(self.task_states, 1):
            tensors.update({f"tasks/{task}/{key}": value for key, value in state.items()})
        tensors.update({f"shared/{key}": value for key, value in self.shared_state.items()})
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng/cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
        numpy_state = _numpy_rng_state()
        if numpy_state is not None:
            tensors["rng/numpy"] = numpy_state[1]
        # Tied or shared storage cannot be written as one safetensors tensor each: every entry gets its own copy.
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
        python_state = random.getstate()
        ratio = self.prune_ratio if isinstance(self.prune_ratio, (int, float)) else list(self.prune_ratio)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "producer": PRODUCER,
            "num_tasks": self.num_tasks,
            "prune_ratio": ratio,
            "prune_granularity": self.prune_granularity
            if self.prune_granularity == "element"
            else list(self.prune_granularity),
            "head": self.head,
            "layers": self.kinds,
            "shared_keys": sorted(self.state_shared_keys),
            "epochs_run": self._epochs_run,
            "init_std": self._init_std,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "input_spec": self.input_spec,
            "rng_python": [python_state[0], list(python_state[1]), python_state[2]],
            "rng_numpy": None if numpy_state is None else numpy_state[0],
            "sha256": _digest(tensors),
        }
        write_file_atomically(
            path, lambda tmp: save_file(tensors, tmp, metadata={"packnet_checkpoint": json.dumps(meta)})
        )
        return meta

    @classmethod
    def load_checkpoint(
        cls,
        path,
        model: nn.Module,
        *,
        prunable: Callable[[str, nn.Module], bool] | None = None,
        restore_rng: bool = True,
    ) -> PackNet:
        """A trainer resumed from :meth:`save_checkpoint` on ``model`` (the same architecture, freshly built: its
        values are all overwritten), ready for its next task. The settings come from the file; ``prunable`` is
        only needed for a filter that depends on more than module names (the file lists the layers). With
        ``restore_rng`` the random generators are put back as they were at the save.

        Raises:
            ValueError: not a checkpoint, a damaged one, or a model that does not fit it (named).
        """
        import json
        import random

        from .pack import PackFormatError, _digest, _read_safetensors

        try:
            tensors, metadata = _read_safetensors(os.fspath(path))
        except PackFormatError as error:
            raise ValueError(str(error)) from None
        try:
            meta = json.loads(metadata["packnet_checkpoint"])
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a packnet checkpoint (no valid packnet_checkpoint metadata)") from error
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this packnet reads"
                f" {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}"
            )
        if meta.get("sha256") != _digest(tensors):
            raise ValueError(f"{path}: checksum mismatch: the tensors are not the ones this checkpoint was saved with")
        layers, shared_keys = meta["layers"], set(meta["shared_keys"])
        granularity = meta["prune_granularity"]
        try:
            trainer = cls(
                model,
                prune_ratio=meta["prune_ratio"],
                prune_granularity=granularity if granularity == "element" else tuple(granularity),
                prunable=prunable or (lambda name, module: name in layers),
                head=meta["head"],
                share=lambda name, module: any(key.rpartition(".")[0] == name for key in shared_keys),
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: the model does not fit the checkpoint ({error})") from None
        if trainer.kinds != layers:
            raise ValueError(f"{path}: the model's shared layers {trainer.kinds} are not the checkpoint's {layers}")
        if trainer.state_shared_keys != shared_keys:
            raise ValueError(f"{path}: the model's shared state does not match the checkpoint's {sorted(shared_keys)}")
        state = {key[len("model/") :]: value for key, value in tensors.items() if key.startswith("model/")}
        try:
            trainer.net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[0:2]
            raise ValueError(f"{path}: the model is not the checkpoint's architecture ({' '.join(first)})") from None
        with torch.no_grad():
            for name, ids in trainer.task_ids.items():
                ids.copy_(tensors[f"task_ids/{name}"])
        device = next(iter(trainer.weights.values())).device
        trainer.task_states = [
            {
                key.split("/", 2)[2]: value.to(device)
                for key, value in tensors.items()
                if key.startswith(f"tasks/{task}/")
            }
            for task in range(1, meta["num_tasks"] + 1)
        ]
        trainer.shared_state = {
            key[len("shared/") :]: v.to(device) for key, v in tensors.items() if key[:7] == "shared/"
        }
        trainer._epochs_run = meta["epochs_run"]
        trainer._init_std = dict(meta["init_std"])  # the spread the original model was built with, not this copy's
        trainer.input_shape = None if meta["input_shape"] is None else tuple(meta["input_shape"])
        trainer.input_spec = meta["input_spec"]
        if restore_rng:
            torch.set_rng_state(tensors["rng/torch"])
            cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith("rng/cuda/")]
            if cuda_states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda_states)
            version, internal, gauss = meta["rng_python"]
            random.setstate((version, tuple(internal), gauss))
            if meta["rng_numpy"] is not None and "rng/numpy" in tensors:
                _set_numpy_rng_state(meta["rng_numpy"], tensors["rng/numpy"])
        return trainer


CHECKPOINT_FORMAT = "packnet-checkpoint"
CHECKPOINT_VERSION = 1


def _numpy_rng_state():
    """``(json part, key tensor)`` of NumPy's global generator, or None without NumPy."""
    try:
        import numpy as np
    except ImportError:
        return None
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, int(position), int(has_gauss), float(cached)], torch.from_numpy(keys.astype(np.int64))


def _set_numpy_rng_state(fields, keys: torch.Tensor) -> None:
    import numpy as np

    kind, position, has_gauss, cached = fields
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
