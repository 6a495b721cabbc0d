"""The prepared GPU check: the torch backend at SD v1.5 size in fp16 on one CUDA device.

    python -m prism_bench.gpu_check OUT_DIR [--steps 50] [--repeats 10]

Measures, in one run: the controlled UNet's step latency at batch 2 (one guided step) and at the
edit batch 2·(1+S) with S = 5 self-window values, fp16 and fp32; diffusers' stock fp16 UNet at
the same batches (the price of the control); one full counterfactual (direct inversion + the
batched five-value sweep, 50 steps) in fp16 and in fp32; and fp16-vs-fp32 parity (UNet noise
relative error, counterfactual PSNR/SSIM). Writes ``OUT_DIR/gpu_check.json``. Random SD v1.5
weights built in code: no download. Meant to finish within 8 minutes on one data-centre GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cuda_time(fn, warmup: int, repeats: int) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    q = np.quantile(times, [0.1, 0.9])
    return {"median_s": float(np.median(times)), "p10_s": float(q[0]), "p90_s": float(q[1]), "repeats": repeats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", type=Path, help="an SD v1.x diffusers folder (default: random SD v1.5 weights)")
    ap.add_argument("--image", type=Path, help="the radiograph to edit (default: pydicom-data's RG1_UNCR.dcm)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device visible to torch", file=sys.stderr)
        return 2
    from prism_rt.config import ControlConfig, RunLimits
    from prism_rt.engine import Engine

    from .suite import environment, graph_inputs

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(None, "cuda"), "rows": [], "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    began = time.perf_counter()

    def save():
        report["wall_s"] = round(time.perf_counter() - began, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from prism_export.tiny import SD15, save_tiny_model

            t0 = time.perf_counter()
            model = save_tiny_model(Path(tmp) / "sd15", SD15)
            report["build_model_s"] = round(time.perf_counter() - t0, 1)
        engines = {p: Engine.load(model, backend="torch", device="cuda", precision=p) for p in ("fp16", "fp32")}
        edit_batch = 2 * (1 + 5)
        noise = {}
        for precision, engine in engines.items():
            for batch in (2, edit_batch):
                inputs = graph_inputs(engine.backend, engine.tokenizer, "unet", batch, rng=np.random.default_rng(batch))
                timing = _cuda_time(lambda: engine.backend.run("unet", **inputs), 3, args.repeats)
                noise[(precision, batch)] = engine.backend.to_numpy(engine.backend.run("unet", **inputs)["noise"])
                report["rows"].append({"what": "controlled UNet step", "precision": precision, "batch": batch, **timing})
            save()
        import copy  # a copy: the fp32 engine's graphs share this module and run again below

        unet = copy.deepcopy(engines["fp32"].backend.components.unet).to("cuda", torch.float16)
        info = engines["fp32"].backend.info
        for batch in (2, edit_batch):
            latents = torch.randn(batch, 4, info.latent_size, info.latent_size, device="cuda", dtype=torch.float16)
            text = torch.randn(batch, 77, info.text_width, device="cuda", dtype=torch.float16)
            t = torch.tensor([501.0], device="cuda")
            with torch.no_grad():
                timing = _cuda_time(lambda: unet(latents, t, encoder_hidden_states=text), 3, args.repeats)
            report["rows"].append({"what": "diffusers stock UNet step", "precision": "fp16", "batch": batch, **timing})
        del unet
        for batch in (2, edit_batch):
            a, b = noise[("fp32", batch)], noise[("fp16", batch)]
            report["rows"].append({"what": "UNet fp16 vs fp32", "batch": batch,
                                   "max_rel": float(np.abs(a - b).max() / np.abs(a).max()),
                                   "rms_rel": float(np.linalg.norm(a - b) / np.linalg.norm(a))})
        save()
        dicom = args.image
        if dicom is None:
            import data_store  # pydicom-data: the real radiograph

            dicom = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
        images = {}
        for precision, engine in engines.items():
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            inversion = engine.invert(dicom, "Chest X-ray showing No Finding, Support Devices", method="direct",
                                      sampler=engine.sampler(steps=args.steps))
            result = engine.edit(inversion, ["Chest X-ray showing No Finding"], ControlConfig(), RunLimits(max_batch=63))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            images[precision] = np.stack([np.clip((e.mean(0) + 1) / 2, 0, 1) for e in result.edits])
            report["rows"].append({"what": "one counterfactual (direct inversion + 5-value sweep in one batch)",
                                   "precision": precision, "steps": args.steps, "seconds": seconds,
                                   "unet_items": inversion.meta["counts"]["unet_items"] + result.counts["unet_items"],
                                   "device_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
            save()
        pairs = list(zip(images["fp32"], images["fp16"]))
        row = {"what": "counterfactual fp16 vs fp32", "max_abs": max(float(np.abs(a - b).max()) for a, b in pairs)}
        from prism_rt.errors import MissingExtraError
        from prism_rt.metrics import psnr

        row["psnr_db_min"] = min(psnr(a, b) for a, b in pairs)
        try:
            from prism_rt.metrics import ssim

            row["ssim_min"] = min(ssim(a, b) for a, b in pairs)
        except MissingExtraError:  # scikit-image is not carried to the GPU machine (size)
            row["note"] = "scikit-image absent: SSIM not computed"
        report["rows"].append(row)
    save()
    print(json.dumps(report["rows"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
