"""``prism-rt batch --ray [ADDRESS]``: the same job on a Ray cluster.

The driver (the ``prism-rt batch`` process) reads the work list, holds ``OUT``'s lock, writes
``job.json`` and ``results.csv`` exactly as a local job does; it loads no model. Each Ray actor
holds one engine (``BatchJob``) and runs whole groups (``BatchJob.run_group``): it inverts, edits
and publishes each image's folder into ``OUT`` itself, so ``OUT`` must be storage every node sees
(NFS, a mounted bucket) and the actors write what a local job writes, file for file. An actor
returns the table rows of its group; the driver keeps the table. A ``kill -9`` of the driver leaves
``OUT`` as a local job's kill does: a rerun, with or without ``--ray``, resumes it. Its actors
outlive it for a moment (Ray then ends them); they check before each group that their driver still
holds ``OUT``'s lock (``JobStore.held_by``) and start nothing once it does not.

Actors: one per GPU, pinned with ``num_gpus=1`` (``--device cuda`` or ``tensorrt``: Ray sets
``CUDA_VISIBLE_DEVICES``, so each actor's engine sees its GPU as device 0), or CPU actors of
``--threads`` cores each (default 1). ``--ray-actors N`` overrides the count.
"""
from __future__ import annotations

import copy
import os
import socket
import sys
from collections import deque
from pathlib import Path

from .batch import BatchJob, Counts, error_text, skipped_rows, table_row
from .batch_csv import ImageTask
from .batch_store import JobStore
from .errors import MissingExtraError, PrismError

IN_FLIGHT = 2
"""Groups queued per actor: the next one is there when the current one finishes."""


class RayClusterError(PrismError):
    """The Ray cluster cannot be reached or cannot place the actors asked for."""


class _Worker:
    """One engine on one Ray worker: ``run`` does a group as a local job would and returns its rows."""

    def __init__(self, args, tasks: list[ImageTask]):
        from .cli_args import control_from_args, load_engine

        self.store = JobStore(args.out, args.cache)
        self.job = BatchJob(args, tasks, self.store, load_engine, control_from_args)

    def ready(self) -> dict:
        return {"settings": self.job.settings(), "load_s": self.job.load_s, "node": socket.gethostname(),
                "pid": os.getpid()}

    def run(self, group: list[ImageTask], token: str) -> dict:
        if not self.store.held_by(token):  # the driver is gone (or another run took OUT): do nothing more
            return {"rows": {}, "counts": {}}
        before = copy.copy(self.job.counts)
        self.store.rows = {}
        self.job.run_group(group)
        after = self.job.counts
        return {"rows": dict(self.store.rows),
                "counts": {k: getattr(after, k) - getattr(before, k) for k in vars(after)}}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtraError("ray", "ray", "prism-rt batch --ray") from None
    return ray


def _actor_device(device: str) -> tuple[str, bool]:
    """The device an actor's engine opens, and whether the actor needs a GPU of its own."""
    kind = device.split(":")[0]
    if kind in ("cuda", "tensorrt"):
        return kind, True  # Ray's CUDA_VISIBLE_DEVICES leaves the actor one GPU: index 0
    return device, False


