"""``prism-rt batch``'s command line: its flags (as ``prism-rt edit``'s where they mean the same)
and the job's loop with its progress and summary lines. The job itself: ``prism_rt.batch``."""
from __future__ import annotations

import argparse
import sys
import time

from .batch import BatchJob, groups, stale_masks
from .batch_csv import BatchInputError, EditSpec, ImageTask, attach_masks, read_chexpert_csv, read_image_folder
from .batch_store import JobStore
from .cli_args import (Formatter, common_args, control_from_args, default, floats, is_engine_args, load_engine,
                       model_args, pair, path, positive, words)
from .config import Fit, InversionConfig, InversionMethod, RunLimits, SamplerConfig


TABLE_EVERY_S = 10.0
"""results.csv is rebuilt after the first group, then after a group once this long has passed since
the last rebuild, and at the end: a job of 10⁵ images must not rewrite its whole table per group."""


def add_batch_parser(sub) -> argparse.ArgumentParser:
    """Register ``prism-rt batch`` on the CLI's sub-parsers; its model flags, argument types and
    settings come from ``prism_rt.cli_args``, as ``prism-rt edit``'s do."""
    from .imageio import DEFAULT_MAX_PIXELS

    p = sub.add_parser("batch", help="counterfactuals of a data set (CheXpert CSV or a folder), resumable",
                       formatter_class=Formatter)
    model_args(p)
    w = p.add_argument_group("work list (a CheXpert CSV, or a folder with one caption)")
    w.add_argument("--csv", type=path, help="CheXpert-style CSV: Path + label columns (1 / 0 / -1 / blank)")
    w.add_argument("--root", type=path, help="the folder the CSV's Path column is relative to (default: the CSV's)")
    w.add_argument("--edit", action="append", default=[], metavar="ATTR=remove|add",
                   help="with --csv: flip one label, e.g. 'Support Devices=remove'; repeat for several edits")
    w.add_argument("--images", type=path, help="a folder of images (PNG, JPEG, DICOM), all with --prompt")
    w.add_argument("--prompt", help="with --images: the source caption of every image")
    w.add_argument("--target", action="append", default=[], help="with --images: an edited caption; repeat")
    g = p.add_argument_group("inversion")
    g.add_argument("--inversion", choices=[m.value for m in InversionMethod],
                   help="default: the engine's (null-text on torch, direct on onnxruntime)")
    g.add_argument("--steps", type=int, default=default(SamplerConfig, "steps"), help="DDIM steps")
    g.add_argument("--guidance", type=float, default=default(SamplerConfig, "guidance"),
                   help="classifier-free guidance scale, in [1, 30]")
    g.add_argument("--fit", default=Fit.RESIZE.value, choices=[f.value for f in Fit])
    g.add_argument("--null-inner-steps", type=int, default=default(InversionConfig, "null_inner_steps"))
    g.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS,
                   help="larger images fail (checked from the header)")
    e = p.add_argument_group("edit (as prism-rt edit; defaults are PRISM's)")
    from .config import EDIT_NEGATIVES, NOISE_BLEND_THRESHOLDS, ControlConfig

    e.add_argument("--mode", default=default(ControlConfig, "mode"), choices=["refine", "replace"])
    e.add_argument("--cross-replace", type=float, default=default(ControlConfig, "cross_replace"))
    e.add_argument("--self-replace", type=floats, default=default(ControlConfig, "self_replace"),
                   help="self-attention window(s), comma-separated: each value is one candidate")
    e.add_argument("--edit-weight", type=float, default=default(ControlConfig, "edit_weight"))
    e.add_argument("--edit-words", type=words, help="words to reweight (default: the new words of each target)")
    e.add_argument("--blend-words", type=pair, help="SRC_WORD,EDIT_WORD: LocalBlend from the attention maps")
    e.add_argument("--blend-threshold", type=float, default=default(ControlConfig, "blend_threshold"))
    e.add_argument("--blend-dilation", type=int, default=default(ControlConfig, "blend_dilation"))
    e.add_argument("--edit-negative", default=default(ControlConfig, "edit_negative"), choices=EDIT_NEGATIVES,
                   help="what the edits' guidance steers away from: empty (published) or source (the source caption)")
    e.add_argument("--noise-blend", action="store_true", help="LocalBlend from the noise predictions (DiffEdit)")
    e.add_argument("--noise-blend-threshold", type=floats, default=NOISE_BLEND_THRESHOLDS)
    e.add_argument("--composite", type=floats, default=(), metavar="T[,T…]", help="difference composite(s)")
    e.add_argument("--keep-mask", type=path, metavar="FILE|DIR",
                   help="white where the image must never change: one mask for every image, or a folder of masks "
                        "named as the images (a CSV's KeepMask column gives an image its own)")
    e.add_argument("--edit-mask", type=path, metavar="FILE|DIR",
                   help="white where the edit may act (as --keep-mask; CSV column EditMask)")
    e.add_argument("--legacy", action="store_true", help="no attention control, no blend (the published code)")
    e.add_argument("--seed", type=int, default=0, help="recorded; every step is deterministic (η = 0)")
    e.add_argument("--select", type=path, metavar="CLASSIFIER.onnx",
                   help="per edit, the candidate that flips the attribute with the best identity (PRISM's filter)")
    o = p.add_argument_group("job")
    o.add_argument("--out", type=path, required=True,
                   help="the job folder: one folder per image, results.csv, job.json; rerun to resume")
    o.add_argument("--group", type=positive, default=4, help="images edited together in one UNet batch")
    o.add_argument("--max-batch", type=positive, default=default(RunLimits, "max_batch"),
                   help="largest UNet batch; a group that does not fit is split")
    o.add_argument("--cache", type=path, help="inversion cache folder (default OUT/.cache/inversions); "
                                                    "another job's reuses its inversions")
    o.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster: one engine per actor (per GPU with --device cuda); no ADDRESS: a "
                        "local cluster (or $RAY_ADDRESS); OUT must be storage every node sees")
    o.add_argument("--ray-actors", type=positive, help="with --ray: how many engines (default: one per GPU, or per "
                                                         "--threads CPUs)")
    o.add_argument("--no-figure", dest="figure", action="store_false", help="no figure.png per image")
    o.add_argument("--extras", action="store_true", help="also the reconstruction and the difference maps")
    common_args(p)
    p.set_defaults(func=cmd_batch)
    return p


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
        tasks = read_chexpert_csv(args.csv, args.root or args.csv.parent, edits)
    else:
        if args.edit or args.root:
            raise BatchInputError("--edit and --root go with --csv; with --images give --prompt and --target")
        tasks = read_image_folder(args.images, args.prompt or "", list(args.target))
    attach_masks(tasks, args.keep_mask, args.edit_mask)
    return tasks


