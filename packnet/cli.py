"""The ``packnet`` command: ``demo``, ``inspect``, ``export``, ``serve`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("packnet")

# Extensions that promise another format than the safetensors `export` writes: a reader would call torch.load
# (pickle) on them, or take the file for a pack.
_MISLEADING_EXPORT_EXTENSIONS = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar", ".pack"}


# Exit statuses: 2 for a refused argument or input (argparse's own), 130 for Ctrl-C and 141 for a closed pipe, as a
# shell reports a process ended by SIGINT or SIGPIPE.
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _prune_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _check_writable_directory(directory: str, what: str) -> None:
    """Raise OSError (one line) unless ``directory`` exists as a directory we can write, or can be created."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise OSError(f"{what} {directory} exists and is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OSError(f"{what} {directory} is not writable")
        return
    parent = os.path.dirname(directory)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot create {what} {directory}: {parent} is not a writable directory")


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_demo

    # Check every output before training, so a bad path fails in a second, not after the run.
    _check_writable_directory(args.out, "output directory")
    if args.json:
        if os.path.isdir(args.json):
            raise OSError(f"--json {args.json} is a directory; give a file name")
        _check_writable_directory(os.path.dirname(os.path.abspath(args.json)), "directory of --json")
    result = run_demo(
        args.out,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        prune_ratio=args.prune_ratio,
        seed=args.seed,
        show_progress=not args.no_progress,
    )
    print(format_report(result))
    if args.json:
        from .pack import write_file_atomically

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        text = json.dumps(result, indent=2)
        write_file_atomically(args.json, lambda tmp_path: _write_text(tmp_path, text))
        print(f"figures written to {args.json}")
    return 0


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _folding_line(pack) -> str:
    """How many BatchNorms fold when the pack loads: built here when its architecture is registered."""
    from .models import BUILDERS
    from .pack import FOLDING_ATTR, build_packed_model

    if pack.arch is None or pack.arch["builder"] not in BUILDERS:
        why = "no architecture recorded" if pack.arch is None else f"builder {pack.arch['builder']!r} not registered"
        return f"folded norms: unknown here ({why}; load_pack(path, model=...).packnet_folding says)"
    folding = getattr(build_packed_model(pack, fuse=True, backend="reference"), FOLDING_ATTR)
    how = "torch.fx graph" if folding["method"] == "fx" else f"nn.Sequential rule; {folding.get('reason')}"
    return f"folded norms: {folding['folded']} of {folding['norms']} BatchNorms fold on load ({how})"


