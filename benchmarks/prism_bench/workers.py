"""The bench's measurements, each run by a worker in a process of its own (``_in_process``): one
graph at a time (``graph_worker``) and whole counterfactuals (``e2e_worker``); the timing helpers
they share with the paired measurement (``paired.py``)."""
from __future__ import annotations

import multiprocessing
import statistics
import time
from pathlib import Path

import numpy as np

from prism_rt.backend import GRAPHS

from .configs import SOURCE, Config
from .memory import peak_rss_mb


# -- workers (each in its own process) -------------------------------------------------------------
def _load(kind: str, backend: str, precision: str, paths: dict, device: str, threads: int | None,
          cpu_graphs: bool = True, session_config: dict | None = None):
    if threads:
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass
    from prism_rt.engine import Engine

    path = paths["checkpoint"] if backend == "torch" else paths["engine"]
    return Engine.load(path, backend=backend, device=device if backend == "torch" else _ort_device(device),
                       precision=precision, threads=threads, cpu_graphs=cpu_graphs,
                       **({"session_config": session_config} if session_config and backend != "torch" else {}))


def _has_cpu_twins(engine) -> bool:
    import json

    raw = json.loads((Path(engine) / "manifest.json").read_text(encoding="utf-8"))
    return any(g.get("cpu") for g in raw.get("graphs", {}).values())


