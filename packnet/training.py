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
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from packnet_kernels import MAX_TASKS, effective_weight

from .distributed import broadcast_, ddp_group, is_main_process, mean_across_ranks
from .pruning import check_granularity, prune_ratio_for, release_smallest, release_smallest_blocks

__all__ = ["CapacityWarning", "LayerOwnership", "PackNet", "default_prunable"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class CapacityWarning(UserWarning):
    """A task starts with no free weight in any prunable layer: earlier tasks kept them all, so it can train only its
    own state (biases, norms, head) on their frozen weights. Raise ``prune_ratio`` (or, with block pruning, use
    smaller blocks) so that each task releases more for the next."""


def default_prunable(name: str, module: nn.Module) -> bool:
    """The default layer filter: every ``nn.Linear`` and ``nn.Conv2d``."""
    return isinstance(module, (nn.Linear, nn.Conv2d))


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
        prunable: ``(name, module) -> bool`` picking the shared layers; default every ``nn.Linear``/``nn.Conv2d``
            outside ``head``. Picked modules must be ``nn.Linear`` or ``nn.Conv2d``.
        head: qualified name of the classifier head. Its parameters are per task and re-initialised (its modules'
            ``reset_parameters``) when a new task starts; other per-task state starts from the previous task's.

    Raises:
        ValueError: a bad ``prune_ratio`` or ``prune_granularity``, an unknown ``head``, or no prunable layer.
        TypeError: the filter picked a module that is not ``nn.Linear``/``nn.Conv2d``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prune_ratio: float | Sequence[float] = 0.5,
        prune_granularity: str | tuple[int, int] = "element",
        prunable: Callable[[str, nn.Module], bool] | None = None,
        head: str | None = None,
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
        for name, module in net.named_modules():
            if head is not None and (name == head or name.startswith(head + ".")):
                continue
            if name and picker(name, module):
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    raise TypeError(f"prunable layer {name!r} is a {type(module).__name__}; only Linear/Conv2d")
                self.layers[name] = module
        if not self.layers:
            raise ValueError("the model has no prunable nn.Linear/nn.Conv2d layer")
        self.task_ids = {
            name: torch.zeros(layer.weight.shape, dtype=torch.uint8, device=layer.weight.device)
            for name, layer in self.layers.items()
        }
        self.shared_keys = {f"{name}.weight" for name in self.layers}
        self.task_states: list[dict[str, torch.Tensor]] = []
        self.current_task = 0  # the task being trained, 0 when none
        self._frozen_weights: dict[str, torch.Tensor] = {}
        self._trainable_masks: dict[str, torch.Tensor] = {}
        self._epochs_run = 0  # passes over the data so far, for DistributedSampler.set_epoch
        # Per-sample shape of the first training input (no batch dimension), recorded into packs so that
        # save_pack can draw a probe input; None until a tensor input is seen.
        self.input_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_tasks(self) -> int:
        """Number of tasks trained and frozen."""
        return len(self.task_states)

    @property
    def net(self) -> nn.Module:
        return _unwrap(self.model)

    def _task_specific_state(self) -> dict[str, torch.Tensor]:
        return {key: value for key, value in self.net.state_dict().items() if key not in self.shared_keys}

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
        tensors = [layer.weight for layer in self.layers.values()] + list(self.task_ids.values())
        tensors += list(self._task_specific_state().values())
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
            for name, layer in self.layers.items():
                free = self.task_ids[name] == 0
                if not bool(free.any()):
                    full.append(name)
                fresh = torch.empty_like(layer.weight)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # nn.Linear/nn.Conv2d's own initialisation
                layer.weight.copy_(torch.where(free, fresh, layer.weight))
                self.task_ids[name][free] = task
        self._sync_ranks()
        self.current_task = task
        self._snapshot_frozen()
        self._report_capacity(task, full)
        return task

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
        """Record the values of the weights the current task may not change, and which ones it may."""
        self._frozen_weights = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}
        self._trainable_masks = {name: ids == self.current_task for name, ids in self.task_ids.items()}

    def restore_frozen_(self) -> None:
        """Put back every weight the current task may not change (other tasks' and released ones)."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.weight.copy_(torch.where(self._trainable(name), layer.weight, self._frozen_weights[name]))

    def _mask_gradients_(self) -> None:
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(self._trainable(name))

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
            for name, layer in self.layers.items():
                if self.prune_granularity == "element":
                    release = release_smallest(layer.weight, self.task_ids[name], self.current_task, ratio)
                else:
                    release = release_smallest_blocks(
                        layer.weight, self.task_ids[name], self.current_task, ratio, self.prune_granularity
                    )
                layer.weight.masked_fill_(release, 0.0)
                self.task_ids[name][release] = 0
                released_counts[name] = int(release.sum())
        self._sync_ranks()
        self._snapshot_frozen()
        return released_counts

    def end_task(self) -> int:
        """Freeze the current task: store its per-task state; returns the task."""
        if not self.current_task:
            raise RuntimeError("no task is being trained")
        self.restore_frozen_()
        self._sync_ranks()  # above all the BatchNorm statistics, which each rank gathered on its own batches
        self.task_states.append({key: value.detach().clone() for key, value in self._task_specific_state().items()})
        task, self.current_task = self.current_task, 0
        self._frozen_weights, self._trainable_masks = {}, {}
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
        """Train the current task for ``epochs`` passes over ``data`` (an iterable of ``(inputs, targets)``).

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
                if self.input_shape is None and isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
                    self.input_shape = tuple(inputs.shape[1:])
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(self.model(inputs), targets)
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
        saved_weights = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}
        was_training = self.model.training
        try:
            self._load_task_state(self.task_states[task - 1])
            with torch.no_grad():
                for name, layer in self.layers.items():
                    layer.weight.copy_(effective_weight(layer.weight, self.task_ids[name], task))
            self.model.eval()
            yield self.net
        finally:
            self._load_task_state(saved_state)
            with torch.no_grad():
                for name, layer in self.layers.items():
                    layer.weight.copy_(saved_weights[name])
            self.model.train(was_training)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, task: int) -> torch.Tensor:
        """The model's output for ``task`` on ``inputs``; raises as :meth:`task`."""
        with self.task(task) as net:
            return net(inputs)

    # ------------------------------------------------------------------ export
    def skeleton(self) -> nn.Module:
        """A deep copy of the plain model (no DDP wrapper), for building packs."""
        return copy.deepcopy(self.net)

    def task_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        """A plain ``state_dict`` of the model for ``task`` alone: masked weights and that task's own state.

        Raises:
            TypeError: ``task`` is not an int. ValueError: ``task`` outside 1..num_tasks.
        """
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int, got {type(task).__name__} {task!r}")
        if not 1 <= task <= self.num_tasks:
            raise ValueError(f"task must be in 1..{self.num_tasks}, got {task}")
        state = dict(self.task_states[task - 1])
        for name, layer in self.layers.items():
            state[f"{name}.weight"] = effective_weight(layer.weight.detach(), self.task_ids[name], task).clone()
        return state
