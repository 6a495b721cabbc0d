"""``prism-rt serve``: one engine as the model ``prism`` on a Triton Inference Server (PyTriton),
over HTTP, gRPC and Prometheus metrics. Tensors and request checks: :mod:`prism_rt.serve_model`.

Two things about PyTriton 0.7's Python stub (the process Triton runs the model's Python side in)
are handled here, so that no user has to set up their shell for them:

* the stub loads the first ``libpython3.X`` the dynamic loader finds; under an interpreter outside
  the system's (pyenv, conda) that is the system's library, and the stub fails at start
  (``'_thread.RLock' object has no attribute '_recursion_count'``). PyTriton starts
  ``tritonserver`` with a copy of ``os.environ`` and the stub inherits it, so putting this
  interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` in ``os.environ`` before the server starts
  is enough (no re-exec: the variable is read when the stub process starts, not this one).
* the stub is built with pybind11 2.11, which misreads numpy ≥ 2 arrays (every element of a tensor
  becomes its first): it must import numpy < 2. Where this environment has numpy ≥ 2 the stub runs
  in a small environment of its own (``scripts/triton_stub_env.sh``: numpy < 2 plus this
  environment's packages), found by ``--stub-env``, ``$PRISM_RT_TRITON_STUB_ENV`` or
  ``<venv>/triton-stub``; without one, serving is refused before the model loads.

PyTriton 0.7 fails every request of a call when the call raises. A call of requests that all fail
raises (Triton returns each an error whose last line is the reason); in a call that also holds
valid requests, a refused one gets an empty ``counterfactuals`` and ``{"error": …}`` in ``result``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from .cli_args import Formatter, common_args, load_engine, model_args, positive
from .errors import BackendError, MissingExtraError
from .serve_model import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TARGETS, INPUTS, OPTIONAL_INPUTS, OUTPUTS, EditService, RequestError

MODEL_NAME = "prism"
STUB_ENV_VARIABLE = "PRISM_RT_TRITON_STUB_ENV"


def _port(text: str) -> int:
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1…65535, got {value}")
    return value


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Register ``prism-rt serve``."""
    p = sub.add_parser("serve", help="serve the engine as the model 'prism' on a Triton Inference Server (PyTriton)",
                       formatter_class=Formatter)
    model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--http-port", type=_port, default=8000)
    s.add_argument("--grpc-port", type=_port, default=8001)
    s.add_argument("--metrics-port", type=_port, default=8002)
    s.add_argument("--max-batch-size", type=positive, default=4,
                   help="requests Triton's dynamic batcher may gather into one call (1: no dynamic batching)")
    s.add_argument("--queue-delay-us", type=int, default=20_000,
                   help="how long the batcher may hold a request to gather more (microseconds)")
    s.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    s.add_argument("--max-targets", type=positive, default=DEFAULT_MAX_TARGETS, help="refuse more edited captions")
    s.add_argument("--max-batch", type=positive, default=32, help="largest UNet batch of one call")
    s.add_argument("--stub-env", type=Path, help="a Python environment with numpy < 2 for Triton's Python stub "
                                                 f"(default ${STUB_ENV_VARIABLE}, else <venv>/triton-stub)")
    common_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def stub_environment(explicit: Path | None = None) -> Path | None:
    """The environment Triton's Python stub runs in: None (this one) where numpy < 2 here."""
    if int(np.__version__.split(".")[0]) < 2:
        return None
    candidates = [explicit, os.environ.get(STUB_ENV_VARIABLE), Path(sys.prefix) / "triton-stub"]
    for candidate in (Path(c) for c in candidates if c):
        python = candidate / "bin" / "python"
        if not python.exists():
            if candidate == explicit:
                raise BackendError(f"--stub-env {candidate} has no bin/python; create it with "
                                   f"scripts/triton_stub_env.sh {candidate}")
            continue
        found = subprocess.run([str(python), "-c", "import numpy, pytriton; print(numpy.__version__)"],
                               capture_output=True, text=True, timeout=60)
        version = found.stdout.strip()
        if found.returncode == 0 and int(version.split(".")[0]) < 2:
            return candidate
        raise BackendError(f"the Triton stub environment {candidate} must import numpy < 2 and pytriton "
                           f"({found.stderr.strip().splitlines()[-1] if found.returncode else 'numpy ' + version}); "
                           f"recreate it with scripts/triton_stub_env.sh {candidate}")
    raise BackendError(f"numpy {np.__version__} is installed here, and PyTriton 0.7's Python stub misreads numpy ≥ 2 "
                       f"tensors; create a stub environment with `scripts/triton_stub_env.sh {sys.prefix}/triton-stub` "
                       f"(or pass --stub-env / set ${STUB_ENV_VARIABLE})")


