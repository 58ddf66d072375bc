"""packnet: train one network on many tasks with PackNet and serve every task from one compact pack.

Train with :class:`PackNet`, compile with :func:`compile_pack`, save and load with :func:`save_pack` /
:func:`load_pack`, and pick the task with :func:`set_task` or per call (``model(x, task=t)``). The masked kernels
live in ``packnet_kernels``.
"""

from .census import Census, census
from .cuda_graphs import MIXED, GraphedModel, cuda_graphs
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
from .training import LayerOwnership, PackNet, is_norm

__version__ = "0.1.0"

__all__ = [
    "MIXED",
    "Census",
    "GraphedModel",
    "LayerOwnership",
    "Pack",
    "PackFormatError",
    "PackSaveError",
    "PackNet",
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
