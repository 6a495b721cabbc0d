"""``prism-rt triton-repo ENGINE OUT``: a Triton model repository (Python backend) for teams that run
their own Triton containers. ``OUT/prism/config.pbtxt`` declares the tensors of ``prism-rt serve``
(:mod:`prism_rt.serve_model`: same names, dtypes and dims); ``OUT/prism/1/model.py`` is a
``TritonPythonModel`` that loads the engine once and hands each call's requests to
:class:`~prism_rt.serve_model.EditService` (the checks, grouping and responses of ``serve``).

The container needs ``prism-rt`` importable by Triton's Python stub, and numpy < 2 there where the
stub is built with pybind11 < 2.12 (as nvidia-pytriton 0.7's is; see ``scripts/triton_stub_env.sh``).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from .serve_model import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TARGETS, INPUTS, OPTIONAL_INPUTS, OUTPUTS

MODEL_NAME = "prism"
COPIED_ENGINE = "1/engine"  # relative to the model folder OUT/prism

MODEL_PY = '''"""Triton Python-backend model for PRISM counterfactuals, written by `prism-rt triton-repo`.
Parameters (config.pbtxt): engine (absolute, or relative to this model's folder), precision,
threads, max_pixels, max_targets. Tensors and checks: prism_rt.serve_model."""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from prism_rt.serve_model import INPUTS, OPTIONAL_INPUTS, OUTPUTS, EditService


class TritonPythonModel:
    def initialize(self, args):
        from prism_rt.config import OrtOptions
        from prism_rt.engine import Engine

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = params["engine"]
        if not os.path.isabs(engine_dir):
            engine_dir = os.path.join(args["model_repository"], engine_dir)
        threads = int(params["threads"]) if params.get("threads") else None
        engine = Engine.from_dir(engine_dir, precision=params.get("precision", "fp32"),
                                 options=OrtOptions(threads=threads))
        self.service = EditService(engine, max_pixels=int(params["max_pixels"]),
                                   max_targets=int(params["max_targets"]))

    def execute(self, requests):
        parsed = []
        for request in requests:
            tensors = {}
            for name, _, _ in INPUTS + OPTIONAL_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    tensors[name] = tensor.as_numpy()
            parsed.append(tensors)
        responses = []
        for answer in self.service(parsed):
            if "error" in answer:
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=pb_utils.TritonError(answer["error"])))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, np.asarray(answer[name])) for name, _, _ in OUTPUTS]))
        return responses

    def finalize(self):
        self.service = None
'''


def _dtype(dtype) -> str:
    return "TYPE_STRING" if dtype is bytes else "TYPE_" + np.dtype(dtype).name.upper()


def _tensor(name: str, dtype, dims, optional: bool = False) -> str:
    return (f'  {{\n    name: "{name}"\n    data_type: {_dtype(dtype)}\n    dims: [ {", ".join(map(str, dims))} ]\n'
            + ("    optional: true\n" if optional else "") + "  }")


def config_pbtxt(engine_ref: str, *, precision: str = "fp32", max_batch_size: int = 4, instances: int = 1,
                 threads: int | None = None, queue_delay_us: int = 20_000,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_targets: int = DEFAULT_MAX_TARGETS) -> str:
    """The model's ``config.pbtxt`` (Triton's ModelConfig in protobuf text format)."""
    params = {"engine": engine_ref, "precision": precision, "threads": str(threads or ""),
              "max_pixels": str(max_pixels), "max_targets": str(max_targets)}
    lines = [f'name: "{MODEL_NAME}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join([_tensor(*t) for t in INPUTS] + [_tensor(*t, optional=True) for t in OPTIONAL_INPUTS])
             + "\n]",
             "output [\n" + ",\n".join(_tensor(*t) for t in OUTPUTS) + "\n]"]
    if max_batch_size > 1:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]")
    for key, value in params.items():
        text = json.dumps(value, ensure_ascii=False)
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {text} }}\n}}')
    return "\n".join(lines) + "\n"


def write_repo(engine_dir, out, *, precision: str = "fp32", max_batch_size: int = 4, instances: int = 1,
               threads: int | None = None, copy_engine: bool = False, queue_delay_us: int = 20_000,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_targets: int = DEFAULT_MAX_TARGETS) -> Path:
    """Check ``engine_dir`` (its manifest, for ``precision``), then publish the repository onto
    ``out`` in one step (:func:`prism_rt.publish.staged_dir`). Returns ``out``."""
    from .manifest import load_manifest
    from .publish import staged_dir

    engine_dir = Path(engine_dir).expanduser().resolve()
    load_manifest(engine_dir, precision=precision)
    # staged_dir matches its marker against OUT's own entries: a previous repository is one whose
    # prism/ holds a config.pbtxt (else the nested name, never an entry, refuses a non-empty OUT)
    marker = f"{MODEL_NAME}/config.pbtxt"
    if (Path(out).expanduser() / marker).is_file():
        marker = MODEL_NAME
    with staged_dir(Path(out), marker=marker, flag="OUT") as stage:
        model = stage / MODEL_NAME
        (model / "1").mkdir(parents=True)
        if copy_engine:
            shutil.copytree(engine_dir, model / COPIED_ENGINE, ignore=shutil.ignore_patterns("trt-cache"))
        ref = COPIED_ENGINE if copy_engine else str(engine_dir)
        (model / "config.pbtxt").write_text(config_pbtxt(
            ref, precision=precision, max_batch_size=max_batch_size, instances=instances, threads=threads,
            queue_delay_us=queue_delay_us, max_pixels=max_pixels, max_targets=max_targets))
        (model / "1" / "model.py").write_text(MODEL_PY)
    return Path(out)


def add_triton_repo_parser(sub) -> argparse.ArgumentParser:
    """Register ``prism-rt triton-repo``."""
    from .cli_args import Formatter, common_args, positive

    p = sub.add_parser("triton-repo", help="write a Triton model repository (Python backend) serving the engine as "
                                           "'prism', for your own Triton container",
                       formatter_class=Formatter)
    p.add_argument("engine", type=Path, help="an engine folder from `prism-export export`")
    p.add_argument("out", type=Path, help="the repository to write (OUT/prism/config.pbtxt, OUT/prism/1/model.py)")
    p.add_argument("--precision", default="fp32", help="the engine's variant (`prism-rt info ENGINE` lists them)")
    p.add_argument("--max-batch-size", type=positive, default=4,
                   help="requests Triton's dynamic batcher may gather into one call (1: no dynamic batching)")
    p.add_argument("--queue-delay-us", type=int, default=20_000, help="dynamic batcher's queue delay (microseconds)")
    p.add_argument("--instances", type=positive, default=1, help="model instances (KIND_CPU count)")
    p.add_argument("--threads", type=positive, help="onnxruntime CPU threads per instance (default: every core)")
    p.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--max-targets", type=positive, default=DEFAULT_MAX_TARGETS, help="refuse more edited captions")
    p.add_argument("--copy-engine", action="store_true", help="copy the engine folder into OUT/prism/1/engine")
    common_args(p)
    p.set_defaults(func=cmd_triton_repo)
    return p


def cmd_triton_repo(args) -> int:
    from .errors import SettingsError

    if args.queue_delay_us < 0:
        raise SettingsError(f"--queue-delay-us must be ≥ 0, got {args.queue_delay_us}")
    out = write_repo(args.engine, args.out, precision=args.precision, max_batch_size=args.max_batch_size,
                     instances=args.instances, threads=args.threads, copy_engine=args.copy_engine,
                     queue_delay_us=args.queue_delay_us, max_pixels=args.max_pixels, max_targets=args.max_targets)
    print(f"wrote Triton model repository {out} (model '{MODEL_NAME}'): tritonserver --model-repository {out}")
    return 0
