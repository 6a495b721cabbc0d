"""``prism-rt bench``: latency, throughput, memory and quality, side by side in one run.

Every measurement is a row of ``results.json`` (schema: ``benchmarks/README.md``). Each
configuration runs in its own spawned process, so its peak host RSS is its own and one
configuration's caches never warm another's. Times are medians (with p10/p90) over repeats after
warm-up; speed-ups are ratios of medians measured in the same run.
"""
from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prism_rt.backend import GRAPHS

SCHEMA = "prism-rt-bench/1"
SOURCE = "Chest X-ray showing No Finding, Support Devices"
TARGET = "Chest X-ray showing No Finding"


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int  # DDIM steps of the end-to-end runs
    repeats: int  # timed repeats per graph measurement (after warm-up)
    warmup: int
    batches: tuple[int, ...]  # per-graph batch sizes; the edit batch 2·(1+K·S) is added
    sweep: tuple[float, ...]  # the self-window values (S of them)
    mode: str  # "full" (per graph + end to end) or "graphs" (per graph only)
    throughput_images: int  # G
    e2e_repeats: int = 1
    cpu_batches: tuple[int, ...] | None = None  # per-graph batches on a CPU (None: batches + the edit batch)
    graphs: tuple[str, ...] | None = None  # per-graph measurements of these graphs (None: all)
    add_edit_batch: bool = True  # per-graph batches include the edit batch 2·(1+K·S) (off: exactly ``batches``)


PRESETS = {
    "tiny": Preset("tiny", steps=20, repeats=5, warmup=1, batches=(1, 2, 4), sweep=(0.4, 0.5, 0.6, 0.7, 0.8),
                   mode="full", throughput_images=2),
    # on a CPU one SD v1.5 UNet call at the edit batch (12) takes about a minute: batches 1 and 2 there
    "sd15": Preset("sd15", steps=50, repeats=3, warmup=2, batches=(1, 2, 4), sweep=(0.4, 0.5, 0.6, 0.7, 0.8),
                   mode="auto", throughput_images=2, cpu_batches=(1, 2)),
}


@dataclass(frozen=True)
class Config:
    """One end-to-end configuration: how one counterfactual is made."""

    name: str
    backend: str
    precision: str
    inversion: str
    sweep: str  # "sequential" (PRISM's published code: one run per self-window value) or "batched"
    role: str = ""  # reference | algorithmic | runtime

    @property
    def model_kind(self) -> str:
        return "checkpoint" if self.backend == "torch" else "engine"


REFERENCE = Config("PRISM reference (torch fp32, null-text, sweep value by value)", "torch", "fp32", "null-text",
                   "sequential", "reference")


def e2e_configs(engine_precisions: tuple[str, ...], have_checkpoint: bool, have_engine: bool, gpu: bool) -> list[Config]:
    configs = []
    if have_checkpoint:
        configs += [REFERENCE,
                    Config("torch fp32, null-text, batched sweep", "torch", "fp32", "null-text", "batched", "algorithmic"),
                    Config("torch fp32, direct, batched sweep", "torch", "fp32", "direct", "batched", "algorithmic")]
        if gpu:
            configs.append(Config("torch fp16, direct, batched sweep", "torch", "fp16", "direct", "batched", "runtime"))
    if have_engine:
        configs.append(Config("onnxruntime fp32, negative-prompt, batched sweep", "onnxruntime", "fp32",
                              "negative-prompt", "batched", "algorithmic"))
        for precision in engine_precisions:
            configs.append(Config(f"onnxruntime {precision}, direct, batched sweep", "onnxruntime", precision, "direct",
                                  "batched", "runtime"))
    return configs


