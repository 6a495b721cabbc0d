"""The prepared GPU check: the torch backend at SD v1.5 size in fp16 on one CUDA device.

    python -m prism_bench.gpu_check OUT_DIR [--steps 50] [--repeats 10] [--dry]

Measures, in one run: the controlled UNet's guided step at batch 2 and at the edit batch
2·(1+S) (one edit × S = 5 self-window values), fp16 eager, fp16 replayed from CUDA graphs, fp16 channels-last (NHWC),
fp32 eager; diffusers' stock fp16 UNet at the same batches and modes (the ratio controlled /
stock is the price of the control); one full counterfactual (direct inversion + the batched
five-value sweep, 50 steps) in fp16 eager, fp16 with CUDA graphs and fp32, with peak device
memory; fp16-vs-fp32 parity (UNet noise relative error, counterfactual PSNR/SSIM). Writes
``OUT_DIR/gpu_check.json`` (after every stage, so a timeout keeps what was measured) and
``OUT_DIR/gpu_check.md`` (the table). Random SD v1.5 weights built in code: no download.
Meant to finish within 8 minutes on one data-centre GPU.

``--dry`` (or ``PRISM_GPU_CHECK_DRY=1``): the same stages on the CPU with the tiny model, 2
steps and 2 repeats, in seconds: the test suite runs it end to end. CUDA graphs are then not
captured (no CUDA): their rows run the same static buffers eagerly and say ``captured: false``;
peak memory is the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SELF_VALUES = 5  # PRISM's self-window sweep, one edit × five values in one batch
EDIT_BATCH = 2 * (1 + SELF_VALUES)
SOURCE = "Chest X-ray showing No Finding, Support Devices"
TARGET = "Chest X-ray showing No Finding"


def _timer(device: str, warmup: int, repeats: int):
    import torch

    def run(fn) -> dict:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        q = np.quantile(times, [0.1, 0.9])
        return {"median_ms": 1000 * float(np.median(times)), "p10_ms": 1000 * float(q[0]),
                "p90_ms": 1000 * float(q[1]), "repeats": repeats}

    return run


class _Memory:
    def __init__(self, device: str):
        self.device = device
        self.of = "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS (CPU dry run)"

    def reset(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        from .memory import peak_rss_mb

        return float(peak_rss_mb() or float("nan"))


def _stock_unet(engine, device: str, dtype):
    """diffusers' own UNet2DConditionModel with the same weights (a copy), no attention control."""
    import copy

    return copy.deepcopy(engine.backend.components.unet).to(device, dtype).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 50; dry: 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10; dry: 2)")
    ap.add_argument("--model", type=Path, help="an SD v1.x diffusers folder (default: random SD v1.5 weights)")
    ap.add_argument("--image", type=Path, help="the radiograph to edit (default: a synthetic chest-like image: the "
                    "weights are random, and pydicom + a DICOM file would not fit the 64 MiB carried to the GPU)")
    ap.add_argument("--dry", action="store_true", default=os.environ.get("PRISM_GPU_CHECK_DRY") == "1",
                    help="CPU, tiny model, 2 steps: the whole check in seconds (also PRISM_GPU_CHECK_DRY=1)")
    args = ap.parse_args(argv)
    import torch

    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; run with --dry for the CPU dry run", file=sys.stderr)
        return 2
    steps = args.steps or (2 if args.dry else 50)
    repeats = args.repeats or (2 if args.dry else 10)
    timed = _timer(device, 1 if args.dry else 3, repeats)
    memory = _Memory(device)
    from prism_rt.config import ControlConfig, RunLimits
    from prism_rt.engine import Engine

    from .suite import environment, graph_inputs

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(None, device), "dry": args.dry, "steps": steps, "memory_of": memory.of,
              "rows": [], "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    began = time.perf_counter()

    def save():
        report["wall_s"] = round(time.perf_counter() - began, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "gpu_check.md").write_text(markdown_table(report))

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from prism_export.tiny import SD15, TinySpec, save_tiny_model

            t0 = time.perf_counter()
            model = save_tiny_model(Path(tmp) / "model", TinySpec() if args.dry else SD15)
            report["build_model_s"] = round(time.perf_counter() - t0, 1)
        engines = {p: Engine.load(model, backend="torch", device=device, precision=p) for p in ("fp16", "fp32")}
        modes = {"fp16": ("eager", "cuda-graph", "channels-last"), "fp32": ("eager",)}
        noise, step_ms = {}, {}
        for precision, engine in engines.items():
            for batch in (2, EDIT_BATCH):
                inputs = graph_inputs(engine.backend, engine.tokenizer, "unet", batch, rng=np.random.default_rng(batch))
                for mode in modes[precision]:
                    engine.backend.cuda_graphs = mode == "cuda-graph"
                    engine.backend.use_channels_last(mode == "channels-last")
                    timing = timed(lambda: engine.backend.run("unet", **inputs))
                    out = engine.backend.to_numpy(engine.backend.run("unet", **inputs)["noise"])
                    noise.setdefault((precision, batch), out)
                    step_ms[("controlled", precision, batch, mode)] = timing["median_ms"]
                    report["rows"].append({"what": "controlled UNet CFG step", "precision": precision, "batch": batch,
                                           "mode": mode, "captured": mode == "cuda-graph" and device == "cuda", **timing})
            engine.backend.cuda_graphs = False
            engine.backend.use_channels_last(False)
            save()
        report["rows"] += _stock_rows(engines["fp32"], device, timed, step_ms)
        for batch in (2, EDIT_BATCH):
            a, b = noise[("fp32", batch)], noise[("fp16", batch)]
            report["rows"].append({"what": "UNet fp16 vs fp32", "batch": batch,
                                   "max_rel": float(np.abs(a - b).max() / np.abs(a).max()),
                                   "rms_rel": float(np.linalg.norm(a - b) / np.linalg.norm(a))})
        save()
        image = args.image or synthetic_radiograph(512)
        images = {}
        for precision, mode in (("fp16", "eager"), ("fp16", "cuda-graph"), ("fp32", "eager")):
            engine = engines[precision]
            engine.backend.cuda_graphs = mode == "cuda-graph"
            memory.reset()
            t0 = time.perf_counter()
            inversion = engine.invert(image, SOURCE, method="direct", sampler=engine.sampler(steps=steps))
            result = engine.edit(inversion, [TARGET], ControlConfig(), RunLimits(max_batch=63))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            images[(precision, mode)] = np.stack([np.clip((e.mean(0) + 1) / 2, 0, 1) for e in result.edits])
            report["rows"].append({"what": "one counterfactual (direct inversion + 5-value sweep in one batch)",
                                   "precision": precision, "mode": mode, "steps": steps, "seconds": seconds,
                                   "values": int(images[(precision, mode)].shape[0]),
                                   "unet_items": inversion.meta["counts"]["unet_items"] + result.counts["unet_items"],
                                   "peak_mb": memory.peak_mb()})
            engine.backend.cuda_graphs = False
            save()
        report["rows"].append(_parity_row("counterfactual fp16 vs fp32", images[("fp32", "eager")], images[("fp16", "eager")]))
        report["rows"].append(_parity_row("counterfactual cuda-graph vs eager (fp16)", images[("fp16", "eager")],
                                          images[("fp16", "cuda-graph")]))
    save()
    print(markdown_table(report))
    return 0


