"""One UNet step, side by side in one run: diffusers' stock UNet (torch eager), the controlled
UNet on the torch backend, and the exported controlled UNet on ONNX Runtime.

    python benchmarks/unet_step.py --model MODEL_DIR --engine ENGINE_DIR [--batch 2] [--repeats 5]

Batch 2 is one guided step of one image (an unconditional and a conditional item, no edit items);
``--edits K`` adds K controlled edit items and their unconditional halves (batch 2·(1+K)).
Prints a table and writes JSON rows (median, p10, p90 seconds) to ``--out`` if given.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np


def _time(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q = np.quantile(times, [0.1, 0.9])
    return {"median_s": statistics.median(times), "p10_s": float(q[0]), "p90_s": float(q[1]), "repeats": repeats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--edits", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch

    from prism_rt.torch_backend.checkpoint import load_checkpoint
    from prism_rt.torch_backend.controlled_unet import ControlledUNet

    comps = load_checkpoint(args.model)
    side = comps.image_size // 2 ** (len(comps.vae.config.block_out_channels) - 1)
    k = args.edits
    n = 2 * (1 + k) if k else args.batch
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, side, side, generator=g)
    text = torch.randn(n, 77, comps.text_encoder.config.hidden_size, generator=g)
    t = torch.tensor([501.0])
    controls = dict(cross_alpha=torch.ones(1, k, 77), token_mapper=torch.eye(77).expand(1, k, 77, 77).contiguous(),
                    refine_alpha=torch.ones(1, k, 77), equalizer=torch.ones(1, k, 77), self_replace=torch.ones(1, k))
    rows = []
    stock = comps.unet
    with torch.no_grad():
        rows.append({"name": "torch eager, diffusers stock UNet", **_time(
            lambda: stock(latents, t, encoder_hidden_states=text), args.warmup, args.repeats)})
    import copy

    controlled = ControlledUNet(copy.deepcopy(stock)).eval()
    with torch.no_grad():
        rows.append({"name": "torch eager, controlled UNet", **_time(
            lambda: controlled(latents, t, text, **controls), args.warmup, args.repeats)})
    del controlled, stock, comps
    if args.engine:
        from prism_rt.ort_backend import load_ort_backend

        backend = load_ort_backend(args.engine, device="cpu")
        feeds = dict(latents=latents.numpy(), timestep=t.numpy(), text=text.numpy(),
                     **{name: value.numpy() for name, value in controls.items()})
        rows.append({"name": "onnxruntime CPU, controlled UNet", **_time(
            lambda: backend.run("unet", **feeds), args.warmup, args.repeats)})
    base = rows[0]["median_s"]
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "batch": n, "edits": k, "latent_side": side}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    print(f"UNet step, batch {n} ({k} edit items), latent {side}×{side}: {json.dumps(env)}")
    print(f"{'configuration':40s} {'median s':>9s} {'p10':>7s} {'p90':>7s} {'vs stock':>9s}")
    for row in rows:
        row["speedup_vs_stock"] = base / row["median_s"]
        print(f"{row['name']:40s} {row['median_s']:9.3f} {row['p10_s']:7.3f} {row['p90_s']:7.3f} {row['speedup_vs_stock']:8.2f}×")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