def prepare_stub_libpython() -> str:
    """Put this interpreter's libpython first on ``LD_LIBRARY_PATH`` for the processes Triton starts."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and (not current or current[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *(p for p in current if p != libdir)])
    return libdir


def triton_infer(service: EditService):
    """The PyTriton inference callable: a list of requests in, one response dict per request out."""

    def infer(requests):
        responses = service([dict(r.items()) for r in requests])
        errors = [r["error"] for r in responses if "error" in r]
        if errors and len(errors) == len(responses):
            raise RequestError(errors[0] if len(set(errors)) == 1 else " | ".join(sorted(set(errors))))
        return [r if "error" not in r else
                {"counterfactuals": np.zeros((1, 0, 0, 0), np.uint16),
                 "result": np.array([[json.dumps({"error": r["error"]}).encode()]], dtype=object)} for r in responses]

    return infer


def serve(engine, args, *, block: bool = True):
    """Start Triton with ``engine`` bound as :data:`MODEL_NAME`; serve until SIGINT/SIGTERM
    (``block``) or return the running ``Triton`` (call ``.stop()``)."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise MissingExtraError("serve", "nvidia-pytriton", "prism-rt serve") from None
    from .config import RunLimits

    stub_env = stub_environment(args.stub_env)
    prepare_stub_libpython()
    service = EditService(engine, max_pixels=args.max_pixels, max_targets=args.max_targets,
                          limits=RunLimits(max_batch=args.max_batch))
    config = TritonConfig(http_address=args.host, grpc_address=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, exit_timeout_secs=5)
    triton = Triton(config=config)
    triton.bind(model_name=MODEL_NAME, infer_func=triton_infer(service),
                inputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in INPUTS]
                + [Tensor(name=n, dtype=d, shape=s, optional=True) for n, d, s in OPTIONAL_INPUTS],
                outputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in OUTPUTS],
                config=ModelConfig(max_batch_size=args.max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us)),
                strict=False)
    saved = sys.exec_prefix
    try:  # PyTriton runs the stub in the environment at sys.exec_prefix, read as the server starts
        if stub_env is not None:
            sys.exec_prefix = str(stub_env)
        triton.run()
    finally:
        sys.exec_prefix = saved
    if not block:
        return triton
    print(f"serving {engine.model_path} as '{MODEL_NAME}': http {args.host}:{args.http_port}, grpc "
          f"{args.host}:{args.grpc_port}, metrics :{args.metrics_port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops Triton and its stubs as Ctrl-C does
    try:
        while triton.is_alive():
            time.sleep(1.0)
        raise BackendError("the Triton server or its Python stub stopped; see the log above")
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        triton.stop()
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    if args.queue_delay_us < 0:
        raise BackendError(f"--queue-delay-us must be ≥ 0, got {args.queue_delay_us}")
    try:  # refused before the model loads: no PyTriton, or no environment its stub can run in
        import pytriton  # noqa: F401
    except ImportError:
        raise MissingExtraError("serve", "nvidia-pytriton", "prism-rt serve") from None
    stub_environment(args.stub_env)
    serve(load_engine(args), args)
    return 0