def _stock_rows(engine, device: str, timed, step_ms: dict) -> list[dict]:
    import torch

    from prism_rt.torch_backend.cuda_graphs import GraphedCall

    unet, info, rows = _stock_unet(engine, device, torch.float16), engine.backend.info, []
    stock = lambda latents, timestep, text: unet(latents, timestep, encoder_hidden_states=text).sample  # noqa: E731
    graphed = GraphedCall(stock, capture=device == "cuda")
    for batch in (2, EDIT_BATCH):
        g = torch.Generator().manual_seed(batch)
        inputs = {"latents": torch.randn(batch, 4, info.latent_size, info.latent_size, generator=g).to(device, torch.float16),
                  "timestep": torch.tensor([501.0], device=device),
                  "text": torch.randn(batch, info.max_tokens, info.text_width, generator=g).to(device, torch.float16)}
        for mode, call in (("eager", stock), ("cuda-graph", graphed)):
            with torch.no_grad():
                timing = timed(lambda: call(**inputs))
            ratio = step_ms[("controlled", "fp16", batch, mode)] / timing["median_ms"]
            rows.append({"what": "diffusers stock UNet CFG step", "precision": "fp16", "batch": batch, "mode": mode,
                         "captured": graphed.capture and mode == "cuda-graph", **timing, "controlled_over_stock": ratio})
    del unet, graphed
    return rows


def _parity_row(what: str, reference: np.ndarray, other: np.ndarray) -> dict:
    from prism_rt.errors import MissingExtraError
    from prism_rt.metrics import psnr

    pairs = list(zip(reference, other))
    row = {"what": what, "max_abs": max(float(np.abs(a - b).max()) for a, b in pairs),
           "psnr_db_min": min(float(psnr(a, b)) for a, b in pairs)}
    try:
        from prism_rt.metrics import ssim

        row["ssim_min"] = min(float(ssim(a, b)) for a, b in pairs)
    except MissingExtraError:  # scikit-image is not carried to the GPU machine (size)
        row["note"] = "scikit-image absent: SSIM not computed"
    return row


def synthetic_radiograph(size: int) -> np.ndarray:
    """A deterministic chest-like grey image in [0, 1]: a bright body, two darker lung fields,
    smooth texture. Speed does not depend on the content; parity is measured on it too."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2) ** 2)
    lungs = sum(np.exp(-(((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.27) ** 2) ** 2) for cx in (0.33, 0.67))
    texture = np.random.default_rng(0).standard_normal((size // 16, size // 16))
    texture = np.kron(texture, np.ones((16, 16)))[:size, :size]
    return np.clip(0.15 + 0.7 * body - 0.35 * lungs + 0.03 * texture, 0, 1).astype(np.float32)


COLUMNS = ("what", "precision", "batch", "mode", "captured", "median_ms", "p10_ms", "p90_ms", "controlled_over_stock",
           "seconds", "peak_mb", "max_rel", "rms_rel", "max_abs", "psnr_db_min", "ssim_min")


def markdown_table(report: dict) -> str:
    """The rows as one markdown table (columns that no row has are left out)."""
    rows = report["rows"]
    columns = [c for c in COLUMNS if any(c in r for r in rows)]

    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return "inf" if math.isinf(value) else f"{value:.4g}"
        return str(value)

    env = report["environment"]
    lines = [f"GPU check on {env.get('gpu', env.get('cpu', '?'))} ({'dry run, CPU, tiny model' if report['dry'] else 'SD v1.5 geometry'}, "
             f"{report['steps']} steps, torch {env.get('torch')}, diffusers {env.get('diffusers')}; peak memory: "
             f"{report['memory_of']})", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
