"""Load test of ``packnet serve``: mixed-task batching against batching by task, over HTTP on 127.0.0.1.

    python benchmarks/serve_load.py [--pack PACK] [--clients 20] [--requests 2000] [--rounds 2] [--out DIR]

Starts its own Ray (files under a temporary ``RAY_TMPDIR``, node address 127.0.0.1, HTTP proxy on 127.0.0.1) and
deploys the same deployment twice: ``/mixed`` (one batch queue, any tasks per batch, one forward with a task tensor)
and ``/by-task`` (one queue per task, each batch one task). Each round sends ``--requests`` requests (tasks drawn
evenly over the pack's tasks, one test image of that task per request unless ``--rows``) from ``--clients``
concurrent keep-alive clients to each mode in turn, and checks every answer against the offline per-task run of the
same inputs bit for bit: a lost request, an error or another task's output is counted and fails the run. Reports
client-side p50/p99 latency and throughput per mode and round, and each replica's batch histograms
(``GET /stats``), into ``<out>/<host>-<date>-serve-load.json`` and ``.md``, with a plot (latency CDF, throughput,
batch sizes) in ``.png``.

Without ``--pack`` it trains the Split-Digits demo pack (5 tasks) for a few epochs first. The load generator shares
the machine with Ray and the replicas, so the figures are those of the whole machine.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import math
import os
import platform
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {"mixed": "/mixed", "by_task": "/by-task"}
TOLERANCE = 1e-5


def build_demo_pack(path: str, seed: int = 0, epochs: int = 2) -> str:
    """Train the Split-Digits demo (5 tasks) briefly and save its pack to ``path``."""
    import packnet
    from packnet.demo import split_digits, train_packnet

    tasks = split_digits(seed)
    trainer, _ = train_packnet(tasks, epochs, 0, 0.5, seed, show_progress=False)
    packnet.save_pack(packnet.compile_pack(trainer), path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_of(ray_tmpdir: str) -> list[int]:
    """Process ids whose environment names ``ray_tmpdir`` as RAY_TMPDIR: this run's Ray processes, whatever they
    renamed themselves to and whichever process group they moved to."""
    marker = f"RAY_TMPDIR={ray_tmpdir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def make_work(pack_path: str, requests: int, rows: int, seed: int) -> list[tuple[int, list, torch.Tensor]]:
    """``requests`` items ``(task, inputs as nested lists, expected outputs)``: tasks evenly spread and shuffled,
    inputs drawn from that task's Split-Digits test images, expected outputs from the offline per-task run."""
    import packnet
    from packnet.demo import split_digits

    model = packnet.load_pack(pack_path)
    num_tasks = packnet.read_pack(pack_path).num_tasks
    data = split_digits(seed)
    generator = torch.Generator().manual_seed(seed)
    tasks = (torch.arange(requests) % num_tasks + 1)[torch.randperm(requests, generator=generator)]
    work = []
    with torch.inference_mode():
        for task in tasks.tolist():
            images = data[(task - 1) % len(data)].test_x
            index = torch.randint(len(images), (rows,), generator=generator)
            inputs = images[index]
            work.append((task, inputs.tolist(), model(inputs, task=task)))
    return work


def model_costs(pack_path: str, threads: int, repeats: int = 100) -> list[dict]:
    """Offline, in this process with ``threads`` torch threads: the model's time for a batch of one task against a
    mixed batch of the same rows spread over k tasks (median of ``repeats`` calls, ms). Explains what the replicas'
    forwards cost: on the CPU (the reference backend) a mixed batch runs per task present."""
    import packnet

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = packnet.load_pack(pack_path)
    num_tasks = packnet.read_pack(pack_path).num_tasks
    inputs = torch.rand((32, *packnet.read_pack(pack_path).input_shape), generator=torch.Generator().manual_seed(0))
    rows_out = []
    try:
        with torch.inference_mode():
            for rows in (2, 6, 32):
                batch = inputs[:rows]
                for count in sorted({1, min(3, num_tasks), num_tasks}):
                    task = count if count == 1 else torch.arange(rows) % count + 1
                    for _ in range(5):
                        model(batch, task=task)
                    times = []
                    for _ in range(repeats):
                        started = time.perf_counter()
                        model(batch, task=task)
                        times.append(1000 * (time.perf_counter() - started))
                    rows_out.append({"rows": rows, "tasks": count, "ms": percentile(times, 0.5)})
    finally:
        torch.set_num_threads(previous)
    return rows_out


