"""``prism-export``: model factories now; the ONNX / TensorRT export stage builds on this CLI."""
from __future__ import annotations

import sys
from pathlib import Path

from .export_cli import add_export_parser, add_variants_parser, run_cpu_graphs, run_export, run_variants
from .train_phantom import add_train_phantom_parser


def main(argv: list[str] | None = None) -> int:
    from prism_rt.cli import Parser

    parser = Parser(prog="prism-export", description="prism_rt export stage")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    tiny = sub.add_parser("tiny-model", help="write an SD-v1.5-layout model with random weights (diffusers layout)")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--preset", choices=["tiny", "sd15"], default="tiny",
                      help="tiny (seconds, for tests) or sd15 (the real 860 M-parameter architecture)")
    tiny.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    tiny.add_argument("--seed", type=int, default=0)
    add_export_parser(sub)
    add_variants_parser(sub)
    add_train_phantom_parser(sub)
    twins = sub.add_parser("cpu-graphs", help="add CPU twins (attention fused for onnxruntime's CPU provider) to an "
                                               "engine folder exported before they existed")
    twins.add_argument("--engine", type=Path, required=True, help="an engine folder written by `prism-export export`")
    twins.add_argument("--replace", action="store_true",
                       help="rewrite the CPU twins the engine already has with this version's fusion (checked the same way)")
    memory = sub.add_parser("memory", help="record each graph's activation memory in an engine folder's manifest "
                                           "(for prism-rt info ENGINE --memory; export does this itself)")
    memory.add_argument("--engine", type=Path, required=True, help="an engine folder written by `prism-export export`")
    bundle = sub.add_parser("bundle-demo", help="a trained phantom model → the bundled demo engine folder")
    bundle.add_argument("--model", type=Path, required=True, help="the folder `prism-export train-phantom` wrote")
    bundle.add_argument("--out", type=Path, default=Path("engines/phantom-demo"))
    bundle.add_argument("--precision", default="fp32,int8-cpu", help="variants to bundle (default fp32,int8-cpu)")
    bundle.add_argument("--calibration-steps", type=int, default=50)
    bundle.add_argument("--blend-downsample", type=int, choices=(1, 2, 4, 8), default=None,
                        help="LocalBlend's maps at 1/N of the latent side (default 4: a quarter, as SD v1.5)")
    args = parser.parse_args(argv)
    if args.command == "export":
        return run_export(args)
    if args.command == "variants":
        return run_variants(args)
    if args.command == "cpu-graphs":
        return run_cpu_graphs(args)
    if args.command == "memory":
        return _run_memory(args)
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError as exc:
        print(f"error: prism-export needs the '{exc.name}' package; install it with: pip install 'prism-rt[export]'",
              file=sys.stderr)
        return 2
    if args.command == "bundle-demo":
        from prism_rt.errors import PrismError

        from .demo_bundle import bundle_demo

        try:
            out = bundle_demo(args.model, args.out, tuple(p for p in args.precision.split(",") if p),
                              calibration_steps=args.calibration_steps, progress=lambda line: print(line, flush=True),
                              blend_downsample=args.blend_downsample)
        except PrismError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"wrote the demo engine {out}; run it with: prism-rt demo --out out/demo")
        return 0
    if args.command == "train-phantom":
        from .train_phantom import run_train_phantom

        return run_train_phantom(args)
    from dataclasses import replace

    from .tiny import SD15, TinySpec, save_tiny_model

    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: --out {args.out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    spec = SD15 if args.preset == "sd15" else TinySpec()
    spec = replace(spec, seed=args.seed, **({"image_size": args.image_size} if args.image_size else {}))
    save_tiny_model(args.out, spec)
    print(f"wrote a {args.preset} SD-v1.5-layout model (random weights) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _run_memory(args) -> int:
    from prism_rt.errors import PrismError
    from prism_rt.manifest import load_manifest

    from .memory_profile import add_memory_records

    try:
        import onnx  # noqa: F401
    except ImportError:
        print("error: prism-export memory needs the 'onnx' package; install it with: pip install 'prism-rt[export]'",
              file=sys.stderr)
        return 2
    try:
        load_manifest(args.engine)  # a folder that matches its manifest, before the manifest is rewritten
        add_memory_records(args.engine, progress=lambda line: print(line, flush=True))
    except PrismError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"recorded; see it with: prism-rt info {args.engine} --memory")
    return 0
