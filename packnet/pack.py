"""Compiled packs: build, save, load and export.

A pack holds, per prunable layer, the shared dense weight and its ``uint8`` task ids; per task, every other entry of
the model's state dict (biases, BatchNorm parameters and statistics, the head); and metadata. On disk it is a single
safetensors file (no pickle: loading an untrusted pack never runs code) whose header metadata key ``"packnet"`` holds
a JSON document: format name and version, producer, number of tasks, dtype, layers, per-task keys, architecture spec
and the SHA-256 of the tensors. The reader parses the file itself and validates everything before building a model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from packnet_kernels import MAX_TASKS, effective_weight

from .models import ARCH_ATTR, arch_spec, build_model
from .modules import PackedConv2d, PackedLinear, TaskSwitch, _PackedLayer, _replace_submodule

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Pack",
    "PackFormatError",
    "build_packed_model",
    "compile_pack",
    "export_task_state_dict",
    "load_pack",
    "pack_from_model",
    "pack_from_trainer",
    "read_pack",
    "save_pack",
]

FORMAT_NAME = "packnet-pack"
FORMAT_VERSION = 1
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


@dataclass
class Pack:
    """A pack in memory.

    Attributes:
        num_tasks: tasks held, 1..255.
        layers: qualified layer name -> ``(weight, task_ids)``; weight ``[out, in]`` or ``[out, in/g, kh, kw]``.
        task_states: one dict per task: state-dict key of the plain model -> tensor.
        arch: the architecture spec of a registered builder, or None.
    """

    num_tasks: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    task_states: list[dict[str, torch.Tensor]]
    arch: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values()))[0].dtype

    def ownership(self) -> dict[str, list[int]]:
        """Per layer, the number of weights owned by each task (index 0 = free)."""
        return {
            name: torch.bincount(ids.flatten().long(), minlength=self.num_tasks + 1).tolist()
            for name, (_, ids) in self.layers.items()
        }

    def task_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        """A plain ``state_dict`` of the original architecture for ``task`` alone (masked weights)."""
        if isinstance(task, bool) or not isinstance(task, int) or not 1 <= task <= self.num_tasks:
            raise ValueError(f"task must be in 1..{self.num_tasks}, got {task!r}")
        state = {key: value.clone() for key, value in self.task_states[task - 1].items()}
        for name, (weight, ids) in self.layers.items():
            state[f"{name}.weight"] = effective_weight(weight, ids, task).clone()
        return state

    def nbytes(self) -> int:
        tensors = [t for pair in self.layers.values() for t in pair]
        tensors += [t for state in self.task_states for t in state.values()]
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
        name: (_cast(layer.weight, dtype).cpu(), trainer.task_ids[name].detach().clone().cpu())
        for name, layer in trainer.layers.items()
    }
    task_states = [{key: _cast(value, dtype).cpu() for key, value in state.items()} for state in trainer.task_states]
    return Pack(trainer.num_tasks, layers, task_states, arch_spec(trainer.net))


def _check_against_skeleton(pack: Pack, skeleton: nn.Module) -> None:
    """Raise PackFormatError unless ``pack`` fits ``skeleton``'s layers and state dict exactly."""
    state = skeleton.state_dict()
    for name, (weight, _) in pack.layers.items():
        try:
            module = skeleton.get_submodule(name)
        except AttributeError:
            raise PackFormatError(f"pack layer {name!r} is not a module of the model") from None
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise PackFormatError(f"pack layer {name!r} is a {type(module).__name__} in the model, not Linear/Conv2d")
        if tuple(module.weight.shape) != tuple(weight.shape):
            raise PackFormatError(
                f"pack layer {name!r} has weight shape {tuple(weight.shape)} but the model's is"
                f" {tuple(module.weight.shape)}: the pack is for another architecture"
            )
    expected = {key: value for key, value in state.items() if key[: -len(".weight")] not in pack.layers}
    for task, task_state in enumerate(pack.task_states, 1):
        missing = sorted(set(expected) - set(task_state))
        extra = sorted(set(task_state) - set(expected))
        if missing or extra:
            raise PackFormatError(
                f"task {task}'s state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for key, value in task_state.items():
            want = pack.dtype if expected[key].is_floating_point() else expected[key].dtype
            if value.dtype != want:
                raise PackFormatError(f"task {task}'s {key!r} has dtype {value.dtype}, expected {want}")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise PackFormatError(
                    f"task {task}'s {key!r} has shape {tuple(value.shape)} but the model's is"
                    f" {tuple(expected[key].shape)}: the pack is for another architecture"
                )


def _rebuild_checked(pack: Pack) -> nn.Module:
    """Rebuild ``pack.arch``, allocating real memory only once its shapes are known to match the pack's tensors.

    The spec comes from the file and is not covered by the checksum: a crafted size must neither allocate without
    bound nor raise anything but PackFormatError.
    """
    stored = sum(t.numel() for pair in pack.layers.values() for t in pair)
    stored += sum(t.numel() for state in pack.task_states for t in state.values())
    for key, value in pack.arch["kwargs"].items():
        # No size, width or depth of a model exceeds the number of values it stores.
        if type(value) is int and not 0 <= value <= max(stored, 1):
            raise PackFormatError(f"architecture argument {key}={value} cannot describe a model of {stored} values")
    try:
        with torch.device("meta"):  # shapes only, no memory
            _check_against_skeleton(pack, build_model(pack.arch))
        return build_model(pack.arch)
    except PackFormatError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise PackFormatError(f"cannot rebuild the architecture {pack.arch}: {error}") from error


def _own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        buffer is not None for buffer in module.buffers(recurse=False)
    )


