"""The ``packnet`` command: ``demo``, ``inspect``, ``export`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("packnet")


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_demo

    result = run_demo(
        args.out,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        prune_ratio=args.prune_ratio,
        seed=args.seed,
    )
    print(format_report(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        print(f"figures written to {args.json}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .pack import read_pack

    pack = read_pack(args.pack)
    meta = pack.meta
    print(f"{args.pack}: {meta['format']} v{meta['version']} by {meta['producer']}")
    print(f"tasks: {pack.num_tasks}   dtype: {meta['dtype']}   architecture: {json.dumps(pack.arch)}")
    print(f"tensor bytes: {pack.nbytes()}   sha256: {meta['sha256']}")
    header = "".join(f"{'task ' + str(t):>10}" for t in range(1, pack.num_tasks + 1))
    print(f"{'layer':<24}{'shape':<20}{'free':>10}{header}")
    for name, counts in pack.ownership().items():
        total = sum(counts)
        shape = str(list(pack.layers[name][0].shape))
        cells = "".join(f"{100 * c / total:>9.1f}%" for c in counts)
        print(f"{name:<24}{shape:<20}{cells}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .pack import read_pack

    state = read_pack(args.pack).task_state_dict(args.task)
    save_file({key: value.contiguous() for key, value in state.items()}, args.out)
    print(f"task {args.task} written to {args.out} as a plain state_dict ({len(state)} tensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packnet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="Split-Digits: train, compile, check and time a 5-task pack")
    demo.add_argument("--out", default="demo-out", help="directory for the pack (default: demo-out)")
    demo.add_argument("--json", help="also write every figure to this JSON file")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs per task (default: 10)")
    demo.add_argument("--finetune-epochs", type=int, default=3, help="post-prune epochs per task (default: 3)")
    demo.add_argument("--prune-ratio", type=float, default=0.5, help="fraction released per task (default: 0.5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser("inspect", help="print a pack's tasks and per-layer ownership")
    inspect.add_argument("pack")
    inspect.set_defaults(run=_inspect)

    export = commands.add_parser("export", help="write one task as a plain safetensors state_dict")
    export.add_argument("pack")
    export.add_argument("--task", type=int, required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(run=_export)

    try:
        from . import bench
    except ImportError:
        bench = None
    if bench is not None:
        bench_parser = commands.add_parser("bench", help="run the benchmark suite and write results, table, plot")
        bench.add_arguments(bench_parser)
        bench_parser.set_defaults(run=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from .pack import PackFormatError

    try:
        return args.run(args)
    except PackFormatError as error:
        print(f"packnet {args.command}: invalid pack: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"packnet {args.command}: {error}", file=sys.stderr)
        return 2