class RayRunner:
    """Starts the actors, then runs groups on them; the counterpart of a local ``BatchJob`` for
    ``batch_cli._run`` (``settings()``, ``counts``, ``run(groups)``, ``close()``)."""

    def __init__(self, args, tasks: list[ImageTask], store: JobStore):
        ray = self.ray = _import_ray()
        self.store, self.counts = store, Counts()
        self._started = False
        address = args.ray or None
        try:
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=True,
                         **({} if address else {"object_store_memory": 100 * 2**20}))
                self._started = True
        except Exception as exc:
            raise RayClusterError(f"--ray {args.ray or '(a local cluster)'}: Ray could not start or connect "
                                  f"({error_text(exc)}); give the head's address (ray start --head prints it) or "
                                  "'auto' on a node of the cluster") from None
        resources = ray.cluster_resources()
        device, gpu = _actor_device(args.device)
        threads = args.threads or 1
        if gpu:
            have, need, options = int(resources.get("GPU", 0)), 1, {"num_gpus": 1, "num_cpus": 1}
            if have == 0:
                self.close()
                raise RayClusterError(f"--device {args.device} with --ray: the cluster has no GPU; use --device cpu "
                                      "or add GPU nodes")
        else:
            have, need, options = int(resources.get("CPU", 0)), threads, {"num_cpus": threads}
            if resources.get("GPU", 0):
                print(f"batch: the Ray cluster has {int(resources['GPU'])} GPUs; --device cuda puts one engine on each",
                      file=sys.stderr, flush=True)
        n = args.ray_actors or max(1, have // need)
        if n * need > have:
            self.close()
            raise RayClusterError(f"--ray-actors {n} needs {n * need} {'GPU' if gpu else 'CPU'}s, the cluster has "
                                  f"{have}; ask for fewer actors{'' if gpu else ' or fewer --threads'}")
        actor_args = copy.copy(args)
        for name, value in vars(actor_args).items():  # a worker's cwd is not the driver's
            if isinstance(value, Path):
                setattr(actor_args, name, value.absolute())
        actor_args.device, actor_args.threads = device, threads
        actor_args.func = None  # the CLI's handler stays on the driver
        worker = ray.remote(max_restarts=0, **options)(_Worker)
        tasks_ref = ray.put(tasks)
        self.actors = [worker.remote(actor_args, tasks_ref) for _ in range(n)]
        try:
            self.info = ray.get([a.ready.remote() for a in self.actors])
        except Exception as exc:
            self.close()
            raise _cause(exc, "an actor could not load the model") from None
        self._settings = self.info[0]["settings"]
        nodes = sorted({i["node"] for i in self.info})
        print(f"batch: Ray: {n} actor(s) ({'1 GPU' if gpu else f'{threads} CPU thread(s)'} each) on "
              f"{len(nodes)} node(s), model loaded in {max(i['load_s'] for i in self.info):.1f} s",
              file=sys.stderr, flush=True)

    def settings(self) -> dict:
        return self._settings

    def run(self, groups: list[list[ImageTask]]):
        """Yield each group as it finishes (in any order); its rows are in the store."""
        ray = self.ray
        todo, pending = deque(groups), {}
        free = deque(a for a in self.actors for _ in range(IN_FLIGHT))
        while todo or pending:
            while todo and free:
                actor, group = free.popleft(), todo.popleft()
                pending[actor.run.remote(group, self.store.token)] = (actor, group)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, group = pending.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc, "a group failed") from None
            except ray.exceptions.RayActorError as exc:  # the worker process died (out of memory, a crash)
                self._lost(group, exc)
                self.actors = [a for a in self.actors if a is not actor]
                free = deque(a for a in free if a is not actor)
                if not self.actors:  # nothing left to run the rest on: stop, the rerun finishes it
                    for _, other in pending.values():
                        self._lost(other, exc)
                    raise RayClusterError(f"--ray: every actor died ({error_text(exc)[:200]}); {len(todo)} group(s) "
                                          "not started; rerun the same command to finish the job") from None
                yield group
                continue
            for image_id, rows in out["rows"].items():
                self.store.rows[image_id] = rows
            for k, v in out["counts"].items():
                setattr(self.counts, k, getattr(self.counts, k) + v)
            free.append(actor)
            yield group

    def _lost(self, group: list[ImageTask], exc: BaseException) -> None:
        """A group whose actor died: each image is recorded failed (a rerun retries it)."""
        error = f"the Ray worker died ({error_text(exc)[:200]}); rerun the job to retry this image"
        for task in group:
            if task.image_id in self.store.rows:
                continue
            rows = [table_row(task, pe, "failed", error) for pe in task.edits if pe.skip_reason is None]
            rows += skipped_rows(task)
            self.store.record_failure(task.image_id, rows)
            self.counts.failed += 1

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def _cause(exc: BaseException, what: str) -> PrismError:
    """The error an actor raised, as the driver's own: a PrismError passes through unchanged."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, PrismError):
        return cause
    return RayClusterError(f"--ray: {what}: {error_text(cause or exc)}")
