"""``prism-rt batch`` (command line: ``prism_rt.batch_cli``): counterfactuals of a data set, resumable.

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

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .batch_csv import EditSpec, ImageTask
from .batch_store import JobStore, inversion_key, model_identity
from .config import InversionConfig, InversionMethod, RunLimits
from .errors import OutputError

SETTING_KEYS = ("inversion", "steps", "guidance", "fit", "null_inner_steps", "max_pixels", "mode", "cross_replace",
                "self_replace", "edit_weight", "edit_words", "blend_words", "blend_threshold", "blend_dilation",
                "edit_negative", "noise_blend",
                "noise_blend_threshold", "composite", "legacy", "seed", "select", "figure", "extras", "keep_mask",
                "edit_mask")
"""The arguments that change a job's outputs, recorded in ``job.json`` (speed-only ones are not:
--group, --threads, --max-batch, --cache, --no-progress)."""


@dataclass
class Counts:
    images: int = 0  # finished in this run (edited or all-skipped)
    skipped_images: int = 0
    failed: int = 0
    inverted: int = 0
    reused: int = 0


def groups(tasks: list[ImageTask], size: int) -> list[list[ImageTask]]:
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


def table_row(task: ImageTask, planned, status: str, error: str = "", **values) -> dict:
    return {"image_id": task.image_id, "path": str(task.path), "source_caption": task.source,
            "target_caption": planned.target or "", "edit": planned.edit, "status": status, "error": error,
            "masks": task.masks, **values}


def stale_masks(tasks: list[ImageTask], rows: dict[str, list[dict]], done: set[str]) -> set[str]:
    """The done images whose recorded mask digest is not their masks' now (``ImageTask.masks``)."""
    return {t.image_id for t in tasks if t.image_id in done and rows.get(t.image_id)
            and rows[t.image_id][0].get("masks", "") != t.masks}


def skipped_rows(task: ImageTask) -> list[dict]:
    return [table_row(task, pe, "skipped", pe.skip_reason) for pe in task.edits if pe.skip_reason is not None]


