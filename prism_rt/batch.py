"""``prism-rt batch``: counterfactuals of a whole data set, resumable and crash-safe.

    prism-rt batch --csv train.csv --root CheXpert-v1.0 --out runs/devices --model ENGINE \\
        --edit "Support Devices=remove" --edit "Pleural Effusion=add" --group 4
    prism-rt batch --images DIR --prompt "Chest X-ray showing …" --target "…" --out OUT --model ENGINE

The work list (``prism_rt.batch_csv``) is checked whole before the model loads. Inversions are
cached on disk (``--cache``, default ``OUT/.cache/inversions``) keyed by image, caption, model and
inversion settings, so another job over the same images inverts nothing. Images with as many
applicable edits are edited ``--group`` at a time in one UNet batch (``Engine.edit_many``). What is
on disk and why a ``kill -9`` at any moment is harmless: ``prism_rt.batch_store``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from .batch_csv import BatchInputError, EditSpec, ImageTask, read_chexpert_csv, read_image_folder
from .batch_store import JobStore, inversion_key, model_identity
from .config import Fit, InversionConfig, InversionMethod, RunLimits, SamplerConfig
from .errors import OutputError

SETTING_KEYS = ("inversion", "steps", "guidance", "fit", "null_inner_steps", "max_pixels", "mode", "cross_replace",
                "self_replace", "edit_weight", "edit_words", "blend_words", "blend_threshold", "noise_blend",
                "noise_blend_threshold", "composite", "legacy", "seed", "select", "figure", "extras")
"""The arguments that change a job's outputs, recorded in ``job.json`` (speed-only ones are not:
--group, --threads, --max-batch, --cache, --no-progress)."""


def add_batch_parser(sub) -> argparse.ArgumentParser:
    """Register ``prism-rt batch`` on the CLI's sub-parsers (argument helpers from ``prism_rt.cli``,
    imported here: cli imports this module lazily, so there is no import cycle)."""
    from . import cli
    from .imageio import DEFAULT_MAX_PIXELS

    p = sub.add_parser("batch", help="counterfactuals of a data set (CheXpert CSV or a folder), resumable",
                       formatter_class=cli.Formatter)
    cli._model_args(p)
    w = p.add_argument_group("work list (a CheXpert CSV, or a folder with one caption)")
    w.add_argument("--csv", type=cli._path, help="CheXpert-style CSV: Path + label columns (1 / 0 / -1 / blank)")
    w.add_argument("--root", type=cli._path, help="the folder the CSV's Path column is relative to (default: the CSV's)")
    w.add_argument("--edit", action="append", default=[], metavar="ATTR=remove|add",
                   help="with --csv: flip one label, e.g. 'Support Devices=remove'; repeat for several edits")
    w.add_argument("--images", type=cli._path, help="a folder of images (PNG, JPEG, DICOM), all with --prompt")
    w.add_argument("--prompt", help="with --images: the source caption of every image")
    w.add_argument("--target", action="append", default=[], help="with --images: an edited caption; repeat")
    g = p.add_argument_group("inversion")
    g.add_argument("--inversion", choices=[m.value for m in InversionMethod],
                   help="default: the engine's (null-text on torch, direct on onnxruntime)")
    g.add_argument("--steps", type=int, default=cli.default(SamplerConfig, "steps"), help="DDIM steps")
    g.add_argument("--guidance", type=float, default=cli.default(SamplerConfig, "guidance"),
                   help="classifier-free guidance scale, in [1, 30]")
    g.add_argument("--fit", default=Fit.RESIZE.value, choices=[f.value for f in Fit])
    g.add_argument("--null-inner-steps", type=int, default=cli.default(InversionConfig, "null_inner_steps"))
    g.add_argument("--max-pixels", type=cli._positive, default=DEFAULT_MAX_PIXELS,
                   help="larger images fail (checked from the header)")
    e = p.add_argument_group("edit (as prism-rt edit; defaults are PRISM's)")
    from .config import NOISE_BLEND_THRESHOLDS, ControlConfig

    e.add_argument("--mode", default=cli.default(ControlConfig, "mode"), choices=["refine", "replace"])
    e.add_argument("--cross-replace", type=float, default=cli.default(ControlConfig, "cross_replace"))
    e.add_argument("--self-replace", type=cli._floats, default=cli.default(ControlConfig, "self_replace"),
                   help="self-attention window(s), comma-separated: each value is one candidate")
    e.add_argument("--edit-weight", type=float, default=cli.default(ControlConfig, "edit_weight"))
    e.add_argument("--edit-words", type=cli._csv, help="words to reweight (default: the new words of each target)")
    e.add_argument("--blend-words", type=cli._pair, help="SRC_WORD,EDIT_WORD: LocalBlend from the attention maps")
    e.add_argument("--blend-threshold", type=float, default=cli.default(ControlConfig, "blend_threshold"))
    e.add_argument("--noise-blend", action="store_true", help="LocalBlend from the noise predictions (DiffEdit)")
    e.add_argument("--noise-blend-threshold", type=cli._floats, default=NOISE_BLEND_THRESHOLDS)
    e.add_argument("--composite", type=cli._floats, default=(), metavar="T[,T…]", help="difference composite(s)")
    e.add_argument("--legacy", action="store_true", help="no attention control, no blend (the published code)")
    e.add_argument("--seed", type=int, default=0, help="recorded; every step is deterministic (η = 0)")
    e.add_argument("--select", type=cli._path, metavar="CLASSIFIER.onnx",
                   help="per edit, the candidate that flips the attribute with the best identity (PRISM's filter)")
    o = p.add_argument_group("job")
    o.add_argument("--out", type=cli._path, required=True,
                   help="the job folder: one folder per image, results.csv, job.json; rerun to resume")
    o.add_argument("--group", type=cli._positive, default=4, help="images edited together in one UNet batch")
    o.add_argument("--max-batch", type=cli._positive, default=cli.default(RunLimits, "max_batch"),
                   help="largest UNet batch; a group that does not fit is split")
    o.add_argument("--cache", type=cli._path, help="inversion cache folder (default OUT/.cache/inversions); "
                                                    "another job's reuses its inversions")
    o.add_argument("--no-figure", dest="figure", action="store_false", help="no figure.png per image")
    o.add_argument("--extras", action="store_true", help="also the reconstruction and the difference maps")
    cli._common(p)
    p.set_defaults(func=cmd_batch)
    return p


@dataclass
class _Counts:
    images: int = 0  # finished in this run (edited or all-skipped)
    skipped_images: int = 0
    failed: int = 0
    inverted: int = 0
    reused: int = 0
    rows: dict = field(default_factory=lambda: {"ok": 0, "skipped": 0, "failed": 0})


def _tasks(args) -> list[ImageTask]:
    if (args.csv is None) == (args.images is None):
        raise BatchInputError("give either --csv FILE (with --edit) or --images DIR (with --prompt and --target)")
    if args.csv is not None:
        if args.prompt or args.target:
            raise BatchInputError("--prompt and --target go with --images; with --csv the captions come from the "
                                  "labels and the edits from --edit")
        edits = [EditSpec.parse(text) for text in args.edit]
        if len({e.attribute for e in edits}) != len(edits):
            raise BatchInputError(f"--edit names one label twice ({args.edit}); give each label once")
        return read_chexpert_csv(args.csv, args.root or args.csv.parent, edits)
    if args.edit or args.root:
        raise BatchInputError("--edit and --root go with --csv; with --images give --prompt and --target")
    return read_image_folder(args.images, args.prompt or "", list(args.target))


def _groups(tasks: list[ImageTask], size: int) -> list[list[ImageTask]]:
    """Images with as many applicable edits, ``size`` at a time (edit_many needs one count), in
    the order of each group's first image."""
    buckets: dict[int, list[list[ImageTask]]] = {}
    order = []
    for task in tasks:
        chunks = buckets.setdefault(len(task.targets), [])
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(task)
    return order


