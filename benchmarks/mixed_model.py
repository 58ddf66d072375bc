"""The byte-and-step model of a mixed-task launch: predictions for benchmarks/mixed.py's cases (run 4's layer).

    python benchmarks/mixed_model.py features --kernel v1|v2 --source DIR --out FILE [--triton-path DIR]
    python benchmarks/mixed_model.py predict --out DIR        (also: python benchmarks/mixed.py model --out DIR)

``features`` compiles, on the CPU, the kernel variants the cases launch (v1: the 16-row mixed tiles of the source
given, run 4's v6 at 103cbab; v2: the grouped kernel) for sm_90 with the Triton found first on ``--triton-path``,
and keeps their loops' SASS per K step and resources (tests/_codegen.py); ``predict`` turns the committed features
into times, with the parameters benchmarks/costmodel.py calibrated on run 4's single-task kernels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# A mixed launch is a set of programs, each running K steps of a main loop whose SASS is read from its compiled
# code (tests/_codegen.py), over the bytes it must move. Its time comes from benchmarks/costmodel.py's resource
# times and combination, with the parameters calibrated on run 4's single-task kernels (results/costmodel-v6-
# calibration.json: the single-task kernel's measured rate): nothing is fitted to mixed batches. Per case:
#
# - v1 (16-row mixed tiles, v6's kernel: one config 64 x 16 x 32, 4 warps, 5 stages): ``ceil(N / 64) x ceil(M / 16)
#   x split`` programs; a tile whose sorted rows hold d tasks runs ``ceil(d / 8)`` passes, each with the loop of 2
#   dots per step (a pass of 1 or 2 tasks) or of 8; its instructions per step are the passes' loops summed. Each
#   16-row tile reads the weight and ids again, from L2 when its neighbours read them just before (the grid walks
#   a group of weight tiles for every batch tile): DRAM sees them once.
# - v2 (grouped, this tree's :func:`~packnet_kernels.linear._mixed_linear_kernel`): ``ceil(N / BLOCK_N) x split``
#   programs; the batch's groups (16 rows of one task each) take the few-group loop when they fit it, else
#   ``ceil(groups / GROUPS)`` passes of the full loop, each reading the weight and ids from DRAM again. A loop's
#   instructions per step at run time: the loop compiled without the predicate, plus per distinct task of the pass
#   one mask (the compiled loop's extra instructions per group: a group whose task repeats skips its mask).
#   Tensor work: every unrolled group's dot. A kernel whose wgmma ptxas serialises (its notes C7513 or C7515,
#   tests/_codegen.py) adds its tensor time to its issue time (costmodel.combine). The autotuner keeps the fastest
#   config that fits: so does the model.

# benchmarks/mixed.py's layer (out, in), batches and task counts (test_mixed.py checks they agree).
MODEL_LAYER = (11008, 4096)
BATCHES = (8, 64, 256)
TASK_COUNTS = (1, 2, 4, 8)
# Tasks of the model's layer (its per-task tables' rows): the fields loop's copies for a batch of one task.
MODEL_TASKS = 8
MODEL_CASES = [(batch, count) for batch in BATCHES for count in TASK_COUNTS]
RESULTS = HERE / "results"
RUN4_MIXED = RESULTS / "nvidia-h200-2026-11-27-v6-mixed.json"
CALIBRATION = RESULTS / "costmodel-v6-calibration.json"
MODEL_FEATURES = {"v1": RESULTS / "mixed-model-features-v6-triton3.6.json",
                  "v2": RESULTS / "mixed-model-features-v2-triton3.6.json"}  # fmt: skip
V6_MIXED_CONFIG = {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 32, "GROUP_N": 8, "num_warps": 4, "num_stages": 5}


def case_tasks(batch: int, count: int) -> list[int]:
    """The sorted per-row tasks of a case (``mixed.row_tasks_for``: the last ``count`` of 8 tasks dealt round-robin;
    the kernels sort them)."""
    first = 8 - count + 1
    return sorted(first + row % count for row in range(batch))


def _mixed_args(linear_args: dict, batch: int, split_k: int, k_per_split: int) -> dict:
    out_features, in_features = MODEL_LAYER
    return dict(
        linear_args,
        M=batch,
        N=out_features,
        K=in_features,
        k_per_split=k_per_split,
        partials_ptr="*fp32" if split_k > 1 else None,
        counters_ptr="*i32" if split_k > 1 else None,
        max_task=255,
        stride_xm=in_features,
        stride_xk=1,
        stride_wn=in_features,
        stride_wk=1,
        stride_idn=in_features,
        stride_idk=1,
        stride_ym=out_features,
        stride_yn=1,
    )


def _base_args() -> dict:
    return {
        "x_ptr": "*fp16",
        "w_ptr": "*fp16",
        "ids_ptr": "*u8",
        "bias_ptr": None,
        "scale_ptr": None,
        "shift_ptr": None,
        "y_ptr": "*fp16",
        **{f"stride_{name}": 0 for name in ("bias", "scale", "shift", "bias_task", "scale_task", "shift_task")},
    }


def model_specs(kernel: str) -> list[dict]:
    """The compile specs of every kernel variant the model's cases launch (``kernel`` "v1": the 16-row mixed
    tiles of the ``packnet_kernels`` first on ``sys.path``, run 4's v6; "v2": the grouped kernel), each with the
    launch facts the model needs (programs, steps per pass, split)."""
    import costmodel
    import torch

    from packnet_kernels import _checks, linear

    for module in (linear, _checks):
        module.device_properties = lambda device: costmodel._Properties
    out_features, in_features = MODEL_LAYER
    specs = []
    for batch in BATCHES:
        if kernel == "v1":
            split_k, k_per_split = linear._split_plan(batch, out_features, in_features, False, None)
            config = V6_MIXED_CONFIG
            args = dict(_mixed_args(_base_args(), batch, split_k, k_per_split), tile_map_ptr=None,
                        row_tasks_ptr="*i64", row_order_ptr="*i64", active_task=0, m_bucket=linear._m_bucket(batch),
                        stride_map_plane=0, stride_map_row=0)  # fmt: skip
            flags = dict(HAS_BIAS=False, HAS_SCALE=False, HAS_SHIFT=False, RELU=False, USE_MASK=True, TILE_MAP=False,
                         RAW_TILES=False, CELL_N=32, CELL_K=32, SPLIT=split_k > 1, UPCAST_BF16=False,
                         INPUT_PRECISION="tf32", MIXED=True, SEGMENTS=linear.mixed_segments(batch), ID_BITS=8,
                         USE_ASM=True, TASK=0)  # fmt: skip
            jit = linear._masked_linear_kernel
            specs.append(_model_spec(jit, "_masked_linear_kernel", args, flags, config, batch, split_k, k_per_split))
            continue
        split_k, k_per_split = linear._mixed_split_plan(batch, out_features, in_features, 2, False, None)
        few, groups = linear.mixed_groups(batch, 2)
        wide = linear.mixed_wide_groups(batch, 2)
        args = dict(_mixed_args(_base_args(), batch, split_k, k_per_split), group_rows_ptr="*i32",
                    group_tasks_ptr="*i32", group_count_ptr="*i32",
                    max_passes=linear.ceil_div(batch, groups))  # fmt: skip
        # The configs that fit every id variant below (its own one-task loop and slots): the model pairs each masked
        # variant with the bare uint8 one of the same config.
        kinds = ((8, True), (8, False), (4, True))
        sizes = []
        for id_bits, use_mask in kinds:
            slots = _slots(linear, id_bits, use_mask, split_k, k_per_split, groups, batch)
            sizes.append((groups, few, wide, *linear.mixed_one_task(batch, 2, id_bits=id_bits), *slots))
        limit = costmodel.DEVICE["shared_per_block_optin"]
        for triton_config in linear._configs("mixed2", 9):
            if not all(linear.mixed2_config_fits(triton_config, torch.float16, limit, *size) for size in sizes):
                continue
            config = dict(triton_config.kwargs, num_warps=triton_config.num_warps, num_stages=triton_config.num_stages)
            # uint8 ids (what benchmarks/mixed.py passes) and 4-bit ids (what a packed layer of up to 15 tasks reads
            # on a GPU: compact ids in their run-time layout); each also without the predicate.
            for id_bits, use_mask in kinds:
                one_rows, one_block_k = linear.mixed_one_task(batch, 2, id_bits=id_bits)
                flags = dict(HAS_BIAS=False, HAS_SCALE=False, HAS_SHIFT=False, RELU=False, USE_MASK=use_mask,
                             SPLIT=split_k > 1, UPCAST_BF16=False, INPUT_PRECISION="tf32", ID_BITS=id_bits,
                             USE_ASM=True, GROUPS=groups, FEW_GROUPS=few, WIDE_GROUPS=wide, ONE_ROWS=one_rows,
                             ONE_BLOCK_K=one_block_k)  # fmt: skip
                if hasattr(linear, "mixed_field_tasks"):
                    # A batch of one task on compact ids: the fields loop, one copy per task of the model's layer.
                    flags["FIELD_TASKS"] = linear.mixed_field_tasks(id_bits, one_rows, use_mask, 2, split_k,
                                                                    k_per_split, MODEL_TASKS)  # fmt: skip
                if hasattr(linear, "whole_chunks"):
                    flags["EVEN_K"] = linear.whole_chunks(in_features)
                # Mixes of many tasks on compact ids: one slot per task of the model's layer, masks compiled in.
                slot_tasks, slot_rows = _slots(linear, id_bits, use_mask, split_k, k_per_split, groups, batch)
                if hasattr(linear, "mixed_slots"):
                    flags.update(SLOT_TASKS=slot_tasks, SLOT_ROWS=slot_rows)
                elif hasattr(linear, "mixed_slot_tasks"):
                    flags["SLOT_TASKS"] = slot_tasks
                compact = {}
                if id_bits < 8 and hasattr(linear, "_field_configs"):
                    # The fields layout: int32 words read as bytes, the weight as it is.
                    compact = dict(ids_ptr="*i32", stride_idn=in_features * id_bits // 8)
                elif id_bits < 8:
                    compact = dict(w_ptr="*i32", ids_ptr="*i32", stride_wn=in_features // 2,
                                   stride_idn=in_features * id_bits // 32)  # fmt: skip
                specs.append(_model_spec(linear._mixed_linear_kernel, "_mixed_linear_kernel", args | compact, flags,
                                         config, batch, split_k, k_per_split))  # fmt: skip
    return specs


def _slots(linear, id_bits: int, use_mask: bool, split_k: int, k_per_split: int, groups: int,
           batch: int) -> tuple[int, int]:  # fmt: skip
    """``(SLOT_TASKS, SLOT_ROWS)`` of the model's layer and a batch of ``batch`` rows in the tree compiled:
    ``linear.mixed_slots``, or (16-row slots only) ``linear.mixed_slot_tasks`` of the trees before it, or none
    before the slots."""
    if hasattr(linear, "mixed_slots"):
        return linear.mixed_slots(id_bits, use_mask, 2, split_k, k_per_split, MODEL_TASKS, groups, batch)
    if hasattr(linear, "mixed_slot_tasks"):
        return linear.mixed_slot_tasks(id_bits, use_mask, 2, split_k, k_per_split, MODEL_TASKS, groups), 16
    return 0, 16


def _model_spec(jit, name: str, args: dict, flags: dict, config: dict, batch: int, split_k: int, k_per_split: int):
    tile = {key: value for key, value in config.items() if key not in ("num_warps", "num_stages")}
    names = set(jit.arg_names)
    constexprs = {key: value for key, value in {**flags, **tile}.items() if key in names}
    return {
        "spec": {
            "module": "linear",
            "kernel": name,
            "args": {key: value for key, value in args.items() if key in names and key not in constexprs},
            "constexprs": constexprs,
            "num_warps": config["num_warps"],
            "num_stages": config["num_stages"],
            "arch": 90,
            "ptxas_notes": True,
        },
        "batch": batch,
        "config": config,
        "split_k": split_k,
        "k_per_split": k_per_split,
        "use_mask": flags["USE_MASK"],
        "id_bits": flags.get("ID_BITS", 8),
        "groups": (flags.get("FEW_GROUPS"), flags.get("GROUPS"), flags.get("WIDE_GROUPS")),
        "one_task": (flags.get("ONE_ROWS", 0), flags.get("ONE_BLOCK_K", 0)),
        "field_tasks": flags.get("FIELD_TASKS", 0),
        "slot_tasks": flags.get("SLOT_TASKS", 0),
        "slot_rows": flags.get("SLOT_ROWS", 16),
    }


def collect_model_features(kernel: str) -> dict:
    """Compile :func:`model_specs` (in 2 worker processes) and keep each variant's loops and resources."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import costmodel

    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    specs = model_specs(kernel)
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(costmodel._compile, dict(item["spec"], fma_loop=False)) for item in specs]
        variants = []
        for item, future in zip(specs, futures, strict=True):
            summary = future.result()
            variants.append(
                {key: value for key, value in item.items() if key != "spec"}
                | {
                    "constexprs": item["spec"]["constexprs"],
                    "registers": summary["registers"],
                    "shared": summary["shared"],
                    "local": summary["local"],
                    "serialized_wgmma": summary.get("serialized_wgmma", 0),
                    # Innermost loops by address: the first one written first (v1: the few-segment loop; v2: the
                    # few-group loop when there is one).
                    "loops": [
                        {"instructions": loop["instructions"], "kinds": loop["kinds"]}
                        for loop in sorted(summary["loops"], key=lambda loop: loop.get("start", 0))
                    ],  # fmt: skip
                }
            )
    return {"kernel": kernel, "triton": triton.__version__, "layer": list(MODEL_LAYER), "variants": variants}