def _ort_device(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def _device_peak_mb(engine) -> float | None:
    if engine.backend.kind.value == "torch" and str(getattr(engine.backend, "device", "cpu")).startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def _usage() -> tuple[int, float] | None:
    """(minor page faults, system CPU seconds) of this process so far, all threads; None off POSIX."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def _call_measured(fn) -> tuple[float, tuple[int, float] | None]:
    """One call's wall time, and the page faults and kernel time it cost (memory the allocator
    returned to the system and touches again: a cost of the allocator, not of the arithmetic)."""
    before = _usage()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    after = _usage()
    return seconds, None if before is None else (after[0] - before[0], after[1] - before[1])


def _timed(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times, usage = [], []
    for _ in range(repeats):
        seconds, used = _call_measured(fn)
        times.append(seconds)
        usage.append(used)
    return _time_stats(times, usage)


def _spread(values: list[float]) -> dict:
    q = np.quantile(values, [0.1, 0.9])
    return {"median": statistics.median(values), "p10": float(q[0]), "p90": float(q[1])}


def _time_stats(times: list[float], usage: list | None = None) -> dict:
    spread = _spread(times)
    stats = {"median_s": spread["median"], "p10_s": spread["p10"], "p90_s": spread["p90"], "repeats": len(times)}
    if usage and all(u is not None for u in usage):
        stats["minor_faults_per_call"] = int(statistics.median(u[0] for u in usage))
        stats["system_s_per_call"] = statistics.median(u[1] for u in usage)
    return stats


def unet_layout(batch: int) -> tuple[int, int]:
    """(U, K) of a one-image UNet call of ``batch`` items (``prism_rt.unet_batch.UNetBatch``): 1 → a
    direct-inversion call; an even N → an edit step with every item guided (ddim / null-text),
    K = N/2 − 1 (2: one guided step); an odd N → a direct-inversion edit step, K = (N − 1)/2."""
    from prism_rt.unet_batch import UNetBatch

    if batch == 1:
        layout = UNetBatch(1, 0, source_uncond=False)
    elif batch % 2 == 0:
        layout = UNetBatch.for_method("ddim", 1, batch // 2 - 1)
    else:
        layout = UNetBatch.for_method("direct", 1, (batch - 1) // 2)
    assert layout.size == batch
    return layout.uncond, layout.edits


def graph_inputs(backend, tokenizer, graph: str, batch: int, rng: np.random.Generator) -> dict:
    info = backend.info
    s, h, d, t = info.image_size, info.latent_size, info.text_width, info.max_tokens
    if graph == "text_encoder":
        ids = tokenizer.encode_batch_padded([SOURCE])[0] if hasattr(tokenizer, "encode_batch_padded") else None
        ids = np.repeat(np.asarray(ids, np.int32).reshape(1, -1), batch, axis=0)
        return {"input_ids": backend.asarray(ids)}
    if graph == "vae_encoder":
        return {"pixels": backend.asarray(rng.uniform(-1, 1, (batch, 3, s, s)).astype(np.float32))}
    if graph == "vae_decoder":
        return {"latents": backend.asarray(rng.standard_normal((batch, info.latent_channels, h, h)).astype(np.float32))}
    u, k = unet_layout(batch)
    # the edit loop's layout: each unconditional item repeats a conditional item's latent
    cond = rng.standard_normal((batch - u, info.latent_channels, h, h)).astype(np.float32)
    return {"latents": backend.asarray(np.concatenate([cond[np.arange(-u, 0) % len(cond)], cond])),
            "timestep": backend.asarray(np.array([501.0], np.float32)),
            "text": backend.asarray(rng.standard_normal((batch, t, d)).astype(np.float32)),
            "cross_alpha": backend.asarray(np.ones((1, k, t), np.float32)),
            "token_mapper": backend.asarray(np.broadcast_to(np.eye(t, dtype=np.float32), (1, k, t, t)).copy()),
            "refine_alpha": backend.asarray(np.ones((1, k, t), np.float32)),
            "equalizer": backend.asarray(np.ones((1, k, t), np.float32)),
            "self_replace": backend.asarray(np.full((1, k), 0.5, np.float32))}


def graph_worker(job: dict) -> list[dict]:
    engine = _load("graphs", job["backend"], job["precision"], job["paths"], job["device"], job["threads"],
                   cpu_graphs=not job.get("portable"))
    backend, rows, rng = engine.backend, [], np.random.default_rng(0)
    label = job["backend"] + (" (portable graphs)" if job.get("portable") else "")
    graphs = job.get("graphs") or GRAPHS
    for graph in graphs:
        for batch in job["batches"]:
            timing = _timed(_graph_call(engine, graph, batch, rng), job["warmup"], job["repeats"])
            row = {"kind": "graph", "backend": label, "precision": job["precision"], "graph": graph,
                   "batch": batch, **timing}
            if graph == "unet":
                row["unet_layout"] = dict(zip(("uncond", "edits"), unet_layout(batch)))
            rows.append(row)
    for row in rows:
        row["peak_rss_mb"] = peak_rss_mb()
        row["device_peak_mb"] = _device_peak_mb(engine)
    if job["backend"] == "torch" and job["precision"] == "fp32" and job.get("stock_unet") and "unet" in graphs:
        rows += _stock_unet_rows(engine, job, rng)
    return rows


def _graph_call(engine, graph: str, batch: int, rng: np.random.Generator):
    """A call of one graph at one batch on the bench's inputs (drawn from ``rng`` now); the call
    returns its first output on the host."""
    backend = engine.backend
    inputs = graph_inputs(backend, engine.tokenizer, graph, batch, rng)

    def call():
        out = backend.run(graph, **inputs)
        return backend.to_numpy(next(iter(out.values())))  # waits for the device

    return call


def _stock_unet_rows(engine, job: dict, rng) -> list[dict]:
    """diffusers' own UNet (no control) at batch 2, for the price of the controlled one."""
    import torch

    unet = engine.backend.components.unet.to(engine.backend.device)
    info = engine.backend.info
    rows = []
    for batch in job["batches"]:
        latents = torch.as_tensor(rng.standard_normal((batch, info.latent_channels, info.latent_size, info.latent_size)),
                                  dtype=torch.float32, device=engine.backend.device)
        text = torch.as_tensor(rng.standard_normal((batch, info.max_tokens, info.text_width)), dtype=torch.float32,
                               device=engine.backend.device)
        t = torch.tensor([501.0], device=engine.backend.device)

        def call():
            with torch.no_grad():
                unet(latents, t, encoder_hidden_states=text).sample.cpu()

        rows.append({"kind": "graph", "backend": "torch (diffusers stock UNet)", "precision": "fp32", "graph": "unet",
                     "batch": batch, **_timed(call, job["warmup"], job["repeats"])})
    return rows


