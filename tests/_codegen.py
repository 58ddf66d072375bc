"""Compile a Triton kernel for a GPU that is not there, and read what the GPU would run (for tests/test_codegen.py).

Triton builds PTX and cubins for any ``GPUTarget`` on a CPU-only machine, with its bundled ``ptxas``; the bundled
``cuobjdump`` reads registers, stack and local memory (spills) from the cubin. This module imports Triton only inside
:func:`compile_variant`, which runs in a fresh process whose environment has the interpreter off.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

# Per-block shared-memory limits (opt-in maximum) by compute capability major, in bytes.
SHARED_MEMORY_LIMIT = {8: 163 * 1024, 9: 227 * 1024}

# One SASS instruction of ``cuobjdump -sass``: address, optional predicate, opcode with its modifiers, operands.
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
# Instruction kinds of a main loop, by opcode (without modifiers).
SASS_KINDS = {
    "tensor": {"HGMMA", "HMMA", "IMMA", "QGMMA"},
    "integer": {"IADD3", "IMAD", "LOP3", "PRMT", "ISETP", "SEL", "SHF", "LEA", "IABS", "IMNMX", "VIADD", "VIMNMX",
                "SGXT", "BMSK", "POPC", "FLO", "SHL", "SHR", "PLOP3", "IDP", "LOP", "IADD", "ICMP", "BFE", "BFI"},
    "shared_store": {"STS", "STSM"},
    "shared_load": {"LDS", "LDSM"},
    "global_load": {"LDG", "LDGSTS", "LDGDEPBAR", "UTMALDG"},
    "sync": {"BAR", "WARPSYNC", "DEPBAR", "WARPGROUP", "SYNCS", "MEMBAR", "FENCE"},
}  # fmt: skip
_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global[\w.:]*|cp\.async\.c[ag]\.shared\.global[^;]*)", re.M)
_RESOURCES = re.compile(r"REG:(\w+) STACK:(\w+) SHARED:(\w+) LOCAL:(\w+)")


def signature(kernel, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """``(signature, constants, attrs)`` as Triton's launcher would specialise ``args``: pointers (given as type
    strings like ``"*fp16"``) 16-byte aligned, ints equal to 1 made constants and multiples of 16 marked divisible,
    except the kernel's ``do_not_specialize`` arguments; ``None`` arguments are constants."""
    unspecialised = set(kernel.do_not_specialize or ())
    names = kernel.arg_names
    unspecialised = {names[i] if isinstance(i, int) else i for i in unspecialised}
    types, constants, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = constexprs[name] if name in constexprs else args[name]
        if name in constexprs or value is None or (value == 1 and name not in unspecialised and type(value) is int):
            types[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, str):
            types[name], attrs[(index,)] = value, [["tt.divisibility", 16]]
        else:
            types[name] = "i32"
            if name not in unspecialised and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return types, constants, attrs


def _side_load(instruction: str) -> bool:
    """Loads outside the main loop's operand stream: the split-K reduction's L2-only partials (``ld.global.cg``) and
    the tile map's few bytes per step, marked ``evict_last`` so that they stay in cache."""
    return instruction.startswith("ld.global.cg") or "evict_last" in instruction


def _load_bytes(instruction: str) -> int:
    """Bytes one thread moves with a global load or ``cp.async`` instruction."""
    if instruction.startswith("cp.async"):
        return int(instruction.replace(" ", "").split(",")[2], 0)
    vector = re.search(r"\.v(\d)", instruction)
    bits = re.search(r"\.[bfsu](\d+)$", instruction)
    return (int(vector.group(1)) if vector else 1) * int(bits.group(1)) // 8


def sass_loops(sass: str) -> list[dict]:
    """The loops of a kernel's SASS that hold tensor-core instructions (its main loops), innermost first by
    address: per loop ``instructions`` (per iteration: one K step), a Counter ``kinds`` of :data:`SASS_KINDS`
    (``other`` for the rest: moves, uniform-datapath and branch instructions), ``opcodes`` and ``waits`` (its
    ``WARPGROUP.DEPBAR`` instructions that wait until none of the warpgroup's wgmma is in flight)."""
    instructions = [(int(address, 16), opcode, operands) for address, opcode, operands in _SASS.findall(sass)]
    targets = [
        (int(target.group(1), 16), address)
        for address, opcode, operands in instructions
        if opcode.startswith("BRA")
        and (target := re.search(r"0x([0-9a-f]+)", operands))
        and int(target.group(1), 16) <= address
    ]
    loops = []
    for start, end in sorted(set(targets)):
        body = [opcode.split(".")[0] for address, opcode, _ in instructions if start <= address <= end]
        opcodes = Counter(body)
        if not any(opcode in SASS_KINDS["tensor"] for opcode in opcodes):
            continue
        kinds = Counter()
        for opcode, count in opcodes.items():
            kind = next((name for name, members in SASS_KINDS.items() if opcode in members), "other")
            kinds[kind] += count
        # Waits until no wgmma is in flight (WARPGROUP.DEPBAR.LE gsb0, 0x0): one after every HGMMA is a serialised
        # loop, however ptxas got there (a wait that leaves some in flight, 0x7, is not counted).
        waits = sum(
            opcode.startswith("WARPGROUP.DEPBAR") and re.search(r",\s*0x0\s*$", operands) is not None
            for address, opcode, operands in instructions
            if start <= address <= end
        )
        loops.append({"start": start, "instructions": len(body), "kinds": kinds, "opcodes": opcodes, "waits": waits})
    # Keep innermost loops only: a loop containing another loop's tensor instructions is an outer one.
    starts = [(loop["start"], loop["start"] + 16 * loop["instructions"]) for loop in loops]
    return [
        loop
        for loop, (start, end) in zip(loops, starts, strict=True)
        if not any(start <= other_start and other_end <= end and (other_start, other_end) != (start, end)
                   for other_start, other_end in starts)
    ]  # fmt: skip