def run_load(port: int, prefix: str, work: list, clients: int, deadline: float) -> dict:
    """Send ``work`` from ``clients`` keep-alive connections; every answer is checked against its expected outputs.

    Returns client-side latencies (s) of the correct answers, counts of errors (lost, failed) and wrong answers,
    and the wall time from the first request to the last answer.
    """
    lock = threading.Lock()
    next_item = [0]
    latencies: list[float] = []
    errors: list[str] = []
    wrong: list[int] = []
    exact, worst = [0], [0.0]

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                index = next_item[0]
                next_item[0] += 1
            if index >= len(work):
                break
            task, inputs, expected = work[index]
            body = json.dumps({"task": task, "inputs": inputs})
            started = time.perf_counter()
            try:
                connection.request("POST", prefix + "/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    errors.append(f"request {index}: {type(error).__name__}: {error}")
                continue
            elapsed = time.perf_counter() - started
            if response.status != 200:
                with lock:
                    errors.append(f"request {index}: HTTP {response.status} {payload[:200]!r}")
                continue
            answer = json.loads(payload)
            outputs = torch.tensor(answer["outputs"], dtype=expected.dtype)
            correct = answer["task"] == task and outputs.shape == expected.shape
            difference = float((outputs - expected).abs().max()) if correct else math.inf
            # Within 1e-5 and the same class: CPU convolutions pick their algorithm by batch size, so a row served in
            # a batch of 20 may differ from its run alone in the last bits (a head of another task differs by far more).
            correct = correct and difference <= TOLERANCE and torch.equal(outputs.argmax(-1), expected.argmax(-1))
            with lock:
                if correct:
                    latencies.append(elapsed)
                    exact[0] += difference == 0
                    worst[0] = max(worst[0], difference)
                else:
                    wrong.append(index)
        connection.close()

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "sent": min(next_item[0], len(work)),
        "answered": len(latencies),
        "latencies_s": latencies,
        "errors": errors,
        "wrong": wrong,
        "bit_exact": exact[0],
        "max_abs_difference": worst[0],
        "wall_s": wall,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def get_json(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def histogram_delta(after: dict, before: dict) -> dict:
    counts = [a - b for a, b in zip(after["counts"], before["counts"], strict=True)]
    count = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    mean = total / count if count else None
    return {"boundaries": after["boundaries"], "counts": counts, "count": count, "mean": mean}


def write_report(result: dict, stem: Path) -> None:
    """``stem.md`` (a table per mode and round) and ``stem.png`` (latency CDF, throughput, batch sizes)."""
    lines = [
        f"# packnet serve load test ({result['date']})",
        "",
        f"{result['machine']}; torch {result['versions']['torch']}, ray {result['versions']['ray']}; pack"
        f" {result['settings']['pack_tasks']} tasks; {result['settings']['clients']} clients,"
        f" {result['settings']['requests']} requests per mode and round, {result['settings']['rows']} row(s) each;"
        f" max batch {result['settings']['max_batch']}, batch wait {result['settings']['batch_wait_ms']} ms.",
        "Latency is client-side (HTTP round trip on 127.0.0.1). Every answer was checked against the offline per-task"
        f" run of its inputs: within {TOLERANCE:g} and the same class (the bit-exact ones are counted).",
        "",
        "| mode | round | answered | errors | wrong | bit-exact | max diff | p50 ms | p99 ms | throughput req/s |"
        " mean requests/batch | mean tasks/batch | model ms/batch | model busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['mode']} | {run['round']} | {run['answered']} | {run['errors']} | {run['wrong']} |"
            f" {run['bit_exact']} | {run['max_abs_difference']:.1e} | {run['p50_ms']:.1f} | {run['p99_ms']:.1f} |"
            f" {run['throughput_rps']:.0f} |"
            f" {run['batch_requests']['mean']:.2f} | {run['tasks_per_batch']['mean']:.2f} |"
            f" {run['forward_ms']['mean']:.2f} | {100 * run['forward_busy_fraction']:.0f}% |"
        )
    lines.append("")
    for mode, summary in result["summary"].items():
        lines.append(
            f"- {mode}: median over rounds p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms,"
            f" {summary['throughput_rps']:.0f} requests/s"
        )
    lines += [
        "",
        f"The model alone, offline, 1 torch thread (each replica ran {result['replica_torch_threads']}): a batch of"
        " one task against the same rows spread over k tasks, median ms. On the CPU the reference backend runs a"
        " mixed batch per task present, so a mixed forward costs about one forward per task in it; the one-pass"
        " mixed kernels are the Triton ones (GPU).",
        "",
        "| rows | tasks in the batch | ms |",
        "|---:|---:|---:|",
        *(f"| {c['rows']} | {c['tasks']} | {c['ms']:.2f} |" for c in result["model_costs_1_thread"]),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cdf, bars, sizes) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"mixed": "tab:blue", "by_task": "tab:orange"}
    for run in result["runs"]:
        ordered = sorted(run["latencies_ms"])
        cdf.plot(
            ordered,
            [(i + 1) / len(ordered) for i in range(len(ordered))],
            color=colors[run["mode"]],
            alpha=1.0 if run["round"] == 1 else 0.5,
            label=f"{run['mode']} round {run['round']}",
        )
    cdf.set_xscale("log")
    cdf.set_xlabel("client latency (ms, log)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("latency CDF")
    cdf.legend(fontsize=8)
    modes = list(result["summary"])
    bars.bar(modes, [result["summary"][m]["throughput_rps"] for m in modes], color=[colors[m] for m in modes])
    bars.set_ylabel("requests/s (median over rounds)")
    bars.set_title("throughput")
    width = 0.4
    for offset, mode in enumerate(modes):
        hist = result["summary"][mode]["batch_requests"]
        labels = [f"<={b}" for b in hist["boundaries"]] + ["more"]
        positions = [i + (offset - 0.5) * width for i in range(len(labels))]
        total = max(sum(hist["counts"]), 1)
        sizes.bar(positions, [c / total for c in hist["counts"]], width, color=colors[mode], label=mode)
    sizes.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    sizes.set_ylabel("fraction of batches")
    sizes.set_title("requests per batch")
    sizes.legend(fontsize=8)
    figure.suptitle(
        f"packnet serve, {result['settings']['clients']} clients, {result['settings']['pack_tasks']} tasks,"
        f" {result['machine']}"
    )
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", help="pack to serve (default: train the Split-Digits demo pack briefly)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="requests per mode and round (default: 2000)")
    parser.add_argument("--rows", type=int, default=1, help="samples per request (default: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running both modes (default: 2)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--budget-s", type=float, default=900, help="stop sending after this long (default: 900)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    ray_tmpdir = tempfile.mkdtemp(prefix="packnet-serve-load-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmpdir
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only Ray (see packnet.serve.start)
    repo = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)

    import ray
    from ray import serve

    import packnet
    from packnet.serve import build_app

    pack_path = args.pack or build_demo_pack(os.path.join(ray_tmpdir, "split_digits.pack"))
    num_tasks = packnet.read_pack(pack_path).num_tasks
    print(f"making {args.requests} requests and their offline answers ...", flush=True)
    work = make_work(pack_path, args.requests, args.rows, seed=0)
    costs = model_costs(pack_path, threads=1)
    port = free_port()
    deadline = time.monotonic() + args.budget_s
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    runs = []
    replica_threads = None
    try:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, prefix in MODES.items():
            app = build_app(
                pack_path,
                batching=mode,
                max_batch=args.max_batch,
                batch_wait_ms=args.batch_wait_ms,
                access_log=False,
                cpus_per_replica=0.5,
            )
            serve.run(app, name=mode, route_prefix=prefix, blocking=False)
        replica_threads = get_json(port, "/mixed/healthz").get("torch_threads")
        for prefix in MODES.values():  # warm up: every task once per mode, unchecked
            run_load(port, prefix, work[: 4 * num_tasks], args.clients, deadline)
        for round_index in range(1, args.rounds + 1):
            for mode, prefix in MODES.items():
                if stopping.is_set() or time.monotonic() > deadline:
                    break
                before = get_json(port, prefix + "/stats")["metrics"]
                load = run_load(port, prefix, work, args.clients, deadline)
                after = get_json(port, prefix + "/stats")["metrics"]
                latencies = load["latencies_s"]
                run = {
                    "mode": mode,
                    "round": round_index,
                    "sent": load["sent"],
                    "answered": load["answered"],
                    "errors": len(load["errors"]),
                    "error_samples": load["errors"][:5],
                    "wrong": len(load["wrong"]),
                    "bit_exact": load["bit_exact"],
                    "max_abs_difference": load["max_abs_difference"],
                    "p50_ms": 1000 * percentile(latencies, 0.5),
                    "p99_ms": 1000 * percentile(latencies, 0.99),
                    "throughput_rps": load["answered"] / load["wall_s"],
                    "wall_s": load["wall_s"],
                    "batch_requests": histogram_delta(after["batch_requests"], before["batch_requests"]),
                    "tasks_per_batch": histogram_delta(after["tasks_per_batch"], before["tasks_per_batch"]),
                    "forward_ms": histogram_delta(after["forward_ms"], before["forward_ms"]),
                    "latencies_ms": [1000 * value for value in latencies],
                }
                forward = run["forward_ms"]
                run["forward_busy_fraction"] = (forward["mean"] or 0) * forward["count"] / 1000 / load["wall_s"]
                runs.append(run)
                print(
                    f"round {round_index} {mode:>8}: {run['answered']}/{len(work)} answered, {run['errors']} errors,"
                    f" {run['wrong']} wrong; p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms,"
                    f" {run['throughput_rps']:.0f} req/s; {run['batch_requests']['mean']:.2f} requests and"
                    f" {run['tasks_per_batch']['mean']:.2f} tasks per batch; {run['forward_ms']['mean']:.2f} ms per"
                    f" batch in the model ({100 * run['forward_busy_fraction']:.0f}% of the wall time)",
                    flush=True,
                )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        for _ in range(50):
            left = processes_of(ray_tmpdir)
            if not left:
                break
            time.sleep(0.2)
        for pid in processes_of(ray_tmpdir):
            print(f"killing leftover Ray process {pid}", file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    summary = {}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        if not mine:
            continue
        merged = {"boundaries": mine[0]["batch_requests"]["boundaries"]}
        merged["counts"] = [sum(c) for c in zip(*(run["batch_requests"]["counts"] for run in mine), strict=True)]
        summary[mode] = {
            "p50_ms": percentile([run["p50_ms"] for run in mine], 0.5),
            "p99_ms": percentile([run["p99_ms"] for run in mine], 0.5),
            "throughput_rps": percentile([run["throughput_rps"] for run in mine], 0.5),
            "batch_requests": merged,
        }
    machine = f"{platform.machine()} {os.cpu_count()} CPUs" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    )
    date = datetime.date.today().isoformat()
    result = {
        "date": date,
        "machine": machine,
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "settings": {
            "clients": args.clients,
            "requests": args.requests,
            "rows": args.rows,
            "rounds": args.rounds,
            "max_batch": args.max_batch,
            "batch_wait_ms": args.batch_wait_ms,
            "pack_tasks": num_tasks,
            "pack": "split_digits demo (trained for the run)" if args.pack is None else args.pack,
        },
        "replica_torch_threads": replica_threads,
        "model_costs_1_thread": costs,
        "runs": runs,
        "summary": summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    stem = out / f"{device}-{date}-serve-load"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_report(result, stem)
    print(f"written {stem}.json, .md and .png", flush=True)
    # Every request of every run must be sent and answered correctly: an unsent one (the budget ran out) counts too.
    failures = sum(run["errors"] + run["wrong"] + (args.requests - run["sent"]) for run in runs)
    return 1 if failures or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
