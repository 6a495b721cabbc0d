"""Images per hour of ``prism-rt batch`` on the bundled phantom engine: ``--group 1`` against
``--group 4`` (or any ``--groups``), end to end (inversion + edit + outputs) and with the inversions
already cached (edit + outputs: what ``--group`` batches); with ``--ray-actors N`` also the same job
on a local Ray cluster of N actors of ``--ray-threads`` threads each (``prism-rt batch --ray``).

    python benchmarks/batch_throughput.py --images 12 --steps 50 --threads 2 --repeats 3 --json rows.jsonl
    python benchmarks/batch_throughput.py --images 12 --threads 2 --ray-actors 2 --ray-threads 1

N images are made from the engine's three phantoms (a little noise each, so every image has its
own hash and its own inversion); every row is a fresh job into a fresh folder (engine load
excluded: the job's own images/s). Each configuration runs ``--repeats`` times after one warm-up
job; the table gives the median and the range. A job that fails is an error, not a row.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engines" / "phantom-demo"


def make_dataset(folder: Path, n: int) -> Path:
    from PIL import Image

    phantoms = sorted((ENGINE / "images").glob("phantom-100000?.png"))
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        pixels = np.asarray(Image.open(phantoms[k % len(phantoms)]).convert("L"), np.float32)
        pixels = np.clip(pixels + rng.normal(0, 1.5, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{k:03d}.png")
        rows.append([f"img{k:03d}.png", "", "", "", "1"])
    path = folder / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "No Finding", "Cardiomegaly", "Pleural Effusion", "Support Devices"])
        writer.writerows(rows)
    return path


def run_job(labels: Path, out: Path, group: int, args, cache: Path | None, ray: bool = False) -> float:
    """One job's images/s, from its summary line (the engine load, and with Ray the cluster's start,
    are not in it)."""
    from prism_rt.cli import main

    argv = ["batch", "--csv", str(labels), "--out", str(out), "--model", str(ENGINE), "--steps", str(args.steps),
            "--self-replace", "0.5", "--no-figure", "--no-progress", "--group", str(group),
            "--edit", "Support Devices=remove"]
    if ray:
        argv += ["--ray", "--ray-actors", str(args.ray_actors), "--threads", str(args.ray_threads)]
    elif args.threads:
        argv += ["--threads", str(args.threads)]
    argv += ["--cache", str(cache)] if cache else []
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"error: the job into {out} exited {code}: {stderr.getvalue().strip()[-400:]}")
    found = re.search(r"([\d.]+) images/s", stdout.getvalue())
    if not found:
        raise SystemExit(f"error: no images/s in the job's summary: {stdout.getvalue()!r}")
    return float(found.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="images per job")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (PRISM: 50)")
    parser.add_argument("--groups", default="1,4", help="--group values to compare")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: every core)")
    parser.add_argument("--ray-actors", type=int, default=0, help="also run each --group on Ray with this many actors")
    parser.add_argument("--ray-threads", type=int, default=1, help="threads of each Ray actor")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also append the rows here as JSON lines")
    args = parser.parse_args(argv)
    groups = [int(g) for g in args.groups.split(",")]
    import onnxruntime

    env = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "cpu": platform.processor()
           or platform.machine(), "cores": os.cpu_count(), "threads": args.threads, "steps": args.steps,
           "images": args.images}
    rows = []
    with tempfile.TemporaryDirectory(prefix="prism-batch-bench-") as tmp:
        tmp = Path(tmp)
        labels = make_dataset(tmp, args.images)
        cache = tmp / "shared-cache"
        run_job(labels, tmp / "warmup", groups[0], args, cache)  # fills the shared cache too
        runners = [("local", False)] + ([("ray", True)] if args.ray_actors else [])
        local = f"local, {args.threads or 'all'} threads"
        for group in groups:
            for runner, ray in runners:
                for stage, shared in (("end to end", None), ("inversions cached", cache)):
                    rates = [run_job(labels, tmp / f"{runner}-g{group}-{stage[:3]}-{r}", group, args, shared, ray)
                             for r in range(args.repeats)]
                    per_hour = sorted(3600 * r for r in rates)
                    rows.append({"runner": f"Ray, {args.ray_actors} actors × {args.ray_threads} thread(s)" if ray
                                 else local, "group": group, "stage": stage,
                                 "images_per_hour_median": statistics.median(per_hour), "min": per_hour[0],
                                 "max": per_hour[-1], "repeats": args.repeats, **env})
    print(f"prism-rt batch on engines/phantom-demo: {args.images} images, {args.steps} steps, threads "
          f"{args.threads or 'all'}, {args.repeats} repeat(s) after a warm-up job ({env['cpu']}, {env['cores']} cores)\n")
    print("| runner | --group | stage | images/hour (median) | range |")
    print("|---|---:|---|---:|---:|")
    for row in rows:
        print(f"| {row['runner']} | {row['group']} | {row['stage']} | {row['images_per_hour_median']:.0f} | "
              f"{row['min']:.0f}–{row['max']:.0f} |")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
