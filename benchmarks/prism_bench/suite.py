"""``prism-rt bench``: latency, throughput, memory and quality, side by side in one run.

Every measurement is a row of ``results.json`` (schema: ``benchmarks/README.md``). Each
configuration runs in its own spawned process, so its peak host RSS is its own (read there as
``VmHWM``, not ``ru_maxrss``, which a spawned child inherits: ``memory.py``) and one configuration's
caches never warm another's. Times are medians (with p10/p90) over repeats after
warm-up; speed-ups are ratios of medians measured in the same run.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from prism_rt.backend import GRAPHS

# the configurations, the workers (each run in a process of its own) and the paired measurement live
# in their own modules; their names stay importable from here
from .configs import PRESETS, REFERENCE, SCHEMA, SOURCE, TARGET, Config, Preset, e2e_configs, environment
from .memory import peak_rss_mb, run_shared
from .paired import paired_worker
from .workers import (_call_measured, _has_cpu_twins, _in_process, _time_stats, _timed, e2e_worker, graph_inputs,
                      graph_worker, unet_layout)

__all__ = ["PRESETS", "REFERENCE", "SCHEMA", "SOURCE", "TARGET", "BenchPlan", "Config", "Preset", "e2e_configs",
           "environment", "run_bench", "peak_rss_mb", "paired_worker", "e2e_worker", "graph_inputs", "graph_worker",
           "unet_layout", "_call_measured", "_in_process", "_time_stats", "_timed"]


# -- the whole run ------------------------------------------------------------------------------------
@dataclass
class BenchPlan:
    preset: Preset
    paths: dict  # checkpoint, engine (either may be None)
    device: str = "cpu"
    threads: int | None = None
    images: list = field(default_factory=list)  # gray [0,1] arrays or paths
    engine_precisions: tuple[str, ...] = ("fp32",)
    isolate: bool = True
    paired: bool = False  # also time torch fp32 and the engine precisions in turn (paired_worker)
    prompt: str = SOURCE
    target: str = TARGET
    judge: dict | None = None  # {"classifier": path, "truth": [H,W] array, "mask": [H,W] bool}: edit metrics


def run_bench(plan: BenchPlan, progress=print) -> dict:
    preset = plan.preset
    gpu = plan.device.startswith("cuda")
    full = preset.mode == "full" or (preset.mode == "auto" and gpu)
    k = len(preset.sweep)
    edit_batch = 2 * (1 + k)
    batches = tuple(sorted(set(preset.batches) | ({edit_batch} if preset.add_edit_batch else set())))
    if not gpu and preset.cpu_batches:
        batches = tuple(preset.cpu_batches)
    run = _in_process if plan.isolate else run_shared
    rows: list[dict] = []
    started = time.perf_counter()

    graph_jobs = []
    if plan.paths.get("checkpoint"):
        graph_jobs.append(("torch", "fp32"))
        if gpu:
            graph_jobs.append(("torch", "fp16"))
    if plan.paths.get("engine"):
        graph_jobs += [("onnxruntime", p) for p in plan.engine_precisions]
        if not gpu and "fp32" in plan.engine_precisions and _has_cpu_twins(plan.paths["engine"]):
            graph_jobs.append(("onnxruntime", "fp32", "portable"))  # what the CPU twins save, side by side
    for backend, precision, *portable in graph_jobs:
        progress(f"per graph: {backend} {precision}{' (portable graphs)' if portable else ''} at batches {batches} …")
        rows += run(graph_worker, {"backend": backend, "precision": precision, "portable": bool(portable),
                                   "paths": plan.paths, "device": plan.device,
                                   "threads": plan.threads, "batches": batches, "repeats": preset.repeats,
                                   "warmup": preset.warmup, "stock_unet": backend == "torch" and precision == "fp32",
                                   "graphs": list(preset.graphs or GRAPHS)})

    if plan.paired:
        progress(f"paired: torch fp32 and onnxruntime {', '.join(plan.engine_precisions)} in turn, "
                 f"{'each in its own process' if plan.isolate else 'all in this process'}, at batches {batches} …")
        # this process only coordinates: each configuration has its own (or, --no-isolate, this one)
        rows += paired_worker({"precisions": list(plan.engine_precisions), "paths": plan.paths,
                               "device": plan.device, "threads": plan.threads, "batches": batches,
                               "repeats": preset.repeats, "warmup": preset.warmup, "processes": plan.isolate,
                               "graphs": list(preset.graphs or GRAPHS)})

    if full:
        with tempfile.TemporaryDirectory() as scratch:
            configs = e2e_configs(tuple(plan.engine_precisions), bool(plan.paths.get("checkpoint")),
                                  bool(plan.paths.get("engine")), gpu)
            e2e = []
            for cfg in configs:
                progress(f"end to end: {cfg.name} …")
                e2e.append(run(e2e_worker, {"config": asdict(cfg), "paths": plan.paths, "device": plan.device,
                                            "threads": plan.threads, "steps": preset.steps, "sweep": preset.sweep,
                                            "images": plan.images[:1], "scratch": scratch, "prompt": plan.prompt,
                                            "target": plan.target}))
            _quality(e2e)
            if plan.judge:
                _judge(e2e, plan)
            rows += e2e
            rows += _decomposition(e2e)
            best = _fastest(e2e)
            if best is not None and preset.throughput_images > 1:
                cfg = Config(**{k2: best[k2] for k2 in ("backend", "precision", "inversion", "sweep", "role")},
                             name=best["config"])
                g = preset.throughput_images
                progress(f"throughput: {cfg.name}, {g} images edited in one batch …")
                row = run(e2e_worker, {"config": asdict(cfg), "paths": plan.paths, "device": plan.device,
                                       "threads": plan.threads, "steps": preset.steps, "sweep": preset.sweep,
                                       "images": plan.images[:g], "scratch": scratch, "grouped": True,
                                       "prompt": plan.prompt, "target": plan.target})
                rows.append({"kind": "throughput", "config": cfg.name, "images": row["images"],
                             "batching": f"{g} images' edits in one UNet batch per step (Engine.edit_many)",
                             "counterfactuals_per_minute": 60.0 / row["seconds_per_counterfactual"],
                             "one_image_counterfactuals_per_minute": 60.0 / best["seconds_per_counterfactual"],
                             "seconds_per_counterfactual": row["seconds_per_counterfactual"],
                             "unet_calls_per_counterfactual": row["unet_calls_per_counterfactual"],
                             "peak_rss_mb": row["peak_rss_mb"], "device_peak_mb": row["device_peak_mb"],
                             **{k2: row[k2] for k2 in ("process_peak_rss_mb", "peak_rss_note") if k2 in row}})
            for row in rows:
                row.pop("images_file", None)
    _speedups(rows)
    return {"schema": SCHEMA, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "preset": asdict(preset), "mode": "full" if full else "graphs", "edit_batch": edit_batch,
            "paths": {k2: (str(v) if v else None) for k2, v in plan.paths.items()},
            "environment": environment(plan.threads, plan.device), "wall_s": round(time.perf_counter() - started, 1),
            "rows": rows}


def _quality(e2e: list[dict]) -> None:
    from prism_rt.metrics import psnr as psnr_db, ssim as structural_similarity

    ref = next((r for r in e2e if r["role"] == "reference"), None)
    if ref is None:
        return
    reference = np.load(ref["images_file"])
    for row in e2e:
        got = np.load(row["images_file"])
        pairs = list(zip(reference.reshape(-1, *reference.shape[-2:]), got.reshape(-1, *got.shape[-2:])))
        psnr = [psnr_db(a, b) for a, b in pairs]
        ssim = [structural_similarity(a, b) for a, b in pairs]
        row["quality_vs_reference"] = {"psnr_db_min": round(min(psnr), 2), "psnr_db_mean": round(float(np.mean(psnr)), 2),
                                       "ssim_min": round(min(ssim), 4), "ssim_mean": round(float(np.mean(ssim)), 4)}


def _judge(e2e: list[dict], plan: BenchPlan) -> None:
    """With a classifier and the true counterfactual (a phantom engine's demo.json): PRISM's
    selection over the sweep, then success, CPG and identity of the chosen value, per
    configuration (``prism_rt.evaluate``, the same code as ``prism-rt evaluate``)."""
    from prism_rt.evaluate import Classifier, edit_direction, edit_metrics, select

    classifier = Classifier.load(plan.judge["classifier"])
    attribute, direction = edit_direction(plan.prompt, plan.target, classifier.labels)
    for row in e2e:
        edits = np.load(row["images_file"])[0]
        source, recon = np.load(row["images_file"].replace(".npy", "-recon.npy"))[0]
        candidates = [edit_metrics(classifier, attribute, direction, source, recon, e, plan.judge["mask"],
                                   plan.judge["truth"]) for e in edits]
        chosen = select(candidates)
        best = candidates[chosen["selected"] if chosen["selected"] is not None else chosen["best_cpg_index"]]
        row["edit_judgement"] = {"attribute": attribute, "direction": direction, "success": chosen["flipped"],
                                 "cpg": best["classifier"]["cpg"], "identity_outside_mask": best["identity_outside_mask"],
                                 "truth": best.get("truth")}


def _fastest(e2e: list[dict]) -> dict | None:
    candidates = [r for r in e2e if r["role"] != "reference"]
    return min(candidates, key=lambda r: r["seconds_per_counterfactual"]) if candidates else None


def _find(e2e, **want):
    return next((r for r in e2e if all(r.get(k) == v for k, v in want.items())), None)


def _decomposition(e2e: list[dict]) -> list[dict]:
    """The speed-up split into its algorithmic part (same backend and precision) and its runtime
    part (same algorithm), each a ratio of two measured configurations."""
    ref = _find(e2e, role="reference")
    batched = _find(e2e, backend="torch", precision="fp32", inversion="null-text", sweep="batched")
    direct = _find(e2e, backend="torch", precision="fp32", inversion="direct", sweep="batched")
    ort = _find(e2e, backend="onnxruntime", precision="fp32", inversion="direct")
    engine_direct = [r for r in e2e if r["inversion"] == "direct" and r["sweep"] == "batched" and r is not direct]
    best = min(engine_direct, key=lambda r: r["seconds_per_counterfactual"]) if engine_direct else None
    rows = []

    def ratio(part, slow, fast, what):
        if slow is not None and fast is not None:
            rows.append({"kind": "decomposition", "part": part, "what": what, "from": slow["config"], "to": fast["config"],
                         "speedup": slow["seconds_per_counterfactual"] / fast["seconds_per_counterfactual"]})

    ratio("algorithmic", ref, batched, "self-window sweep in one batch (null-text, torch fp32)")
    ratio("algorithmic", batched, direct, "direct inversion in place of null-text (batched, torch fp32)")
    ratio("algorithmic", ref, direct, "algorithm total (torch fp32)")
    ratio("runtime", direct, ort, "onnxruntime in place of torch eager (fp32, direct, batched)")
    if best is not None and ort is not None and best is not ort:
        ratio("runtime", ort, best, f"precision {best['precision']} in place of fp32 ({best['backend']})")
    ratio("runtime", direct, best, "runtime total (direct, batched)")
    ratio("total", ref, best, "PRISM reference → fastest engine configuration")
    return rows


def _speedups(rows: list[dict]) -> None:
    ref = _find(rows, kind="counterfactual", role="reference")
    for row in rows:
        if row["kind"] == "counterfactual" and ref is not None:
            row["speedup_vs_reference"] = ref["seconds_per_counterfactual"] / row["seconds_per_counterfactual"]
    torch_fp32 = {(r["graph"], r["batch"]): r["median_s"] for r in rows
                  if r["kind"] == "graph" and r["backend"] == "torch" and r["precision"] == "fp32"}
    for row in rows:
        base = torch_fp32.get((row.get("graph"), row.get("batch"))) if row["kind"] == "graph" else None
        if base:
            row["speedup_vs_torch_fp32"] = base / row["median_s"]
