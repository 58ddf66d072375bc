"""packnet: train one network on many tasks with PackNet and serve every task from one compact pack.

Train with :class:`PackNet`, compile with :func:`compile_pack`, save and load with :func:`save_pack` /
:func:`load_pack`, and pick the task with :func:`set_task` or per call (``model(x, task=t)``). The masked kernels
live in ``packnet_kernels``.

The names below are imported on first use (``packnet.PackNet`` imports ``packnet.training``, and torch with it), so
``import packnet`` itself is instant: the ``packnet`` command answers ``--help`` and ``--version`` without loading
torch, and handles Ctrl-C from its first instruction.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "CapacityWarning",
    "Census",
    "GraphedModel",
    "LayerOwnership",
    "MIXED",
    "Pack",
    "PackFormatError",
    "PackNet",
    "PackSaveError",
    "PackedConv1d",
    "PackedConv2d",
    "PackedEmbedding",
    "PackedLinear",
    "PackedMultiheadAttention",
    "PackedTransposedLinear",
    "TaskParameters",
    "TaskSwitch",
    "accept_task_argument",
    "build_model",
    "build_packed_model",
    "census",
    "compile_pack",
    "cuda_graphs",
    "export_task_state_dict",
    "fold_norms",
    "is_norm",
    "load_pack",
    "magnitude_task_ids",
    "mlp",
    "module_fingerprint",
    "pack_from_model",
    "pack_from_trainer",
    "read_pack",
    "register_builder",
    "save_pack",
    "set_task",
    "small_cnn",
    "small_vit",
    "swap_packed_",
    "task_modules",
]

# Where the names of __all__ are defined, searched in this order on first use (tests/test_package.py checks that each
# resolves, and that the eager imports below for static tools list the same names).
_SUBMODULES = ("graphs", "inventory", "layers", "models", "modules", "pack", "pruning", "training")


def __getattr__(name: str):
    if name in __all__:
        for submodule in _SUBMODULES:
            module = importlib.import_module(f".{submodule}", __name__)
            if name in getattr(module, "__all__", ()) or name in vars(module):
                value = getattr(module, name)
                globals()[name] = value  # later lookups skip this function
                return value
    raise AttributeError(f"module 'packnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools (type checkers, IDEs) see: the same names, imported eagerly
    from .graphs import MIXED, GraphedModel, cuda_graphs
    from .inventory import Census, census
    from .layers import PackedConv1d, PackedEmbedding, PackedMultiheadAttention, PackedTransposedLinear
    from .models import build_model, mlp, module_fingerprint, register_builder, small_cnn, small_vit
    from .modules import (
        PackedConv2d,
        PackedLinear,
        TaskParameters,
        TaskSwitch,
        accept_task_argument,
        set_task,
        swap_packed_,
        task_modules,
    )
    from .pack import (
        Pack,
        PackFormatError,
        PackSaveError,
        build_packed_model,
        compile_pack,
        export_task_state_dict,
        fold_norms,
        load_pack,
        pack_from_model,
        pack_from_trainer,
        read_pack,
        save_pack,
    )
    from .pruning import magnitude_task_ids
    from .training import CapacityWarning, LayerOwnership, PackNet, is_norm
