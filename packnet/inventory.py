"""What a model shares between tasks and what each task stores: :func:`census`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from .layers import KINDS

__all__ = ["Census", "CensusRow", "census"]


@dataclass(frozen=True)
class CensusRow:
    """One module of the census.

    Attributes:
        module: qualified module name (``""`` for the root).
        class_name: the plain module's class, or ``"?"`` when unknown (a pack written without a fingerprint).
        packed: the layer kind (:data:`packnet.layers.KINDS`) when the module's weight is one packed weight shared
            by all tasks, else None.
        shared: local state names held once for all tasks (a packed weight, a norm shared with ``share``).
        shared_values: how many values those hold.
        per_task: local state names every task holds its own copy of (biases, norms, tokens, heads).
        per_task_values: how many values one task's copy holds.
    """

    module: str
    class_name: str
    packed: str | None
    shared: tuple[str, ...]
    shared_values: int
    per_task: tuple[str, ...]
    per_task_values: int


@dataclass(frozen=True)
class Census:
    """Per module, what is shared by all tasks and what each task stores; totals in values (not bytes)."""

    num_tasks: int | None
    rows: tuple[CensusRow, ...]

    @property
    def packed_values(self) -> int:
        """Values in packed weights: stored once, each with a one-byte task id."""
        return sum(row.shared_values for row in self.rows if row.packed)

    @property
    def shared_values(self) -> int:
        """Values of other state stored once for all tasks."""
        return sum(row.shared_values for row in self.rows if not row.packed)

    @property
    def per_task_values(self) -> int:
        """Values each task stores on its own."""
        return sum(row.per_task_values for row in self.rows)

    def table(self) -> str:
        """The census as a plain-text table, one module per line, with the totals."""
        header = ("module", "class", "shared by all tasks", "per task")
        lines = []
        for row in self.rows:
            shared = f"{row.shared_values} ({', '.join(row.shared)})" if row.shared else "-"
            if row.packed:
                shared = f"packed {row.packed}: {shared}"
            per_task = f"{row.per_task_values} ({', '.join(row.per_task)})" if row.per_task else "-"
            lines.append((row.module or "<root>", row.class_name, shared, per_task))
        widths = [max(len(line[column]) for line in [header, *lines]) for column in range(3)]
        text = [
            "  ".join(cell.ljust(width) for cell, width in zip(line[:3], widths, strict=True)) + "  " + line[3]
            for line in [header, *lines]
        ]
        tasks = f"{self.num_tasks} tasks" if self.num_tasks is not None else "tasks not trained yet"
        text.append(
            f"total ({tasks}): {self.packed_values} packed values (+1 byte of task id each), {self.shared_values}"
            f" other shared values, {self.per_task_values} values per task"
        )
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()


def _owner(key: str) -> tuple[str, str]:
    module, _, local = key.rpartition(".")
    return module, local


def _rows(
    layers: dict[str, tuple[str, int]],
    shared: dict[str, int],
    per_task: dict[str, int],
    classes: dict[str, str],
) -> tuple[CensusRow, ...]:
    """Rows from ``layers`` (name -> (kind, values)) and state keys with their value counts."""
    modules: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return modules.setdefault(name, {"packed": None, "shared": {}, "per_task": {}})

    for name, (kind, values) in layers.items():
        row = entry(name)
        row["packed"] = kind
        row["shared"][KINDS[kind].weight_key] = values
    for key, values in shared.items():
        module, local = _owner(key)
        entry(module)["shared"][local] = values
    for key, values in per_task.items():
        module, local = _owner(key)
        entry(module)["per_task"][local] = values
    order = {name: index for index, name in enumerate(classes)}
    return tuple(
        CensusRow(
            name,
            classes.get(name, "?"),
            row["packed"],
            tuple(row["shared"]),
            sum(row["shared"].values()),
            tuple(row["per_task"]),
            sum(row["per_task"].values()),
        )
        for name, row in sorted(modules.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    )


def census(
    source,
    *,
    head: str | None = None,
    share: Callable[[str, nn.Module], bool] | None = None,
    prunable: Callable[[str, nn.Module], bool] | None = None,
) -> Census:
    """What ``source`` shares between tasks and what each task stores, per module.

    ``source`` is a :class:`packnet.PackNet` trainer, a packed model (``compile_pack``, ``load_pack``,
    ``swap_packed_``), a :class:`packnet.Pack`, or a plain model: then what ``PackNet(model, head=head,
    share=share, prunable=prunable)`` would do (nothing is changed). ``print(census(model))`` shows the table.

    Raises:
        ValueError, TypeError: a plain model :class:`packnet.PackNet` refuses (no packable layer, a bad filter).
    """
    from .modules import _TaskSelecting, recorded_skeleton
    from .pack import Pack, pack_from_model
    from .training import PackNet

    if isinstance(source, nn.Module) and not any(isinstance(m, _TaskSelecting) for m in source.modules()):
        source = PackNet(source, head=head, share=share, prunable=prunable)
    if isinstance(source, PackNet):
        net = source.net
        layers = {name: (source.kinds[name], weight.numel()) for name, weight in source.weights.items()}
        state = net.state_dict()
        shared = {key: state[key].numel() for key in source.state_shared_keys}
        per_task = {key: value.numel() for key, value in source._task_specific_state().items()}
        classes = {name: type(module).__name__ for name, module in net.named_modules()}
        return Census(source.num_tasks, _rows(layers, shared, per_task, classes))
    if isinstance(source, nn.Module):
        skeleton = recorded_skeleton(source)
        pack = pack_from_model(source)
        classes = {name: type(module).__name__ for name, module in (skeleton or source).named_modules()}
    elif isinstance(source, Pack):
        pack = source
        classes = {entry[0]: entry[1] for entry in pack.fingerprint or []}
    else:
        raise TypeError(f"census: expected a PackNet, a model or a Pack, got {type(source).__name__}")
    layers = {name: (pack.kind(name), weight.numel()) for name, (weight, _) in pack.layers.items()}
    shared = {key: value.numel() for key, value in pack.shared_state.items()}
    per_task = {key: value.numel() for key, value in pack.task_states[0].items()}
    return Census(pack.num_tasks, _rows(layers, shared, per_task, classes))
