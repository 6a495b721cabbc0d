"""Held-out noise error of the int8-cpu UNet for several sets of float scopes (a study, run by hand).

The variant builder's own quality figure is in-sample (measured on its calibration images). This
script records the fp32 engine's UNet calls while it inverts and edits the built-in calibration
images and, apart from them, held-out phantom patients; builds an int8-cpu UNet per scope set from
the calibration calls (the builder's own ``quantize_unet`` + CPU fusion); and reports each one's
rms noise error on three sets of calls: the calibration calls, the other calls of the calibration
trajectories (held apart), and the held-out patients' calls.

    python benchmarks/int8_scopes.py --engine engines/phantom-demo --out out/int8-scopes \
        --set default= --set no_proj=-proj_in,-proj_out

A set is ``name=changes``: comma-separated scopes added to the default float scopes (``up_blocks.3``)
or removed from them (``-proj_in``); empty: the defaults. Results: ``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELD_OUT_SEED0 = 1_000_010  # phantom patients outside training (0…) and calibration (2 000 000…)


def scope_set(spec: str, defaults: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    name, _, changes = spec.partition("=")
    scopes = list(defaults)
    for change in filter(None, (c.strip() for c in changes.split(","))):
        if change.startswith("-"):
            if change[1:] not in scopes:
                raise SystemExit(f"--set {spec!r}: {change[1:]!r} is not a default float scope ({', '.join(defaults)})")
            scopes.remove(change[1:])
        elif change not in scopes:
            scopes.append(change)
    return name, tuple(scopes)


class _Session:
    """The candidate UNet as the ``run`` interface ``noise_error`` expects."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def run(self, graph: str, **feeds):
        return {"noise": self.session.run(["noise"], {k: v for k, v in feeds.items() if k in self.inputs})[0]}


def main(argv=None) -> int:
    from prism_export import variants as V
    from prism_export.cpu_graph import fuse_for_cpu_file
    from prism_rt.engine import Engine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, default=Path("engines/phantom-demo"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", dest="sets", default=[], help="name=changes (see the module docstring)")
    p.add_argument("--calibration-count", type=int, default=4)
    p.add_argument("--held-out", type=int, default=4, help="held-out phantom patients")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=64, help="calibration calls")
    p.add_argument("--size", type=int, default=128, help="image size of the phantoms")
    p.add_argument("--alpha", type=float, default=V.DEFAULT_SMOOTHING_ALPHA)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    sets = dict(scope_set(s, V.UNET_FLOAT_SCOPES) for s in (args.sets or ["default="]))

    settings = V.VariantSettings(calibration_count=args.calibration_count, calibration_steps=args.steps,
                                 calibration_samples=args.samples, threads=args.threads)
    engine = Engine.load(args.engine, backend="onnxruntime", precision="fp32", threads=args.threads)
    calls = V._invert_and_edit(engine, V.default_calibration_items(args.calibration_count, args.size), settings,
                               record=True).unet_calls
    picked = set(V.spread_index(len(calls), args.samples))
    held_out = [V.phantom_item(seed, args.size) for seed in range(HELD_OUT_SEED0, HELD_OUT_SEED0 + args.held_out)]
    groups = {"calibration": [calls[i] for i in sorted(picked)],
              "held_apart": V._spread([c for i, c in enumerate(calls) if i not in picked], 48),
              "held_out": V._spread(V._invert_and_edit(engine, held_out, settings, record=True).unet_calls,
                                    2 * args.samples)}
    del engine
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"engine": str(args.engine), "alpha": args.alpha, "calls": {k: len(v) for k, v in groups.items()},
               "metric": "rms_rel = ||int8-cpu - fp32|| / ||fp32|| of the noise prediction over the calls", "sets": {}}
    for name, scopes in sets.items():
        start = time.perf_counter()
        unet = args.out / name / "unet.onnx"
        unet.parent.mkdir(exist_ok=True)
        V.quantize_unet(args.engine / "onnx" / "unet.onnx", unet, [feeds for feeds, _ in groups["calibration"]],
                        "int8-cpu", scopes, smoothing=args.alpha)
        fuse_for_cpu_file(unet)
        session = _Session(unet, args.threads)
        errors = {k: V.noise_error(session, v)["rms_rel"] for k, v in groups.items()}
        results["sets"][name] = {"float_scopes": list(scopes), "rms_rel": errors,
                                 "seconds": round(time.perf_counter() - start, 1)}
        print(name, "  ".join(f"{k} {100 * e:.2f} %" for k, e in errors.items()), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
