"""Kernel launches off Triton's per-call path: the first launch of a plan goes through Triton, later ones straight to
the compiled kernel Triton returned.

Triton's own launch (``kernel[grid](*args, **kwargs)``) binds the arguments to the signature, specialises every one
of them (dtype, 16-byte alignment of pointers, divisibility of integers: 35 to 46 calls into Triton's C++ per launch
of our kernels), hashes that into a cache key, looks the compiled kernel up (through the autotuner's own cache first)
and only then calls its launcher: on the GPU machine's CPU that was 75-128 us of host time per call, against 13-16 us
for all of ``F.linear``. A :class:`KernelLaunch` belongs to one launch plan, whose constants (shapes, strides, flags,
the config) never change between its calls: the first call goes through Triton (autotuning included), and the
arguments Triton bound and the grid it computed are kept with the compiled kernel it returned. Later calls pass the
plan's arguments in the same order to that kernel's launcher. What may change between calls of one plan is checked
per call: the pointers' 16-byte alignment (Triton specialises on it, and a kernel compiled for aligned pointers must
not get a misaligned one: that call goes through Triton, which compiles what it needs).

Only on Triton versions whose launch interface was read (:data:`DIRECT_LAUNCH_TRITON`: 3.6, the GPU machine's, to
3.9, ours); elsewhere, under the interpreter (which returns no compiled kernel), with a launch hook set (profilers),
or with ``PACKNET_DIRECT_LAUNCH=0``, every call is the plain launch.

:func:`stub_launches` replaces the kernel launch by a no-op at the launcher's boundary, so that the host time of
the whole call path can be measured without a GPU (``packnet bench --stage host``).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["DIRECT_LAUNCH", "DIRECT_LAUNCH_TRITON", "KernelLaunch", "direct_launch_supported", "stub_launches"]

# Triton versions (major, minor), inclusive, whose launch path was read: ``JITFunction.run`` hands the grid callable
# the bound arguments (a dict of every parameter in signature order, constexprs and the config included) and calls
# ``compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, launch_metadata,
# enter_hook, exit_hook, *bound_arguments)``, and pointers specialise on ``data_ptr() % 16 == 0`` alone.
DIRECT_LAUNCH_TRITON = ((3, 6), (3, 9))

# Direct launches on supported Triton versions (the default); ``PACKNET_DIRECT_LAUNCH=0`` turns them off (every call
# through Triton's launch, e.g. to measure what they save). Read when a plan launches for the first time.
DIRECT_LAUNCH = os.environ.get("PACKNET_DIRECT_LAUNCH", "1") != "0"

# The bytes a pointer argument's alignment is specialised on.
_POINTER_ALIGN = 16


def _version_tuple(version: str) -> tuple[int, int]:
    """``"3.6.0"`` -> ``(3, 6)``; a version that does not parse gives ``(0, 0)`` (unsupported)."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def version_supported(version: str) -> bool:
    """Whether Triton ``version`` is within :data:`DIRECT_LAUNCH_TRITON`."""
    low, high = DIRECT_LAUNCH_TRITON
    return low <= _version_tuple(version) <= high


@functools.cache
def direct_launch_supported() -> bool:
    """True when the installed Triton's launch interface is the one :class:`KernelLaunch` calls."""
    try:
        import triton
    except ImportError:
        return False
    return version_supported(triton.__version__)


def _compiled_kernel_class():
    from triton.compiler import CompiledKernel

    return CompiledKernel


class _Stub:
    """The stand-in for Triton while :func:`stub_launches` is active: counts launches, runs nothing."""

    def __init__(self):
        self.plain_launches = 0
        self.direct_launches = 0
        self.last_args: tuple | None = None
        self.record = False

    def run(self, *args) -> None:
        """The compiled kernel's launcher: what the driver would get (``args[9:]`` are the kernel arguments)."""
        self.direct_launches += 1
        if self.record:
            self.last_args = args

    def plain(self, kernel, grid, args: tuple, kwargs: dict):
        """A plain launch: the arguments bound as Triton binds them, the grid computed, nothing launched."""
        self.plain_launches += 1
        meta = dict(zip(kernel.arg_names, args, strict=False))
        meta.update(kwargs)
        meta = {name: meta[name] for name in kernel.arg_names}
        grid(meta)
        return _StubKernel(self)


class _StubKernel:
    """What a plain launch returns under :func:`stub_launches`: a compiled kernel whose launcher is the stub's."""

    def __init__(self, stub: _Stub):
        self.run = stub.run
        self.function = 0
        self.packed_metadata = None


# The stub in effect, or None for Triton itself.
_ACTIVE_STUB: list[_Stub | None] = [None]


@contextlib.contextmanager
def stub_launches():
    """Replace every kernel launch by a no-op at the launcher's boundary while inside (for host-time measurements
    without a GPU). Yields the stub: ``plain_launches`` (first calls of plans, whose arguments are bound as Triton
    binds them) and ``direct_launches`` (calls of the compiled kernel's launcher) count what would have run. A plan
    called on both sides of the boundary starts over on each (its first call there is a plain one)."""
    stub = _Stub()
    previous = _ACTIVE_STUB[0]
    _ACTIVE_STUB[0] = stub
    try:
        yield stub
    finally:
        _ACTIVE_STUB[0] = previous


