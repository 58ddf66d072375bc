"""A Ray driver for tests/test_serve.py, run as its own process: ``python tests/_serve_driver.py GCS_ADDRESS``.

It joins the server's Ray (a fresh interpreter, so Ray's node address is chosen as the server's was: 127.0.0.1)
and answers one JSON command per line on stdin with one JSON line on stdout, through Ray Serve handles:

- ``{"op": "predict", "task": T, "inputs": [...], "app": "packnet"}``: ``handle.predict`` on a float32 tensor;
- ``{"op": "tasks"}``, ``{"op": "reload"}``: ``handle.tasks`` / ``handle.reload``;
- ``{"op": "deploy", "pack": PATH, "name": N, "route_prefix": P, "options": {...}}``: ``serve.run(build_app(...))``;
- ``{"op": "delete", "name": N}``: ``serve.delete``.

A failure answers ``{"error": class name, "request_error": bool, "status", "reason", "message"}``; the test process
itself never imports Ray's driver machinery.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported, as packnet.serve.start does

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from packnet.serve import RequestError, build_app  # noqa: E402

TIMEOUT_S = 120


def run(command: dict):
    op = command["op"]
    if op == "deploy":
        app = build_app(command["pack"], **command.get("options", {}))
        serve.run(app, name=command["name"], route_prefix=command["route_prefix"], blocking=False)
        return True
    if op == "delete":
        serve.delete(command["name"])
        return True
    handle = serve.get_app_handle(command.get("app", "packnet"))
    if op == "predict":
        inputs = torch.tensor(command["inputs"], dtype=torch.float32)
        outputs = handle.predict.remote(command["task"], inputs).result(timeout_s=TIMEOUT_S)
        return {"type": type(outputs).__name__, "dtype": str(outputs.dtype), "outputs": outputs.tolist()}
    if op == "tasks":
        return handle.tasks.remote().result(timeout_s=TIMEOUT_S)
    if op == "reload":
        return handle.reload.remote().result(timeout_s=TIMEOUT_S)
    raise ValueError(f"unknown op {op!r}")


def main() -> int:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            reply = {"ok": run(json.loads(line))}
        except Exception as error:  # noqa: BLE001 - every failure goes back to the test as data
            reply = {
                "error": type(error).__name__,
                "request_error": isinstance(error, RequestError),
                "status": getattr(error, "status", None),
                "reason": getattr(error, "reason", None),
                "message": str(getattr(error, "message", error)).splitlines()[0] if str(error) else "",
            }
        print(json.dumps(reply), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