def e2e_worker(job: dict) -> dict:
    from prism_rt.config import ControlConfig, RunLimits

    cfg = Config(**job["config"])
    start = time.perf_counter()
    engine = _load("e2e", cfg.backend, cfg.precision, job["paths"], job["device"], job["threads"])
    load_s = time.perf_counter() - start
    sampler = engine.sampler(steps=job["steps"])
    images, stages, unet_items, unet_calls = [], {"invert_s": 0.0, "edit_s": 0.0}, 0, 0
    recons, sources = [], []
    started = time.perf_counter()
    if job.get("grouped"):  # G images: inverted one by one, edited in one batch per step
        t0 = time.perf_counter()
        inversions = [engine.invert(image, job["prompt"], method=cfg.inversion, sampler=sampler) for image in job["images"]]
        stages["invert_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        results = engine.edit_many(inversions, [job["target"]], ControlConfig(self_replace=tuple(job["sweep"])),
                                   RunLimits(max_batch=63))
        stages["edit_s"] += time.perf_counter() - t0
        unet_items = sum(i.meta["counts"]["unet_items"] for i in inversions) + results[0].counts["unet_items"]
        unet_calls = sum(i.meta["counts"]["unet_calls"] for i in inversions) + results[0].counts["unet_calls"]
        images = [np.stack([np.clip((e.mean(0) + 1) / 2, 0, 1) for e in r.edits]) for r in results]
    for image in ([] if job.get("grouped") else job["images"]):
        t0 = time.perf_counter()
        inversion = engine.invert(image, job["prompt"], method=cfg.inversion, sampler=sampler)
        stages["invert_s"] += time.perf_counter() - t0
        counts = inversion.meta["counts"]
        unet_items += counts["unet_items"]
        unet_calls += counts["unet_calls"]
        runs = [tuple(job["sweep"])] if cfg.sweep == "batched" else [(v,) for v in job["sweep"]]
        t0 = time.perf_counter()
        edits = []
        for values in runs:
            result = engine.edit(inversion, [job["target"]], ControlConfig(self_replace=values), RunLimits(max_batch=63))
            edits += [np.clip((e.mean(0) + 1) / 2, 0, 1) for e in result.edits]
            unet_items += result.counts["unet_items"]
            unet_calls += result.counts["unet_calls"]
        stages["edit_s"] += time.perf_counter() - t0
        images.append(np.stack(edits))
        recons.append(np.clip((result.reconstruction.mean(0) + 1) / 2, 0, 1))
        sources.append(np.clip((inversion.fitted_pixels.mean(0) + 1) / 2, 0, 1))
    total = time.perf_counter() - started
    out = Path(job["scratch"]) / f"{abs(hash(cfg.name))}.npy"
    np.save(out, np.stack(images))
    if recons:
        np.save(str(out).replace(".npy", "-recon.npy"), np.stack([np.stack([s_, r]) for s_, r in zip(sources, recons)]))
    n = len(job["images"])
    return {"kind": "counterfactual", "config": cfg.name, "backend": cfg.backend, "precision": cfg.precision,
            "inversion": cfg.inversion, "sweep": cfg.sweep, "role": cfg.role, "images": n,
            "sweep_values": len(job["sweep"]), "steps": job["steps"],
            "seconds_per_counterfactual": total / n, "stages_s_per_counterfactual": {k: v / n for k, v in stages.items()},
            "load_s": load_s, "unet_items_per_counterfactual": unet_items / n, "unet_calls_per_counterfactual": unet_calls / n,
            "peak_rss_mb": peak_rss_mb(), "device_peak_mb": _device_peak_mb(engine), "images_file": str(out)}


def _in_process(fn, job):
    """Run ``fn(job)`` in a fresh spawned process (own RSS, own thread pools)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, job).result()