class KernelLaunch:
    """The kernel launch of one launch plan: through Triton the first time, then through the compiled kernel's
    launcher with the arguments in the order Triton bound them.

    Args:
        kernel: a ``triton.jit`` kernel, an autotuner wrapping one, or an interpreted kernel (always launched
            plainly: it returns no compiled kernel).
        grid: ``meta -> (x, y, z)`` as for ``kernel[grid]``; ``meta`` holds every argument and the config.
        constants: the plan's keyword arguments (constexpr flags, plan constants, an untuned config's
            ``num_warps``/``num_stages``): the same values on every call of the plan.
        varying: names of keyword arguments given anew on every call (:meth:`__call__`'s ``varying``).
    """

    __slots__ = (
        "kernel",
        "grid",
        "constants",
        "varying",
        "stub",
        "launcher",
        "function",
        "metadata",
        "launch_grid",
        "tail",
        "varying_slots",
        "aligned_slots",
    )

    def __init__(self, kernel, grid, constants: dict, varying: tuple[str, ...] = ()):
        self.kernel = kernel
        self.grid = grid
        self.constants = constants
        self.varying = varying
        # The stub (or None: Triton) that the kept launcher belongs to.
        self.stub = _ACTIVE_STUB[0]
        self.launcher = None  # the compiled kernel's launcher, once there is one to call directly

    @property
    def direct(self) -> bool:
        """Whether the next call with aligned pointers goes straight to the compiled kernel."""
        return self.launcher is not None

    def __call__(self, args: tuple, varying: tuple = (), stream: int = 0) -> None:
        """Launch with ``args``, the kernel's first ``len(args)`` parameters, and ``varying``, the values of the
        keyword arguments named at construction, on CUDA stream ``stream`` (the raw handle; 0 on the CPU)."""
        launcher = self.launcher
        if self.stub is not _ACTIVE_STUB[0]:
            # stub_launches was entered or left since the launcher was kept: start over on this side.
            self.stub, self.launcher = _ACTIVE_STUB[0], None
            launcher = None
        if launcher is None or _launch_hook_set():
            self._plain(args, varying)
            return
        full = [*args, *self.tail]
        for slot, value in zip(self.varying_slots, varying, strict=True):
            full[slot] = value
        for slot in self.aligned_slots:
            if full[slot].data_ptr() % _POINTER_ALIGN:
                self._plain(args, varying)  # Triton compiles (or finds) the variant for this alignment
                return
        grid_x, grid_y, grid_z = self.launch_grid
        launcher(grid_x, grid_y, grid_z, stream, self.function, self.metadata, None, None, None, *full)

    def _plain(self, args: tuple, varying: tuple) -> None:
        """Triton's own launch (autotuning on the first call of a tuned kernel); on the first one, keep what a direct
        launch needs, where it can run."""
        kwargs = dict(self.constants)
        kwargs.update(zip(self.varying, varying, strict=True))
        recorded = []

        def grid(meta):
            launch_grid = self.grid(meta)
            # The autotuner calls the grid for every config it times; the launch it then makes calls it last.
            recorded[:] = [launch_grid, meta]
            return launch_grid

        stub = self.stub
        if stub is not None:
            compiled = stub.plain(self.kernel, grid, args, kwargs)
        else:
            compiled = self.kernel[grid](*args, **kwargs)
        if self.launcher is None and recorded and (stub is not None or self._can_launch_directly(compiled)):
            self._keep(compiled, args, *recorded)

    @staticmethod
    def _can_launch_directly(compiled) -> bool:
        return (
            DIRECT_LAUNCH
            and direct_launch_supported()
            and compiled is not None
            and isinstance(compiled, _compiled_kernel_class())
        )

    def _keep(self, compiled, args: tuple, launch_grid, meta: dict) -> None:
        values = list(meta.values())
        names = list(meta)
        if len(values) < len(args) or any(value is not arg for value, arg in zip(values, args, strict=False)):
            return  # not bound as read (another Triton): keep launching plainly
        launch_grid = tuple(launch_grid) + (1,) * (3 - len(launch_grid))
        self.tail = values[len(args) :]
        self.varying_slots = tuple(names.index(name) for name in self.varying)
        # Pointers Triton specialised as 16-byte aligned must stay so; the others may be anything.
        self.aligned_slots = tuple(
            slot
            for slot, value in enumerate(values)
            if isinstance(value, torch.Tensor) and value.data_ptr() % _POINTER_ALIGN == 0
        )
        self.launch_grid = launch_grid
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.launcher = compiled.run


# Triton's runtime knobs, looked up on the first direct launch (never at import: Triton is optional).
_RUNTIME_KNOBS: list = []


def _launch_hook_set() -> bool:
    """A launch hook (a profiler's) wants each launch's metadata: Triton's own launch provides it. Triton keeps its
    hooks in chains that are empty unless something added one (a direct launch then passes no hooks at all)."""
    if _ACTIVE_STUB[0] is not None:
        return False
    if not _RUNTIME_KNOBS:
        from triton import knobs

        _RUNTIME_KNOBS.append(knobs.runtime)
    runtime = _RUNTIME_KNOBS[0]
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False
