"""Compiled packs: build, save, load and export.

A pack holds, per prunable layer, the shared dense weight and its ``uint8`` task ids; per task, the model's state
that differs between tasks (biases, BatchNorm parameters and statistics, the head); the state shared by all tasks
(a BatchNorm or LayerNorm left unpacked, an unpacked layer); and metadata. On disk it is a single safetensors file
(no pickle: loading an untrusted pack never runs code) whose header metadata key ``"packnet"`` holds a JSON document:
format name and version, producer, number of tasks, dtype, layers, per-task keys, shared keys, architecture spec,
module-tree fingerprint, input shape and the SHA-256 of the tensors. The reader parses the file itself and validates
everything before building a model.

Format versions: 1 (no shared state, fingerprint or input shape) and 2 (this writer). Both are read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from safetensors.torch import save_file

from packnet_kernels import MAX_TASKS, effective_weight

from .layers import KINDS, kind_of, pack_layer
from .models import (
    ARCH_ATTR,
    BUILDERS,
    INPUT_SHAPE_ATTR,
    INPUT_SPEC_ATTR,
    arch_spec,
    build_model,
    module_fingerprint,
)
from .modules import (
    TASK_STATE_NAME,
    PackedConv2d,
    TaskParameters,
    TaskSwitch,
    _PackedLayer,
    _replace_submodule,
    accept_task_argument,
    hold_task_state,
    record_skeleton,
    recorded_skeleton,
    set_task,
)
from .training import input_spec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FOLDING_ATTR",
    "Pack",
    "PackFormatError",
    "PackSaveError",
    "build_packed_model",
    "compile_pack",
    "export_task_state_dict",
    "load_pack",
    "pack_from_model",
    "pack_from_trainer",
    "read_pack",
    "save_pack",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "packnet-pack"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Attribute of a built model: how many BatchNorms it holds, how many were folded and how they were found.
FOLDING_ATTR = "packnet_folding"
PRODUCER = "packnet 0.1.0"
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors dtype codes the reader accepts, with their torch dtype.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 64 * 1024 * 1024


class PackFormatError(ValueError):
    """A pack file or pack contents that cannot be used; the message names what is wrong."""


class PackSaveError(RuntimeError):
    """:func:`save_pack` wrote a file that does not read back into the model it was given; no file was left."""


@dataclass
class Pack:
    """A pack in memory.

    Attributes:
        num_tasks: tasks held, 1..255.
        layers: qualified layer name -> ``(weight, task_ids)``; weight ``[out, in]`` or ``[out, in/g, kh, kw]``.
        task_states: one dict per task: state-dict key of the plain model -> tensor.
        arch: the architecture spec of a registered builder, or None.
        meta: the file's metadata when read from a file.
        shared_state: state-dict key of the plain model -> tensor, for state shared by all tasks.
        fingerprint: :func:`packnet.models.module_fingerprint` of the plain model, or None (unknown; format v1).
        input_shape: per-sample input shape of the model (no batch dimension), or None when unknown.
        kinds: qualified layer name -> layer kind (:data:`packnet.layers.KINDS`); a layer missing here is a Linear
            (2-D weight) or Conv2d (4-D), as in packs written before other kinds existed.
        input_spec: what the model's inputs look like (:func:`packnet.training.input_spec`: shape, dtype and value
            range of a tensor input, or of each keyword input), for drawing probe inputs; None when unknown.
    """

    num_tasks: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    task_states: list[dict[str, torch.Tensor]]
    arch: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    shared_state: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: list | None = None
    input_shape: list[int] | None = None
    kinds: dict[str, str] = field(default_factory=dict)
    input_spec: dict[str, Any] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values()))[0].dtype

    def kind(self, name: str) -> str:
        """Layer ``name``'s kind: as recorded, else ``linear`` for a 2-D weight and ``conv2d`` for a 4-D one."""
        if name in self.kinds:
            return self.kinds[name]
        return "linear" if self.layers[name][0].dim() == 2 else "conv2d"

    def weight_key(self, name: str) -> str:
        """The plain model's state-dict key of layer ``name``'s packed weight (``<name>.weight``, an attention's
        ``<name>.in_proj_weight``)."""
        return f"{name}.{KINDS[self.kind(name)].weight_key}"

    def bias_key(self, name: str) -> str:
        return f"{name}.{KINDS[self.kind(name)].bias_key}"

    def ownership(self) -> dict[str, list[int]]:
        """Per layer, the number of weights owned by each task (index 0 = free)."""
        return {
            name: torch.bincount(ids.flatten().long(), minlength=self.num_tasks + 1).tolist()
            for name, (_, ids) in self.layers.items()
        }

    def task_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        """A plain ``state_dict`` of the original architecture for ``task`` alone (masked weights).

        Raises:
            TypeError: ``task`` is not an int. ValueError: ``task`` outside 1..num_tasks (tasks count from 1).
        """
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int in 1..{self.num_tasks}, got {type(task).__name__} {task!r}")
        if not 1 <= task <= self.num_tasks:
            raise ValueError(f"task must be in 1..{self.num_tasks}, got {task}")
        state = {key: value.clone() for key, value in self.shared_state.items()}
        state.update({key: value.clone() for key, value in self.task_states[task - 1].items()})
        for name, (weight, ids) in self.layers.items():
            state[self.weight_key(name)] = effective_weight(weight, ids, task).clone()
        return state

    def nbytes(self) -> int:
        tensors = [t for pair in self.layers.values() for t in pair]
        tensors += [t for state in self.task_states for t in state.values()]
        tensors += list(self.shared_state.values())
        return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------------- building
def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor.clone()


def pack_from_trainer(trainer, dtype: torch.dtype | None = None) -> Pack:
    """Collect a trained :class:`packnet.PackNet` into a :class:`Pack` (weights and per-task state in ``dtype``)."""
    if trainer.current_task:
        raise RuntimeError(f"task {trainer.current_task} is still being trained; call end_task() first")
    if not trainer.num_tasks:
        raise ValueError("the trainer has no finished task to pack")
    if dtype is not None and dtype not in WEIGHT_DTYPES.values():
        raise TypeError(f"pack dtype must be one of {list(WEIGHT_DTYPES)}, got {dtype}")
    layers = {
        name: (_cast(weight, dtype).cpu(), trainer.task_ids[name].detach().clone().cpu())
        for name, weight in trainer.weights.items()
    }
    task_states = [{key: _cast(value, dtype).cpu() for key, value in state.items()} for state in trainer.task_states]
    shared_state = {key: _cast(value, dtype).cpu() for key, value in trainer.shared_state.items()}
    input_shape = trainer.input_shape or getattr(trainer.net, INPUT_SHAPE_ATTR, None)
    return Pack(
        trainer.num_tasks,
        layers,
        task_states,
        arch_spec(trainer.net),
        shared_state=shared_state,
        fingerprint=module_fingerprint(trainer.net),
        input_shape=None if input_shape is None else list(input_shape),
        kinds=_recorded_kinds(dict(trainer.kinds)),
        input_spec=copy.deepcopy(trainer.input_spec),
    )