def cmd_batch(args) -> int:
    tasks = _tasks(args)
    if args.ray_actors and args.ray is None:
        raise BatchInputError("--ray-actors goes with --ray")
    # the control settings against the inversion (its default: direct on an engine folder, null-text on a
    # checkpoint) before OUT is made
    method = args.inversion or (InversionMethod.DIRECT if is_engine_args(args) else InversionMethod.NULL_TEXT)
    control_from_args(args).check_inversion(method)
    store = JobStore(args.out, args.cache)
    store.check_out()
    store.lock()
    job = None
    try:
        if args.ray is not None:
            from .batch_ray import RayRunner

            job = RayRunner(args, tasks, store)
        else:
            job = BatchJob(args, tasks, store, load_engine, control_from_args)
        return _run(args, tasks, store, job)
    finally:
        if job is not None:
            job.close()
        store.unlock()


def _run(args, tasks: list[ImageTask], store: JobStore, job) -> int:
    """The job's loop; ``job`` is a local ``BatchJob`` or a ``batch_ray.RayRunner``."""
    resumed = store.claim(job.settings())
    ids = [t.image_id for t in tasks]
    done = store.scan(ids)
    changed = stale_masks(tasks, store.rows, done)
    if changed:
        print(f"batch: {len(changed)} done image(s) have other mask files now; they are done again",
              file=sys.stderr, flush=True)
        done -= changed
    todo = [t for t in tasks if t.image_id not in done]
    earlier = len(tasks) - len(todo)
    if resumed:
        print(f"batch: resuming {args.out}: {earlier} of {len(tasks)} images already done, skipped as done",
              file=sys.stderr, flush=True)
    start, finished, written = time.perf_counter(), 0, None
    for group in job.run(groups(todo, args.group)):
        finished += len(group)
        if written is None or time.monotonic() - written >= TABLE_EVERY_S:
            store.write_table(ids)
            written = time.monotonic()
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
