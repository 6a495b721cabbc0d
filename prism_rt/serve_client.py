"""Client side of ``prism-rt serve``: the request tensors for tritonclient (HTTP or gRPC), the
response decoded, and a server process on free loopback ports (tests, benchmarks, notebooks).

    import tritonclient.http as http
    client = http.InferenceServerClient("127.0.0.1:8000")
    answer = client.infer("prism", request_inputs(http, levels, "Chest X-ray showing …", ["…"], {"steps": 50}))
    images, report = decode(answer)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def request_inputs(module, levels: np.ndarray, prompt: str, targets, params: dict | str | None = None, *,
                   keep_mask=None, edit_mask=None) -> list:
    """The input tensors of one request; ``module``: ``tritonclient.http`` or ``tritonclient.grpc``.
    ``levels``: [H, W] uint16 (an 8-bit image: widen it first, ``levels.astype(np.uint16) * 257``);
    ``keep_mask`` / ``edit_mask`` (optional): [H, W], nonzero = the region (``prism_rt.user_masks``)."""
    levels = np.asarray(levels)
    if levels.dtype != np.uint16:
        raise ValueError(f"levels must be uint16 grey levels (8-bit images × 257), got {levels.dtype}")
    text = params if isinstance(params, str) else json.dumps(params or {})
    tensors = [("image", levels[None], "UINT16"),
               ("prompt", np.array([[prompt.encode()]], dtype=object), "BYTES"),
               ("targets", np.array([[t.encode() for t in targets]], dtype=object), "BYTES"),
               ("params", np.array([[text.encode()]], dtype=object), "BYTES")]
    tensors += [(name, (np.asarray(mask) > 0).astype(np.uint8)[None], "UINT8")
                for name, mask in (("keep_mask", keep_mask), ("edit_mask", edit_mask)) if mask is not None]
    inputs = []
    for name, array, dtype in tensors:
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def decode(answer) -> tuple[np.ndarray, dict]:
    """(counterfactuals [K·S, H, W] uint16, the result JSON) of one response."""
    report = json.loads(answer.as_numpy("result").reshape(-1)[0])
    return answer.as_numpy("counterfactuals")[0], report


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ServerProcess:
    """``prism-rt serve`` in a child process on free loopback ports; a context manager that waits
    for Triton's ``/v2/health/ready`` and stops the server (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, model, *extra: str, log: str | os.PathLike | None = None, ready_timeout_s: float = 120.0):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.command = [sys.executable, "-m", "prism_rt.cli", "serve", "--model", str(model), "--http-port",
                        str(self.http_port), "--grpc-port", str(self.grpc_port), "--metrics-port",
                        str(self.metrics_port), *extra]
        self.log_path, self.ready_timeout_s, self.process = log, ready_timeout_s, None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self) -> bool:
        """Triton's ``/v2/health/ready`` and the model's ``/v2/models/prism/ready`` (PyTriton loads
        the model after the server is up, so the server alone answers ready a moment early)."""
        try:
            for path in ("/v2/health/ready", "/v2/models/prism/ready"):
                with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as answer:
                    if answer.status != 200:
                        return False
            return True
        except OSError:
            return False

    def __enter__(self) -> "ServerProcess":
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prism-rt serve did not become ready (exit code {self.process.returncode}; "
                                   f"log: {self.log_path or 'not kept'})")
            time.sleep(0.5)
        return self

    def rss_mb(self) -> float:
        """Resident memory of the server process and its children (Triton, its stub), in MB."""
        pids, total = [self.process.pid], 0
        for pid in pids:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                pids.extend(int(c) for c in children)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __exit__(self, *exc) -> None:
        self.stop()