def _recorded_kinds(kinds: Mapping[str, str]) -> dict[str, str]:
    """The kinds a pack records: all but Linear and Conv2d, whose weights' dimensions say what they are (so packs
    of those alone are written as before)."""
    return {name: kind for name, kind in kinds.items() if kind not in ("linear", "conv2d")}


def _describe_state(state: list) -> str:
    return ", ".join(f"{key} {tuple(shape)}" for key, shape in state) or "no state"


def check_fingerprint(fingerprint: list, skeleton: nn.Module) -> None:
    """Raise PackFormatError naming the first module where ``skeleton`` differs from the pack's module tree.

    Compares module names, classes and the shapes of the state each module holds, and copies nothing.
    """
    ours = {name: (kind, state) for name, kind, state in fingerprint}
    theirs = {name: (kind, state) for name, kind, state in module_fingerprint(skeleton)}
    prefix = "the model given is not the pack's architecture:"
    for name, (kind, state) in ours.items():
        label = repr(name) if name else "<root>"
        if name not in theirs:
            raise PackFormatError(f"{prefix} the pack's module {label} ({kind}) is missing from the model")
        their_kind, their_state = theirs[name]
        if their_kind != kind:
            raise PackFormatError(f"{prefix} module {label} is a {kind} in the pack but a {their_kind} in the model")
        if their_state != state:
            raise PackFormatError(
                f"{prefix} module {label} ({kind}) holds {_describe_state(state)} in the pack but"
                f" {_describe_state(their_state)} in the model"
            )
    for name, (kind, _) in theirs.items():
        if name not in ours:
            raise PackFormatError(f"{prefix} the model's module {name!r} ({kind}) is not in the pack")


