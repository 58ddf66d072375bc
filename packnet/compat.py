"""Using torchvision's model classes beside a CPU build of PyTorch.

The torchvision wheel that matches a PyTorch release (``torchvision==0.28.0`` for ``torch==2.13.0``) is built for
CUDA; beside the CPU build of that PyTorch its C extension (``torchvision/_C.so``) cannot load, and ``import
torchvision`` then fails with ``operator torchvision::nms does not exist``: the package registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` whether or not its extension loaded. Since transformers imports
``torchvision.transforms`` whenever torchvision is installed, that failure breaks ``import transformers`` too.

:func:`import_torchvision` makes the import work: when the extension cannot load, it declares the schemas of those
two operators (nothing else touches the extension at import) and imports torchvision, whose Python code (every
model class, the transforms) then works; its C operators (``torchvision.ops.nms``, ``roi_align``, ...) raise
torchvision's own "Couldn't load custom C++ ops" error when called. Call it before importing transformers. Nothing
here runs unless called, and the core library never imports torchvision.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

__all__ = ["import_torchvision", "torchvision_extension_loads"]

log = logging.getLogger(__name__)

# Operators torchvision's _meta_registrations registers fake kernels for unconditionally, with their schemas as its C
# extension defines them.
_UNCONDITIONAL_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARIES: list = []  # keeps the operator declarations alive for the life of the process


def torchvision_extension_loads() -> bool:
    """Whether torchvision's C extension loads beside this PyTorch (False also when torchvision is not installed)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for directory in spec.submodule_search_locations:
        for name in os.listdir(directory):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(directory, name))
                except (OSError, RuntimeError) as error:
                    log.info("torchvision's C extension does not load here (%s)", str(error).splitlines()[0])
                    return False
                return True
    return False


def import_torchvision():
    """Import and return torchvision, declaring the operators its import needs when its C extension cannot load
    (see the module docstring). Idempotent; call it before importing transformers.

    Raises:
        ImportError: torchvision is not installed.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed (pip install 'torchvision==0.28.0' beside torch 2.13)")
    import torch

    if not torchvision_extension_loads():
        library = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _UNCONDITIONAL_OPS.items():
            if not hasattr(torch.ops.torchvision, name):
                library.define(schema)
        _LIBRARIES.append(library)
    import torchvision

    return torchvision
