"""``prism-export export``: checkpoint → ONNX engine folder. Kept apart from ``cli.py`` so the
subcommand's options and error handling sit next to each other and the CLI file stays small."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prism_rt.config import BlendMaps
from prism_rt.precision import CHOICES, Precision


def add_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a checkpoint to an ONNX engine folder (graphs, tokenizer, manifest)")
    p.add_argument("--model", required=True, help="diffusers SD v1.x folder or single-file .safetensors checkpoint")
    p.add_argument("--unet-weights", type=Path, help="fine-tuned UNet state dict (e.g. PRISM's model.safetensors)")
    p.add_argument("--config", type=Path, help="diffusers SD folder giving configs and tokenizer for a single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickle weights (they can execute code)")
    p.add_argument("--self-max-queries", type=int, default=32 * 32,
                   help="self-attention layers with at most this many queries are controlled; compiled into the UNet "
                        "(PRISM 1024, prompt-to-prompt 256)")
    p.add_argument("--blend-maps", choices=[m.value for m in BlendMaps], default=BlendMaps.AFTER_CONTROL.value,
                   help="the cross-attention maps the UNet returns for LocalBlend: after control (refine, reweight: "
                        "what the published prompt-to-prompt reads; default) or each item's own, before control")
    p.add_argument("--blend-downsample", type=int, choices=(1, 2, 4, 8), default=None,
                   help="LocalBlend reads the cross-attention maps at 1/N of the latent side (default 4: SD v1.5's 16×16 "
                        "maps at 512 px; the nearest size the UNet has); small models whose quarter-side maps are "
                        "coarser than 8×8 localise better at 2")
    p.add_argument("--max-edits", type=int, default=5,
                   help="edit items per image in one UNet call that TensorRT's profiles are built for (default 5: one "
                        "edit × five self values); recorded in the manifest, overridable at load (--trt-max-edits)")
    p.add_argument("--max-groups", type=int, default=1, help="images per UNet call the profiles are built for (default 1)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest UNet batch of the profiles (default 2·groups·(1 + edits): every item with its "
                        "unconditional half)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--parity-tolerance", type=float, default=1e-3,
                   help="fail if a graph differs from torch by more than this (max abs error / max |torch output|)")
    p.add_argument("--out", type=Path, required=True, help="the engine folder to create (must not exist, or be empty)")
    add_variant_options(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return p


def _precisions(text: str) -> tuple[Precision, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in CHOICES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"precisions are a comma-separated subset of {','.join(CHOICES)}; got {text!r}")
    return tuple(Precision(v) for v in values)


def _graphs(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_variant_options(p: argparse.ArgumentParser, default_precision: str = "fp32") -> None:
    from .variant_config import FP16_GRAPHS_DEFAULT, VariantSettings

    d = VariantSettings()
    p.add_argument("--precision", type=_precisions, default=_precisions(default_precision),
                   help="comma-separated variants to write side by side: fp32 (the reference, always written by "
                        "export), fp16, int8 (symmetric Q/DQ UNet for TensorRT), int8-cpu (u8/s8 UNet for onnxruntime "
                        "on x86)")
    p.add_argument("--fp16-graphs", type=_graphs, default=FP16_GRAPHS_DEFAULT,
                   help=f"graphs converted in the fp16 variant (default {','.join(FP16_GRAPHS_DEFAULT)}); the others stay fp32")
    p.add_argument("--fp16-fp32-ops", type=_ops, default=d.fp16_fp32_ops,
                   help="op types the fp16 graphs keep in float32, comma-separated, or 'none' (default %(default)s: "
                        "normalisations and softmax, where fp16 overflows first)")
    p.add_argument("--calibration-images", type=Path, default=None,
                   help="folder of PNG/JPEG/DICOM radiographs (+ optional captions.json) whose inversion and edit "
                        "trajectories calibrate int8 and measure every variant's quality (default: the built-in set, "
                        "pydicom-data's RG1_UNCR.dcm and phantom patients)")
    p.add_argument("--calibration-count", type=int, default=d.calibration_count, help="images used (default %(default)s)")
    p.add_argument("--calibration-steps", type=int, default=d.calibration_steps,
                   help="DDIM steps of the calibration/quality runs (default %(default)s; use ~5 at SD v1.5 size on a CPU)")
    p.add_argument("--calibration-samples", type=int, default=d.calibration_samples,
                   help="UNet calls kept for int8 calibration, evenly spread (default %(default)s)")
    p.add_argument("--calibration-self-replace", type=lambda s: tuple(float(v) for v in s.split(",") if v),
                   default=d.self_replace, help="self-window sweep of the calibration edits (default PRISM's 0.4…0.8)")
    p.add_argument("--int8-float-scopes", type=_graphs, default=d.int8_float_scopes,
                   help="UNet module scopes whose Conv/MatMul/Gemm stay float in int8 / int8-cpu, comma-separated torch "
                        "module paths or their parts (default %(default)s; add e.g. up_blocks.3 for less error, "
                        "at a cost in speed)")
    p.add_argument("--int8-cpu-smoothing", type=_alpha, default=d.int8_cpu_smoothing,
                   help="int8-cpu: SmoothQuant migration strength α of the per-channel rescaling folded into its Q/DQ "
                        "scales (default %(default)s; 'off': no rescaling, more error, same speed)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads of the calibration/quality runs")


def _ops(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() in ("none", "off", "") else _graphs(text)


def _alpha(text: str) -> float | None:
    if text.strip().lower() in ("off", "none", "no"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number in [0, 1] nor 'off'") from None


def variant_settings(args):
    from .variant_config import VariantSettings

    return VariantSettings(fp16_graphs=tuple(args.fp16_graphs), fp16_fp32_ops=tuple(args.fp16_fp32_ops),
                           calibration_images=args.calibration_images,
                           calibration_count=args.calibration_count, calibration_steps=args.calibration_steps,
                           calibration_samples=args.calibration_samples,
                           self_replace=tuple(args.calibration_self_replace), threads=args.threads,
                           int8_float_scopes=tuple(args.int8_float_scopes),
                           int8_cpu_smoothing=args.int8_cpu_smoothing)


def add_variants_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("variants", help="add fp16 / int8 / int8-cpu variants (with measured quality) to an engine folder")
    p.add_argument("--engine", type=Path, required=True, help="an engine folder written by `prism-export export`")
    add_variant_options(p, default_precision="fp16,int8,int8-cpu")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return p


def _needs(*modules) -> str | None:
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return (f"error: prism-export needs the '{module}' package; install it with: "
                    "pip install 'prism-rt[export]'")
    return None


def run_variants(args) -> int:
    message = _needs("onnx", "onnxruntime", "skimage")
    if message:
        print(message, file=sys.stderr)
        return 2
    from prism_rt.errors import PrismError

    from .variants import add_variants

    try:
        variants = add_variants(args.engine, args.precision, variant_settings(args),
                                progress=lambda line: print(line, flush=True))
    except PrismError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"the engine {args.engine} now holds fp32, {', '.join(variants)}; run one with: "
          f"prism-rt edit --model {args.engine} --backend onnxruntime --precision {args.precision[-1]} …")
    return 0


def run_export(args) -> int:
    variants = [p for p in args.precision if not p.is_reference]
    message = _needs("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime",
                     *(("skimage",) if variants else ()))
    if message:
        print(message, file=sys.stderr)
        return 2
    from prism_rt.errors import PrismError

    from .onnx_export import export_engine

    try:
        settings = variant_settings(args) if variants else None  # bad settings fail before the export
        from prism_rt.deployment import Deployment

        deployment = Deployment(max_edits=args.max_edits, max_groups=args.max_groups, max_batch=args.max_batch)
        out = export_engine(args.model, args.out, unet_weights=args.unet_weights, config=args.config,
                            allow_pickle=args.allow_pickle, self_max_queries=args.self_max_queries, opset=args.opset,
                            blend_maps=args.blend_maps, blend_downsample=args.blend_downsample,
                            parity_tolerance=args.parity_tolerance, progress=lambda line: print(line, flush=True),
                            precisions=variants, variant_settings=settings, deployment=deployment)
    except PrismError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote the engine folder {out}; run it with: prism-rt edit --model {out} --backend onnxruntime …")
    return 0


def run_cpu_graphs(args) -> int:
    message = _needs("onnx", "onnxruntime")
    if message:
        print(message, file=sys.stderr)
        return 2
    from prism_rt.errors import PrismError

    from .onnx_export import add_cpu_graphs

    try:
        added = add_cpu_graphs(args.engine, progress=lambda line: print(line, flush=True), replace=args.replace)
    except PrismError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{'wrote' if args.replace else 'added'} CPU twins of {', '.join(added)} to {args.engine}" if added else
          f"{args.engine} already has the CPU twins of every graph that has attention to fuse")
    return 0
