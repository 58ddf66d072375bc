"""Serving a pack with Ray Serve (packnet/serve.py and ``packnet serve``).

The request checks and the batch runner are tested directly (no Ray). The server tests start ``packnet serve`` once
for the module as a subprocess: its own ``RAY_TMPDIR``, a loopback-only Ray, the HTTP proxy on 127.0.0.1, every wait
bounded; this process joins that Ray as a driver for the handle tests. The last test stops the server with SIGTERM
and checks that every process of that Ray (found by its ``RAY_TMPDIR``, since Serve's processes rename themselves
and leave the process group) is gone; the fixture kills what is left by process id in any case.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.demo import split_digits, train_packnet
from packnet.serve import (
    RequestError,
    ServeConfig,
    ServeMetrics,
    _Pending,
    check_task,
    inputs_to_tensor,
    load_served_pack,
    parse_predict_body,
    run_batch,
)

REPO = Path(__file__).resolve().parent.parent
# Offline and served outputs of the same inputs: CPU convolutions choose their algorithm by batch size, so a row in a
# batch of 20 may differ from its run alone in the last bits; another task's head differs by far more than this.
TOLERANCE = 1e-5
STARTUP_S = 180  # Serve answers 13-27 s after start on a quiet 2-core machine; allow for a busy one
HTTP_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------------------------------ packs
@pytest.fixture(scope="module")
def data():
    return split_digits(0)


@pytest.fixture(scope="module")
def packs(tmp_path_factory, data):
    """Pack A: the 5 Split-Digits tasks, 1 epoch each; pack B: the first 3 tasks, another seed (for reloads)."""
    root = tmp_path_factory.mktemp("serve-packs")
    trainer_a, _ = train_packnet(data, 1, 0, 0.5, 0, show_progress=False)
    trainer_b, _ = train_packnet(data[:3], 1, 0, 0.5, 1, show_progress=False)
    path_a, path_b = root / "a.pack", root / "b.pack"
    packnet.save_pack(packnet.compile_pack(trainer_a), path_a)
    packnet.save_pack(packnet.compile_pack(trainer_b), path_b)
    return {
        "a": path_a,
        "b": path_b,
        "model_a": packnet.load_pack(path_a),
        "model_b": packnet.load_pack(path_b),
        "sha_a": packnet.read_pack(path_a).meta["sha256"],
        "sha_b": packnet.read_pack(path_b).meta["sha256"],
    }


def offline(model: nn.Module, inputs, task: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.as_tensor(inputs, dtype=torch.float32), task=task)


def assert_matches(outputs, expected: torch.Tensor, task: int, others: dict[int, torch.Tensor] | None = None) -> None:
    """``outputs`` (nested lists or a tensor) equal ``expected`` within TOLERANCE with the same classes, and (when
    ``others`` gives other tasks' outputs of the same inputs) are far from every other task's."""
    got = torch.as_tensor(outputs, dtype=expected.dtype)
    assert got.shape == expected.shape, f"task {task}: shape {list(got.shape)} != {list(expected.shape)}"
    difference = float((got - expected).abs().max())
    assert difference <= TOLERANCE, f"task {task}: differs from its offline run by {difference}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1)), f"task {task}: another class than offline"
    for other, other_expected in (others or {}).items():
        assert float((got - other_expected).abs().max()) > 100 * TOLERANCE, f"task {task} answered like task {other}"


# ---------------------------------------------------------------------------------------- the checks, without Ray
def test_importing_and_the_cli_work_without_ray(packs):
    """``import packnet.serve`` needs no Ray; ``packnet serve`` without it says how to install it, in one line."""
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "import packnet, packnet.serve, packnet.cli\n"
        'assert packnet.serve.parse_predict_body(b\'{"task": 1, "inputs": []}\') == (1, [])\n'
        f"sys.exit(packnet.cli.main(['serve', {str(packs['a'])!r}, '--port', '{_free_port()}']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_env_with_repo()
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'packnet[serve]'" in lines[0], done.stderr


def test_cli_refuses_a_bad_pack_before_starting_ray(tmp_path):
    broken = tmp_path / "broken.pack"
    broken.write_bytes(b"nope")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "packnet", "serve", str(broken), "--port", str(_free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_env_with_repo(), "RAY_TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"packnet serve: invalid pack: {broken}: file too short (4 bytes) to be a safetensors pack"
    ]
    assert time.monotonic() - started < 60
    assert not any(tmp_path.glob("session_*")), "Ray was started for a pack that does not load"


@pytest.mark.parametrize(
    ("body", "status", "reason", "words"),
    [
        (b"", 400, "bad_request", "empty body"),
        (b'{"task": 1, "inputs": [', 400, "malformed_json", "not valid JSON"),
        (b"\xff\xfe{", 400, "malformed_json", "not valid JSON"),
        (b'{"task": 1, "inputs": NaN}', 400, "malformed_json", "NaN is not a JSON value"),
        (b'{"task": 1, "inputs": [[-Infinity]]}', 400, "malformed_json", "-Infinity is not a JSON value"),
        (b"[1, 2]", 400, "bad_request", "must be a JSON object"),
        (b'{"task": 1}', 400, "bad_request", 'missing field "inputs"'),
        (b'{"inputs": []}', 400, "bad_request", 'missing field "task"'),
        (b'{"task": 1, "input": []}', 400, "bad_request", "unknown field(s) ['input']"),
        (b"[" * 100000 + b"]" * 100000, 400, "malformed_json", "nests too deeply"),
    ],
)
def test_parse_predict_body_refuses(body, status, reason, words):
    with pytest.raises(RequestError) as caught:
        parse_predict_body(body)
    error = caught.value
    assert (error.status, error.reason) == (status, reason)
    assert words in error.message and "\n" not in error.message


@pytest.mark.parametrize(
    ("task", "status", "reason", "words"),
    [
        (0, 404, "unknown_task", "task 0 is not in this pack, which holds tasks 1..5"),
        (6, 404, "unknown_task", "task 6 is not in this pack"),
        (True, 422, "bad_task", "a boolean (true)"),
        (2.0, 422, "bad_task", "the number 2.0"),
        ("2", 422, "bad_task", "a string ('2')"),
        (None, 422, "bad_task", "null"),
    ],
)
def test_check_task_refuses(task, status, reason, words):
    with pytest.raises(RequestError) as caught:
        check_task(task, 5)
    assert (caught.value.status, caught.value.reason) == (status, reason)
    assert words in caught.value.message


def _image(value=0.5):
    return [[[value] * 8 for _ in range(8)]]


def _with(value, row=0, y=3, x=5):
    image = _image()
    image[0][y][x] = value
    return [_image()] * row + [image]


@pytest.mark.parametrize(
    ("inputs", "status", "reason", "words"),
    [
        ({"a": 1}, 422, "bad_shape", "inputs must be nested lists of shape [batch, 1, 8, 8], got an object"),
        ([], 422, "bad_shape", "no row"),
        (_image(), 422, "bad_shape", "inputs[0] holds 8 items, expected 1"),  # one sample without the batch
        ([[[[0.5] * 8] * 7]], 422, "bad_shape", "inputs[0][0] holds 7 items, expected 8"),
        ([[[[0.5] * 8] * 7 + [[0.5] * 9]]], 422, "bad_shape", "inputs[0][0][7] holds 9 items, expected 8"),
        ([[[[[0.5]] * 8] * 8]], 422, "bad_shape", "inputs[0][0][0][0] is a list, where a number belongs"),
        (_with("0.5", row=1), 422, "bad_dtype", "inputs[1][0][3][5] is a string ('0.5'), expected a number"),
        (_with(True), 422, "bad_dtype", "inputs[0][0][3][5] is a boolean (true), expected a number"),
        (_with(None), 422, "bad_dtype", "inputs[0][0][3][5] is null, expected a number"),
        (_with({}), 422, "bad_dtype", "is an object, expected a number"),
        (_with(float("inf")), 422, "non_finite", "inputs[0][0][3][5] is inf"),
        (_with(float("nan"), row=2), 422, "non_finite", "inputs[2][0][3][5] is nan"),
        (_with(1e39), 422, "out_of_range", "inputs[0][0][3][5] = 1e+39 is outside the range of the pack's float32"),
        (_with(10**400, row=1), 422, "out_of_range", "inputs[1][0][3][5] is an integer too large"),
        ([_image()] * 5, 413, "too_large", "5 rows, more than the 4"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.bool), 422, "bad_dtype", "a tensor of torch.bool"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.complex64), 422, "bad_dtype", "a tensor of torch.complex64"),
        (torch.zeros(2, 8, 8), 422, "bad_shape", "got a tensor of shape [2, 8, 8]"),
        (torch.full((1, 1, 8, 8), float("nan")), 422, "non_finite", "inputs[0][0][0][0] is nan"),
    ],
)
def test_inputs_to_tensor_refuses(inputs, status, reason, words):
    with pytest.raises(RequestError) as caught:
        inputs_to_tensor(inputs, (1, 8, 8), torch.float32, max_rows=4)
    assert (caught.value.status, caught.value.reason) == (status, reason)
    assert words in caught.value.message and "\n" not in caught.value.message


def test_inputs_to_tensor_accepts_numbers_tensors_and_arrays():
    numpy = pytest.importorskip("numpy")
    nested = [[[[1, 2.5, -3, 0, 1e-3, 7, 8, 9]] * 8]]
    expected = torch.tensor(nested, dtype=torch.float64).to(torch.float16)
    for inputs in (nested, torch.tensor(nested, dtype=torch.float64), numpy.array(nested, dtype=numpy.int64) * 0 + 1):
        tensor = inputs_to_tensor(inputs, (1, 8, 8), torch.float16, max_rows=4)
        assert tensor.dtype == torch.float16 and tensor.shape == (1, 1, 8, 8)
    assert torch.equal(inputs_to_tensor(nested, (1, 8, 8), torch.float16, max_rows=4), expected)
    with pytest.raises(RequestError, match="outside the range of the pack's float16"):
        inputs_to_tensor([[[[70000.0] * 8] * 8]], (1, 8, 8), torch.float16, max_rows=4)


def test_serve_config_refuses_bad_options():
    for bad, words in [
        ({"max_batch": 0}, "max_batch must be an integer of at least 1, got 0"),
        ({"batch_wait_ms": -1}, "batch_wait_ms must be a finite number of at least 0"),
        ({"batching": "random"}, "batching must be one of ['mixed', 'by_task']"),
        ({"input_shape": (1, 0)}, "input_shape must be positive integers"),
        ({"max_rows": True}, "max_rows must be an integer"),
        ({"watch_s": True}, "watch_s must be a finite number of at least 0, got True"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            ServeConfig(**bad)


@pytest.fixture(scope="module")
def served(packs):
    return load_served_pack(packs["a"], "cpu")


def test_load_served_pack_describes_and_refuses(packs, served, tmp_path):
    assert served.num_tasks == 5 and served.input_shape == (1, 8, 8) and served.dtype == torch.float32
    assert served.output_shapes == [(2,)] * 5 and served.sha256 == packs["sha_a"]
    assert served.describe_tasks()[1] == {"task": 2, "input_shape": [1, 8, 8], "output_shape": [2], "output_size": 2}
    with pytest.raises(ValueError, match=r"input shape \[3, 8, 8\] was given but the pack records \[1, 8, 8\]"):
        load_served_pack(packs["a"], "cpu", input_shape=(3, 8, 8))
    truncated = tmp_path / "truncated.pack"
    truncated.write_bytes(packs["a"].read_bytes()[:-100])
    with pytest.raises(packnet.PackFormatError, match="truncated or corrupt"):
        load_served_pack(truncated, "cpu")


def _pending(data, task: int, rows: int, seed: int) -> _Pending:
    images = data[task - 1].test_x
    index = torch.randint(len(images), (rows,), generator=torch.Generator().manual_seed(seed))
    return _Pending(task, images[index])


def test_run_batch_mixed_and_by_task_match_offline_runs(data, packs, served):
    requests = [_pending(data, 1 + i % 5, 1 + i % 3, i) for i in range(17)]
    for mixed in (True, False):
        results, report = run_batch(served, requests, mixed=mixed)
        assert (report.requests, report.tasks) == (17, 5)
        assert report.rows == sum(len(r.inputs) for r in requests)
        for request, result in zip(requests, results, strict=True):
            assert_matches(result, offline(packs["model_a"], request.inputs, request.task), request.task)


class _FailsOnMarker(nn.Module):
    """The served model, but raising when any input equals the marker: a failure only one request causes."""

    MARKER = 0.123

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, task=None):
        if bool((x == self.MARKER).any()):
            raise RuntimeError("a marked input\nsecond line")
        return self.model(x, task=task)


def test_run_batch_failures_stay_with_their_request(data, packs, served):
    """A forward that raises, outputs that are not finite, a task the reloaded pack lacks: each fails alone."""
    requests = [_pending(data, 1 + i % 5, 2, i) for i in range(6)]
    poisoned = _Pending(3, torch.full((1, 1, 8, 8), _FailsOnMarker.MARKER))
    overflowing = _Pending(2, torch.full((2, 1, 8, 8), 3e38))
    vanished = _Pending(6, requests[0].inputs)
    batch = [requests[0], poisoned, *requests[1:3], overflowing, vanished, *requests[3:]]
    failing = dataclasses.replace(served, model=_FailsOnMarker(served.model))
    for mixed in (True, False):
        results, report = run_batch(failing, batch, mixed=mixed)
        assert report.requests == len(batch) - 1  # the vanished task's request never reaches a forward
        errors = {index: result for index, result in enumerate(results) if isinstance(result, RequestError)}
        assert sorted(errors) == [1, 4, 5]
        assert (errors[1].status, errors[1].reason) == (500, "internal")
        assert errors[1].message == "task 3: the forward failed: RuntimeError: a marked input"
        assert (errors[4].status, errors[4].reason) == (422, "non_finite_output")
        assert "rows [0, 1]" in errors[4].message
        assert (errors[5].status, errors[5].reason) == (409, "pack_changed")
        for index, request in enumerate(batch):
            if index not in errors:
                assert_matches(results[index], offline(packs["model_a"], request.inputs, request.task), request.task)


def test_serve_metrics_histograms_and_counters():
    from packnet.serve import BatchReport

    metrics = ServeMetrics()
    for requests, tasks in [(1, 1), (3, 2), (20, 5), (600, 5)]:
        metrics.record_batch(BatchReport(requests=requests, rows=2 * requests, tasks=tasks), forward_ms=0.3 * tasks)
    metrics.record_served(2, 3.5)
    metrics.record_served(2, 700.0)
    metrics.record_rejected("unknown_task")
    metrics.record_reload(False)
    snapshot = metrics.as_dict()
    batches = snapshot["batch_requests"]
    assert batches["count"] == 4 and batches["sum"] == 624
    assert batches["counts"][0] == 1 and batches["counts"][2] == 1 and batches["counts"][5] == 1
    assert batches["counts"][-1] == 1  # 600 is above the last boundary (512)
    assert snapshot["tasks_per_batch"]["counts"][:5] == [1, 1, 0, 0, 2]
    assert snapshot["forward_ms"]["counts"][:5] == [0, 0, 1, 1, 2] and snapshot["forward_ms"]["count"] == 4
    assert snapshot["latency_ms"]["2"]["count"] == 2 and snapshot["served"] == {"2": 2}
    assert snapshot["rejected"] == {"unknown_task": 1} and snapshot["reloads"] == {"accepted": 0, "refused": 1}


def test_app_builder_parses_its_arguments(packs):
    pytest.importorskip("ray.serve")
    from packnet.serve import app_builder

    app = app_builder({"pack": str(packs["a"]), "max_batch": "8", "batching": "by-task", "input_shape": "1,8,8"})
    deployment = app._bound_deployment
    config = deployment.init_args[1]
    assert (config.max_batch, config.batching, config.input_shape) == (8, "by_task", (1, 8, 8))
    assert deployment.init_args[0] == str(packs["a"])
    from_config = app_builder({"pack": str(packs["a"]), "input_shape": [1, 8, 8], "access_log": False, "max_batch": 4})
    config = from_config._bound_deployment.init_args[1]
    assert (config.input_shape, config.max_batch) == ((1, 8, 8), 4)
    assert from_config._bound_deployment._deployment_config.logging_config["enable_access_log"] is False
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['max_batches'\]"):
        app_builder({"pack": str(packs["a"]), "max_batches": "8"})
    with pytest.raises(ValueError, match="max_batch='eight' does not parse"):
        app_builder({"pack": str(packs["a"]), "max_batch": "eight"})


# ------------------------------------------------------------------------------------------------- the live server
def _env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _processes_of(ray_tmpdir: str) -> list[int]:
    """Ids of the processes whose environment has ``RAY_TMPDIR=ray_tmpdir``: the server and its Ray."""
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


@dataclasses.dataclass
class Server:
    port: int
    gcs_address: str
    process: subprocess.Popen
    ray_tmpdir: str
    pack_path: Path
    output: list[str]
    metrics_port: int

    def request(self, method: str, path: str, body=None, headers=None, timeout=HTTP_TIMEOUT_S):
        """``(status, parsed JSON, raw body)`` of one request on a fresh connection to 127.0.0.1."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if body is not None and not isinstance(body, (bytes, str)) and not hasattr(body, "__iter__"):
                body = json.dumps(body)
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        return response.status, json.loads(raw) if raw else None, raw

    def predict(self, task, inputs, prefix=""):
        return self.request("POST", prefix + "/predict", json.dumps({"task": task, "inputs": inputs}))

    def stats(self, prefix="") -> dict:
        status, document, _ = self.request("GET", prefix + "/stats")
        assert status == 200
        return document


@pytest.fixture(scope="module")
def server(packs):
    pytest.importorskip("ray.serve")
    # A short directory: Ray's socket paths under it must stay within the 107 characters a Unix socket allows.
    ray_tmpdir = tempfile.mkdtemp(prefix="pn-serve-", dir="/tmp")
    pack_path = Path(ray_tmpdir) / "served.pack"
    shutil.copyfile(packs["a"], pack_path)
    port, metrics_port = _free_port(), _free_port()
    env = {**_env_with_repo(), "RAY_TMPDIR": ray_tmpdir, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "packnet", "serve", str(pack_path), "--port", str(port)]
    command += ["--max-request-bytes", "65536", "--max-rows", "64", "--watch", "0.5", "--no-access-log"]
    command += ["--max-batch", "32", "--batch-wait-ms", "10", "--num-cpus", "2", "--metrics-port", str(metrics_port)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output: list[str] = []
    ready = threading.Event()

    def read_output() -> None:
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if line.startswith("serving "):
                ready.set()

    threading.Thread(target=read_output, daemon=True).start()
    try:
        deadline = time.monotonic() + STARTUP_S
        while not ready.wait(0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"packnet serve did not start (exit {process.poll()}):\n" + "\n".join(output[-40:]))
        match = re.search(r"Ray at (\S+);", next(line for line in output if line.startswith("serving ")))
        yield Server(port, match.group(1), process, ray_tmpdir, pack_path, output, metrics_port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        deadline = time.monotonic() + 20
        while _processes_of(ray_tmpdir) and time.monotonic() < deadline:
            time.sleep(0.25)
        for pid in _processes_of(ray_tmpdir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


class Driver:
    """tests/_serve_driver.py joined to the server's Ray: Ray Serve handle calls, one JSON line each way."""

    def __init__(self, server: Server):
        env = {**_env_with_repo(), "RAY_TMPDIR": server.ray_tmpdir, "RAY_AUTH_MODE": "disabled"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_serve_driver.py"), server.gcs_address],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._reply(STARTUP_S) == {"ready": True}

    def _read(self) -> None:
        for line in self.process.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def _reply(self, timeout: float):
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the Ray driver did not answer within {timeout} s")
        if reply is None:
            pytest.fail(f"the Ray driver exited ({self.process.poll()})")
        return reply

    def __call__(self, op: str, timeout: float = 2 * HTTP_TIMEOUT_S, **fields):
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self._reply(timeout)

    def close(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def driver(server):
    joined = Driver(server)
    try:
        yield joined
    finally:
        joined.close()


def test_tasks_healthz_and_routes(server, packs):
    status, document, _ = server.request("GET", "/tasks")
    assert status == 200 and document["dtype"] == "float32"
    assert document["tasks"] == [
        {"task": t, "input_shape": [1, 8, 8], "output_shape": [2], "output_size": 2} for t in range(1, 6)
    ]
    status, health, _ = server.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["sha256"] == packs["sha_a"]
    assert (health["num_tasks"], health["device"], health["batching"]) == (5, "cpu", "mixed")
    status, document, _ = server.request("GET", "/predict")
    assert status == 405 and document == {"error": "/predict takes POST, not GET"}
    status, document, _ = server.request("POST", "/nowhere", b"{}")
    assert status == 404 and "no route /nowhere" in document["error"]


def _concurrently(calls, clients=10):
    """Run the callables from ``clients`` threads at once; their results in order."""
    results = [None] * len(calls)
    next_index = iter(range(len(calls)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            results[index] = calls[index]()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HTTP_TIMEOUT_S * 2)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    return results


def test_every_response_equals_the_offline_per_task_run(server, packs, data):
    """Requests of all five tasks at once, 1-3 rows each, batched together: each gets its own task's outputs."""
    before = server.stats()["metrics"]
    cases = []
    for i in range(60):
        task = 1 + i % 5
        images = data[(i * 7) % 5].test_x  # any task's images: the task, not the data, picks the head
        inputs = images[torch.randint(len(images), (1 + i % 3,), generator=torch.Generator().manual_seed(i))]
        cases.append((task, inputs.tolist()))
    answers = _concurrently([lambda task=task, inputs=inputs: server.predict(task, inputs) for task, inputs in cases])
    for (task, inputs), (status, document, raw) in zip(cases, answers, strict=True):
        assert status == 200, raw
        assert document["task"] == task
        others = {t: offline(packs["model_a"], inputs, t) for t in range(1, 6) if t != task}
        assert_matches(document["outputs"], offline(packs["model_a"], inputs, task), task, others)
    after = server.stats()["metrics"]
    mixed_batches = sum(after["tasks_per_batch"]["counts"][1:]) - sum(before["tasks_per_batch"]["counts"][1:])
    assert mixed_batches >= 1, "no batch held more than one task: the requests were not batched together"
    served = {task: after["served"].get(task, 0) - before["served"].get(task, 0) for task in "12345"}
    assert served == {task: 12 for task in "12345"}
    assert after["latency_ms"]["3"]["count"] >= 12


def test_handle_predict_for_python_callers(server, packs, data, driver):
    inputs = data[2].test_x[:5]
    for task in (1, 5):
        reply = driver("predict", task=task, inputs=inputs.tolist())
        assert reply["ok"]["type"] == "Tensor" and reply["ok"]["dtype"] == "torch.float32", reply
        assert_matches(reply["ok"]["outputs"], offline(packs["model_a"], inputs, task), task)
    assert driver("tasks")["ok"][4] == {"task": 5, "input_shape": [1, 8, 8], "output_shape": [2], "output_size": 2}
    reply = driver("predict", task=9, inputs=inputs.tolist())
    assert reply["request_error"] and (reply["status"], reply["reason"]) == (404, "unknown_task"), reply
    reply = driver("predict", task=1, inputs=inputs[:, 0].tolist())
    assert (reply["status"], reply["reason"]) == (422, "bad_shape")
    assert "a tensor of shape [5, 8, 8]" in reply["message"]


BAD_REQUESTS = [
    (b'{"task": 1, "inputs": [[[[0.5]]]', 400, "malformed_json", "not valid JSON"),
    (b'{"task": 1, "inputs": [[[[NaN]]]]}', 400, "malformed_json", "NaN is not a JSON value"),
    (b'{"task": 1, "inputs": 1e999}', 422, "bad_shape", "got the number inf"),
    (json.dumps({"task": 1, "inputs": _with(1e999)}).replace("Infinity", "1e999"), 422, "non_finite", "is inf"),
    (json.dumps({"task": 7, "inputs": [_image()]}), 404, "unknown_task", "task 7 is not in this pack"),
    (json.dumps({"task": "1", "inputs": [_image()]}), 422, "bad_task", "a string ('1')"),
    (json.dumps({"task": True, "inputs": [_image()]}), 422, "bad_task", "a boolean (true)"),
    (json.dumps({"task": 1, "inputs": _image()}), 422, "bad_shape", "inputs[0] holds 8 items, expected 1"),
    (json.dumps({"task": 1, "inputs": _with("x")}), 422, "bad_dtype", "is a string ('x'), expected a number"),
    (json.dumps({"task": 1, "inputs": _with(True)}), 422, "bad_dtype", "is a boolean (true)"),
    (json.dumps({"task": 1, "inputs": _with(3.5e38)}), 422, "out_of_range", "outside the range"),
    (json.dumps({"task": 1, "inputs": [_image()] * 65}), 413, "too_large", "65 rows, more than the 64"),
    (json.dumps({"task": 1, "inputs": [_image()], "debug": 1}), 400, "bad_request", "unknown field(s) ['debug']"),
]


def test_bad_requests_get_a_4xx_and_one_line(server, packs):
    before = server.stats()["metrics"]["rejected"]
    expected_counts: dict[str, int] = {}
    for body, status, reason, words in BAD_REQUESTS:
        got, document, raw = server.request("POST", "/predict", body, {"Content-Type": "application/json"})
        assert got == status, (body[:80], raw)
        assert set(document) == {"error"} and words in document["error"], (body[:80], raw)
        assert "\n" not in document["error"]
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    after = server.stats()["metrics"]["rejected"]
    counted = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    assert {reason: count for reason, count in counted.items() if count} == expected_counts
    status, document, _ = server.predict(2, [_image()])  # the replica is still there and answers
    assert status == 200
    assert_matches(document["outputs"], offline(packs["model_a"], [_image()], 2), 2)


def test_oversized_bodies_get_a_413(server):
    big = json.dumps({"task": 1, "inputs": [_image(0.12345678912345)] * 64})  # ~75 KB, within max_rows
    assert len(big) > 65536
    status, document, _ = server.request("POST", "/predict", big)
    assert status == 413 and document["error"] == (
        f"the body is {len(big)} bytes, more than the 65536 accepted; split the request"
    )
    chunks = (big[i : i + 4096].encode() for i in range(0, len(big), 4096))  # no Content-Length: counted as it streams
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT_S)
    try:
        connection.request("POST", "/predict", body=chunks, encode_chunked=True)
        response = connection.getresponse()
        status, document = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413 and "exceeds the 65536 bytes accepted (counted as it streamed)" in document["error"]


def test_a_bad_request_in_a_batch_fails_alone(server, packs, data):
    """Requests whose outputs overflow (inputs finite, within float32) run in the same batches as good ones: they get
    a 422, every other request its own outputs."""
    overflow = [[[[3e38] * 8] * 8]]
    cases = [(1 + i % 5, data[i % 5].test_x[i : i + 2].tolist()) for i in range(30)]
    cases[3::7] = [(2, overflow)] * len(cases[3::7])
    answers = _concurrently([lambda t=task, x=inputs: server.predict(t, x) for task, inputs in cases])
    for (task, inputs), (status, document, raw) in zip(cases, answers, strict=True):
        if inputs is overflow:
            assert status == 422 and "are not finite in the pack's float32" in document["error"], raw
        else:
            assert status == 200, raw
            assert_matches(document["outputs"], offline(packs["model_a"], inputs, task), task)


def _wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_reload_of_a_changed_pack_is_refused_unless_it_validates(server, packs, data, driver):
    """The watcher (--watch 0.5) sees each change of the file. A truncated pack and a file that is no pack are
    refused and the old pack goes on answering; a valid pack (3 tasks) replaces it; the handle's reload agrees."""
    inputs = data[0].test_x[:3].tolist()
    refused = server.stats()["metrics"]["reloads"]["refused"]
    for broken in (packs["b"].read_bytes()[:-64], b"\x00" * 4096):
        with open(server.pack_path, "wb") as handle:  # in place, not atomically: the watcher may see it half written
            handle.write(broken)
        refused = _wait_for(
            lambda r=refused: (n := server.stats()["metrics"]["reloads"]["refused"]) > r and n, "a refused reload"
        )
        status, health, _ = server.request("GET", "/healthz")
        assert status == 200 and health["sha256"] == packs["sha_a"] and health["num_tasks"] == 5
        assert server.stats()["last_reload"]["reloaded"] is False
        status, document, _ = server.predict(5, inputs)
        assert status == 200
        assert_matches(document["outputs"], offline(packs["model_a"], inputs, 5), 5)
    packnet.save_pack(packnet.load_pack(packs["b"]), server.pack_path)  # renamed into place, as save_pack does
    _wait_for(lambda: server.request("GET", "/healthz")[1]["sha256"] == packs["sha_b"], "the valid pack to load")
    status, document, _ = server.request("GET", "/tasks")
    assert [entry["task"] for entry in document["tasks"]] == [1, 2, 3]
    status, document, _ = server.predict(5, inputs)
    assert status == 404 and "holds tasks 1..3" in document["error"]
    status, document, _ = server.predict(3, inputs)
    assert status == 200
    assert_matches(document["outputs"], offline(packs["model_b"], inputs, 3), 3)
    # Back to pack A through the handle's reload, which validates the same way.
    shutil.copyfile(packs["a"], str(server.pack_path) + ".tmp")
    os.replace(str(server.pack_path) + ".tmp", server.pack_path)
    outcome = driver("reload")["ok"]
    assert outcome["sha256"] == packs["sha_a"] and outcome["num_tasks"] == 5  # reloaded here or by the watcher
    assert server.request("GET", "/healthz")[1]["sha256"] == packs["sha_a"]


def _percentile(values, q):
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _load(server, prefix, work, clients, budget_s):
    """``work`` [(task, inputs, expected)] from ``clients`` keep-alive connections within ``budget_s``; returns the
    latencies of the answers and every failure (lost, an error, another task's or a wrong output)."""
    lock = threading.Lock()
    position = iter(range(len(work)))
    latencies, failures = [], []
    deadline = time.monotonic() + budget_s

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT_S)
        while time.monotonic() < deadline:
            with lock:
                index = next(position, None)
            if index is None:
                break
            task, inputs, expected = work[index]
            started = time.perf_counter()
            try:
                connection.request("POST", prefix + "/predict", json.dumps({"task": task, "inputs": inputs}))
                response = connection.getresponse()
                document = json.loads(response.read())
                assert response.status == 200, document
                assert document["task"] == task
                assert_matches(document["outputs"], expected, task)
            except (OSError, http.client.HTTPException, AssertionError, ValueError) as error:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT_S)
                with lock:
                    failures.append(f"request {index} (task {task}): {type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(budget_s + HTTP_TIMEOUT_S)
    return latencies, failures, time.perf_counter() - started


def test_load_mixed_batching_against_batching_by_task(server, packs, data, driver, record_property):
    """20 concurrent clients, 2000 requests over the 5 tasks to the mixed deployment and 600 to the same deployment
    batching by task (deployed beside it at /by-task): none lost, each answered with its own task's outputs."""
    options = {"batching": "by_task", "max_batch": 32, "batch_wait_ms": 10, "access_log": False}
    reply = driver("deploy", pack=str(server.pack_path), name="by-task", route_prefix="/by-task", options=options)
    assert reply == {"ok": True}, reply
    generator = torch.Generator().manual_seed(1)
    tasks = (torch.arange(2000) % 5 + 1)[torch.randperm(2000, generator=generator)].tolist()
    work = []
    for task in tasks:
        images = data[task - 1].test_x
        inputs = images[torch.randint(len(images), (1,), generator=generator)]
        work.append((task, inputs.tolist(), offline(packs["model_a"], inputs, task)))
    figures = {}
    try:
        for name, prefix, count in (("mixed", "", 2000), ("by_task", "/by-task", 600)):
            before = server.stats(prefix)["metrics"]
            latencies, failures, wall = _load(server, prefix, work[:count], clients=20, budget_s=120)
            after = server.stats(prefix)["metrics"]
            assert not failures, f"{name}: {len(failures)} failed, e.g. {failures[:3]}"
            assert len(latencies) == count, f"{name}: {count - len(latencies)} requests lost"
            batches = after["batch_requests"]["count"] - before["batch_requests"]["count"]
            requests = after["batch_requests"]["sum"] - before["batch_requests"]["sum"]
            tasks_per_batch = after["tasks_per_batch"]["sum"] - before["tasks_per_batch"]["sum"]
            assert requests == count
            figures[name] = {
                "p50_ms": round(1000 * _percentile(latencies, 0.5), 1),
                "p99_ms": round(1000 * _percentile(latencies, 0.99), 1),
                "throughput_rps": round(count / wall, 1),
                "requests_per_batch": round(requests / batches, 2),
                "tasks_per_batch": round(tasks_per_batch / batches, 2),
            }
            record_property(name, json.dumps(figures[name]))
        assert figures["by_task"]["tasks_per_batch"] == 1.0
        print(f"\nserve load on 127.0.0.1, 20 clients: {json.dumps(figures)}")
    finally:
        driver("delete", name="by-task")


def test_metrics_reach_rays_prometheus_endpoint(server):
    """The replica's metrics are exported by Ray's metrics agent (reported every few seconds), with their tags."""
    wanted = [
        r'ray_packnet_serve_rejected_total\{[^}]*reason="unknown_task"[^}]*\} [1-9]',
        r'ray_packnet_serve_requests_total\{[^}]*task="3"[^}]*\} [1-9]',
        r'ray_packnet_serve_latency_ms_count\{[^}]*task="5"[^}]*\} [1-9]',
        r"ray_packnet_serve_batch_requests_count\{[^}]*application=\"packnet\"[^}]*\} [1-9]",
        r"ray_packnet_serve_tasks_per_batch_bucket\{",
        r"ray_packnet_serve_batch_rows_bucket\{",
        r"ray_packnet_serve_forward_ms_bucket\{",
    ]

    def exported():
        connection = http.client.HTTPConnection("127.0.0.1", server.metrics_port, timeout=HTTP_TIMEOUT_S)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        except OSError:
            return False
        finally:
            connection.close()
        return all(re.search(pattern, text) for pattern in wanted)

    _wait_for(exported, "the packnet_serve metrics on Ray's Prometheus endpoint", timeout=60)


def test_sigterm_stops_the_server_and_every_ray_process(server, driver):
    """Last: SIGTERM makes ``packnet serve`` shut Serve and Ray down and exit 0; no process of its Ray is left."""
    driver.close()
    assert _processes_of(server.ray_tmpdir), "the server's Ray processes cannot be found by RAY_TMPDIR"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, "\n".join(server.output[-30:])
    assert server.output[-1] == "stopped"
    deadline = time.monotonic() + 20
    while _processes_of(server.ray_tmpdir) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not _processes_of(server.ray_tmpdir), "Ray processes outlived packnet serve"
