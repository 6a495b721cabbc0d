"""``prism-export``: model factories now; the ONNX / TensorRT export stage builds on this CLI."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prism-export", description="prism_rt export stage")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-model", help="write a tiny SD-v1.5-layout model with random weights (diffusers layout)")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--image-size", type=int, default=128)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError as exc:
        print(f"error: prism-export needs the '{exc.name}' package; install it with: pip install 'prism-rt[export]'",
              file=sys.stderr)
        return 2
    from .tiny import TinySpec, save_tiny_model

    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: --out {args.out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    save_tiny_model(args.out, TinySpec(image_size=args.image_size, seed=args.seed))
    print(f"wrote a tiny SD-v1.5-layout model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