def _inspect(args: argparse.Namespace) -> int:
    from .pack import read_pack

    pack = read_pack(args.pack)
    meta = pack.meta
    print(f"{args.pack}: {meta['format']} v{meta['version']} by {meta['producer']}")
    print(f"tasks: {pack.num_tasks}   dtype: {meta['dtype']}   architecture: {json.dumps(pack.arch)}")
    print(f"tensor bytes: {pack.nbytes()}   sha256: {meta['sha256']}")
    print(
        f"shared state: {len(pack.shared_state)} tensors   per-task state: {len(pack.task_states[0])} tensors per task"
    )
    print(_folding_line(pack))
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

    from .pack import read_pack, write_file_atomically

    out, extension = args.out, os.path.splitext(args.out)[1].lower()
    # Every refusal comes before the warning and before the pack is read.
    if os.path.exists(out) and os.path.exists(args.pack) and os.path.samefile(out, args.pack):
        raise OSError(f"--out {out} is the input pack itself; refusing to overwrite it")
    if os.path.isdir(out):
        raise IsADirectoryError(
            f"--out {out} is a directory; give a file name, e.g. {os.path.join(out, 'task.safetensors')}"
        )
    if extension in _MISLEADING_EXPORT_EXTENSIONS:
        raise OSError(
            f"--out {out}: export writes a safetensors state_dict, which a {extension} name misrepresents"
            " (torch.load or packnet would fail on it); name it .safetensors"
        )
    if os.path.exists(out) and not args.force:
        raise FileExistsError(f"--out {out} exists; pass --force to overwrite it")
    if extension != ".safetensors":
        log.warning("export: %s does not end in .safetensors, but the file is safetensors", out)
    pack = read_pack(args.pack)
    if args.task > pack.num_tasks:
        raise ValueError(f"--task {args.task}: {args.pack} holds tasks 1..{pack.num_tasks}")
    state = pack.task_state_dict(args.task)
    tensors = {key: value.contiguous() for key, value in state.items()}
    write_file_atomically(out, lambda tmp_path: save_file(tensors, tmp_path))
    print(f"task {args.task} written to {out} as a plain state_dict ({len(state)} tensors)")
    return 0


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers like 1,8,8, got {text!r}") from None
    if not all(dim >= 1 for dim in shape):
        raise argparse.ArgumentTypeError(f"every dimension must be at least 1, got {text!r}")
    return shape


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .serve import start

    stop = threading.Event()

    def request_stop(signum, frame):  # Serve and Ray are stopped in order below, not by the default handlers
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    try:
        server = start(
            args.pack,
            host=args.host,
            port=args.port,
            address=args.address,
            app_name=args.app_name,
            route_prefix=args.route_prefix,
            num_cpus=args.num_cpus,
            metrics_port=args.metrics_port,
            replicas=args.replicas,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            batching=args.batching,
            max_request_bytes=args.max_request_bytes,
            max_rows=args.max_rows,
            input_shape=args.input_shape,
            watch_s=args.watch,
            imports=tuple(args.imports),
            access_log=not args.no_access_log,
        )
    except ImportError as error:
        print(f"packnet serve: {error}", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):  # ray.init may have installed its own
        signal.signal(signum, request_stop)
    served = server.served
    print(
        f"serving {args.pack} ({served.num_tasks} tasks, input {list(served.input_shape)}, {args.batching} batching)"
        f" at {server.url}: POST /predict, GET /tasks, GET /healthz, GET /stats; Ray at {server.gcs_address};"
        " Ctrl-C stops",
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    server.stop()
    print("stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="packnet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"packnet {__version__}", help="print the version")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    demo = commands.add_parser("demo", help="Split-Digits: train, compile, check and time a 5-task pack")
    demo.add_argument("--out", default="demo-out", help="directory for the pack (default: demo-out)")
    demo.add_argument("--json", help="also write every figure to this JSON file")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="training epochs per task, 1+ (default: 10)")
    demo.add_argument(
        "--finetune-epochs", type=_non_negative_int, default=3, help="post-prune epochs per task, 0+ (default: 3)"
    )
    demo.add_argument(
        "--prune-ratio", type=_prune_ratio, default=0.5, help="fraction released per task, in [0, 1) (default: 0.5)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and batches")
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they are shown only on a terminal anyway)"
    )
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser("inspect", help="print a pack's tasks, state, folding and per-layer ownership")
    inspect.add_argument("pack", help="the pack file to read")
    inspect.set_defaults(run=_inspect)

    export = commands.add_parser("export", help="write one task as a plain safetensors state_dict")
    export.add_argument("pack", help="the pack file to read")
    export.add_argument("--task", type=_positive_int, required=True, help="the task to export, 1..number of tasks")
    export.add_argument("--out", required=True, help="the .safetensors file to write (never the input pack)")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    export.set_defaults(run=_export)

    serve = commands.add_parser(
        "serve",
        help="serve every task of a pack over HTTP with Ray Serve, mixed-task batches (needs packnet[serve])",
        description='Serve a pack with Ray Serve: POST /predict {"task": T, "inputs": [...]}, GET /tasks,'
        " GET /healthz, GET /stats. Requests of any tasks are batched into one mixed-task forward. Without --address"
        " a local Ray starts on this machine; SIGINT or SIGTERM stops Serve and Ray.",
    )
    serve.add_argument("pack", help="the pack file (readable at this path on every node that runs a replica)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument(
        "--address", help="join this Ray cluster (auto, HOST:6379, ray://HOST:10001) instead of starting a local Ray"
    )
    serve.add_argument("--replicas", type=_positive_int, default=1, help="replicas of the deployment (default: 1)")
    serve.add_argument(
        "--gpus-per-replica",
        type=_non_negative_float,
        default=None,
        help="GPUs per replica, fractions share one (default: 1 when the cluster has a GPU, else 0)",
    )
    serve.add_argument("--cpus-per-replica", type=_non_negative_float, default=1.0, help="default: 1")
    serve.add_argument("--max-batch", type=_positive_int, default=32, help="most requests per batch (default: 32)")
    serve.add_argument(
        "--batch-wait-ms",
        type=_non_negative_float,
        default=5.0,
        help="longest a batch waits for more requests after its first, ms (default: 5)",
    )
    serve.add_argument(
        "--batching",
        choices=("mixed", "by-task"),
        default="mixed",
        help="mixed: any tasks in one batch and forward (default); by-task: one queue and batch per task",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=16 * 1024 * 1024,
        help="largest request body accepted; larger ones get a 413 (default: 16 MiB)",
    )
    serve.add_argument(
        "--max-rows", type=_positive_int, default=256, help="most samples in one request; more get a 413 (default: 256)"
    )
    serve.add_argument(
        "--input-shape", type=_input_shape, help="per-sample input shape like 1,8,8 when the pack records none"
    )
    serve.add_argument(
        "--watch",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="poll the pack file every SECONDS and reload it when it changed and validates (default: 0, never)",
    )
    serve.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="module every replica imports before loading (one that calls packnet.register_builder); repeatable",
    )
    serve.add_argument("--app-name", default="packnet", help="Serve application name (default: packnet)")
    serve.add_argument("--route-prefix", default="/", help="URL prefix of the routes (default: /)")
    serve.add_argument("--num-cpus", type=_positive_int, help="CPUs of the local Ray (default: all)")
    serve.add_argument(
        "--metrics-port", type=int, help="port where the local Ray serves its Prometheus metrics (default: Ray picks)"
    )
    serve.add_argument("--no-access-log", action="store_true", help="no Ray Serve access log line per request")
    serve.set_defaults(run=_serve)

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
    """Run the ``packnet`` command line; returns the exit status.

    A refused input prints one line ``packnet COMMAND: what is wrong`` to stderr and returns 2; Ctrl-C prints one
    line and returns 130 (files being written are removed: every output goes through a temporary file); a closed
    stdout (``packnet inspect PACK | head``) ends quietly with 141.
    """
    command = "packnet"
    try:
        args = build_parser().parse_args(argv)
        command = f"packnet {args.command}"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        from .pack import PackFormatError

        try:
            return args.run(args)
        except PackFormatError as error:
            print(f"{command}: invalid pack: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except (ValueError, OSError) as error:
            if isinstance(error, BrokenPipeError):
                raise
            print(f"{command}: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"{command}: interrupted (Ctrl-C); no partial file was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _close_progress_bars() -> None:
    """Close the progress bars an interrupt left open, so the last line starts at the left margin."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _silence_stdout() -> None:
    """Point stdout at /dev/null: its reader has gone, and Python would report the failed flush at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file descriptor
        pass


def console_main() -> None:
    """The ``packnet`` console script and ``python -m packnet``: :func:`main`, then exit with its status. After
    Ctrl-C the interpreter's teardown is skipped: an interrupt inside an extension module's import (Triton's,
    torch's) can leave it half initialised, and its teardown may then abort the process."""
    status = main()
    if status == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    sys.exit(status)
