"""What the GPU would run: every kernel variant and autotune config, compiled for sm_90 and sm_80 on the CPU.

The interpreter checks the arithmetic; these tests check the machine code. Each variant (kernel, regime, dtype,
autotune config, target) is compiled with Triton's own compiler for a ``GPUTarget`` (``tests/_codegen.py``), at
representative shapes: linear M = 1, 64, 4096 with N = K = 4096; conv 3x3, 1x1, the 7x7 stride-2 RGB stem and a
depthwise 3x3, channels_last, with the packed layer's K-contiguous weights. Asserted from the PTX and the cubin:

- the main loop's weight, id and activation loads move at least 8 bytes per thread (``cp.async`` or vector
  ``ld.global``), except where the data cannot be contiguous (the stem's 3 channels, the depthwise kernel's taps);
- no register spills (no local memory);
- shared memory within the target's limit, or the launcher prunes that config for that dtype;
- wgmma (Hopper's tensor-core instruction) on sm_90 for fp16 and bf16 GEMM variants;
- every GEMM main loop with wide loads pipelined (``cp.async`` groups committed ahead: ``num_stages - 1`` or more
  per loop), and
  mixed-task linear tiles with both their loops pipelined (few tasks per pass, many; a run-time ``if`` around each
  dot inside one loop would lose the pipelining); a mixed conv tile runs the single-task loop, instruction for
  instruction within a few per K step;
- the tile-map path keeps all of that, its few map bytes per K step loaded apart (``evict_last``);
- the grouped mixed kernel (v2): its loops per K step against the single-task loop of the same tiles (one dot per
  group, the weight and ids loaded once per step), no spills;
- split-K linear reduces in its one launch: one acquire-release atomic on the tile counter, after a barrier that
  follows the partial stores, and the partials read back through L2 (``ld.global.cg``); no atomic anywhere else.

Compiling runs in 2 fresh processes (the interpreter off) into a Triton cache made for this run only.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from _codegen import SHARED_MEMORY_LIMIT, compile_variant

pytest.importorskip("triton")
linear = pytest.importorskip("packnet_kernels.linear")
conv2d = pytest.importorskip("packnet_kernels.conv2d")

pytestmark = pytest.mark.codegen

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ARCHS = (90, 80)
# Triton's name for each dtype in a pointer type.
POINTER = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _selected(arch: int, dtype: str, shape: str, main_shapes: tuple[str, ...], configs: list, default) -> list:
    """The configs compiled for one (target, dtype, shape), within the time a CPU run can afford (about 200 compiles,
    under 3 minutes on 2 cores): on sm_90 (the GPUs we serve on) every config of the main shapes in every dtype and
    of the other shapes in fp16; on sm_80 every config in fp16 of the main shapes; else the untuned default."""
    if (arch == 90 and (dtype == "fp16" or shape in main_shapes)) or (dtype == "fp16" and shape in main_shapes):
        return configs
    return [default]


def _linear_variants() -> list[dict]:
    n = k = 4096
    variants = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for m in (1, 64, 4096):
                regime = linear.choose_regime(m)
                # The split plans of a 132-SM GPU: M = 1 and M = 64 split K, M = 4096 does not.
                k_per_split = {1: 512, 64: 1024, 4096: k}[m]
                configs = linear._configs(regime, arch // 10)
                configs = [config for config in configs if linear.useful_batch_tile(config, m)]
                limit = SHARED_MEMORY_LIMIT[arch // 10]
                default = linear.default_config(regime, arch // 10, DTYPES[dtype], limit)
                configs = _selected(arch, dtype, f"m{m}", ("m1", "m4096"), configs, default)
                for config in configs:
                    args = {
                        "x_ptr": POINTER[dtype],
                        "w_ptr": POINTER[dtype],
                        "ids_ptr": "*u8",
                        "bias_ptr": None,
                        "scale_ptr": None,
                        "shift_ptr": None,
                        "y_ptr": POINTER[dtype],
                        "partials_ptr": "*fp32" if k_per_split < k else None,
                        "counters_ptr": "*i32" if k_per_split < k else None,
                        "tile_map_ptr": None,
                        "row_tasks_ptr": None,
                        "row_order_ptr": None,
                        "M": m,
                        "N": n,
                        "K": k,
                        "active_task": 2,
                        "k_per_split": k_per_split,
                        "m_bucket": linear._m_bucket(m),
                        "max_task": 0,
                        "stride_map_plane": 0,
                        "stride_map_row": 0,
                        "stride_xm": k,
                        "stride_xk": 1,
                        "stride_wn": k,
                        "stride_wk": 1,
                        "stride_idn": k,
                        "stride_idk": 1,
                        "stride_bias": 0,
                        "stride_scale": 0,
                        "stride_shift": 0,
                        "stride_bias_task": 0,
                        "stride_scale_task": 0,
                        "stride_shift_task": 0,
                        "stride_ym": n,
                        "stride_yn": 1,
                    }
                    constexprs = {
                        "HAS_BIAS": False,
                        "HAS_SCALE": False,
                        "HAS_SHIFT": False,
                        "RELU": True,
                        "USE_MASK": True,
                        "TILE_MAP": False,
                        "RAW_TILES": False,
                        "CELL_N": 32,
                        "CELL_K": 32,
                        "SPLIT": k_per_split < k,
                        "UPCAST_BF16": False,
                        # fp32 linear layers follow torch.get_float32_matmul_precision(), "highest" by default
                        "INPUT_PRECISION": "tf32" if dtype != "fp32" else "ieee",
                        "MIXED": False,
                        "SEGMENTS": 1,
                        "ID_BITS": 8,
                        "USE_ASM": True,
                        "TASK": 0,
                        "EVEN_K": linear.whole_chunks(k),
                        **config.kwargs,
                    }
                    name = (
                        f"linear-m{m}-{dtype}-sm{arch}-"
                        + "-".join(f"{key}{value}" for key, value in config.kwargs.items() if key != "GROUP_N")
                        + f"-w{config.num_warps}-s{config.num_stages}"
                    )
                    variants.append(
                        dict(
                            name=name,
                            module="linear",
                            kernel="_masked_linear_kernel",
                            args=args,
                            constexprs=constexprs,
                            num_warps=config.num_warps,
                            num_stages=config.num_stages,
                            arch=arch,
                            dtype=dtype,
                            config=config,
                            wide_loads=True,
                            gemm=True,
                        )
                    )
    # Mixed-task batches (8 unrolled task segments, int64 row tasks and order): every mixed config on sm_90 fp16 at
    # M = 1 and 64, with and without the tile map; the tile-map variants also gather a per-task bias, scale and shift
    # for each row, as a mixed batch through per-task norms does.
    for m, base in ((1, "linear-m1-fp16-sm90-"), (64, "linear-m64-fp16-sm90-")):
        variant = next(v for v in variants if v["name"].startswith(base))
        for config in linear._configs("mixed", 9):
            for tile_map in (False, True):
                args = dict(variant["args"], row_tasks_ptr="*i64", row_order_ptr="*i64", max_task=255)
                constexprs = dict(variant["constexprs"], MIXED=True, SEGMENTS=8, TILE_MAP=tile_map, RAW_TILES=tile_map)
                if tile_map:
                    args.update(tile_map_ptr="*u8", stride_map_plane=128 * 128, stride_map_row=128)
                    for name in ("bias", "scale", "shift"):
                        args.update({f"{name}_ptr": "*fp32", f"stride_{name}": 1, f"stride_{name}_task": n})
                        constexprs[f"HAS_{name.upper()}"] = True
                constexprs.update(config.kwargs)
                name = (
                    f"linear-mixed-m{m}-fp16-sm90-BLOCK_N{config.kwargs['BLOCK_N']}-w{config.num_warps}-s{config.num_stages}"
                    + ("-tilemap" if tile_map else "")
                )
                variants.append(
                    dict(
                        variant,
                        name=name,
                        args=args,
                        constexprs=constexprs,
                        config=config,
                        num_warps=config.num_warps,
                        num_stages=config.num_stages,
                    )
                )
    return variants


CONV_SHAPES = {
    # name: (in channels, out channels, kernel, stride, image size, groups)
    "3x3": (256, 256, 3, 1, 14, 1),
    "1x1": (1024, 256, 1, 1, 14, 1),
    "7x7s2": (3, 64, 7, 2, 224, 1),
    "dw3x3": (192, 192, 3, 1, 28, 192),
}


def _channels_last_strides(prefix: str, shape: tuple[int, ...]) -> dict:
    """``{"stride_<prefix>n": ..., ...}``: the strides the launcher passes for a channels_last tensor of ``shape``
    (``n``, ``c``, ``h``, ``w`` for activations; ``o``, ``c``, ``h``, ``w`` for a weight and its ids)."""
    strides = conv2d.kernel_strides(torch.empty(shape, device="meta").contiguous(memory_format=torch.channels_last))
    dims = "nchw" if prefix in "xo" else "ochw"
    return {f"stride_{prefix}{dim}": step for dim, step in zip(dims, strides, strict=True)}


def _conv_variants() -> list[dict]:
    variants = []
    batch = 64
    for arch in ARCHS:
        for dtype in DTYPES:
            for shape_name, (cin, cout, kernel, stride, size, groups) in CONV_SHAPES.items():
                cin_g, cout_g = cin // groups, cout // groups
                out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
                direct = conv2d._uses_direct_kernel(groups, cin_g, cout_g)
                kernel_name = "direct" if direct else "gemm"
                args = {
                    "x_ptr": POINTER[dtype],
                    "w_ptr": POINTER[dtype],
                    "ids_ptr": "*u8",
                    "bias_ptr": None,
                    "scale_ptr": None,
                    "shift_ptr": None,
                    "out_ptr": POINTER[dtype],
                    "active_task": 2,
                    "total_pixels": batch * out_size * out_size,
                    "m_bucket": conv2d._row_bucket(batch * out_size * out_size),
                    "in_h": size,
                    "in_w": size,
                    "out_h": out_size,
                    "out_w": out_size,
                    "cin_per_group": cin_g,
                    "cout_per_group": cout_g,
                    # channels_last input and output; K-contiguous ([out, kh, kw, in/groups]) weight and ids, as a
                    # packed conv holds them on CUDA
                    **_channels_last_strides("x", (batch, cin, size, size)),
                    **_channels_last_strides("w", (cout, cin_g, kernel, kernel)),
                    **_channels_last_strides("i", (cout, cin_g, kernel, kernel)),
                    **_channels_last_strides("o", (batch, cout, out_size, out_size)),
                    "conv_stride_h": stride,
                    "conv_stride_w": stride,
                    "pad_top": kernel // 2,
                    "pad_left": kernel // 2,
                    "dilation_h": 1,
                    "dilation_w": 1,
                }
                if direct:
                    args["out_channels"] = cout
                else:
                    args.update(
                        tile_map_ptr=None,
                        stride_map_plane=0,
                        stride_map_row=0,
                        image_order_ptr=None,
                        pixel_tiles_ptr=None,
                        max_task=0,
                        stride_bias_task=0,
                        stride_scale_task=0,
                        stride_shift_task=0,
                    )
                constexprs = {
                    "KH": kernel,
                    "KW": kernel,
                    "USE_MASK": True,
                    "HAS_BIAS": False,
                    "HAS_SCALE": False,
                    "HAS_SHIFT": False,
                    "APPLY_RELU": True,
                }
                if not direct:
                    constexprs.update(
                        TAPS_OUTER=cin_g >= conv2d._TAPS_OUTER_MIN_CHANNELS,
                        TILE_MAP=False,
                        RAW_TILES=False,
                        CELL_N=32,
                        CELL_K=32,
                        MIXED=False,
                        CHANNELS_INNER=True,
                        UPCAST_DOT=False,
                        INPUT_PRECISION="tf32",
                        ID_BITS=8,
                        USE_ASM=True,
                    )
                # fp32 convs run TF32 dots by default (PyTorch's cudnn.allow_tf32) and 3xTF32 when it is off.
                precisions = ["tf32", "tf32x3"] if dtype == "fp32" and not direct and arch == 90 else ["tf32"]
                taps_outer = constexprs.get("TAPS_OUTER", True)
                limit = SHARED_MEMORY_LIMIT[arch // 10]
                default = conv2d.default_config(kernel_name, DTYPES[dtype], limit, taps_outer)
                configs = _selected(arch, dtype, shape_name, ("3x3", "dw3x3"), conv2d._configs(kernel_name), default)
                for precision, config in ((p, c) for p in precisions for c in configs):
                    if precision == "tf32x3" and shape_name != "3x3":
                        continue
                    name = (
                        f"conv{shape_name}-{dtype}{'-tf32x3' if precision == 'tf32x3' else ''}-sm{arch}-"
                        + "-".join(f"{key}{value}" for key, value in config.kwargs.items())
                        + f"-w{config.num_warps}-s{config.num_stages}"
                    )
                    variants.append(
                        dict(
                            name=name,
                            module="conv2d",
                            kernel=f"_masked_conv2d_{kernel_name}_kernel",
                            args=args,
                            constexprs={**constexprs, **config.kwargs}
                            | ({} if direct else {"INPUT_PRECISION": precision}),
                            num_warps=config.num_warps,
                            num_stages=config.num_stages,
                            arch=arch,
                            dtype=dtype,
                            config=config,
                            # The stem gathers 3 channels per pixel, the depthwise kernel one weight per channel
                            # and tap: neither has 8 contiguous bytes to load.
                            wide_loads=not direct and cin_g >= conv2d._TAPS_OUTER_MIN_CHANNELS,
                            gemm=not direct,
                        )
                    )
    return variants


def _derived_variants(variants: list[dict], prefixes: tuple[str, ...], suffix: str, args: dict, constexprs: dict):
    """Every sm_90 fp16 variant whose name starts with one of ``prefixes``, again with ``args`` and ``constexprs``
    set and ``suffix`` added to its name: the same configs on another path of the kernel."""
    return [
        dict(
            variant,
            name=variant["name"] + suffix,
            args=dict(variant["args"], **args),
            constexprs=dict(variant["constexprs"], **constexprs),
        )
        for variant in variants
        if variant["arch"] == 90 and variant["dtype"] == "fp16" and variant["name"].startswith(prefixes)
    ]


def _field_variants(variants: list[dict]) -> list[dict]:
    """Per sm_90 fp16 linear variant of both regimes, its single-task loop on compact 4-bit ids (the fields layout's
    bytes, 2048 per row; task 3 compiled in) in the config the launcher derives from it (``linear._field_configs``:
    ``BLOCK_K`` <= 64, stages of whole chunks), named after the base config with ``-ids4``; the same with the tile
    map (``-ids4-tilemap``); and that config with the predicate compiled out (``-ids4-nopredicate``), the loop the
    predicate's cost is measured against."""
    derived = []
    for variant in variants:
        if (
            variant["arch"] != 90
            or variant["dtype"] != "fp16"
            or not variant["name"].startswith(("linear-m1-", "linear-m4096-"))
        ):
            continue  # fmt: skip
        config = linear._field_configs([variant["config"]], 4)[0]
        fields = dict(variant, config=config, num_stages=config.num_stages,
                      constexprs=dict(variant["constexprs"], **config.kwargs))  # fmt: skip
        compact = dict(args=dict(variant["args"], ids_ptr="*i32", stride_idn=4096 * 4 // 8))
        compact["constexprs"] = dict(fields["constexprs"], ID_BITS=4, TASK=3)
        derived.append(dict(fields, name=variant["name"] + "-ids4", **compact))
        mapped = dict(compact["args"], tile_map_ptr="*u8", stride_map_plane=128 * 128, stride_map_row=128)
        derived.append(dict(fields, name=variant["name"] + "-ids4-tilemap", args=mapped,
                            constexprs=dict(compact["constexprs"], TILE_MAP=True, RAW_TILES=True)))  # fmt: skip
        derived.append(dict(fields, name=variant["name"] + "-ids4-nopredicate",
                            constexprs=dict(fields["constexprs"], USE_MASK=False)))  # fmt: skip
    return derived


VARIANTS = _linear_variants() + _conv_variants()
VARIANTS += (
    # The packed layers' tile-map path, raw tiles allowed, in every kernel whose tiles line up with the map's cells
    # (linear; convs with 32k channels per group).
    _derived_variants(
        VARIANTS,
        ("linear-m1-", "linear-m4096-", "conv3x3-", "conv1x1-"),
        "-tilemap",
        dict(tile_map_ptr="*u8", stride_map_plane=128 * 128, stride_map_row=128),
        dict(TILE_MAP=True, RAW_TILES=True),
    )
    # Compact 4-bit ids (what a packed layer with up to 15 tasks reads on a GPU), with and without the tile map, and
    # the same loop with the predicate compiled out (_field_variants).
    + _field_variants(VARIANTS)
    + _derived_variants(VARIANTS, ("linear-m1-", "linear-m4096-"), "-nopredicate", {}, dict(USE_MASK=False))
    # The same for the conv GEMM's tap-by-tap loop: a 3x3 conv of 256 channels, the first six configs (compile time).
    + _derived_variants(
        [v for v in VARIANTS if v["name"].startswith("conv3x3-fp16-sm90-")][:6],
        ("conv3x3-",),
        "-ids4",
        # One word row per output channel: 9 taps of 32 words (256 4-bit ids), one spare step, 32-word aligned.
        dict(ids_ptr="*i32", stride_io=9 * 32 + 32, stride_ic=0, stride_ih=3 * 32, stride_iw=32),
        dict(ID_BITS=4),
    )
    + _derived_variants(
        [v for v in VARIANTS if v["name"].startswith("conv3x3-fp16-sm90-")][:6],
        ("conv3x3-",),
        "-nopredicate",
        {},
        dict(USE_MASK=False),
    )
    # Mixed-task conv batches: images of several tasks in one launch, pixel tiles of one task each (int64 image order
    # and tile table); only the configs of the mixed tile height are launched.
    + _derived_variants(
        VARIANTS,
        ("conv3x3-", "conv1x1-"),
        "-mixed",
        dict(image_order_ptr="*i64", pixel_tiles_ptr="*i64", max_task=255),
        dict(MIXED=True),
    )
)


# v2 variants beyond sm_90 fp16 (rows, dtype, input precision, id bits, arch): each dtype's largest set of loops
# (fp32: 8 groups beside 2 of 64 rows; bf16: 16 beside 4 of 64 rows, 2-bit ids), fp32's one-task loop with IEEE
# dots, and sm_80 (A100-class) at 256 rows. Every config, dtype and id width was compiled once with triton 3.6 and
# 3.9 (benchmarks/NOTES.md, v8 mixed (v2)); these pin the worst of each in the first config that fits.
MIXED_V2_OTHER = ((128, "fp32", "tf32", 8, 90), (64, "fp32", "ieee", 4, 90), (256, "bf16", "tf32", 2, 90),
                  (256, "fp16", "tf32", 8, 80))  # fmt: skip
# v2 variants with slots (rows, dtype, input precision, id bits, arch, the layer's tasks, config index): a mix of an
# 8-task layer on 4-bit ids in the 4-warp tile (the model's fastest for 64 rows over 8 tasks) and in the 64 x 32
# tile on 8 warps, of a 3-task layer on 2-bit ids in bf16 at 48 rows (the most rows its 3 slots of 16 hold), and
# of 8 slots of 32 rows at 256 rows (two passes, the 64 x 32 tile on 8 warps: the only config beside 16 groups). On
# sm_80 (mma.sync) 8 slots at 64 rows spill 144 bytes (triton 3.6 and 3.9): no slots there (linear.mixed_slots).
MIXED_V2_SLOTS = ((64, "fp16", "tf32", 4, 90, 8, 1), (64, "fp16", "tf32", 4, 90, 8, 0),
                  (48, "bf16", "tf32", 2, 90, 3, None), (256, "fp16", "tf32", 4, 90, 8, None))  # fmt: skip


def _mixed_v2_variants() -> list[dict]:
    """The grouped mixed kernel (v2), N = K = 4096, split-K, per-task epilogue tables, on sm_90 fp16: 16 rows (the
    one-task loop of 16 rows and 128 columns per step, 1 group, 8 groups), 64 rows (the one-task loop of 64 rows, a
    4-group loop, an 8-group loop for up to 8 tasks; uint8 and 4-bit ids) and 256 rows (16 groups, and 4 groups of
    64 rows), in its first config; :data:`MIXED_V2_OTHER` in the first config that fits; and the single-task small
    kernel of the same tiles (64 x 16 x 32, 8 warps, 4 stages) that the fp16 loops are compared with
    (:func:`test_mixed_v2_loop_against_the_single_task_loop`)."""
    n = k = 4096
    variants = []
    cases = [(16, "fp16", "tf32", 8, 90), (64, "fp16", "tf32", 8, 90), (64, "fp16", "tf32", 4, 90),
             (256, "fp16", "tf32", 8, 90), *MIXED_V2_OTHER]  # fmt: skip
    cases = [(*case, 0, None) for case in cases] + list(MIXED_V2_SLOTS)
    for m, dtype, precision, bits, arch, layer_tasks, config_index in cases:
        element, ieee = DTYPES[dtype].itemsize, precision == "ieee"
        few, groups = linear.mixed_groups(m, element, ieee, arch // 10)
        wide = linear.mixed_wide_groups(m, element, ieee, arch // 10)
        one_rows, one_block_k = linear.mixed_one_task(m, element, ieee, arch // 10, bits)
        slots, slot_rows = linear.mixed_slots(bits, True, element, 4, 1024, layer_tasks or 1, groups, m, arch // 10)
        sizes = (groups, few, wide, one_rows, one_block_k, slots, slot_rows)
        limit = SHARED_MEMORY_LIMIT[arch // 10]
        configs = linear._configs("mixed2", arch // 10)
        fitting = [c for c in configs if linear.mixed2_config_fits(c, DTYPES[dtype], limit, *sizes, ieee=ieee)]
        config = configs[config_index] if config_index is not None else fitting[0]
        assert config in fitting
        args = {
            "x_ptr": POINTER[dtype],
            "w_ptr": POINTER[dtype],
            "ids_ptr": "*u8" if bits == 8 else "*i32",
            "y_ptr": POINTER[dtype],
            "partials_ptr": "*fp32",
            "counters_ptr": "*i32",
            "group_rows_ptr": "*i32",
            "group_tasks_ptr": "*i32",
            "group_count_ptr": "*i32",
            "M": m,
            "N": n,
            "K": k,
            "k_per_split": 1024,
            "max_task": 255,
            "max_passes": linear.ceil_div(m, groups),
            "stride_xm": k,
            "stride_xk": 1,
            "stride_wn": k,
            "stride_wk": 1,
            "stride_idn": k * bits // 8 if bits < 8 else k,
            "stride_idk": 1,
            "stride_ym": n,
            "stride_yn": 1,
        }
        for name in ("bias", "scale", "shift"):
            args.update({f"{name}_ptr": POINTER[dtype], f"stride_{name}": 1, f"stride_{name}_task": n})
        constexprs = dict(HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, RELU=True, USE_MASK=True, SPLIT=True,
                          UPCAST_BF16=False, INPUT_PRECISION=precision, ID_BITS=bits, USE_ASM=True, GROUPS=groups,
                          FEW_GROUPS=few, WIDE_GROUPS=wide, ONE_ROWS=one_rows, ONE_BLOCK_K=one_block_k,
                          FIELD_TASKS=linear.mixed_field_tasks(bits, one_rows, True, element, 4, 1024,
                                                               layer_tasks or 255),
                          SLOT_TASKS=slots, SLOT_ROWS=slot_rows, EVEN_K=linear.whole_chunks(k),
                          **config.kwargs)  # fmt: skip
        suffix = ("" if precision == "tf32" else f"-{precision}") + (f"-ids{bits}" if bits < 8 else "")
        loop_count = 1 + (few < groups) + (wide > 0) + (one_rows > 0) * max(constexprs["FIELD_TASKS"], 1)
        loop_count += (slots > 0) * slot_rows // 16  # slots of 32 rows: two passes
        if slots:
            suffix += f"-slots{slots}x{slot_rows}-{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']}"
            suffix += f"-w{config.num_warps}"
        variants.append(
            dict(
                name=f"linear-mixed2-m{m}-{dtype}-sm{arch}-groups{few}-{groups}" + suffix,
                module="linear",
                kernel="_mixed_linear_kernel",
                args=args,
                constexprs=constexprs,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                arch=arch,
                dtype=dtype,
                config=config,
                # 16 activation rows by 32 K per group on 256 threads: 2 fp16 (4 bytes) per thread and load, from L2.
                wide_loads=False,
                gemm=True,
                loops=loop_count,
            )
        )
    single = next(v for v in VARIANTS if v["name"].startswith("linear-m1-fp16-sm90-BLOCK_N64-BLOCK_M16-BLOCK_K64"))
    tile = {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 32, "GROUP_N": 1}
    for bits in (8, 4):
        args = dict(single["args"], k_per_split=1024, partials_ptr="*fp32", counters_ptr="*i32")
        if bits < 8:
            args.update(ids_ptr="*i32", stride_idn=k // 2)
        variants.append(
            dict(
                single,
                name="linear-single-m1-fp16-sm90-BLOCK_N64-BLOCK_M16-BLOCK_K32-w8-s4" + ("-ids4" if bits < 8 else ""),
                args=args,
                constexprs=dict(single["constexprs"], SPLIT=True, ID_BITS=bits, **tile),
                num_warps=8,
                num_stages=4,
                config=triton_config(tile, 8, 4),
                # Not a launchable config (a comparison only): 16 x 32 activations on 256 threads load 4 bytes each.
                wide_loads=False,
            )
        )
    return variants


def triton_config(kwargs: dict, num_warps: int, num_stages: int):
    import triton

    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


VARIANTS += _mixed_v2_variants()
# The fields and slots loops with their column checks (EVEN_K off: inputs that are not whole chunks, 4000 here),
# for a single-task fields config and the 4-warp kernel with 8 slots (the tightest in registers): checked for spills,
# serialised wgmma and waits by test_compiled_code only (a prefix of their own keeps them out of the loop reports).
CHECKED_K = ("linear-m1-fp16-sm90-BLOCK_N64-BLOCK_M16-BLOCK_K64-w4-s3-ids4",
             "linear-mixed2-m64-fp16-sm90-groups4-8-ids4-slots8x16-64x32-w4")  # fmt: skip
VARIANTS += [
    dict(variant, name="checkedk-" + variant["name"], args=dict(variant["args"], K=4000),
         constexprs=dict(variant["constexprs"], EVEN_K=False))
    for variant in VARIANTS
    if variant["name"] in CHECKED_K
]  # fmt: skip
VARIANT_BY_NAME = {variant["name"]: variant for variant in VARIANTS}

# The variants the predicate-cost test compares (see the end of this file).
PREDICATE_PREFIXES = ("linear-m1-fp16-sm90-", "linear-m4096-fp16-sm90-", "conv3x3-fp16-sm90-")


def _spec(variant: dict) -> dict:
    keys = ("module", "kernel", "args", "constexprs", "num_warps", "num_stages", "arch")
    # ptxas's notes (serialized wgmma) for the loops the predicate tests below compare.
    notes = variant["name"].startswith((*PREDICATE_PREFIXES, "linear-mixed2-", "checkedk-"))
    return {key: variant[key] for key in keys} | {"ptxas_notes": notes}


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> dict:
    """Every variant this session runs a test of (all of them, unless ``-k`` narrows the run) compiled once, on 2
    processes, into a Triton cache made for this run."""
    wanted = {
        item.callspec.params["variant"]["name"]
        for item in request.session.items
        if hasattr(item, "callspec") and "variant" in item.callspec.params
    }
    predicate_tests = ("test_compact_ids_cut_the_predicate_loop", "test_the_predicate_loop_reaches", "test_no_wgmma",
                       "test_the_masked_tile_takes")  # fmt: skip
    if any(item.name.startswith(predicate_tests) for item in request.session.items):
        wanted |= {variant["name"] for variant in VARIANTS if variant["name"].startswith(PREDICATE_PREFIXES)}
    if any(item.name.startswith("test_a_mixed_conv_tile_runs_the_single_task_loop") for item in request.session.items):
        wanted |= {name for pair in _mixed_conv_pairs() for name in pair}
    saved = {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    try:
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            # A config the launcher prunes for its dtype and target is never launched: nothing to read in its code.
            futures = {
                variant["name"]: pool.submit(compile_variant, _spec(variant))
                for variant in VARIANTS
                if variant["name"] in wanted and not _pruned(variant)
            }
            results = {}
            for name, future in futures.items():
                try:
                    results[name] = future.result()
                except Exception as error:  # reported by the variant's own test
                    results[name] = error
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return results


def _pruned(variant: dict) -> bool:
    """Whether the launcher drops this config for this dtype on this target before trying it."""
    dtype, major = DTYPES[variant["dtype"]], variant["arch"] // 10
    if variant["kernel"] == "_mixed_linear_kernel":
        sizes = [variant["constexprs"][name] for name in linear._MIXED2_SIZES]
        ieee = variant["constexprs"]["INPUT_PRECISION"] == "ieee"
        return not linear.mixed2_config_fits(variant["config"], dtype, SHARED_MEMORY_LIMIT[major], *sizes, ieee=ieee)
    if variant["module"] == "linear":
        tile_map = variant["constexprs"]["TILE_MAP"]
        mixed = variant["constexprs"]["MIXED"]
        field_bits = variant["constexprs"]["ID_BITS"] if variant["constexprs"].get("TASK", 0) else 8
        limit = SHARED_MEMORY_LIMIT[major]
        return not linear.config_fits(variant["config"], dtype, limit, tile_map, mixed, field_bits)
    taps_outer, mixed = variant["constexprs"].get("TAPS_OUTER", True), variant["constexprs"].get("MIXED", False)
    return not conv2d.config_fits(variant["config"], dtype, SHARED_MEMORY_LIMIT[major], taps_outer, mixed)


# Stack frames one Triton version gives a config that the other compiles without (no local memory either way):
# triton 3.6, the GPU machines' version, spills 8 bytes in the fp32 2-warp tile of a 7x7 stem conv (3.9 does not),
# and since the fields and slots loops check no column against K (EVEN_K: 8 % fewer instructions per chunk) 8 bytes
# in the 4-warp grouped kernel with 8 slots on both versions (on 3.6 one STL and one LDL per chunk of the slots'
# loop, 1154 instructions, where the column checks cost 101; on 3.9 outside the loops) and on 3.9 in the 128 x 256
# large-batch tile on 4-bit ids (outside its main loop, which went from 381 to 344 instructions per chunk). (3.9 gave
# the 256-row grouped kernel with 8 slots of 32 rows a 112-byte frame until its groups' loop waited for each dot
# before the next group's mask.)
KNOWN_STACK_BYTES = {
    ("3.6", "conv7x7s2-fp32-sm90-BLOCK_M32-BLOCK_N32-BLOCK_K32-w2-s4"): 8,
    ("3.6", "linear-mixed2-m64-fp16-sm90-groups4-8-ids4-slots8x16-64x32-w4"): 8,
    ("3.9", "linear-mixed2-m64-fp16-sm90-groups4-8-ids4-slots8x16-64x32-w4"): 8,
    ("3.9", "linear-m4096-fp16-sm90-BLOCK_N128-BLOCK_M256-BLOCK_K64-w8-s3-ids4"): 8,
}


def _triton_minor() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant["name"] for variant in VARIANTS])
def test_compiled_code(variant, compiled):
    if _pruned(variant):
        return  # never launched (so not compiled): its shared memory or registers do not fit, the launcher says so
    summary = compiled[variant["name"]]
    if isinstance(summary, Exception):
        raise summary
    assert summary["shared"] <= SHARED_MEMORY_LIMIT[variant["arch"] // 10], (
        f"{summary['shared']} bytes of shared memory, over the sm_{variant['arch']} limit, and the launcher does "
        "not prune this config"
    )
    known_stack = KNOWN_STACK_BYTES.get((_triton_minor(), variant["name"]), 0)
    assert summary["local"] == 0 and summary["stack"] == known_stack, f"register spills: {summary}"
    if variant["kernel"] == "_mixed_linear_kernel" and variant["arch"] == 90:
        notes = summary["serialized_wgmma"]
        assert notes == 0, f"{notes} notes of serialised wgmma (C7513/C7515)"
    # No main loop waits until no wgmma is in flight after every HGMMA (every dot here is 2 or more HGMMA): what a
    # serialised kernel compiles to, with or without ptxas's note.
    for loop in summary["loops"]:
        assert 2 * loop["waits"] <= loop["kinds"]["tensor"], f"a wait for every wgmma: {loop}"
    tile_map = variant["constexprs"].get("TILE_MAP", False)
    # (The grouped mixed kernel's partials are read back through L2 per group: no evict_last loads either way.)
    assert bool(summary["evict_last_loads"]) == tile_map, f"{summary['evict_last_loads']} tile-map loads"
    split = variant["constexprs"].get("SPLIT", False)
    # The grouped mixed kernel counts its splits in each of its loops' passes.
    passes = variant.get("loops", 1) if variant["kernel"] == "_mixed_linear_kernel" else 1
    assert summary["atomics"] == int(split) * passes, f"{summary['atomics']} atomics (split-K: {split})"
    assert bool(summary["cg_loads"]) == split, f"{summary['cg_loads']} L2-only loads (split-K: {split})"
    if split:
        assert summary["barrier_before_atomic"], "the split counter may be bumped before every partial is stored"
    if variant["wide_loads"]:
        # Compiled without epilogue vectors, so every global load but the split reduction's is a main-loop load.
        narrow = {width: count for width, count in summary["load_bytes"].items() if width < 8}
        assert not narrow, f"narrow main-loop loads (bytes: instructions): {summary['load_bytes']}"
    if variant["gemm"] and variant["wide_loads"]:
        # A mixed linear tile compiles one K loop for passes of few tasks and one for passes of many; a tile with a map
        # and raw tiles one for spans without ids and one for checked spans.
        constexprs = variant["constexprs"]
        raw_span = constexprs.get("TILE_MAP", False) and constexprs.get("RAW_TILES", False)
        mixed_linear = constexprs.get("MIXED", False) and variant["module"] == "linear"
        loops = variant.get("loops", 2 if mixed_linear or raw_span else 1)
        assert summary["async_commits"] >= loops * (variant["num_stages"] - 1), (
            f"{summary['async_commits']} cp.async groups for {loops} loop(s) of {variant['num_stages']} stages: a main"
            " loop is not pipelined"
        )
    # wgmma needs a 64-row left operand (the weight tile in linear, the pixel tile in conv) and a whole warpgroup.
    dot_rows = variant["config"].kwargs["BLOCK_N" if variant["module"] == "linear" else "BLOCK_M"]
    if variant["gemm"] and variant["arch"] == 90 and variant["dtype"] != "fp32" and dot_rows >= 64:
        assert summary["wgmma"] > 0, f"no wgmma on sm_90: {summary}"


def test_every_launchable_config_is_compiled():
    """The variants above are every config the launchers can pick: a new config or target is not missed."""
    names = {variant["name"] for variant in VARIANTS}
    assert len(names) == len(VARIANTS)

    def key(config):
        return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)

    for arch in ARCHS:
        for regime, m in (("small", "m1"), ("large", "m4096")):
            prefix = f"linear-{m}-fp16-sm{arch}-"
            compiled = {key(v["config"]) for v in VARIANTS if v["name"].startswith(prefix) and "-ids4" not in v["name"]}
            assert compiled == {key(config) for config in linear._configs(regime, arch // 10)}
            if arch == 90:
                compact = {key(v["config"]) for v in VARIANTS if v["name"].startswith(prefix) and "-ids4" in v["name"]}
                assert compact == {key(config) for config in linear._configs(f"{regime}-fields4", 9)}
    compiled_conv = {key(v["config"]) for v in VARIANTS if v["module"] == "conv2d" and v["arch"] == 90}
    assert compiled_conv == {key(config) for config in conv2d._configs("gemm") + conv2d._configs("direct")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_path_has_a_config_that_fits(arch, dtype):
    """The untuned launch (``AUTOTUNE = False``) and the autotuner's pruning need at least one fitting config for
    every dtype, target and loop."""
    limit, major = SHARED_MEMORY_LIMIT[arch // 10], arch // 10
    for regime in ("small", "large", "mixed"):
        for tile_map in (False, True):
            default = linear.default_config(regime, major, DTYPES[dtype], limit, tile_map)
            assert linear.config_fits(default, DTYPES[dtype], limit, tile_map, mixed=regime == "mixed")
            if regime != "mixed" and DTYPES[dtype].itemsize == 2:
                # The single-task loop on compact ids (16-bit operands only: linear_plan).
                for bits in (2, 4):
                    default = linear.default_config(f"{regime}-fields{bits}", major, DTYPES[dtype], limit, tile_map,
                                                    bits)  # fmt: skip
                    assert linear.config_fits(default, DTYPES[dtype], limit, tile_map, field_bits=bits)
    for kernel, taps_outer, mixed in (("gemm", True, False), ("gemm", False, False), ("direct", True, False)) + (
        ("gemm", True, True),
    ):
        default = conv2d.default_config(kernel, DTYPES[dtype], limit, taps_outer, mixed)
        assert conv2d.config_fits(default, DTYPES[dtype], limit, taps_outer, mixed)
    # The grouped mixed kernel (v2) at every batch it takes: its loops for that batch (groups, few, 64-row groups,
    # the one-task loop, the slots) fit at least one config, which the untuned launch and the pruning then take.
    element = DTYPES[dtype].itemsize
    rows_and_kinds = itertools.product(range(1, linear.MIXED_V2_MAX_ROWS + 1), (False, element == 4), (8, 4))
    for rows, ieee, bits in rows_and_kinds:
        few, groups = linear.mixed_groups(rows, element, ieee, major)
        wide = linear.mixed_wide_groups(rows, element, ieee, major)
        # Slots: as many as a pass's accumulators hold (a layer of that many tasks: the most accumulators and
        # tiles; 8 slots of 32 rows in two passes above 128 rows).
        layer_tasks = min(groups, linear.MIXED_SEGMENTS)
        slots = linear.mixed_slots(bits, True, element, 1, 0, layer_tasks, groups, rows, major)
        sizes = (groups, few, wide, *linear.mixed_one_task(rows, element, ieee, major, bits), *slots)
        configs = linear._configs("mixed2", major)
        fits = [linear.mixed2_config_fits(c, DTYPES[dtype], limit, *sizes, ieee=ieee) for c in configs]
        assert any(fits), (rows, sizes)


# --------------------------------------------------------------------------------------------------------------- #
# The predicate's cost per K step (sm_90 fp16, every config of each regime): the main loop's SASS on uint8 ids and on
# compact 4-bit ids against the same kernel with the predicate compiled out.

PREDICATE_REGIMES = dict(zip(("small", "large", "conv"), PREDICATE_PREFIXES, strict=True))


def _loop_costs(compiled: dict, regime: str) -> dict[str, list[dict]]:
    """Per encoding ("uint8", "ids4") and config: instructions per step and integer instructions per weight
    element per thread, relative to the no-predicate loop; stores to shared memory; C7515 notes."""
    costs: dict[str, list[dict]] = {"uint8": [], "ids4": []}
    prefix = PREDICATE_REGIMES[regime]
    for variant in VARIANTS:
        name = variant["name"]
        if not name.startswith(prefix) or "-ids4" in name or name.endswith(("-nopredicate", "-tilemap", "-mixed")):
            continue
        if _pruned(variant) or name + "-ids4" not in compiled:
            continue
        # The linear loop on the fields layout runs a 128-column chunk per iteration, in its own config, against the
        # plain loop of that config; the conv's compact loop runs the uint8 loop's steps.
        fields = regime != "conv"
        compact = VARIANT_BY_NAME[name + "-ids4"]["config"]
        encodings = (
            ("uint8", compiled[name], compiled[name + "-nopredicate"], variant["config"], 1),
            ("ids4", compiled[name + "-ids4"], compiled[name + ("-ids4-nopredicate" if fields else "-nopredicate")],
             compact, 128 // compact.kwargs["BLOCK_K"] if fields else 1),
        )  # fmt: skip
        for encoding, summary, plain_summary, config, steps in encodings:
            loop, plain = summary["loops"][0], plain_summary["loops"][0]
            tile = config.kwargs
            elements = tile["BLOCK_N"] * tile["BLOCK_K"] / (32 * config.num_warps)
            costs[encoding].append(
                {
                    "name": name,
                    "ratio": loop["instructions"] / steps / plain["instructions"],
                    "integer_per_element": loop["kinds"]["integer"] / steps / elements,
                    "shared_stores": loop["kinds"]["shared_store"] / steps,
                    "serialized": summary["serialized_wgmma"],
                }
            )
    return costs


def _median(values):
    values = sorted(values)
    return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2


@pytest.fixture(scope="module")
def predicate_costs(compiled):
    for name in compiled:
        if isinstance(compiled[name], Exception):
            raise compiled[name]
    return {regime: _loop_costs(compiled, regime) for regime in PREDICATE_REGIMES}


# Per regime: compact over uint8 ratio, ratio to the plain loop, integer instructions per weight element per thread.
PREDICATE_LIMITS = {"small": (0.4, 1.8, 2.8), "large": (0.45, 1.6, 3.0), "conv": (0.85, 2.6, 10.0)}


@pytest.mark.parametrize("regime", list(PREDICATE_REGIMES))
def test_compact_ids_cut_the_predicate_loop(regime, predicate_costs):
    """Measured (medians over each regime's configs, the linear loop on the fields layout per K step against the
    no-predicate loop of its own config): small batch 1.49x on triton 3.6 and 1.53x on 3.9 (uint8 ids 6.1x and 5.3x),
    large tiles 1.29x and 1.30x (3.7x and 3.6x); integer work 2.4 instructions per weight element per thread at small
    batch and 2.7 on large tiles, on both (uint8: 9-10), of which the no-predicate loop's own is 1.4-2.1: per pair of
    weights the predicate is one ``and`` (below the top field), one fp16 compare (``HSET2``, on the FMA pipe) and one
    ``and``, and a ``prmt`` per pair of id bytes. The 3x3 conv's words from 2.1x to 1.4-1.6x. Pinned with a margin:
    a change that loses most of it fails."""
    costs = predicate_costs[regime]
    gain, ceiling, integer_limit = PREDICATE_LIMITS[regime]
    ids4 = _median([cost["ratio"] for cost in costs["ids4"]])
    uint8 = _median([cost["ratio"] for cost in costs["uint8"]])
    assert costs["ids4"], f"{regime}: no variant compared"
    assert ids4 <= gain * uint8, f"{regime}: compact ids {ids4:.2f}x the plain loop, uint8 ids {uint8:.2f}x"
    assert ids4 <= ceiling, f"{regime}: compact ids {ids4:.2f}x the plain loop: {costs['ids4']}"
    integer = _median([cost["integer_per_element"] for cost in costs["ids4"]])
    assert integer <= integer_limit, f"{regime}: {integer:.1f} integer instructions per weight element per thread"


def test_the_masked_tile_takes_no_shared_memory_round_trip(predicate_costs):
    """The linear loop on compact ids (the fields layout, both regimes, every config) stores nothing to shared
    memory: the masked weight tile is built in the registers wgmma reads it from. Before the fields layout every one
    of them stored 2-16 times per K step (the tile's layout conversion for the dot), as the uint8 loop still does."""
    for regime in ("small", "large"):
        costs = predicate_costs[regime]
        assert costs["ids4"] and all(cost["shared_stores"] == 0 for cost in costs["ids4"]), costs["ids4"]
        assert all(cost["shared_stores"] > 0 for cost in costs["uint8"]), costs["uint8"]


def test_no_wgmma_is_serialised(compiled):
    """ptxas serialises no wgmma (notes C7515, "non wgmma instructions defining accumulator registers", and C7513,
    "... defining input registers of a wgmma between start and end of the pipeline stage") in any variant it reads
    here: every config of both linear regimes and of the 3x3 conv, sm_90 fp16, on uint8 and compact ids, with the
    tile map (its raw and checked loops), mixed-task convs and the loops without the predicate (and, through
    :func:`test_compiled_code`, the grouped mixed kernels). Before the linear K loop ran at least one step, 29 of
    them had C7515 on triton 3.6 and 22 on 3.9 (every tile-map kernel, most large tiles): the accumulator's zeros
    reached the kernel's end on a path around the loop as well. Every grouped mixed kernel had C7513 on both versions
    (when only C7515 was counted here) until its groups' loop waited for each group's dot before the next group's
    run-time ``if`` (a group whose task repeats skips its mask): the mask built there gave a dot's operand registers
    a second definition while the dot before read them."""
    notes = {}
    for name, summary in compiled.items():
        if isinstance(summary, Exception):
            raise summary
        if "serialized_wgmma" in summary:
            notes[name] = summary["serialized_wgmma"]
    assert len(notes) >= 60, f"ptxas read {len(notes)} variants only"
    serialized = sorted(name for name, count in notes.items() if count)
    assert not serialized, f"serialised wgmma in {len(serialized)} of {len(notes)} variants: {serialized}"


def test_the_predicate_loop_reaches_the_kernel_issues_targets(predicate_costs):
    """The kernel issue's targets for the linear loop on compact ids, both regimes: at most 2x the no-predicate loop's
    instructions per K step (median) and at most 3 integer instructions per weight element per thread (the others,
    no shared-memory stores and no C7515, are :func:`test_the_masked_tile_takes_no_shared_memory_round_trip` and
    :func:`test_no_wgmma_is_serialised`)."""
    for regime in ("small", "large"):
        costs = predicate_costs[regime]["ids4"]
        assert _median([cost["ratio"] for cost in costs]) <= 2.0
        assert _median([cost["integer_per_element"] for cost in costs]) <= 3.0


# --------------------------------------------------------------------------------------------------------------- #
# Mixed-task conv batches: a pixel tile of one task runs the single-task loop, its task read from the tile table.


def _mixed_conv_pairs() -> list[tuple[str, str]]:
    """``(single-task variant, its mixed twin)`` for every launchable mixed conv config (sm_90 fp16, 3x3 and 1x1)."""
    names = {variant["name"] for variant in VARIANTS}
    return [
        (variant["name"][: -len("-mixed")], variant["name"])
        for variant in VARIANTS
        if variant["name"].endswith("-mixed") and variant["module"] == "conv2d" and not _pruned(variant)
        and variant["name"][: -len("-mixed")] in names
    ]  # fmt: skip


# Instructions per K step a mixed conv loop may add to the single-task loop's (measured: -17..+3 with triton 3.9,
# -9..+5 with 3.6; where the tile's task, loaded, keeps ptxas from the uniform datapath, about 30 uniform
# instructions become vector integer ones, one for one).
MIXED_CONV_EXTRA_INSTRUCTIONS = 8


def test_a_mixed_conv_tile_runs_the_single_task_loop(compiled):
    """The mixed conv kernel's main loop per K step, by kind, is the single-task loop's: the same tensor-core, load,
    shared-memory and barrier instructions, and integer plus other instructions within a few of its own."""
    pairs = _mixed_conv_pairs()
    assert len(pairs) == 10, pairs  # 5 configs of the mixed tile height, 3x3 and 1x1
    for single_name, mixed_name in pairs:
        single, mixed = compiled[single_name], compiled[mixed_name]
        for summary in (single, mixed):
            if isinstance(summary, Exception):
                raise summary
        assert len(mixed["loops"]) == 1, f"{mixed_name}: {len(mixed['loops'])} main loops"
        ours, theirs = mixed["loops"][0], single["loops"][0]
        for kind in ("tensor", "global_load", "shared_load", "shared_store", "sync"):
            assert ours["kinds"][kind] == theirs["kinds"][kind], f"{mixed_name}: {kind} {ours} against {theirs}"
        extra = ours["instructions"] - theirs["instructions"]
        scalar = sum(ours["kinds"][kind] - theirs["kinds"][kind] for kind in ("integer", "other"))
        assert max(extra, scalar) <= MIXED_CONV_EXTRA_INSTRUCTIONS, f"{mixed_name}: {extra} more instructions per step"


# --------------------------------------------------------------------------------------------------------------- #
# The grouped mixed kernel (v2) per K step against the single-task small kernel of the same tiles.

MIXED_V2_PREFIX = "linear-mixed2-"


# The slots' loop per 32 columns against the groups' loop of as many groups (sm_90 fp16, 4-bit ids, 8 slots; triton
# 3.6: 331 against 571 on 4 warps, 391 against 446 in the 64 x 32 tile on 8 warps, 325 against 580 in 128 x 32).
SLOT_LOOP_SHARE = 0.9


def mixed_v2_loops(compiled: dict) -> dict[str, list[dict]]:
    """Per v2 variant: each main loop's groups, SASS instructions per K step by kind, and the same per group; the
    single-task loop (same tiles and ids) beside it; registers, spills and notes of serialised wgmma."""
    report = {}
    for variant in VARIANTS:
        name = variant["name"]
        if not name.startswith(MIXED_V2_PREFIX + "m") or "-fp16-sm90-" not in name:
            continue
        ids4 = "-ids4" in name
        reference = compiled["linear-single-m1-fp16-sm90-BLOCK_N64-BLOCK_M16-BLOCK_K32-w8-s4"
                             + ("-ids4" if ids4 else "")]  # fmt: skip
        summary, constexprs = compiled[name], variant["constexprs"]
        # The loops in the kernel's order (their addresses) by their groups (one dot each): the one-task loop (one
        # group of every row, ONE_BLOCK_K columns per step), 64-row groups, few 16-row groups, all of them.
        few, full, wide = constexprs["FEW_GROUPS"], constexprs["GROUPS"], constexprs["WIDE_GROUPS"]
        one_rows, one_block_k = constexprs["ONE_ROWS"], constexprs["ONE_BLOCK_K"]
        # On compact ids the one-task loop is the fields layout's, a chunk of 128 columns per iteration, in one copy
        # per task (FIELD_TASKS).
        copies, slots = constexprs["FIELD_TASKS"], constexprs["SLOT_TASKS"]
        kinds = [(1, one_rows, 128 if copies else one_block_k, "fields" if copies else True)]
        kinds = kinds * (bool(one_rows) * max(copies, 1)) + [(wide, 64, 32, False)] * bool(wide)
        kinds += [(few, 16, 32, False)] * (few < full) + [(full, 16, 32, False)]
        loops = list(summary["loops"])
        if slots:
            # The slots' loops (every slot's dot for a chunk of 128 columns: the most wgmma; slots of 32 rows in two
            # passes of half the slots) wherever the compiler put them (triton 3.6 after the one-task copies, 3.9
            # after the groups' loops).
            slot_rows = constexprs["SLOT_ROWS"]
            passes = slot_rows // 16
            per_pass = -(-slots // passes)
            slot_loops = sorted(loops, key=lambda loop: loop["kinds"]["tensor"])[-passes:]
            for index, slot_loop in enumerate(sorted(slot_loops, key=lambda loop: loop["start"])):
                loops.remove(slot_loop)
                kinds.append((min(per_pass, slots - per_pass * index), slot_rows, 128, "slots"))
                loops.append(slot_loop)
        single = reference["loops"][0]
        report[name] = [
            {
                "groups": count,
                "rows": rows,
                "one_task": one_task,
                # K steps of the single-task loop (32 columns) one step of this loop covers.
                "k_steps": block_k // 32,
                "instructions": loop["instructions"],
                "kinds": dict(loop["kinds"]),
                "per_group": loop["instructions"] / count,
                "single_task": single["instructions"],
                "single_task_kinds": dict(single["kinds"]),
                "registers": summary["registers"],
                "local": summary["local"],
                "serialized": summary.get("serialized_wgmma", 0),
            }
            for (count, rows, block_k, one_task), loop in zip(kinds, loops, strict=True)
        ]
    return report


def test_mixed_v2_loop_against_the_single_task_loop(compiled):
    """Measured when v2 came (sm_90 fp16, triton 3.9 and 3.6; benchmarks/NOTES.md, v8 mixed): per K step a v2 loop
    of g groups runs g times the single-task loop's tensor instructions (one 64 x 16 x 32 dot per group) and loads
    the weight and id tile once (its global loads grow by the groups' activation tiles only); a group costs well
    under the single-task loop's whole step (one group: about that step). The one-task loop (a batch of one task)
    is the single-task loop of wider K steps: per 32 columns its tensor instructions, and at most the single-task
    loop's instructions; on compact ids it is the fields layout's loop (a chunk of 128 columns per iteration), one copy
    per task. Pinned with a margin; no spills in any loop. (That no loop waits for each wgmma before the next, as
    every loop of every v2 kernel did while ptxas serialised them, note C7513, is :func:`test_compiled_code`'s check
    of every variant's loops.)"""
    for name in compiled:
        if name.startswith(MIXED_V2_PREFIX) and isinstance(compiled[name], Exception):
            raise compiled[name]
    report = mixed_v2_loops(compiled)
    assert report, "no v2 variant compiled"
    for name, loops in report.items():
        for loop in loops:
            single = loop["single_task_kinds"]
            assert loop["local"] == 0, f"{name}: spills"
            steps = loop["k_steps"]
            if loop["one_task"] in ("fields", "slots"):
                # The fields loop (a chunk per iteration): in the 64 x 32 tile on 8 warps Triton splits the two
                # warpgroups along the rows, each needing the masked register operand: 12 wgmma per chunk where 8
                # do the rows' work (8 in the other configs).
                assert loop["groups"] * steps * single["tensor"] <= loop["kinds"]["tensor"], f"{name}: {loop}"
                # The slots' 64 x 32 tile on 8 warps: 14 wgmma per slot and chunk where 8 do the rows' work.
                # (Exact at 256 rows on triton 3.6 and 3.9: 56 wgmma per pass of 4 slots and chunk.)
                spare = 1.75 if loop["one_task"] == "slots" else 1.5
                assert loop["kinds"]["tensor"] <= spare * loop["groups"] * steps * single["tensor"], f"{name}: {loop}"
            else:
                assert loop["kinds"]["tensor"] == loop["groups"] * steps * single["tensor"], f"{name}: {loop}"
            if loop["one_task"] == "slots":
                # Every slot's mask compiled in: the masked tiles stay in wgmma's registers (but in the 64 x 32 tile
                # on 8 warps, as in the fields loop); the slots' passes together at well under the instructions per
                # step of the groups' loop holding as many rows (8 slots of 16 rows: 8 groups; of 32 rows: 16).
                slot_loops = [other for other in loops if other["one_task"] == "slots"]
                held = sum(other["groups"] * other["rows"] // 16 for other in slot_loops)
                groups_loop = next(other for other in loops if other["groups"] == held and not other["one_task"])
                assert loop["kinds"].get("shared_store", 0) == 0 or "-64x32-w8" in name, f"{name}: {loop}"
                per_step = sum(other["instructions"] for other in slot_loops) / steps
                assert per_step <= SLOT_LOOP_SHARE * groups_loop["instructions"], f"{name}: {slot_loops}"
                continue
            if loop["one_task"]:
                # The one-task loop: loads one weight, id and activation tile per step.
                assert loop["instructions"] <= steps * loop["single_task"], f"{name}: {loop}"
                continue
            # Per group: one activation tile load (or two at 8 warps); the weight and id loads once per step.
            extra_loads = loop["kinds"]["global_load"] - single["global_load"]
            assert extra_loads <= 3 * loop["groups"], f"{name}: {loop}"
            if loop["groups"] > 1:
                assert loop["per_group"] <= 0.9 * loop["single_task"], f"{name}: {loop}"
            else:
                # One group is the single-task step with its activation rows gathered.
                assert loop["instructions"] <= 1.1 * loop["single_task"], f"{name}: {loop}"


def test_row_groups_kernel_compiles_without_spills():
    """The one-program layout kernel of a mixed batch (``_row_groups_kernel``) at its largest block (256 rows)."""
    spec = {
        "module": "linear",
        "kernel": "_row_groups_kernel",
        "args": {"row_tasks_ptr": "*i64", "row_order_ptr": "*i64", "group_rows_ptr": "*i32",
                 "group_tasks_ptr": "*i32", "group_count_ptr": "*i32", "M": 200},
        "constexprs": {"BLOCK": 256},
        "num_warps": 4,
        "num_stages": 1,
        "arch": 90,
    }  # fmt: skip
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        summary = pool.submit(compile_variant, spec).result()
    assert summary["local"] == 0 and summary["stack"] == 0 and summary["atomics"] == 0
