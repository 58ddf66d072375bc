"""The host time of a packed layer's call, without a GPU: the whole module call with the kernel launch stubbed.

    python benchmarks/host.py (--out DIR | --json FILE) [--quick]        (or: packnet bench --stage host)

For each case a packed module (``PackedLinear``/``PackedConv2d``, fp16, a per-task bias, 3 tasks; 8 for the mixed
batch) is called as a model calls it, ``module(x, task=t)`` under ``torch.no_grad``, with
:func:`packnet_kernels._launcher.stub_launches` replacing the kernel launch by a no-op at the launcher's boundary
(what Triton's compiled launcher and the driver would do next is all that is left out). Beside it, in the same run,
the same-shaped ``nn.Linear``/``nn.Conv2d`` on meta tensors, which costs only Python and PyTorch's dispatch: the
host time of a torch layer without its kernel. Each figure is the median over at least 2000 calls, each call timed
on its own. ``checked_module_us`` is the packed module with its launch plans bypassed (every call through the kernels'
checked entry points, the path before launch plans), for scale.

Without CUDA the kernels' plans are made for CPU tensors under ``TRITON_INTERPRET=1`` (set by ``main``); the calls take
the same Python path as on a GPU except the CUDA queries (current device, stream, graph capture: well under a
microsecond each) and with the CPU-only checks of a task tensor's values (a mixed batch reads its tasks on the CPU;
on a GPU it never does). ``nn.Linear`` runs without a bias on meta: PyTorch's meta kernel of ``addmm`` is a Python
decomposition costing about 300 us on the development CPU, which measures nothing a CUDA call pays (``mm``'s is
C++, 12-14 us). Target (issue 26): ``packed_module_us <= 2.0 x torch_module_us`` for every case.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timing  # noqa: E402

TARGET_RATIO = 2.0
CALLS = 2000
WARMUP_CALLS = 50


def median_call_us(fn, calls: int = CALLS) -> float:
    """The median of ``calls`` calls of ``fn``, each timed on its own, in microseconds."""
    for _ in range(WARMUP_CALLS):
        fn()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        start = clock()
        fn()
        samples.append(clock() - start)
    return statistics.median(samples) / 1000


def _linear_case(name, rows, num_tasks, mixed, device, generator):
    import packnet

    dense = torch.nn.Linear(4096, 4096, dtype=torch.float16)
    ids = torch.randint(0, num_tasks + 1, dense.weight.shape, dtype=torch.uint8, generator=generator)
    module = packnet.PackedLinear.from_dense(dense, ids, num_tasks, backend="triton").to(device)
    x = torch.randn(rows, 4096, generator=generator).to(device, torch.float16)
    task = (torch.arange(rows) % num_tasks + 1).to(device) if mixed else 2
    torch_module = torch.nn.Linear(4096, 4096, bias=False, device="meta", dtype=torch.float16)
    torch_input = torch.empty(rows, 4096, device="meta", dtype=torch.float16)
    return {
        "case": name,
        "module": module,
        "call": lambda: module(x, task=task),
        "torch_call": lambda: torch_module(torch_input),
        "torch_module": f"nn.Linear(4096, 4096, bias=False) on meta, input [{rows}, 4096] fp16",
        "shape": {"rows": rows, "in": 4096, "out": 4096, "tasks": num_tasks, "mixed": mixed},
    }


def _conv_case(name, channels, groups, hw, device, generator):
    import packnet

    dense = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=groups, dtype=torch.float16)
    ids = torch.randint(0, 4, dense.weight.shape, dtype=torch.uint8, generator=generator)
    module = packnet.PackedConv2d.from_dense(dense, ids, 3, backend="triton").to(device)
    x = torch.randn(1, channels, hw, hw, generator=generator).to(device, torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    torch_module = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=groups, device="meta", dtype=torch.float16)
    torch_input = torch.empty(1, channels, hw, hw, device="meta", dtype=torch.float16)
    torch_input = torch_input.contiguous(memory_format=torch.channels_last)
    return {
        "case": name,
        "module": module,
        "call": lambda: module(x, task=2),
        "torch_call": lambda: torch_module(torch_input),
        "torch_module": f"nn.Conv2d({channels}, {channels}, 3, padding=1, groups={groups}) on meta, input"
        f" [1, {channels}, {hw}, {hw}] fp16 channels_last",
        "shape": {"channels": channels, "groups": groups, "hw": hw, "tasks": 3},
    }


def cases(device: str) -> list[dict]:
    """The issue's cases: linear 4096x4096 at batch 1 and 256, a 3x3 conv of 256 channels, a depthwise 3x3, and a
    mixed batch of 8 tasks."""
    generator = torch.Generator().manual_seed(0)
    return [
        _linear_case("linear 4096x4096 b1", 1, 3, False, device, generator),
        _linear_case("linear 4096x4096 b256", 256, 3, False, device, generator),
        _conv_case("conv3x3 256@14 b1", 256, 1, 14, device, generator),
        _conv_case("depthwise3x3 192@28 b1", 192, 192, 28, device, generator),
        _linear_case("linear 4096x4096 b64, 8 tasks mixed", 64, 8, True, device, generator),
    ]


class _NoPlans:
    """Stands in for a layer's launch plans: every call takes the checked path."""

    def lookup(self, layer, x, task):
        return None