# -- environment ------------------------------------------------------------------------------------
def environment(threads: int | None, device: str) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
           "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": threads or os.cpu_count(), "device": device}
    for module in ("numpy", "onnxruntime", "torch", "diffusers", "transformers", "onnx"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
            env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            env["gpu_driver"] = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float | None:
    """This process's peak resident set (Linux incl. Jetson: KiB; macOS: bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)


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
    """(U, K) of a UNet batch N = U + (1 + K) with one group: 1 → a direct-inversion call; 2 → one
    guided step; 2·(1+K) → an edit step with K items, every item with its unconditional half."""
    if batch == 1:
        return 0, 0
    k = batch // 2 - 1
    return batch - (1 + k), k


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


class _PairedConfig:
    """One configuration of the paired measurement, loaded in this process."""

    def __init__(self, job: dict):
        # onnxruntime's pool threads spin after each call by default: with more than one thread they
        # would take cores from the configuration called next
        self.engine = _load("graphs", job["backend"], job["precision"], job["paths"], job["device"], job["threads"],
                            session_config={"session.intra_op.allow_spinning": "0"})
        self._call = None
        self.pid = os.getpid()

    def prepare(self, graph: str, batch: int, warmup: int) -> np.ndarray:
        """Set up the graph and batch timed next; warm up; returns the first output (compared across)."""
        self._call = _graph_call(self.engine, graph, batch, np.random.default_rng(0))  # every configuration alike
        first = np.asarray(self._call(), np.float64)
        for _ in range(warmup - 1):
            self._call()
        return first

    def timed(self) -> tuple[float, tuple[int, float] | None]:
        return _call_measured(self._call)

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb()

    def close(self) -> None:
        pass


def _paired_server(conn, job: dict) -> None:
    """A spawned process serving one configuration: loads it, then answers the coordinator's
    requests (``prepare``, ``timed``, ``peak_rss_mb``, ``close``) until ``close``."""
    import traceback

    try:
        config = _PairedConfig(job)
        conn.send(("ok", os.getpid()))
        while True:
            what, args = conn.recv()
            conn.send(("ok", getattr(config, what)(*args)))
            if what == "close":
                return
    except BaseException as exc:  # the coordinator raises it, naming the configuration
        try:
            conn.send(("error", "".join(traceback.format_exception_only(type(exc), exc)).strip()))
        except OSError:
            pass


class _PairedProcess:
    """The coordinator's handle of a configuration served by :func:`_paired_server` in its own
    process: the same methods as :class:`_PairedConfig`, each a request answered there."""

    def __init__(self, job: dict):
        ctx = multiprocessing.get_context("spawn")
        self.label = f"{job['backend']} {job['precision']}"
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_paired_server, args=(child, job), name=f"paired {self.label}", daemon=True)
        self._proc.start()
        child.close()
        self.pid = self._answer()

    def _answer(self):
        from prism_rt.errors import BackendError

        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=10)
            raise BackendError(f"paired {self.label}: its process ended without an answer (exit code "
                               f"{self._proc.exitcode}; killed for memory? pair fewer precisions with --precisions)") from None
        if kind == "error":
            raise BackendError(f"paired {self.label}: {value}")
        return value

    def _ask(self, what: str, *args):
        self._conn.send((what, args))
        return self._answer()

    def prepare(self, graph: str, batch: int, warmup: int) -> np.ndarray:
        return self._ask("prepare", graph, batch, warmup)

    def timed(self) -> tuple[float, tuple[int, float] | None]:
        return self._ask("timed")

    def peak_rss_mb(self) -> float | None:
        return self._ask("peak_rss_mb")

    def close(self) -> None:
        try:  # never raises: it runs after another error too
            if self._proc.is_alive():
                self._conn.send(("close", ()))
                if self._conn.poll(30):
                    self._conn.recv()
        except (OSError, EOFError):
            pass
        finally:
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()
            self._conn.close()


def paired_worker(job: dict) -> list[dict]:
    """torch fp32 and each engine precision called in turn, round after round (the order rotated
    every round), on the same inputs: a machine whose speed drifts between runs (a shared VM, a
    device that heats up) slows every configuration of a round alike, so the ratio of each round's
    two times is steadier than the ratio of medians taken minutes apart. With ``job["processes"]``
    each configuration is served by its own spawned process (its own allocator, thread pools and
    RSS, as a user runs it; only one computes at a time); without it they share this one. Rows:
    each configuration's median time, the median (p10, p90) of its per-round ratio to torch fp32,
    and the rms relative difference of its first output from torch fp32's."""
    specs = [("torch", "fp32")] + [("onnxruntime", p) for p in job["precisions"]]
    make = _PairedProcess if job.get("processes") else _PairedConfig
    configs = []
    try:
        for backend, precision in specs:  # loaded one after another: the peak of loading is one model's
            configs.append(make({**job, "backend": backend, "precision": precision}))
        rows = []
        for graph in job["graphs"]:
            for batch in job["batches"]:
                firsts = [c.prepare(graph, batch, job["warmup"]) for c in configs]
                times, usage = [[] for _ in configs], [[] for _ in configs]
                for r in range(job["repeats"]):
                    for j in range(len(configs)):
                        i = (r + j) % len(configs)
                        seconds, used = configs[i].timed()
                        times[i].append(seconds)
                        usage[i].append(used)
                ref = firsts[0]
                for (backend, precision), ts, used, first in zip(specs, times, usage, firsts):
                    row = {"kind": "graph_paired", "backend": backend, "precision": precision, "graph": graph,
                           "batch": batch, **_time_stats(ts, used), "times_s": ts,
                           "ratio_to_torch_fp32": _spread([a / b for a, b in zip(times[0], ts)]),
                           "rms_rel_diff_vs_torch_fp32": float(np.sqrt(((first - ref) ** 2).sum()
                                                                       / max((ref ** 2).sum(), 1e-30)))}
                    if graph == "unet":
                        row["unet_layout"] = dict(zip(("uncond", "edits"), unet_layout(batch)))
                    rows.append(row)
        # one process per configuration: its own peak; one for all: of all of them together
        by_spec = {spec: (config.peak_rss_mb(), config.pid) for spec, config in zip(specs, configs)}
        for row in rows:
            row["peak_rss_mb"], row["pid"] = by_spec[(row["backend"], row["precision"])]
            row["process"] = "own" if job.get("processes") else "shared"
        return rows
    finally:
        for config in configs:
            config.close()


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
    run = (lambda fn, job: _in_process(fn, job)) if plan.isolate else (lambda fn, job: fn(job))
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
                             "peak_rss_mb": row["peak_rss_mb"], "device_peak_mb": row["device_peak_mb"]})
            for row in rows:
                row.pop("images_file", None)
    _speedups(rows)
    return {"schema": SCHEMA, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "preset": asdict(preset), "mode": "full" if full else "graphs", "edit_batch": edit_batch,
            "paths": {k2: (str(v) if v else None) for k2, v in plan.paths.items()},
            "environment": environment(plan.threads, plan.device), "wall_s": round(time.perf_counter() - started, 1),
            "rows": rows}


def _quality(e2e: list[dict]) -> None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = next((r for r in e2e if r["role"] == "reference"), None)
    if ref is None:
        return
    reference = np.load(ref["images_file"])
    for row in e2e:
        got = np.load(row["images_file"])
        pairs = list(zip(reference.reshape(-1, *reference.shape[-2:]), got.reshape(-1, *got.shape[-2:])))
        with np.errstate(divide="ignore"):
            psnr = [min(float(peak_signal_noise_ratio(a, b, data_range=1.0)), 99.0) for a, b in pairs]
        ssim = [float(structural_similarity(a, b, data_range=1.0)) for a, b in pairs]
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
