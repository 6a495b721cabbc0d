"""Which graphs lose most in fp16, with and without the normalisations and softmax kept in fp32.

For each graph of an engine folder: the fp32 graph, its fp16 conversion with every op in fp16, and
with ``--fp32-ops`` (default: prism_export's FP16_FP32_OPS_DEFAULT) kept in fp32, run on the CPU on
the spec's sample inputs (UNet: an edit call of one image × five items); the error of each output
against fp32 (max and rms, relative to the fp32 output's max |value|), and the largest |value| that
enters a kept op in fp32 (how far the graph is from fp16's 65504). On the CPU, onnxruntime computes
ops that lack an fp16 kernel in fp32, so the error measured is fp16 storage between ops; a GPU's
fp16 kernels add their own accumulation error on top.

    python benchmarks/fp16_norms.py ENGINE [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def measure(engine: Path, fp32_ops) -> dict:
    from prism_export.fp16_policy import largest_inputs
    from prism_export.quantization import convert_fp16
    from prism_export.specs import ModelDims, UNetSpec, graph_specs
    from prism_rt.manifest import load_manifest

    manifest = load_manifest(engine)
    raw = manifest.raw
    specs = graph_specs(ModelDims.from_manifest(raw), int(raw["control"]["self_max_queries"]))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in manifest.graphs.items():
            spec = specs[name]
            rng = np.random.default_rng(0)
            feeds = (spec.sample_inputs(rng, uncond=5, groups=1, edits=5) if isinstance(spec, UNetSpec)
                     else spec.sample_inputs(rng, batch=2))
            outputs = [t.name for t in entry.outputs]
            reference = _session(entry.file).run(outputs, feeds)
            row = {"largest_input_to_kept_ops": largest_inputs(entry.file, [feeds], fp32_ops)}
            for policy, ops in (("all_fp16", ()), ("norms_fp32", tuple(fp32_ops))):
                out = Path(tmp) / policy / f"{name}.onnx"
                convert_fp16(entry.file, out, ops)
                got = _session(out).run(outputs, feeds)
                errors = {}
                for o, ref, value in zip(outputs, reference, got):
                    scale = float(np.abs(ref).max()) or 1.0
                    diff = np.abs(value.astype(np.float64) - ref)
                    errors[o] = {"max_rel": float(diff.max() / scale), "rms_rel": float(np.sqrt((diff ** 2).mean()) / scale),
                                 "finite": bool(np.isfinite(value).all())}
                row[policy] = errors
            rows[name] = row
    return {"engine": str(engine), "fp32_ops": list(fp32_ops), "graphs": rows}


def main(argv=None) -> int:
    from prism_export.variant_config import FP16_FP32_OPS_DEFAULT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", type=Path)
    p.add_argument("--fp32-ops", default=",".join(FP16_FP32_OPS_DEFAULT))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = measure(args.engine, tuple(o for o in args.fp32_ops.split(",") if o))
    print(f"| graph | output | all fp16: max rel | rms rel | {', '.join(result['fp32_ops'])} fp32: max rel | rms rel | "
          "max |x| into them |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result["graphs"].items():
        for o in row["all_fp16"]:
            a, b = row["all_fp16"][o], row["norms_fp32"][o]
            print(f"| {name} | {o} | {a['max_rel']:.2e} | {a['rms_rel']:.2e} | {b['max_rel']:.2e} | {b['rms_rel']:.2e} | "
                  f"{row['largest_input_to_kept_ops']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