def measure(case: dict, calls: int, checked: bool) -> dict:
    """One case's figures (see the module docstring), with the launches stubbed."""
    from packnet_kernels._launcher import stub_launches

    module = case["module"]
    with torch.no_grad(), stub_launches() as stub:
        packed = median_call_us(case["call"], calls)
        launches = {"plain": stub.plain_launches, "direct": stub.direct_launches}
        checked_us = None
        if checked:
            plans, module.launch_plans = module.launch_plans, _NoPlans()
            try:
                checked_us = median_call_us(case["call"], calls)
            finally:
                module.launch_plans = plans
        torch_us = median_call_us(case["torch_call"], calls)
    ratio = packed / torch_us
    return {
        "case": case["case"],
        "shape": case["shape"],
        "packed_module_us": round(packed, 2),
        "torch_module_us": round(torch_us, 2),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "checked_module_us": None if checked_us is None else round(checked_us, 2),
        "calls": calls,
        "launches": launches,
        "torch_module": case["torch_module"],
    }


def markdown(results: dict) -> str:
    lines = [
        "# Host time of a packed call (launch stubbed) against a torch layer on meta tensors",
        "",
        f"Device: {results['device'].get('gpu_name') or results['device'].get('cpu')}; torch"
        f" {results['device']['torch']}, triton {results['device']['triton']}. Median of {results['calls']} calls"
        f" each. Target: packed <= {TARGET_RATIO} x torch.",
        "",
        "| case | packed module (us) | torch module on meta (us) | ratio | target met | checked path (us) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in results["results"]:
        checked = "" if row["checked_module_us"] is None else f"{row['checked_module_us']:.1f}"
        lines.append(
            f"| {row['case']} | {row['packed_module_us']:.1f} | {row['torch_module_us']:.1f} | {row['ratio']:.2f} |"
            f" {'yes' if row['meets_target'] else 'no'} | {checked} |"
        )
    lines += ["", "Torch yardsticks: " + "; ".join(row["torch_module"] for row in results["results"]) + "."]
    return "\n".join(lines) + "\n"


def write_report(json_path: str | Path) -> list[Path]:
    """``<json>.md`` beside the results."""
    return timing.markdown_report(json_path, markdown)


def main(argv=None) -> int:
    args, path = timing.stage_arguments(
        argv,
        __doc__.split("\n\n")[0],
        "host.json",
        "the same cases without the checked-path column (the smoke run CI makes)",
        "start no new case after this many seconds",
    )
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "benchmarks/host.py: without CUDA it needs a process of its own (it turns the Triton interpreter on)"
            )
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: CPU tensors may then plan
    results = {"device": timing.device_info(device), "calls": CALLS, "results": [], "skipped": []}
    for case in cases(device):
        if time.perf_counter() - started > args.budget_s:
            results["skipped"].append(case["case"])
            continue
        row = measure(case, CALLS, checked=not args.quick)
        results["results"].append(row)
        timing.write_json(path, results)
        print(
            f"{row['case']:36s} packed {row['packed_module_us']:7.1f} us  torch {row['torch_module_us']:7.1f} us"
            f"  ratio {row['ratio']:5.2f}  checked {row['checked_module_us']}",
            flush=True,
        )
    timing.write_json(path, results)
    return 0 if all(row["meets_target"] for row in results["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