def _check_against_skeleton(pack: Pack, skeleton: nn.Module) -> None:
    """Raise PackFormatError unless ``pack`` fits ``skeleton``'s layers and state dict exactly."""
    state = skeleton.state_dict()
    for name, (weight, _) in pack.layers.items():
        try:
            module = skeleton.get_submodule(name)
        except AttributeError:
            raise PackFormatError(f"pack layer {name!r} is not a module of the model") from None
        kind, found = pack.kind(name), kind_of(module)
        if found != kind:
            expected = "Linear/Conv2d" if name not in pack.kinds else f"the pack's kind, {kind}"
            raise PackFormatError(f"pack layer {name!r} is a {type(module).__name__} in the model, not {expected}")
        model_weight = getattr(module, KINDS[kind].weight_key)
        if tuple(model_weight.shape) != tuple(weight.shape):
            raise PackFormatError(
                f"pack layer {name!r} has weight shape {tuple(weight.shape)} but the model's is"
                f" {tuple(model_weight.shape)}: the pack is for another architecture"
            )
    weight_keys = {pack.weight_key(name) for name in pack.layers}
    expected = {key: value for key, value in state.items() if key not in weight_keys}
    shared_extra = sorted(set(pack.shared_state) - set(expected))
    if shared_extra:
        raise PackFormatError(f"the pack's shared state does not match the model: unexpected {shared_extra[:5]}")
    for name in pack.layers:
        if pack.bias_key(name) in pack.shared_state:
            raise PackFormatError(f"pack layer {name!r} has a shared bias; a packed layer's bias must be per task")
    per_task = {key: value for key, value in expected.items() if key not in pack.shared_state}
    states = [(f"task {task}'s", task_state) for task, task_state in enumerate(pack.task_states, 1)]
    for what, task_state in states:
        missing = sorted(set(per_task) - set(task_state))
        extra = sorted(set(task_state) - set(per_task))
        if missing or extra:
            both = sorted(set(task_state) & set(pack.shared_state))
            if both:
                raise PackFormatError(f"{what} state and the shared state both hold {both[:5]}")
            raise PackFormatError(
                f"{what} state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
    for what, some_state in [*states, ("the shared", pack.shared_state)]:
        for key, value in some_state.items():
            want = pack.dtype if expected[key].is_floating_point() else expected[key].dtype
            if value.dtype != want:
                raise PackFormatError(f"{what} {key!r} has dtype {value.dtype}, expected {want}")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise PackFormatError(
                    f"{what} {key!r} has shape {tuple(value.shape)} but the model's is"
                    f" {tuple(expected[key].shape)}: the pack is for another architecture"
                )


def build_shapes_first(arch: dict[str, Any]) -> tuple[nn.Module, bool]:
    """``(model, on_meta)``: the model of ``arch`` built on the meta device (shapes only, no memory), or, when the
    builder cannot run there (torchvision's RegNet reads tensor values while it builds: "Cannot copy out of meta
    tensor"), built on the CPU; the reason is logged."""
    try:
        with torch.device("meta"):
            return build_model(arch), True
    except (RuntimeError, NotImplementedError) as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        log.info("builder %r cannot run on the meta device (%s); building it on the CPU", arch.get("builder"), reason)
        return build_model(arch), False


def _rebuild_checked(pack: Pack) -> nn.Module:
    """Rebuild ``pack.arch``, allocating real memory only once its shapes are known to match the pack's tensors.

    The spec comes from the file and is not covered by the checksum: a crafted size must neither allocate without
    bound nor raise anything but PackFormatError.
    """
    if pack.arch["builder"] not in BUILDERS:  # looked up by name only: a pack never names code to import
        raise PackFormatError(
            f"the pack was built by model builder {pack.arch['builder']!r}, which is not registered in this process"
            f" (known: {sorted(BUILDERS)}); call packnet.register_builder({pack.arch['builder']!r}, fn) before"
            " loading, or pass the model skeleton (model=...)"
        )
    stored = sum(t.numel() for pair in pack.layers.values() for t in pair)
    stored += sum(t.numel() for state in pack.task_states for t in state.values())
    stored += sum(t.numel() for t in pack.shared_state.values())
    for key, value in pack.arch["kwargs"].items():
        # No size, width or depth of a model exceeds the number of values it stores.
        if type(value) is int and not 0 <= value <= max(stored, 1):
            raise PackFormatError(f"architecture argument {key}={value} cannot describe a model of {stored} values")
    try:
        skeleton, on_meta = build_shapes_first(pack.arch)
        with torch.device("meta"):
            if pack.fingerprint is not None:
                check_fingerprint(pack.fingerprint, skeleton)
            _check_against_skeleton(pack, skeleton)
        return build_model(pack.arch) if on_meta else skeleton
    except PackFormatError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise PackFormatError(f"cannot rebuild the architecture {pack.arch}: {error}") from error


def _own_state_keys(module: nn.Module) -> list[str]:
    """Local state-dict keys of the parameters and persistent buffers ``module`` holds itself."""
    keys = [key for key, param in module._parameters.items() if param is not None]
    keys += [
        key
        for key, buffer in module._buffers.items()
        if buffer is not None and key not in module._non_persistent_buffers_set
    ]
    return keys


def _subtree(name: str, key: str) -> bool:
    return not name or key == name or key.startswith(name + ".")


def _local_state(task_state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "." if name else ""
    return {key[len(prefix) :]: value for key, value in task_state.items() if key.startswith(prefix)}


def _materialize(model: nn.Module) -> nn.Module:
    """Give every meta-device parameter and buffer of ``model`` real (uninitialised) CPU memory, in place.

    Used on recorded skeletons; every such value is then overwritten from the pack (the skeleton check makes sure
    the pack holds all of them).
    """
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and param.is_meta:
                module._parameters[key] = nn.Parameter(torch.empty_like(param, device="cpu"), param.requires_grad)
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[key] = torch.empty_like(buffer, device="cpu")
    return model


def build_packed_model(
    pack: Pack, skeleton: nn.Module | None = None, *, fuse: bool = True, backend: str = "auto"
) -> nn.Module:
    """Build the inference model of ``pack`` on a copy of ``skeleton`` (default: rebuilt from ``pack.arch``).

    Prunable layers become :class:`PackedLinear`/:class:`PackedConv2d`; every other module with per-task state
    becomes a :class:`TaskSwitch` of per-task copies; shared state is loaded into the modules as they are. With
    ``fuse``, a packed layer whose output only an eval-mode BatchNorm reads (and whose BatchNorm output only a ReLU
    reads) becomes one packed layer with a per-task epilogue; the matches are found in the ``torch.fx`` graph of
    the model, or, when the model cannot be traced, inside ``nn.Sequential`` containers only (the reason is logged).
    ``model.packnet_folding`` then says how many BatchNorms were folded. The model is returned in eval mode, on the
    CPU, with no active task.

    Raises:
        PackFormatError: the pack does not fit the architecture (checked against the pack's module-tree fingerprint
            first, when it has one, before anything is copied), or the architecture cannot be rebuilt.
    """
    if skeleton is None:
        if pack.arch is None:
            raise PackFormatError("the pack records no architecture spec; pass the model skeleton (model=...)")
        skeleton = _rebuild_checked(pack)
    if pack.fingerprint is not None:
        check_fingerprint(pack.fingerprint, skeleton)
    _check_against_skeleton(pack, skeleton)
    model = _materialize(copy.deepcopy(skeleton)).to(device="cpu", dtype=pack.dtype)
    num_tasks = pack.num_tasks
    for name, (weight, ids) in pack.layers.items():
        module = model.get_submodule(name)
        kind = pack.kind(name)
        bias_key = pack.bias_key(name)
        has_bias = getattr(module, KINDS[kind].bias_key, None) is not None
        biases = [state[bias_key] for state in pack.task_states] if has_bias else None
        with torch.no_grad():
            getattr(module, KINDS[kind].weight_key).copy_(weight)
        _replace_submodule(model, name, pack_layer(kind, module, ids, num_tasks, biases, backend=backend))
    with torch.no_grad():
        for key, value in pack.shared_state.items():
            module_name, _, local = key.rpartition(".")
            getattr(model.get_submodule(module_name) if module_name else model, local).copy_(value)
    switched: list[str] = []  # task switches made: their subtrees are per-task copies
    for name, module in list(model.named_modules()):
        if any(_subtree(done, name) for done in switched) or isinstance(module, (_PackedLayer, TaskSwitch)):
            continue
        own = [key for key in _own_state_keys(module) if (f"{name}.{key}" if name else key) not in pack.shared_state]
        if not own:
            continue
        prefix = f"{name}." if name else ""
        inside = [layer for layer in pack.layers if _subtree(name, layer)]
        shared_inside = [key for key in pack.shared_state if _subtree(name, key)]
        if inside or shared_inside or not name or len(own) < len(_own_state_keys(module)):
            # State of its own beside packed layers or shared state: the module stays, its own per-task values
            # move into a TaskParameters holder that it reads as its own attributes.
            hold_task_state(module, {key: [state[prefix + key] for state in pack.task_states] for key in own})
            continue
        copies = []
        for task_state in pack.task_states:
            per_task = copy.deepcopy(module)
            per_task.load_state_dict(_local_state(task_state, name))
            copies.append(per_task)
        _replace_submodule(model, name, TaskSwitch(copies))
        switched.append(name)
    folding = fold_norms(model) if fuse else {"norms": _count_norms(model), "folded": 0, "method": None}
    setattr(model, FOLDING_ATTR, folding)
    setattr(model, ARCH_ATTR, pack.arch)
    input_shape = pack.input_shape or getattr(skeleton, INPUT_SHAPE_ATTR, None)
    if input_shape is not None:
        setattr(model, INPUT_SHAPE_ATTR, tuple(input_shape))
    spec = pack.input_spec or getattr(skeleton, INPUT_SPEC_ATTR, None)
    if spec is not None:
        setattr(model, INPUT_SPEC_ATTR, copy.deepcopy(spec))
    record_skeleton(model, skeleton)
    _refuse_save_pretrained(model)
    return accept_task_argument(model).eval()


def _refuse_save_pretrained(model: nn.Module) -> None:
    """A packed transformers model keeps ``save_pretrained``/``push_to_hub`` from its class, which would write every
    task's weights under the plain model's names, a checkpoint no plain model reads correctly: they raise instead,
    saying what to do."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return

    def refuse(*args, **kwargs):
        raise TypeError(
            "save_pretrained cannot save a packed model (one shared weight holds every task); save it with"
            " packnet.save_pack(model, path), or export one task with packnet.export_task_state_dict(model, t),"
            " load that into the plain model (load_state_dict) and call the plain model's save_pretrained"
        )

    # Instance attributes shadow the class's methods (push_to_hub saves through save_pretrained).
    object.__setattr__(model, "save_pretrained", refuse)
    object.__setattr__(model, "push_to_hub", refuse)


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _count_norms(model: nn.Module) -> int:
    """BatchNorms in ``model``: a TaskSwitch of per-task BatchNorms counts once, as do folded ones."""
    count, per_task_copies = 0, set()
    for module in model.modules():  # pre-order: a TaskSwitch comes before its copies
        if isinstance(module, TaskSwitch):
            per_task_copies.update(id(copy_module) for copy_module in module.per_task.modules())
            count += isinstance(module.per_task[0], _NORMS)
        elif isinstance(module, _PackedLayer):
            count += module.fused_norm_name is not None
        elif isinstance(module, _NORMS) and id(module) not in per_task_copies:
            count += 1
    return count


def _foldable_norms(layer: _PackedLayer, norm: nn.Module) -> tuple[list[nn.Module], bool] | None:
    """The per-task BatchNorms ``norm`` holds and whether it is one shared module, or None when not foldable."""
    expected = nn.BatchNorm2d if isinstance(layer, PackedConv2d) else nn.BatchNorm1d
    if isinstance(norm, TaskSwitch):
        norms, shared = list(norm.per_task), False
    elif type(norm) is expected:
        norms, shared = [norm] * layer.num_tasks, True
    else:
        return None
    if len(norms) != layer.num_tasks or not all(
        type(bn) is expected and bn.running_mean is not None and bn.num_features == layer.weight.shape[0]
        for bn in norms
    ):
        return None
    return norms, shared


@torch.no_grad()  # the epilogue is a constant: no autograd history into BatchNorm parameters
def _fold_into(layer: _PackedLayer, norms: list[nn.Module], shared: bool, relu: bool, norm_name: str) -> None:
    """Fold eval-mode BatchNorms (one per task) and an optional ReLU into ``layer``'s epilogue."""
    scales, shifts = [], []
    for bn in norms:
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        scales.append(scale)
        shifts.append(shift)
    norm_state = {key: torch.stack([bn.state_dict()[key] for bn in norms]) for key in norms[0].state_dict()}
    layer.set_epilogue(torch.stack(scales), torch.stack(shifts), relu, norm_name, norm_state, norm_shared=shared)


class _PackedTracer(torch.fx.Tracer):
    """Symbolic tracer that keeps packed layers and task switches as single calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (_PackedLayer, TaskSwitch)) or super().is_leaf_module(module, qualified_name)


def fold_norms(model: nn.Module) -> dict[str, Any]:
    """Fold every ``packed layer -> BatchNorm (-> ReLU)`` chain of ``model`` into the layer's epilogue, in place.

    A chain folds when, in the ``torch.fx`` graph of ``model.forward``, the packed layer and the BatchNorm are each
    called once, the layer's output is read by the BatchNorm alone, nothing else is passed to it and ``forward``
    reads none of the BatchNorm's parameters or buffers directly; the ReLU is
    fused too when it is an ``nn.ReLU`` module called once, on the BatchNorm's output alone, which nothing else
    reads. Folded modules become ``nn.Identity``. A model that cannot be traced falls back to chains of adjacent
    children of ``nn.Sequential`` containers, and the reason is logged.

    Returns:
        ``{"norms": BatchNorms in the model, "folded": how many were folded, "method": "fx" or "sequential",
        "reason": why tracing failed (fallback only)}``.
    """
    norms = _count_norms(model)
    if not norms:  # nothing to fold: no need to trace (which transformers models do not survive)
        return {"norms": 0, "folded": 0, "method": "fx"}
    try:
        graph = _PackedTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - tracing runs the model's own forward code, which may raise anything
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        log.warning(
            "cannot trace %s with torch.fx (%s); folding BatchNorms only inside nn.Sequential containers",
            type(model).__name__,
            reason,
        )
        return {"norms": norms, "folded": _fold_in_sequentials(model), "method": "sequential", "reason": reason}
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    # Modules whose parameters or buffers forward reads directly: replacing them by nn.Identity would break that.
    attributes_read = [node.target for node in graph.nodes if node.op == "get_attr"]

    def read_directly(name: str) -> bool:
        return any(target.startswith(name + ".") for target in attributes_read)

    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        layer = model.get_submodule(node.target)
        if not isinstance(layer, _PackedLayer) or layer.scale is not None or len(node.users) != 1:
            continue
        (norm_node,) = node.users
        if norm_node.op != "call_module" or norm_node.args != (node,) or norm_node.kwargs:
            continue
        if calls[norm_node.target] != 1 or read_directly(norm_node.target):
            continue
        found = _foldable_norms(layer, model.get_submodule(norm_node.target))
        if found is None:
            continue
        relu_node = next(iter(norm_node.users)) if len(norm_node.users) == 1 else None
        relu = (
            relu_node is not None
            and relu_node.op == "call_module"
            and calls[relu_node.target] == 1
            and not read_directly(relu_node.target)
            and relu_node.args == (norm_node,)
            and not relu_node.kwargs
            and type(model.get_submodule(relu_node.target)) is nn.ReLU
        )
        _fold_into(layer, *found, relu, norm_node.target)
        _replace_submodule(model, norm_node.target, nn.Identity())
        if relu:
            _replace_submodule(model, relu_node.target, nn.Identity())
        folded += 1
    return {"norms": norms, "folded": folded, "method": "fx"}


def _fold_in_sequentials(model: nn.Module) -> int:
    """Fold ``Packed* -> BatchNorm -> (ReLU)`` chains of adjacent ``nn.Sequential`` children; returns the count."""
    folded = 0
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq)
        for index in range(len(children) - 1):
            layer, norm = children[index], children[index + 1]
            if not isinstance(layer, _PackedLayer) or layer.scale is not None:
                continue
            found = _foldable_norms(layer, norm)
            if found is None:
                continue
            relu = index + 2 < len(children) and type(children[index + 2]) is nn.ReLU
            prefix = f"{seq_name}." if seq_name else ""
            _fold_into(layer, *found, relu, f"{prefix}{index + 1}")
            seq[index + 1] = nn.Identity()
            if relu:
                seq[index + 2] = nn.Identity()
            children = list(seq)
            folded += 1
    return folded


def compile_pack(trainer, *, dtype: torch.dtype | None = None, fuse: bool = True, backend: str = "auto") -> nn.Module:
    """Compile a trained :class:`packnet.PackNet` into a packed inference model (see :func:`build_packed_model`)."""
    return build_packed_model(pack_from_trainer(trainer, dtype), trainer.skeleton(), fuse=fuse, backend=backend)


def pack_from_model(model: nn.Module) -> Pack:
    """Recover the :class:`Pack` of a packed model (fused epilogues give back their unfused parameters).

    State outside packed layers and task switches (an unpacked BatchNorm, LayerNorm or layer, any parameter or
    buffer) is shared by all tasks and goes into ``shared_state``.

    Raises:
        ValueError: the model has no packed layers, or its packed modules disagree on the number of tasks.
    """
    layers, num_tasks = {}, None
    shared_state: dict[str, torch.Tensor] = {}
    task_owned: list[str] = []
    task_states: list[dict[str, torch.Tensor]] | None = None
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (_PackedLayer, TaskSwitch, TaskParameters)):
            continue
        task_owned.append(name)
        if num_tasks is None:
            num_tasks = module.num_tasks
            task_states = [{} for _ in range(num_tasks)]
        elif module.num_tasks != num_tasks:
            raise ValueError(f"module {name!r} holds {module.num_tasks} tasks, others {num_tasks}")
        if isinstance(module, _PackedLayer) and module.fused_norm_shared:
            for key, value in module.fused_norm_state(1).items():
                shared_state[f"{module.fused_norm_name}.{key}"] = value.detach().cpu().clone()
        for task in range(1, num_tasks + 1):
            state = task_states[task - 1]
            if isinstance(module, TaskSwitch):
                for key, value in module.per_task[task - 1].state_dict().items():
                    state[f"{name}.{key}"] = value.detach().cpu().clone()
                continue
            if isinstance(module, TaskParameters):
                owner = name.removesuffix(TASK_STATE_NAME).removesuffix(".")
                prefix = f"{owner}." if owner else ""
                for key in module.names:
                    state[prefix + key] = module.task_value(key, task).detach().cpu().clone()
                continue
            if module.bias is not None:
                state[f"{name}.{module.bias_key}"] = module.bias[task - 1].detach().cpu().clone()
            if not module.fused_norm_shared:
                for key, value in module.fused_norm_state(task).items():
                    state[f"{module.fused_norm_name}.{key}"] = value.detach().cpu().clone()
        if isinstance(module, _PackedLayer):
            layers[name] = (module.weight.detach().cpu().clone(), module.task_ids.detach().cpu().clone())
            kinds[name] = module.kind
    if not layers:
        raise ValueError("the model has no packed layers; build one with compile_pack, load_pack or swap_packed_")
    packed_children = [name for name in task_owned if isinstance(model.get_submodule(name), _PackedLayer)]
    for key, value in model.state_dict().items():
        if any(_subtree(owner, key) for owner in task_owned):
            # A packed layer's own state is its weight, ids, biases and epilogue; its submodules (an attention's
            # out_proj) are modules of their own.
            owner = max((name for name in packed_children if _subtree(name, key)), key=len, default=None)
            if owner is None or "." not in key[len(owner) + 1 :] or _owned_below(task_owned, owner, key):
                continue
        shared_state[key] = value.detach().cpu().clone()
    skeleton = recorded_skeleton(model)
    input_shape = getattr(model, INPUT_SHAPE_ATTR, None)
    return Pack(
        num_tasks,
        layers,
        task_states,
        getattr(model, ARCH_ATTR, None),
        shared_state=shared_state,
        fingerprint=None if skeleton is None else module_fingerprint(skeleton),
        input_shape=None if input_shape is None else list(input_shape),
        kinds=_recorded_kinds(kinds),
        input_spec=copy.deepcopy(getattr(model, INPUT_SPEC_ATTR, None)),
    )


def _owned_below(task_owned: list[str], owner: str, key: str) -> bool:
    """Whether ``key`` (inside packed layer ``owner``) belongs to a task-owned module nested in ``owner``."""
    return any(name != owner and _subtree(owner, name) and _subtree(name, key) for name in task_owned)


def export_task_state_dict(source: nn.Module | Pack, task: int) -> dict[str, torch.Tensor]:
    """A plain ``state_dict`` of the original architecture for ``task`` alone, for runtimes without packnet.

    ``source`` is a packed model or a :class:`Pack`; load the result into the unpacked model with
    ``load_state_dict`` (strict). For a transformers model, that plain model's ``save_pretrained`` then writes a
    checkpoint ``from_pretrained`` reads back as task ``task``, bit for bit (``from_pretrained(None, config=config,
    state_dict=...)`` takes the dict directly); a packed model's own ``save_pretrained`` refuses.
    Tasks count from 1: task ``t`` was trained ``t``-th.

    Raises:
        TypeError: ``task`` is not an int. ValueError: ``task`` outside 1..num_tasks.
    """
    pack = source if isinstance(source, Pack) else pack_from_model(source)
    return pack.task_state_dict(task)


# ---------------------------------------------------------------------------------------------------------- file I/O
def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(_tensor_bytes(tensor))
    return sha.hexdigest()


def _tensor_names(pack: Pack) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (weight, ids) in pack.layers.items():
        tensors[f"layers/{name}/weight"] = weight
        tensors[f"layers/{name}/task_ids"] = ids
    for task, state in enumerate(pack.task_states, 1):
        for key, value in state.items():
            tensors[f"tasks/{task}/{key}"] = value
    for key, value in pack.shared_state.items():
        tensors[f"shared/{key}"] = value
    return tensors


def default_file_mode() -> int:
    """The permission bits the process's umask gives a newly created ordinary file (``0o666 & ~umask``)."""
    try:  # Linux reports the umask without changing it (other threads may be creating files right now)
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
        os.umask(umask)
    return 0o666 & ~umask


def write_file_atomically(
    path: str | os.PathLike, write: Callable[[str], None], check: Callable[[str], None] | None = None
) -> None:
    """Create ``path`` through a temporary file in its directory: ``write(tmp)``, then ``check(tmp)``, then rename.

    The file gets the mode the umask gives an ordinary file. If ``write`` or ``check`` raises, the temporary file is
    removed, ``path`` is left as it was and the error propagates.

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist.
        PermissionError: the directory is not writable.
        OSError: any other failure to create, write or rename the file (a read-only file system, a full disk),
            named by ``path``, never by the temporary file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    try:
        handle, tmp_path = tempfile.mkstemp(prefix=".packnet-", suffix=".tmp", dir=directory)
    except PermissionError:
        raise PermissionError(f"cannot write {path}: directory {directory} is not writable") from None
    except OSError as error:
        raise _naming_target(error, path) from None
    os.close(handle)
    try:
        write(tmp_path)
        if check is not None:
            check(tmp_path)
        os.chmod(tmp_path, default_file_mode())  # mkstemp creates 0600
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(error, OSError) and tmp_path in str(error):
            raise _naming_target(error, path) from None
        raise


def _naming_target(error: OSError, path: str) -> OSError:
    """``error`` again, of the same class and errno, with a message naming ``path`` (the file the caller asked
    for) instead of the hidden temporary file it was written through."""
    reason = error.strerror or str(error)
    renamed = type(error)(f"cannot write {path}: {reason[:1].lower()}{reason[1:]}")
    renamed.errno = error.errno
    return renamed


_SPEC_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def _draw(spec: Mapping[str, Any], float_dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Two samples of a tensor spec: normal floats (in the pack's dtype), integers in ``0..high-1``."""
    shape, dtype = (2, *spec["shape"]), _SPEC_DTYPES[spec["dtype"]]
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(float_dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    return torch.randint(0, max(int(spec.get("high", 1)), 1), shape, generator=generator, dtype=dtype)


def _probe_input(probe, pack: Pack):
    """The probe as given (a tensor, or a dict of keyword inputs), on the CPU; by default two samples drawn from
    the pack's input spec (integer inputs stay in the range training saw), else from its input shape."""
    if probe is not None:
        if isinstance(probe, torch.Tensor):
            return probe.detach().cpu()
        if isinstance(probe, Mapping) and all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in probe.items()
        ):
            return {key: value.detach().cpu() for key, value in probe.items()}
        raise TypeError(
            "save_pack: probe must be a tensor (a batch of inputs) or a dict of keyword inputs"
            f" ({{'input_ids': ..., 'attention_mask': ...}}), got {type(probe).__name__}"
        )
    generator = torch.Generator().manual_seed(0)
    if pack.input_spec is not None:
        if "keywords" in pack.input_spec:
            return {key: _draw(spec, pack.dtype, generator) for key, spec in pack.input_spec["keywords"].items()}
        return _draw(pack.input_spec, pack.dtype, generator)
    if pack.input_shape is None:
        raise ValueError(
            "save_pack checks the file it writes by running the model on a probe input, but the model records no"
            " input shape; pass probe=<a small batch of inputs>, e.g. probe=torch.randn(2, 3, 32, 32)"
        )
    return torch.randn((2, *pack.input_shape), generator=generator).to(pack.dtype)


def _describe_probe(probe) -> str:
    if isinstance(probe, Mapping):
        return "keyword inputs " + ", ".join(f"{key} {tuple(v.shape)} {v.dtype}" for key, v in probe.items())
    return f"shape {tuple(probe.shape)} and dtype {probe.dtype}"


def _call(model: nn.Module, probe):
    return model(**probe) if isinstance(probe, Mapping) else model(probe)


def _task_outputs(model: nn.Module, probe, num_tasks: int) -> list:
    outputs = []
    with torch.no_grad():
        for task in range(1, num_tasks + 1):
            with set_task(model, task):
                outputs.append(_call(model, probe))
    return outputs


def output_difference(want, got, where: str = "output", depth: int = 0) -> str | None:
    """Where two model outputs differ, or None when they are equal bit for bit (NaNs in the same places): tensors,
    and tuples, lists and dicts of them (a transformers ``ModelOutput`` field by field), compared recursively; other
    objects (a transformers key-value cache) by their attributes, a few levels deep."""
    if depth > 8:
        return None
    if isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
            return f"{where} is a {type(want).__name__} in one and a {type(got).__name__} in the other"
        if want.shape != got.shape or want.dtype != got.dtype:
            return f"{where} has shape {tuple(want.shape)} {want.dtype} vs {tuple(got.shape)} {got.dtype}"
        if want.is_floating_point() and not torch.equal(want.isnan(), got.isnan()):
            return f"{where} has NaNs in other places"
        if not torch.equal(
            want.nan_to_num() if want.is_floating_point() else want,
            got.nan_to_num() if got.is_floating_point() else got,
        ):
            return f"{where} differs"
        return None
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        if list(want) != list(got):
            return f"{where} has fields {list(want)} vs {list(got)}"
        for key in want:
            difference = output_difference(want[key], got[key], f"{where}.{key}", depth + 1)
            if difference:
                return difference
        return None
    if isinstance(want, (tuple, list)) and isinstance(got, (tuple, list)):
        if len(want) != len(got):
            return f"{where} has {len(want)} items vs {len(got)}"
        for index, (first, second) in enumerate(zip(want, got, strict=True)):
            difference = output_difference(first, second, f"{where}[{index}]", depth + 1)
            if difference:
                return difference
        return None
    if type(want) is not type(got):
        return f"{where} is a {type(want).__name__} in one and a {type(got).__name__} in the other"
    if isinstance(want, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)):
        return None if want == got else f"{where} is {want!r} vs {got!r}"
    attributes = getattr(want, "__dict__", None)
    if isinstance(attributes, dict):
        return output_difference(attributes, vars(got), where, depth + 1)
    return None


def _reference_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` whose packed layers run the PyTorch reference: what a rebuilt model computes."""
    reference = copy.deepcopy(model).cpu().eval()
    for module in reference.modules():
        if isinstance(module, _PackedLayer):
            module.backend = "reference"
    return reference


def _written_file_check(model: nn.Module | Pack, pack: Pack, probe) -> Callable[[Pack], None]:
    """Prepare, before anything is written, the check of the written pack; returns it as ``check(read_back)``.

    A model: the file must rebuild (from the model's recorded plain skeleton) into a model whose outputs equal the
    model's for every task on the probe input. A :class:`Pack` of a registered builder: the file must rebuild.
    """
    if isinstance(model, Pack):
        if pack.arch is None or pack.arch.get("builder") not in BUILDERS:
            return lambda read_back: None  # nothing to build on; read_pack has checked tensors and checksum
        return lambda read_back: build_packed_model(read_back, fuse=False, backend="reference")
    skeleton = recorded_skeleton(model)
    if skeleton is None and pack.arch is not None and pack.arch.get("builder") in BUILDERS:
        skeleton = build_shapes_first(pack.arch)[0]
    if skeleton is None:
        raise ValueError(
            "save_pack checks the file it writes by rebuilding the model, but this model records no plain"
            " architecture; build packed models with packnet.swap_packed_, compile_pack or load_pack"
        )
    probe_input = _probe_input(probe, pack)
    folding = getattr(model, FOLDING_ATTR, None)
    fuse = bool(folding and folding["method"])
    try:
        expected = _task_outputs(_reference_copy(model), probe_input, pack.num_tasks)
    except Exception as error:  # noqa: BLE001 - the model's own forward code on an input it may not accept
        raise ValueError(
            f"save_pack checks the file by running the model on a probe input of {_describe_probe(probe_input)},"
            f" which failed ({type(error).__name__}: {error}); pass probe=<a small batch of inputs the model accepts"
            " (a tensor, or a dict of keyword inputs)>"
        ) from error

    def check(read_back: Pack) -> None:
        rebuilt = build_packed_model(read_back, skeleton, fuse=fuse, backend="reference")
        for task, (want, got) in enumerate(
            zip(expected, _task_outputs(rebuilt, probe_input, pack.num_tasks), strict=True), 1
        ):
            difference = output_difference(want, got)
            if difference:
                raise PackSaveError(
                    f"the file written does not reproduce the model: task {task}'s outputs on the probe input differ"
                    f" ({difference})"
                )

    return check


def save_pack(model: nn.Module | Pack, path: str | os.PathLike, *, probe=None) -> dict[str, Any]:
    """Write a packed model (or a :class:`Pack`) to ``path`` as one safetensors file; returns the metadata.

    The file is written to a temporary name in the same directory, read back and checked, then renamed, so a
    reader never sees half a pack and a pack that would not load is never left behind. The check reads the file
    with :func:`read_pack`, rebuilds it on the model's plain architecture (recorded by ``swap_packed_``,
    ``compile_pack`` and ``load_pack``) and compares the outputs of every task with the model's on ``probe``, bit
    for bit (tensors, or tuples, lists, dicts and transformers ``ModelOutput``s of them, field by field). ``probe``
    is a batch of inputs, or a dict of keyword inputs (``model(**probe)``: ``{"input_ids": ..., "attention_mask":
    ...}``); by default two samples drawn from what the model records of its inputs (the input spec training saw:
    integers in the range seen for token models, else normal floats of the recorded input shape), and when it
    records nothing, what the probe looks like is recorded in the file. The check costs a CPU copy of the
    model, one rebuild and two forward passes per task. A :class:`Pack` of a registered builder must rebuild. The
    file gets the mode the umask gives an ordinary file.

    Raises:
        PackSaveError: the written file does not read back into the model; no file is left.
        ValueError: the model has no packed layers, records no architecture to check against, or no input shape
            and no ``probe`` was given.
        TypeError: the weights are not fp32, fp16 or bf16.
        OSError: the directory does not exist or is not writable.
    """
    pack = model if isinstance(model, Pack) else pack_from_model(model)
    if pack.dtype not in WEIGHT_DTYPES.values():
        raise TypeError(f"pack weights must be one of {list(WEIGHT_DTYPES)}, got {pack.dtype}")
    tensors = {name: tensor.detach().contiguous().cpu().clone() for name, tensor in _tensor_names(pack).items()}
    check_outputs = _written_file_check(model, pack, probe)  # refuses a bad probe before anything is written
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "producer": PRODUCER,
        "num_tasks": pack.num_tasks,
        "dtype": str(pack.dtype).removeprefix("torch."),
        "layers": [
            {"name": name, "kind": pack.kind(name), "shape": list(weight.shape)}
            for name, (weight, _) in pack.layers.items()
        ],
        "task_keys": sorted(pack.task_states[0]),
        "shared_keys": sorted(pack.shared_state),
        "arch": pack.arch,
        "fingerprint": pack.fingerprint,
        # A probe given once tells the shape for later saves of the loaded pack.
        "input_shape": pack.input_shape
        if pack.input_shape is not None or not isinstance(probe, torch.Tensor)
        else list(probe.shape[1:]),
        "sha256": _digest(tensors),
    }
    spec = pack.input_spec if pack.input_spec is not None or probe is None else input_spec(probe)
    if spec is not None:  # written only when known, so packs without one keep their bytes
        meta["input_spec"] = spec
    path = os.fspath(path)

    def check(tmp_path: str) -> None:
        try:
            # read_pack validates everything and its checksum proves the tensors are the ones meant to be written.
            read_back = read_pack(tmp_path)
            check_outputs(read_back)
        except PackFormatError as error:
            raise PackSaveError(f"{path}: the file written does not read back ({error}); nothing was saved") from None
        except PackSaveError as error:
            raise PackSaveError(f"{path}: {error}; nothing was saved") from None

    write_file_atomically(
        path,
        lambda tmp_path: save_file(tensors, tmp_path, metadata={"packnet": json.dumps(meta, sort_keys=True)}),
        check,
    )
    return meta


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors file strictly: header bounds, JSON, dtypes, shapes, offsets. Raises PackFormatError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no pack at {path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path} is a directory, not a pack file") from None
    except PermissionError:
        raise PermissionError(f"cannot read pack {path}: permission denied") from None
    if len(data) < 8:
        raise PackFormatError(f"{path}: file too short ({len(data)} bytes) to be a safetensors pack")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(len(data) - 8, _MAX_HEADER_BYTES):
        if data[8:9] != b"{":  # every safetensors header is a JSON object right after its 8-byte length
            raise PackFormatError(
                f"{path}: not a pack (nor any safetensors file): it starts with {data[:12]!r}; give a file written"
                " by packnet.save_pack"
            )
        raise PackFormatError(f"{path}: header length {header_size} exceeds the file ({len(data)} bytes): truncated?")
    try:
        header = json.loads(data[8 : 8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise PackFormatError(f"{path}: the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise PackFormatError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PackFormatError(f"{path}: the safetensors metadata must map strings to strings")
    body = memoryview(data)[8 + header_size :]
    tensors, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise PackFormatError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise PackFormatError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
            raise PackFormatError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise PackFormatError(f"{path}: tensor {name!r} has invalid data offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != nbytes:
            raise PackFormatError(
                f"{path}: tensor {name!r} needs {nbytes} bytes at offsets {offsets} but the data section has"
                f" {len(body)} bytes: truncated or corrupt"
            )
        spans.append((begin, end, name))
        raw = bytearray(body[begin:end])
        tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise PackFormatError(f"{path}: tensors {first!r} and {second!r} overlap in the file")
    return tensors, metadata


def _fail(path: str, message: str) -> PackFormatError:
    return PackFormatError(f"{path}: {message}")


def read_pack(path: str | os.PathLike) -> Pack:
    """Read and validate a pack file without building a model.

    Checks: the format name and version (1 or 2), the checksum, the tensor set (nothing missing, nothing extra),
    dtypes and shapes, task ids within 1..num_tasks, free weights exactly zero, every task's state present, and
    (version 2) the shared keys, fingerprint and input shape well formed.

    Raises:
        PackFormatError: naming the first problem found (also for a file that is not a pack at all).
        FileNotFoundError, IsADirectoryError, PermissionError: ``path`` cannot be read.
    """
    path = os.fspath(path)
    tensors, metadata = _read_safetensors(path)
    if "packnet" not in metadata:
        raise _fail(path, "a safetensors file without packnet metadata: not a packnet pack")
    try:
        meta = json.loads(metadata["packnet"])
    except (json.JSONDecodeError, RecursionError) as error:
        raise _fail(path, f"the packnet metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise _fail(path, f"format is {found!r}, expected {FORMAT_NAME!r}")
    version = meta.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise _fail(path, f"unsupported format version {version!r}; this packnet reads {readable}")
    if meta.get("sha256") != _digest(tensors):
        raise _fail(path, "checksum mismatch: the tensors are not the ones this pack was written with")
    num_tasks = meta.get("num_tasks")
    if type(num_tasks) is not int or not 1 <= num_tasks <= MAX_TASKS:
        raise _fail(path, f"num_tasks must be an int in 1..{MAX_TASKS}, got {num_tasks!r}")
    dtype = WEIGHT_DTYPES.get(meta.get("dtype")) if isinstance(meta.get("dtype"), str) else None
    if dtype is None:
        raise _fail(path, f"dtype must be one of {list(WEIGHT_DTYPES)}, got {meta.get('dtype')!r}")
    layer_entries, task_keys, arch = meta.get("layers"), meta.get("task_keys"), meta.get("arch")
    if not isinstance(layer_entries, list) or not layer_entries:
        raise _fail(path, "the metadata lists no layers")
    if not isinstance(task_keys, list) or not all(isinstance(key, str) for key in task_keys):
        raise _fail(path, "task_keys must be a list of strings")
    if arch is not None and not (
        isinstance(arch, dict) and isinstance(arch.get("builder"), str) and isinstance(arch.get("kwargs"), dict)
    ):
        raise _fail(path, f"arch must be null or {{'builder': str, 'kwargs': {{...}}}}, got {arch!r}")
    shared_keys, fingerprint, input_shape = _read_v2_fields(path, meta) if version >= 2 else ([], None, None)
    expected = {f"shared/{key}" for key in shared_keys}
    for entry in layer_entries:
        if not (
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("shape"), list)
        ):
            raise _fail(path, f"malformed layer entry {entry!r}")
        expected |= {f"layers/{entry['name']}/weight", f"layers/{entry['name']}/task_ids"}
    expected |= {f"tasks/{task}/{key}" for task in range(1, num_tasks + 1) for key in task_keys}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise _fail(path, f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise _fail(path, f"unexpected tensors: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    layers, kinds = {}, {}
    for entry in layer_entries:
        name, shape = entry["name"], entry["shape"]
        weight, ids = tensors[f"layers/{name}/weight"], tensors[f"layers/{name}/task_ids"]
        if weight.dtype != dtype:
            raise _fail(path, f"layer {name!r} weight is {weight.dtype}, the pack's dtype is {dtype}")
        if ids.dtype != torch.uint8:
            raise _fail(path, f"layer {name!r} task_ids are {ids.dtype}, expected torch.uint8")
        kind = entry.get("kind")
        if kind is not None and (not isinstance(kind, str) or kind not in KINDS):
            raise _fail(path, f"layer {name!r} has unknown kind {kind!r}; this packnet knows {sorted(KINDS)}")
        # Linear and Conv2d layers are told apart by their weight's dimensions, as before other kinds existed.
        legacy = kind in (None, "linear", "conv2d")
        dims = (2, 4) if legacy else (KINDS[kind].weight_dims,)
        if list(weight.shape) != shape or list(ids.shape) != shape or len(shape) not in dims:
            declared = " or ".join(f"{dim}-D" for dim in dims)
            raise _fail(
                path,
                f"layer {name!r}: weight {list(weight.shape)} and task_ids {list(ids.shape)} must both be"
                f" the declared {declared} shape {shape}",
            )
        if not legacy:
            kinds[name] = kind
        if ids.numel() and int(ids.max()) > num_tasks:
            raise _fail(path, f"layer {name!r} has task id {int(ids.max())} but the pack holds {num_tasks} tasks")
        if bool((weight[ids == 0] != 0).any()):
            raise _fail(path, f"layer {name!r} has non-zero values in free weights (task id 0)")
        layers[name] = (weight, ids)
    task_states = [{key: tensors[f"tasks/{task}/{key}"] for key in task_keys} for task in range(1, num_tasks + 1)]
    for key in task_keys:
        first = task_states[0][key]
        for task, state in enumerate(task_states[1:], 2):
            if state[key].shape != first.shape or state[key].dtype != first.dtype:
                raise _fail(path, f"task {task}'s {key!r} differs in shape or dtype from task 1's")
    both = sorted(set(shared_keys) & set(task_keys))
    if both:
        raise _fail(path, f"keys both shared and per task: {both[:5]}")
    shared_state = {key: tensors[f"shared/{key}"] for key in shared_keys}
    spec = _read_input_spec(path, meta.get("input_spec"))
    return Pack(num_tasks, layers, task_states, arch, meta, shared_state, fingerprint, input_shape, kinds, spec)


def _read_tensor_spec(path: str, where: str, spec) -> dict[str, Any]:
    if not isinstance(spec, dict) or not set(spec) <= {"shape", "dtype", "high"} or not {"shape", "dtype"} <= set(spec):
        raise _fail(path, f"{where} must be {{'shape': [...], 'dtype': name, 'high'?: int}}, got {spec!r}")
    shape, dtype, high = spec["shape"], spec["dtype"], spec.get("high", 1)
    if not (
        isinstance(shape, list)
        and all(type(dim) is int and 1 <= dim <= _MAX_INPUT_VALUES for dim in shape)
        and math.prod(shape) <= _MAX_INPUT_VALUES
    ):
        raise _fail(path, f"{where} shape must be a list of positive ints, at most {_MAX_INPUT_VALUES} values")
    if dtype not in _SPEC_DTYPES:
        raise _fail(path, f"{where} dtype must be one of {sorted(_SPEC_DTYPES)}, got {dtype!r}")
    if type(high) is not int or not 1 <= high <= 2**62:
        raise _fail(path, f"{where} high must be an int in 1..2**62, got {high!r}")
    return spec


def _read_input_spec(path: str, spec) -> dict[str, Any] | None:
    """Validate the optional ``input_spec`` (a tensor spec, or ``{"keywords": {name: spec}}``)."""
    if spec is None:
        return None
    if isinstance(spec, dict) and set(spec) == {"keywords"}:
        keywords = spec["keywords"]
        if not isinstance(keywords, dict) or not keywords or len(keywords) > 64:
            raise _fail(path, "input_spec keywords must map 1 to 64 input names to tensor specs")
        for key, value in keywords.items():
            _read_tensor_spec(path, f"input_spec keyword {key!r}", value)
        return spec
    return _read_tensor_spec(path, "input_spec", spec)


_MAX_INPUT_VALUES = 2**26  # per sample; save_pack draws a probe of this shape, so a crafted pack must not be huge


def _read_v2_fields(path: str, meta: dict) -> tuple[list[str], list | None, list[int] | None]:
    """Validate format 2's ``shared_keys``, ``fingerprint`` and ``input_shape``. Raises PackFormatError."""
    shared_keys, fingerprint, input_shape = meta.get("shared_keys"), meta.get("fingerprint"), meta.get("input_shape")
    if not isinstance(shared_keys, list) or not all(isinstance(key, str) for key in shared_keys):
        raise _fail(path, "shared_keys must be a list of strings")
    if fingerprint is not None:
        well_formed = isinstance(fingerprint, list) and all(
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], list)
            and all(
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], list)
                and all(type(dim) is int and dim >= 0 for dim in item[1])
                for item in entry[2]
            )
            for entry in fingerprint
        )
        if not well_formed:
            raise _fail(path, "fingerprint must be null or a list of [module name, class name, [[key, shape], ...]]")
    if input_shape is not None and not (
        isinstance(input_shape, list)
        and all(type(dim) is int and 1 <= dim <= _MAX_INPUT_VALUES for dim in input_shape)
        and math.prod(input_shape) <= _MAX_INPUT_VALUES
    ):
        raise _fail(path, f"input_shape must be null or a list of positive ints, at most {_MAX_INPUT_VALUES} values")
    return shared_keys, fingerprint, input_shape


def load_pack(
    path: str | os.PathLike, model: nn.Module | None = None, *, fuse: bool = True, backend: str = "auto"
) -> nn.Module:
    """Read, validate and build a packed model from ``path``.

    Args:
        path: a file written by :func:`save_pack`.
        model: the plain architecture to build on; needed only when the pack records no architecture spec (a
            user's own model not built by a builder registered with :func:`packnet.register_builder`). When the
            pack records a module-tree fingerprint (format 2), ``model`` must match it, module by module, before
            anything is copied.
        fuse: fold BatchNorm (+ReLU) into the packed layers' epilogues.
        backend: kernel backend of the packed layers.

    Raises:
        PackFormatError: the file is not a valid pack, does not fit ``model``, or names a builder that is not
            registered in this process (a pack's builder name is only ever looked up, never imported).
        FileNotFoundError, IsADirectoryError, PermissionError: ``path`` cannot be read.
    """
    pack = read_pack(path)
    if model is not None and getattr(model, ARCH_ATTR, None) not in (None, pack.arch) and pack.arch is not None:
        raise PackFormatError(
            f"{os.fspath(path)}: the pack is for architecture {pack.arch} but the model given is"
            f" {getattr(model, ARCH_ATTR)}"
        )
    return build_packed_model(pack, model, fuse=fuse, backend=backend)