def _subtree(name: str, key: str) -> bool:
    return not name or key == name or key.startswith(name + ".")


def _local_state(task_state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "." if name else ""
    return {key[len(prefix) :]: value for key, value in task_state.items() if key.startswith(prefix)}


def build_packed_model(
    pack: Pack, skeleton: nn.Module | None = None, *, fuse: bool = True, backend: str = "auto"
) -> nn.Module:
    """Build the inference model of ``pack`` on a copy of ``skeleton`` (default: rebuilt from ``pack.arch``).

    Prunable layers become :class:`PackedLinear`/:class:`PackedConv2d`; every other module with state becomes a
    :class:`TaskSwitch` of per-task copies. With ``fuse``, inside ``nn.Sequential`` containers a packed layer
    followed by an eval-mode BatchNorm (and optionally a ReLU) becomes one packed layer with a per-task epilogue.
    The model is returned in eval mode, on the CPU, with no active task.

    Raises:
        PackFormatError: the pack does not fit the architecture.
    """
    if skeleton is None:
        if pack.arch is None:
            raise PackFormatError("the pack records no architecture spec; pass the model skeleton (model=...)")
        skeleton = _rebuild_checked(pack)
    _check_against_skeleton(pack, skeleton)
    model = copy.deepcopy(skeleton).to(device="cpu", dtype=pack.dtype)
    num_tasks = pack.num_tasks
    for name, (weight, ids) in pack.layers.items():
        module = model.get_submodule(name)
        kind = PackedLinear if isinstance(module, nn.Linear) else PackedConv2d
        biases = [state[f"{name}.bias"] for state in pack.task_states] if module.bias is not None else None
        with torch.no_grad():
            module.weight.copy_(weight)
        _replace_submodule(model, name, kind.from_dense(module, ids, num_tasks, biases, backend=backend))
    covered: list[str] = list(pack.layers)
    for name, module in list(model.named_modules()):
        if any(_subtree(done, name) for done in covered) or isinstance(module, (_PackedLayer, TaskSwitch)):
            continue
        if not _own_state(module):
            continue
        inside = [layer for layer in pack.layers if _subtree(name, layer)]
        if inside or not name:
            raise PackFormatError(
                f"module {name or '<root>'!r} holds its own per-task state and contains shared layers {inside};"
                " move the state into a submodule of its own"
            )
        copies = []
        for task_state in pack.task_states:
            per_task = copy.deepcopy(module)
            per_task.load_state_dict(_local_state(task_state, name))
            copies.append(per_task)
        _replace_submodule(model, name, TaskSwitch(copies))
        covered.append(name)
    if fuse:
        _fuse_norms(model)
    setattr(model, ARCH_ATTR, pack.arch)
    return model.eval()


def _fuse_norms(model: nn.Module) -> None:
    """Fold ``Packed* -> TaskSwitch(BatchNorm) -> (ReLU)`` chains inside ``nn.Sequential`` containers."""
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq)
        for index in range(len(children) - 1):
            layer, norm = children[index], children[index + 1]
            if not isinstance(layer, _PackedLayer) or layer.scale is not None or not isinstance(norm, TaskSwitch):
                continue
            expected = nn.BatchNorm2d if isinstance(layer, PackedConv2d) else nn.BatchNorm1d
            norms = list(norm.per_task)
            if not all(type(bn) is expected and bn.running_mean is not None for bn in norms):
                continue
            relu = index + 2 < len(children) and type(children[index + 2]) is nn.ReLU
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
            prefix = f"{seq_name}." if seq_name else ""
            norm_state = {key: torch.stack([bn.state_dict()[key] for bn in norms]) for key in norms[0].state_dict()}
            layer.set_epilogue(torch.stack(scales), torch.stack(shifts), relu, f"{prefix}{index + 1}", norm_state)
            seq[index + 1] = nn.Identity()
            if relu:
                seq[index + 2] = nn.Identity()
            children = list(seq)


