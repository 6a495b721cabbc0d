"""``prism-export export``: checkpoint → ONNX engine folder. Kept apart from ``cli.py`` so the
subcommand's options and error handling sit next to each other and the CLI file stays small."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a checkpoint to an ONNX engine folder (graphs, tokenizer, manifest)")
    p.add_argument("--model", required=True, help="diffusers SD v1.x folder or single-file .safetensors checkpoint")
    p.add_argument("--unet-weights", type=Path, help="fine-tuned UNet state dict (e.g. PRISM's model.safetensors)")
    p.add_argument("--config", type=Path, help="diffusers SD folder giving configs and tokenizer for a single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickle weights (they can execute code)")
    p.add_argument("--self-max-queries", type=int, default=32 * 32,
                   help="self-attention layers with at most this many queries are controlled; compiled into the UNet "
                        "(PRISM 1024, prompt-to-prompt 256)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--parity-tolerance", type=float, default=1e-3,
                   help="fail if a graph differs from torch by more than this (max abs error / max |torch output|)")
    p.add_argument("--out", type=Path, required=True, help="the engine folder to create (must not exist, or be empty)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def run_export(args) -> int:
    for module in ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            print(f"error: prism-export export needs the '{module}' package; install it with: "
                  "pip install 'prism-rt[export]'", file=sys.stderr)
            return 2
    from prism_rt.errors import PrismError

    from .onnx_export import export_engine

    try:
        out = export_engine(args.model, args.out, unet_weights=args.unet_weights, config=args.config,
                            allow_pickle=args.allow_pickle, self_max_queries=args.self_max_queries, opset=args.opset,
                            parity_tolerance=args.parity_tolerance, progress=lambda line: print(line, flush=True))
    except PrismError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote the engine folder {out}; run it with: prism-rt edit --model {out} --backend onnxruntime …")
    return 0