def error_text(exc: BaseException) -> str:
    from .errors import PrismError

    text = str(exc) if isinstance(exc, PrismError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


class BatchJob:
    """One job: its work list, engine, settings and store."""

    def __init__(self, args, tasks: list[ImageTask], store: JobStore, load, control):
        """``load`` / ``control``: the CLI's engine loader and ControlConfig builder (args → object),
        passed in so that this module does not import the CLI that registers it."""
        self.args, self.tasks, self.store = args, tasks, store
        self.control = control(args)
        self.limits = RunLimits(max_batch=args.max_batch)
        self.classifier = None
        if args.select is not None:
            from .evaluate import Classifier, edit_direction

            self.classifier = Classifier.load(args.select)
            for source, target in {(t.source, x) for t in tasks for x in t.targets}:
                edit_direction(source, target, self.classifier.labels)
        start = time.perf_counter()
        self.engine = load(args)
        self.load_s = time.perf_counter() - start
        self.method = self.engine.check_inversion_method(args.inversion)
        self.sampler = self.engine.sampler(steps=args.steps, guidance=args.guidance)
        self.inversion_config = InversionConfig(null_inner_steps=args.null_inner_steps)
        self.identity = model_identity(self.engine, args.precision)
        self.inversion_settings = {"method": self.method.value, "steps": args.steps, "guidance": args.guidance,
                                   "fit": args.fit, **({"null_inner_steps": args.null_inner_steps}
                                                       if self.method is InversionMethod.NULL_TEXT else {})}
        self.counts = Counts()

    def settings(self) -> dict:
        args = self.args
        work = ({"csv": str(args.csv.absolute()), "root": str((args.root or args.csv.parent).absolute()),
                 "edits": [EditSpec.parse(e).text for e in args.edit]} if args.csv is not None else
                {"images": str(args.images.absolute()), "prompt": args.prompt, "targets": list(args.target)})
        chosen = {k: getattr(args, k) for k in SETTING_KEYS}
        chosen.update({k: str(v.absolute()) for k, v in chosen.items() if isinstance(v, Path)})  # as a Ray actor's
        chosen["inversion"] = self.method.value
        return {"work": work, "model_identity": self.identity, "settings": chosen}

    # -- one image's inversion -----------------------------------------------------------------
    def _inversion(self, task: ImageTask):
        """(inversion, seconds spent inverting, user masks or None); masks are read and checked first."""
        from .imageio import load_image
        from .inversion import Inversion
        from .user_masks import UserMasks

        self.engine.plan(task.source, task.targets, self.control, self.sampler.steps)
        source = load_image(task.path, max_pixels=self.args.max_pixels)
        masks = UserMasks.read(task.keep_mask, task.edit_mask, source.pixels.shape)
        path = self.store.cache_path(inversion_key(source.sha256, task.source, self.identity, self.inversion_settings))
        if path.is_file():
            try:
                inversion = Inversion.load(path, max_pixels=self.args.max_pixels)
                if inversion.sampler == self.sampler and inversion.method is self.method:
                    self.counts.reused += 1
                    return inversion, 0.0, masks
            except Exception:  # an unreadable cache entry is a miss: invert again and replace it
                pass
        start = time.perf_counter()
        inversion = self.engine.invert(source, task.source, method=self.method, sampler=self.sampler,
                                       inversion=self.inversion_config, fit=self.args.fit)
        elapsed = time.perf_counter() - start
        inversion.save(path)
        self.counts.inverted += 1
        return inversion, elapsed, masks

    def _fail(self, task: ImageTask, exc: BaseException) -> None:
        error = error_text(exc)
        rows = [table_row(task, pe, "failed", error) for pe in task.edits if pe.skip_reason is None] + skipped_rows(task)
        self.store.record_failure(task.image_id, rows)
        self.counts.failed += 1
        print(f"batch: {task.image_id} failed: {error}", file=sys.stderr, flush=True)

    def _edit(self, ready: list) -> list:
        """edit_many over the group; if it fails, each image alone, so one bad image fails alone."""
        start = time.perf_counter()
        try:
            results = self.engine.edit_many([inv for _, inv, _, _ in ready], [t.targets for t, _, _, _ in ready],
                                            self.control, self.limits, keep_masks=[m and m.keep for *_, m in ready],
                                            edit_masks=[m and m.edit for *_, m in ready])
            per_image = (time.perf_counter() - start) / len(ready)
            return [(t, inv, inv_s, res, per_image) for (t, inv, inv_s, _), res in zip(ready, results)]
        except OutputError:
            raise
        except Exception:
            if len(ready) == 1:
                raise
        out = []
        for task, inv, inv_s, masks in ready:
            start = time.perf_counter()
            try:
                result = self.engine.edit(inv, task.targets, self.control, self.limits, keep_mask=masks and masks.keep,
                                          edit_mask=masks and masks.edit)
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
                rows.append(table_row(task, planned, "skipped", planned.skip_reason))
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
            rows.append(table_row(task, planned, "ok", "; ".join(result.warnings), **values))
        parameters = {"batch": {"image_id": task.image_id, "path": str(task.path), "rows": rows},
                      "job": self.settings()}
        write_edit_outputs(self.store.folder(task.image_id), result, inversion, parameters, selection=selection,
                           figure=self.args.figure, extras=self.args.extras)
        self.store.finished(task.image_id, rows)
        self.counts.images += 1

    def run(self, groups: list[list[ImageTask]]):
        """Yield each group once it is done (as ``batch_ray.RayRunner.run`` does on a cluster)."""
        for group in groups:
            self.run_group(group)
            yield group

    def close(self) -> None:
        pass

    def run_group(self, group: list[ImageTask]) -> None:
        ready = []
        for task in group:
            if not task.targets:
                self.store.publish_skipped(task.image_id, {"image_id": task.image_id, "path": str(task.path),
                                                           "rows": skipped_rows(task)})
                self.counts.images += 1
                self.counts.skipped_images += 1
                continue
            try:
                inversion, invert_s, masks = self._inversion(task)
            except OutputError:
                raise
            except Exception as exc:  # unreadable, missing, too large, non-finite, a bad mask: this image only
                self._fail(task, exc)
                continue
            ready.append((task, inversion, invert_s, masks))
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