def _distinct(tasks: list[int]) -> int:
    return len(set(tasks))


def v1_launch(features: dict, batch: int, count: int) -> list[dict]:
    """The v1 launch of one case as :func:`costmodel.resource_times` rows (one config)."""
    import costmodel

    variant = next(v for v in features["variants"] if v["batch"] == batch)
    loops = sorted(variant["loops"], key=lambda loop: loop["kinds"]["tensor"])  # 2-dot loop, then 8-dot
    few, many = loops[0], loops[-1]
    tasks = case_tasks(batch, count)
    config = variant["config"]
    tiles = [tasks[start : start + 16] for start in range(0, batch, 16)]
    instructions = flops = 0.0
    per_dot = 2 * config["BLOCK_N"] * 16 * config["BLOCK_K"]
    for tile in tiles:
        distinct = _distinct(tile)
        for first in range(0, distinct, 8):
            in_pass = min(8, distinct - first)
            loop = few if in_pass <= 2 else many
            instructions += loop["instructions"] / len(tiles)
            flops += per_dot * loop["kinds"]["tensor"] / few["kinds"]["tensor"] * 2 / len(tiles)
    out_features, in_features = MODEL_LAYER
    programs = costmodel.ceil_div(out_features, config["BLOCK_N"]) * len(tiles) * variant["split_k"]
    return [_launch_row(variant, config, programs, config["BLOCK_K"], instructions, flops, batch, 1)]