def serialized_wgmma(ptx: str, bin_dir: str) -> int:
    """How many notes ``wgmma.mma_async instructions are serialized`` ptxas gives for ``ptx`` on sm_90a, whatever
    their cause: C7515 (non-wgmma instructions defining the accumulator registers), C7513 (defining a wgmma's input
    registers between the start and end of its pipeline stage) or another; each makes ptxas wait for every wgmma of
    the kernel before the next (C7517, one wait ptxas injected, is not one of them). Triton 3.9 writes PTX 9.x,
    which only its ``ptxas-blackwell`` (CUDA 13) reads; 3.6's ``ptxas`` reads its own."""
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):
            binary = os.path.join(bin_dir, name)
            if not os.path.exists(binary):
                continue
            run = subprocess.run(
                [binary, "-v", "-arch=sm_90a", source, "-o", os.path.join(scratch, "kernel.cubin")],
                capture_output=True,
                text=True,
            )
            if run.returncode == 0:
                return run.stderr.count("wgmma.mma_async instructions are serialized")
    raise RuntimeError("no bundled ptxas could assemble the kernel's PTX")


def compile_variant(spec: dict) -> dict:
    """Compile one kernel variant and summarise it.

    ``spec``: ``module`` and ``kernel`` (names in ``packnet_kernels``), ``args`` (pointer type strings and ints),
    ``constexprs``, ``num_warps``, ``num_stages``, ``arch`` (compute capability, e.g. 90).

    Returns: ``load_bytes`` (Counter of bytes per global load instruction, the side loads of :func:`_side_load` left
    out), ``cg_loads`` (the split-K reduction's L2-only loads), ``evict_last_loads`` (the tile map's), ``atomics``
    (global atomic instructions), ``barrier_before_atomic`` (a ``bar.sync`` between the last global store and the
    first atomic), ``async_commits`` (``cp.async.commit_group`` instructions: pipelined loops commit their stages
    ahead), ``wgmma``/``mma`` instruction counts, ``shared`` bytes, and ``registers``/``stack``/``local`` from
    the cubin.
    """
    os.environ["TRITON_INTERPRET"] = "0"
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(f"packnet_kernels.{spec['module']}"), spec["kernel"])
    types, constants, attrs = signature(kernel, spec["args"], spec["constexprs"])
    compiled = triton.compile(
        ASTSource(kernel, types, constants, attrs),
        target=GPUTarget("cuda", spec["arch"], 32),
        options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
    )
    ptx = compiled.asm["ptx"]
    loads = _LOAD.findall(ptx)
    first_atomic = ptx.find("atom.global")
    summary = {
        "load_bytes": dict(Counter(_load_bytes(load) for load in loads if not _side_load(load))),
        "cg_loads": sum(load.startswith("ld.global.cg") for load in loads),
        "evict_last_loads": sum("evict_last" in load for load in loads),
        "atomics": ptx.count("atom.global"),
        "barrier_before_atomic": first_atomic >= 0
        and "bar.sync" in ptx[ptx.rfind("st.global", 0, first_atomic) : first_atomic],
        "async_commits": ptx.count("cp.async.commit_group"),
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma": ptx.count("mma.sync"),
        "shared": compiled.metadata.shared,
    }
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as scratch:
        cubin = os.path.join(scratch, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    registers, stack, _, local = (int(value, 0) for value in _RESOURCES.search(usage).groups())
    summary.update(registers=registers, stack=stack, local=local, loops=sass_loops(sass))
    if spec.get("ptxas_notes") and spec["arch"] == 90:
        summary["serialized_wgmma"] = serialized_wgmma(ptx, os.path.dirname(cuobjdump))
    return summary