def _row(task: ImageTask, planned, status: str, error: str = "", **values) -> dict:
    return {"image_id": task.image_id, "path": str(task.path), "source_caption": task.source,
            "target_caption": planned.target or "", "edit": planned.edit, "status": status, "error": error, **values}


def _skipped_rows(task: ImageTask) -> list[dict]:
    return [_row(task, pe, "skipped", pe.skip_reason) for pe in task.edits if pe.skip_reason is not None]


def _error_text(exc: BaseException) -> str:
    from .errors import PrismError

    text = str(exc) if isinstance(exc, PrismError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


class BatchJob:
    """One job: its work list, engine, settings and store."""

    def __init__(self, args, tasks: list[ImageTask], store: JobStore):
        from . import cli

        self.args, self.tasks, self.store = args, tasks, store
        self.control = cli._control(args)
        self.limits = RunLimits(max_batch=args.max_batch)
        self.classifier = None
        if args.select is not None:
            from .evaluate import Classifier, edit_direction

            self.classifier = Classifier.load(args.select)
            for source, target in {(t.source, x) for t in tasks for x in t.targets}:
                edit_direction(source, target, self.classifier.labels)
        start = time.perf_counter()
        self.engine = cli._load(args)
        self.load_s = time.perf_counter() - start
        self.method = self.engine.check_inversion_method(args.inversion)
        self.sampler = self.engine.sampler(steps=args.steps, guidance=args.guidance)
        self.inversion_config = InversionConfig(null_inner_steps=args.null_inner_steps)
        self.identity = model_identity(self.engine, args.precision)
        self.inversion_settings = {"method": self.method.value, "steps": args.steps, "guidance": args.guidance,
                                   "fit": args.fit, **({"null_inner_steps": args.null_inner_steps}
                                                       if self.method is InversionMethod.NULL_TEXT else {})}
        self.counts = _Counts()

    def settings(self) -> dict:
        args = self.args
        work = ({"csv": str(args.csv.absolute()), "root": str((args.root or args.csv.parent).absolute()),
                 "edits": [EditSpec.parse(e).text for e in args.edit]} if args.csv is not None else
                {"images": str(args.images.absolute()), "prompt": args.prompt, "targets": list(args.target)})
        chosen = {k: getattr(args, k) for k in SETTING_KEYS}
        chosen["inversion"] = self.method.value
        chosen["select"] = str(args.select) if args.select else None
        return {"work": work, "model_identity": self.identity, "settings": chosen}

    # -- one image's inversion -----------------------------------------------------------------
    def _inversion(self, task: ImageTask):
        from .imageio import load_image
        from .inversion import Inversion

        self.engine.plan(task.source, task.targets, self.control, self.sampler.steps)
        source = load_image(task.path, max_pixels=self.args.max_pixels)
        path = self.store.cache_path(inversion_key(source.sha256, task.source, self.identity, self.inversion_settings))
        if path.is_file():
            try:
                inversion = Inversion.load(path, max_pixels=self.args.max_pixels)
                if inversion.sampler == self.sampler and inversion.method is self.method:
                    self.counts.reused += 1
                    return inversion, 0.0
            except Exception:  # an unreadable cache entry is a miss: invert again and replace it
                pass
        start = time.perf_counter()
        inversion = self.engine.invert(source, task.source, method=self.method, sampler=self.sampler,
                                       inversion=self.inversion_config, fit=self.args.fit)
        elapsed = time.perf_counter() - start
        inversion.save(path)
        self.counts.inverted += 1
        return inversion, elapsed

    def _fail(self, task: ImageTask, exc: BaseException) -> None:
        error = _error_text(exc)
        rows = [_row(task, pe, "failed", error) for pe in task.edits if pe.skip_reason is None] + _skipped_rows(task)
        self.store.record_failure(task.image_id, rows)
        self.counts.failed += 1
        print(f"batch: {task.image_id} failed: {error}", file=sys.stderr, flush=True)

    def _edit(self, ready: list) -> list:
        """edit_many over the group; if it fails, each image alone, so one bad image fails alone."""
        start = time.perf_counter()
        try:
            results = self.engine.edit_many([inv for _, inv, _ in ready], [t.targets for t, _, _ in ready],
                                            self.control, self.limits)
            per_image = (time.perf_counter() - start) / len(ready)
            return [(t, inv, inv_s, res, per_image) for (t, inv, inv_s), res in zip(ready, results)]
        except OutputError:
            raise
        except Exception:
            if len(ready) == 1:
                raise
        out = []
        for task, inv, inv_s in ready:
            start = time.perf_counter()
            try:
                result = self.engine.edit(inv, task.targets, self.control, self.limits)
            except OutputError:
                raise
            except Exception as exc:
                self._fail(task, exc)
                continue
            out.append((task, inv, inv_s, result, time.perf_counter() - start))
        return out

    def _publish(self, task: ImageTask, inversion, invert_s: float, result, edit_s: float) -> None:
        from .outputs import write_edit_outputs

        selection = None
        if self.classifier is not None:
            from .evaluate import select_edits

            selection = select_edits(self.classifier, inversion.source_prompt, result, inversion.fitted_pixels)
        rows = []
        for planned in task.edits:
            if planned.skip_reason is not None:
                rows.append(_row(task, planned, "skipped", planned.skip_reason))
                continue
            files = [f"{it.name}.png" for it in result.items if it.target == planned.target]
            values = {"output": task.image_id, "files": ";".join(files),
                      "selected_file": files[0] if len(files) == 1 and selection is None else "",
                      "reconstruction_error": f"{result.reconstruction_error:.4g}", "invert_s": f"{invert_s:.3f}",
                      "edit_s": f"{edit_s:.3f}", "inversion": inversion.method.value}
            for k, choice in enumerate(selection or []):
                if choice["target"] != planned.target:
                    continue
                chosen = choice["selected_item"]  # none flips: the scores of a sole candidate still tell how far
                best = next((c for c in choice["candidates"] if c["item"] == chosen), None) if chosen else (
                    choice["candidates"][0] if len(choice["candidates"]) == 1 else None)
                if chosen is not None:
                    values["selected_file"] = f"selected-{k}.png"
                if best is not None:
                    values.update(p_source=f"{best['classifier']['p_source']:.4f}",
                                  p_counterfactual=f"{best['classifier']['p_counterfactual']:.4f}")
            rows.append(_row(task, planned, "ok", "; ".join(result.warnings), **values))
        parameters = {"batch": {"image_id": task.image_id, "path": str(task.path), "rows": rows},
                      "job": self.settings()}
        write_edit_outputs(self.store.folder(task.image_id), result, inversion, parameters, selection=selection,
                           figure=self.args.figure, extras=self.args.extras)
        self.store.clear_failure(task.image_id)
        self.counts.images += 1

    def run_group(self, group: list[ImageTask]) -> None:
        ready = []
        for task in group:
            if not task.targets:
                self.store.publish_skipped(task.image_id, {"image_id": task.image_id, "path": str(task.path),
                                                           "rows": _skipped_rows(task)})
                self.store.clear_failure(task.image_id)
                self.counts.images += 1
                self.counts.skipped_images += 1
                continue
            try:
                inversion, invert_s = self._inversion(task)
            except OutputError:
                raise
            except Exception as exc:  # unreadable, missing, too large, non-finite: this image only
                self._fail(task, exc)
                continue
            ready.append((task, inversion, invert_s))
        if ready:
            try:
                edited = self._edit(ready)
            except OutputError:
                raise
            except Exception as exc:
                self._fail(ready[0][0], exc)
                edited = []
            for item in edited:
                self._publish(*item)


def cmd_batch(args) -> int:
    tasks = _tasks(args)
    store = JobStore(args.out, args.cache)
    store.check_out()
    store.lock()
    try:
        return _run(args, tasks, store, BatchJob(args, tasks, store))
    finally:
        store.unlock()


def _run(args, tasks: list[ImageTask], store: JobStore, job: BatchJob) -> int:
    resumed = store.claim(job.settings())
    todo = [t for t in tasks if store.done_rows(t.image_id) is None]
    earlier = len(tasks) - len(todo)
    if resumed:
        print(f"batch: resuming {args.out}: {earlier} of {len(tasks)} images already done, skipped as done",
              file=sys.stderr, flush=True)
    ids = [t.image_id for t in tasks]
    start, finished = time.perf_counter(), 0
    for group in _groups(todo, args.group):
        job.run_group(group)
        finished += len(group)
        store.write_table(ids)
        if not args.no_progress:
            elapsed = time.perf_counter() - start
            rate = finished / elapsed if elapsed > 0 else 0.0
            eta = (len(todo) - finished) / rate if rate > 0 else 0.0
            print(f"batch: {earlier + finished}/{len(tasks)} images, {rate:.3g} images/s, ETA {eta:.0f} s "
                  f"(inverted {job.counts.inverted}, reused {job.counts.reused})", file=sys.stderr, flush=True)
    path, rows = store.write_table(ids)
    elapsed = time.perf_counter() - start
    status = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "failed")}
    c = job.counts
    print(f"inverted {c.inverted}, reused {c.reused}")
    print(f"batch: {len(tasks)} images: {c.images} done now ({c.skipped_images} with every edit skipped), "
          f"{earlier} done earlier, {c.failed} failed; rows: {status['ok']} ok, {status['skipped']} skipped, "
          f"{status['failed']} failed; inverted {c.inverted}, reused {c.reused}; "
          f"{(c.images + c.failed) / elapsed if elapsed > 0 else 0.0:.3g} images/s; {path}")
    return 1 if status["failed"] else 0