def _launch_row(
    variant: dict,
    config: dict,
    programs: int,
    block_k: int,
    instructions: float,
    flops: float,
    batch: int,
    passes: int,
    id_bits: int = 8,
    **extra,
) -> dict:
    """One :func:`costmodel.resource_times` row of a compiled ``variant`` (its split, registers, shared memory and
    C7515 note) run with ``config``: ``programs`` programs of ``k_per_split / block_k`` steps, each step issuing
    ``instructions`` and ``flops``, reading the weight and ids ``passes`` times; ``extra`` fields are appended."""
    import costmodel

    return {
        "config": config,
        "programs": programs,
        "steps": costmodel.ceil_div(variant["k_per_split"], block_k),
        "warps": config["num_warps"],
        "occupancy": costmodel.occupancy(variant["registers"], variant["shared"], config["num_warps"]),
        "instructions": instructions,
        "flops_per_step": flops,
        "serialized": bool(variant["serialized_wgmma"]),
        "dram_bytes": _dram_bytes(batch, passes, variant["split_k"], id_bits),
        "passes": passes,
        **extra,
    }


def _dram_bytes(batch: int, passes: int, split_k: int, id_bits: int = 8) -> float:
    """The weight (fp16) and its ids (``id_bits`` each) ``passes`` times, the input and output once, split-K's fp32
    partials."""
    out_features, in_features = MODEL_LAYER
    weights = out_features * in_features
    partials = 2 * 4 * split_k * batch * out_features if split_k > 1 else 0
    return passes * weights * (2 + id_bits / 8) + (batch * in_features + batch * out_features) * 2 + partials