def compile_pack(trainer, *, dtype: torch.dtype | None = None, fuse: bool = True, backend: str = "auto") -> nn.Module:
    """Compile a trained :class:`packnet.PackNet` into a packed inference model (see :func:`build_packed_model`)."""
    return build_packed_model(pack_from_trainer(trainer, dtype), trainer.skeleton(), fuse=fuse, backend=backend)


def pack_from_model(model: nn.Module) -> Pack:
    """Recover the :class:`Pack` of a packed model (fused epilogues give back their unfused parameters)."""
    layers, num_tasks = {}, None
    task_states: list[dict[str, torch.Tensor]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (_PackedLayer, TaskSwitch)):
            continue
        if num_tasks is None:
            num_tasks = module.num_tasks
            task_states = [{} for _ in range(num_tasks)]
        elif module.num_tasks != num_tasks:
            raise ValueError(f"module {name!r} holds {module.num_tasks} tasks, others {num_tasks}")
        for task in range(1, num_tasks + 1):
            state = task_states[task - 1]
            if isinstance(module, TaskSwitch):
                for key, value in module.per_task[task - 1].state_dict().items():
                    state[f"{name}.{key}"] = value.detach().cpu().clone()
                continue
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias[task - 1].detach().cpu().clone()
            for key, value in module.fused_norm_state(task).items():
                state[f"{module.fused_norm_name}.{key}"] = value.detach().cpu().clone()
        if isinstance(module, _PackedLayer):
            layers[name] = (module.weight.detach().cpu().clone(), module.task_ids.detach().cpu().clone())
    if not layers:
        raise ValueError("the model has no packed layers; build one with compile_pack or load_pack")
    return Pack(num_tasks, layers, task_states, getattr(model, ARCH_ATTR, None))


