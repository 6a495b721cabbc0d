"""``--paired``: torch fp32 and each engine precision timed in turn, round after round, each
configuration served by its own spawned process (or, ``--no-isolate``, all by this one)."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np

from .memory import mark_shared, peak_rss_mb, reset_peak_rss
from .workers import _call_measured, _graph_call, _load, _spread, _time_stats, unet_layout


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
    shared_reset = not job.get("processes") and reset_peak_rss()  # this process's peak from here on
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
        # one process per configuration: its own peak; one for all: only of all of them together
        by_spec = {spec: (config.peak_rss_mb(), config.pid) for spec, config in zip(specs, configs)}
        for row in rows:
            row["peak_rss_mb"], row["pid"] = by_spec[(row["backend"], row["precision"])]
            row["process"] = "own" if job.get("processes") else "shared"
            if not job.get("processes"):
                mark_shared(row, row["peak_rss_mb"] if shared_reset else None)
        return rows
    finally:
        for config in configs:
            config.close()