def v2_groups(tasks: list[int], width: int = 16) -> list[int]:
    """The tasks of a batch's groups of ``width`` rows, in order (:func:`~packnet_kernels.linear._row_groups`)."""
    groups = []
    for task in sorted(set(tasks)):
        groups += [task] * -(-tasks.count(task) // width)
    return groups


def slots_apply(tasks: list[int], slots: int, slot_rows: int = 16) -> bool:
    """Whether a v2 batch takes the slots (the kernel's test, ``_mixed_linear_kernel``): every task in 1..``slots``
    and in one group of ``slot_rows`` rows, and at least ``SLOT_SHARE`` of the slots held."""
    from packnet_kernels import linear

    distinct = sorted(set(tasks))
    numerator, denominator = linear.SLOT_SHARE
    one_group = all(tasks.count(task) <= slot_rows for task in distinct)
    return one_group and 1 <= distinct[0] and distinct[-1] <= slots and len(distinct) * denominator >= slots * numerator


def v2_launch(features: dict, batch: int, count: int, id_bits: int = 8) -> list[dict]:
    """The v2 launch of one case, one :func:`costmodel.resource_times` row per config that fits. With compact ids
    (``id_bits`` 4) a mask costs what the compact loop adds to the uint8 loop without predicate."""
    import costmodel

    tasks = case_tasks(batch, count)
    groups = v2_groups(tasks)
    rows = []
    by_config = {}
    for variant in features["variants"]:
        if variant["batch"] == batch and variant.get("id_bits", 8) in (id_bits, 8):
            key = (variant["use_mask"], variant.get("id_bits", 8))
            by_config.setdefault(json.dumps(variant["config"], sort_keys=True), {})[key] = variant
    for pair in by_config.values():
        masked, plain = pair[(True, id_bits)], pair[(False, 8)]
        few, full, wide = masked["groups"]
        one_rows, one_block_k = masked.get("one_task", (0, 0))
        config = masked["config"]
        # The loops in the kernel's order (their addresses): the one-task loop (on compact ids the fields loop, one
        # copy per task, a chunk of 128 columns per step), 64-row groups, few, all.
        copies = masked.get("field_tasks", 0) if one_rows else 0
        one_names = [f"one{task}" for task in range(1, copies + 1)] if copies else ["one"] * bool(one_rows)
        slots, slot_rows = masked.get("slot_tasks", 0), masked.get("slot_rows", 16)
        slot_names = [f"slots{index}" for index in range(slot_rows // 16)] if slots else []
        names = ["wide"] * bool(wide) + ["few"] * (few < full) + ["full"]
        loops = masked["loops"]
        if slots:
            # The slots' loops (the most wgmma: every slot's dot per chunk) wherever the compiler put them, kept in
            # the order of their addresses.
            by_tensor = sorted(range(len(loops)), key=lambda index: loops[index]["kinds"]["tensor"])
            slot_indices = sorted(by_tensor[-len(slot_names) :])
            loops = [loop for index, loop in enumerate(loops) if index not in slot_indices]
            loops += [masked["loops"][index] for index in slot_indices]
        loops = dict(zip(one_names + names + slot_names, loops, strict=True))
        bare_loops = dict(zip(["one"] * bool(plain["one_task"][0]) + names, plain["loops"], strict=True))
        counts = {"wide": wide, "few": few, "full": full}
        width = 16
        out_features, _ = MODEL_LAYER
        programs = costmodel.ceil_div(out_features, config["BLOCK_N"]) * masked["split_k"]
        if one_rows and count == 1:
            # One task: the single-task loop (one mask, one dot of every row per step of one_block_k columns).
            loop = loops[f"one{min(tasks[0], copies)}" if copies else "one"]
            step = 128 if copies else one_block_k
            flops = 2 * config["BLOCK_N"] * one_rows * step
            instructions = loop["instructions"]
            rows.append(_launch_row(masked, config, programs, step, instructions, flops, batch, 1, id_bits, groups=1))
            continue
        if slots and slots_apply(tasks, slots, slot_rows):
            # Slots: every task of the layer's mask and dot per step, compiled in (a chunk of 128 columns per step),
            # in one pass over K (16-row slots) or two of half the slots each (32-row slots).
            flops = slots * 2 * config["BLOCK_N"] * slot_rows * 128
            instructions = sum(loops[name]["instructions"] for name in slot_names)
            rows.append(_launch_row(masked, config, programs, 128, instructions, flops, batch, len(slot_names),
                                    id_bits, groups=len(groups)))  # fmt: skip
            continue
        if wide and len(v2_groups(tasks, 64)) <= wide:
            unrolled, passes, width = wide, [v2_groups(tasks, 64)], 64
            name = "wide"
        elif len(groups) <= few:
            unrolled, passes, name = few, [groups], "few" if few < full else "full"
        else:
            unrolled, name = full, "full"
            passes = [groups[first : first + full] for first in range(0, len(groups), full)]
        assert unrolled == counts[name]
        loop, bare = loops[name], bare_loops[name]
        mask_cost = (loop["instructions"] - bare["instructions"]) / unrolled
        instructions = sum(bare["instructions"] + _distinct(part) * mask_cost for part in passes)
        flops = len(passes) * unrolled * 2 * config["BLOCK_N"] * width * config["BLOCK_K"]
        rows.append(
            _launch_row(
                masked,
                config,
                programs,
                config["BLOCK_K"],
                instructions,
                flops,
                batch,
                len(passes),
                id_bits,
                groups=len(groups),
            )
        )
    return rows


def model_time(rows: list[dict], calibration: dict) -> tuple[float, dict, dict]:
    """``(seconds, row, resource times)`` of the fastest row (the autotuner keeps the fastest config)."""
    import costmodel

    params, limits = calibration["params"], calibration["limits"]
    best = None
    for row in rows:
        times = costmodel.resource_times(row, params, limits)
        seconds = costmodel.combine(times, row["serialized"], params)
        if best is None or seconds < best[0]:
            best = (seconds, row, times)
    return best


def model_report(features: dict, calibration: dict, measured: dict) -> dict:
    """Per case: the v1 prediction against run 4's mixed time (v6), the v2 prediction against run 4's one-task and
    split-by-task times, and the issue's targets."""
    graph = {(r["batch"], r["tasks"], r["method"]): r.get("graph_ms") for r in measured["results"]}
    cases = []
    for batch, count in MODEL_CASES:
        v1_s, _, v1_times = model_time(v1_launch(features["v1"], batch, count), calibration)
        v2_s, v2_row, v2_times = model_time(v2_launch(features["v2"], batch, count), calibration)
        compact_s, _, _ = model_time(v2_launch(features["v2"], batch, count, id_bits=4), calibration)
        mixed_ms, one_ms, split_ms = (graph.get((batch, count, m)) for m in ("mixed", "one_task", "split_by_task"))
        cases.append(
            {
                "batch": batch,
                "tasks": count,
                "v1_predicted_us": v1_s * 1e6,
                "v1_measured_us": None if mixed_ms is None else mixed_ms * 1e3,
                "v1_error": None if mixed_ms is None else v1_s / (mixed_ms * 1e-3) - 1,
                "v1_limit": max(v1_times, key=v1_times.get),
                "v2_predicted_us": v2_s * 1e6,
                "v2_ids4_predicted_us": compact_s * 1e6,
                "v2_limit": max(v2_times, key=v2_times.get),
                "v2_config": v2_row["config"],
                "v2_groups": v2_row["groups"],
                "v2_passes": v2_row["passes"],
                "one_task_measured_us": None if one_ms is None else one_ms * 1e3,
                "split_measured_us": None if split_ms is None else split_ms * 1e3,
            }
        )
    errors = sorted(abs(case["v1_error"]) for case in cases if case["v1_error"] is not None)
    return {
        "layer": list(MODEL_LAYER),
        "triton": {kernel: features[kernel]["triton"] for kernel in features},
        "calibration": str(CALIBRATION.name),
        "measured": str(RUN4_MIXED.name),
        "v1_median_abs_error": errors[(len(errors) - 1) // 2] if errors else None,
        "v1_max_abs_error": errors[-1] if errors else None,
        "cases": cases,
        "targets": model_targets(cases),
    }


def model_targets(cases: list[dict]) -> list[dict]:
    """The issue's targets on the predicted v2 times, against run 4's measured single-task and split times."""
    by = {(case["batch"], case["tasks"]): case for case in cases}
    b64, b256 = by[(64, 8)], by[(256, 8)]
    checks = [
        ("64 rows over 8 tasks within 1.3x of 64 rows of one task",
         b64["v2_predicted_us"] / b64["one_task_measured_us"], 1.3, "<="),
        ("64 rows over 8 tasks >= 4x faster than splitting by task",
         b64["split_measured_us"] / b64["v2_predicted_us"], 4.0, ">="),
        ("256 rows over 8 tasks within 1.5x of 256 rows of one task",
         b256["v2_predicted_us"] / b256["one_task_measured_us"], 1.5, "<="),
        # On the 4-bit ids a packed layer keeps on a GPU, against the same kernel's predicted batch of one task.
        ("64 rows over 8 tasks within 1.3x of 64 rows of one task, both on 4-bit ids (predicted)",
         b64["v2_ids4_predicted_us"] / by[(64, 1)]["v2_ids4_predicted_us"], 1.3, "<="),
        ("256 rows over 8 tasks within 1.5x of 256 rows of one task, both on 4-bit ids (predicted)",
         b256["v2_ids4_predicted_us"] / by[(256, 1)]["v2_ids4_predicted_us"], 1.5, "<="),
    ]  # fmt: skip
    for batch in BATCHES:
        case = by[(batch, 1)]
        checks.append((f"{batch} rows of one task as fast as the single-task kernel",
                       case["v2_predicted_us"] / case["one_task_measured_us"], 1.0, "<="))  # fmt: skip
    return [
        {"target": text, "ratio": ratio, "met": ratio <= bound if sense == "<=" else ratio >= bound}
        for text, ratio, bound, sense in checks
    ]


def model_markdown(report: dict) -> str:
    lines = [
        "# Mixed-task batches: the byte-and-step model (predictions)",
        "",
        f"Layer {report['layer'][1]} -> {report['layer'][0]}, fp16, uint8 ids, 8 tasks; the cases of "
        f"`benchmarks/mixed.py`. Parameters: `{report['calibration']}` (run 4's single-task kernels; nothing "
        f"fitted here). v1: run 4's v6 kernel compiled with triton {report['triton']['v1']}, against its measured "
        f"time (`{report['measured']}`); v2: this tree's grouped kernel compiled with triton {report['triton']['v2']}. "
        "Microseconds. **v2 columns are predictions**, not measurements.",
        "",
        f"v1 error on run 4: median {100 * report['v1_median_abs_error']:.0f} %, largest "
        f"{100 * report['v1_max_abs_error']:.0f} %.",
        "",
        "| batch | tasks | v1 measured | v1 model | error | v2 model | v2 limit | v2 groups / passes | v2 config "
        "| v2 model, 4-bit ids | one task (run 4) | split (run 4) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for case in report["cases"]:
        config = case["v2_config"]
        text = f"{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']} s{config['num_stages']}"
        lines.append(
            f"| {case['batch']} | {case['tasks']} | {case['v1_measured_us']:.1f} | {case['v1_predicted_us']:.1f} "
            f"| {100 * case['v1_error']:+.0f} % | {case['v2_predicted_us']:.1f} | {case['v2_limit']} "
            f"| {case['v2_groups']} / {case['v2_passes']} | {text} | {case['v2_ids4_predicted_us']:.1f} "
            f"| {case['one_task_measured_us']:.1f} "
            f"| {case['split_measured_us']:.1f} |"
        )
    lines += ["", "| target (v2 predicted, run 4 baselines) | ratio | met |", "|---|---:|---|"]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['ratio']:.2f}x | {target['met']} |")
    return "\n".join(lines) + "\n"


def load_model_inputs() -> tuple[dict, dict, dict]:
    features = {kernel: json.loads(path.read_text()) for kernel, path in MODEL_FEATURES.items()}
    return features, json.loads(CALIBRATION.read_text()), json.loads(RUN4_MIXED.read_text())


def main(argv=None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="mixed_model.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    collect = commands.add_parser("features", help="compile the model's kernel variants (sm_90, on the CPU)")
    collect.add_argument("--kernel", choices=("v1", "v2"), required=True)
    collect.add_argument("--source", default=str(HERE.parent), help="a checkout whose packnet_kernels to compile")
    collect.add_argument("--triton-path", help="a directory put first on sys.path (the GPU machine's triton)")
    collect.add_argument("--out", required=True)
    predict = commands.add_parser("predict", help="predict every case from the committed features")
    predict.add_argument("--out", required=True, help="directory for mixed-model-predictions.{json,md}")
    args = parser.parse_args(argv)
    if args.command == "features":
        # The compile workers (spawned) import what this process puts on their path: Triton, the source, these.
        paths = [*([args.triton_path] if args.triton_path else []), args.source, str(HERE)]
        sys.path[:0] = paths
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
        Path(args.out).write_text(json.dumps(collect_model_features(args.kernel), indent=1))
        return 0
    sys.path.insert(0, str(HERE))
    report = model_report(*load_model_inputs())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed-model-predictions.json").write_text(json.dumps(report, indent=1))
    (out / "mixed-model-predictions.md").write_text(model_markdown(report))
    print(model_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