def export_task_state_dict(source: nn.Module | Pack, task: int) -> dict[str, torch.Tensor]:
    """A plain ``state_dict`` of the original architecture for ``task`` alone, for runtimes without packnet.

    ``source`` is a packed model or a :class:`Pack`; load the result into the unpacked model with
    ``load_state_dict`` (strict).
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
    return tensors


def save_pack(model: nn.Module | Pack, path: str | os.PathLike) -> dict[str, Any]:
    """Write a packed model (or a :class:`Pack`) to ``path`` as one safetensors file; returns the metadata.

    The file is written to a temporary name in the same directory and renamed, so a reader never sees half a pack.
    """
    pack = model if isinstance(model, Pack) else pack_from_model(model)
    if pack.dtype not in WEIGHT_DTYPES.values():
        raise TypeError(f"pack weights must be one of {list(WEIGHT_DTYPES)}, got {pack.dtype}")
    tensors = {name: tensor.detach().contiguous().cpu().clone() for name, tensor in _tensor_names(pack).items()}
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "producer": PRODUCER,
        "num_tasks": pack.num_tasks,
        "dtype": str(pack.dtype).removeprefix("torch."),
        "layers": [
            {"name": name, "kind": "linear" if weight.dim() == 2 else "conv2d", "shape": list(weight.shape)}
            for name, (weight, _) in pack.layers.items()
        ],
        "task_keys": sorted(pack.task_states[0]),
        "arch": pack.arch,
        "sha256": _digest(tensors),
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".packnet-", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file(tensors, tmp_path, metadata={"packnet": json.dumps(meta, sort_keys=True)})
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    return meta


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors file strictly: header bounds, JSON, dtypes, shapes, offsets. Raises PackFormatError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise PackFormatError(f"cannot read pack {path!r}: {error.strerror or error}") from error
    if len(data) < 8:
        raise PackFormatError(f"{path}: file too short ({len(data)} bytes) to be a safetensors pack")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(len(data) - 8, _MAX_HEADER_BYTES):
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

    Checks: the format name and version, the checksum, the tensor set (nothing missing, nothing extra), dtypes
    and shapes, task ids within 1..num_tasks, free weights exactly zero, every task's state present.

    Raises:
        PackFormatError: naming the first problem found.
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
    if meta.get("version") != FORMAT_VERSION:
        raise _fail(path, f"unsupported format version {meta.get('version')!r}; this packnet reads {FORMAT_VERSION}")
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
    expected = set()
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
    layers = {}
    for entry in layer_entries:
        name, shape = entry["name"], entry["shape"]
        weight, ids = tensors[f"layers/{name}/weight"], tensors[f"layers/{name}/task_ids"]
        if weight.dtype != dtype:
            raise _fail(path, f"layer {name!r} weight is {weight.dtype}, the pack's dtype is {dtype}")
        if ids.dtype != torch.uint8:
            raise _fail(path, f"layer {name!r} task_ids are {ids.dtype}, expected torch.uint8")
        if list(weight.shape) != shape or list(ids.shape) != shape or len(shape) not in (2, 4):
            raise _fail(
                path,
                f"layer {name!r}: weight {list(weight.shape)} and task_ids {list(ids.shape)} must both be"
                f" the declared 2-D or 4-D shape {shape}",
            )
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
    return Pack(num_tasks, layers, task_states, arch, meta)


def load_pack(
    path: str | os.PathLike, model: nn.Module | None = None, *, fuse: bool = True, backend: str = "auto"
) -> nn.Module:
    """Read, validate and build a packed model from ``path``.

    Args:
        path: a file written by :func:`save_pack`.
        model: the plain architecture to build on; needed only when the pack was trained on a user's own model
            (packs of the project's builders record their architecture).
        fuse: fold BatchNorm (+ReLU) into the packed layers' epilogues.
        backend: kernel backend of the packed layers.

    Raises:
        PackFormatError: the file is not a valid pack, or does not fit ``model``.
    """
    pack = read_pack(path)
    if model is not None and getattr(model, ARCH_ATTR, None) not in (None, pack.arch) and pack.arch is not None:
        raise PackFormatError(
            f"{os.fspath(path)}: the pack is for architecture {pack.arch} but the model given is"
            f" {getattr(model, ARCH_ATTR)}"
        )
    return build_packed_model(pack, model, fuse=fuse, backend=backend)
