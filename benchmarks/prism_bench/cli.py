"""``prism-rt bench``: the options, model preparation for the presets, and the output folder."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from prism_rt.errors import ModelError, OutputError, PrismError, SettingsError

DEFAULT_CACHE = Path(os.environ.get("PRISM_RT_CACHE", Path.home() / ".cache" / "prism_rt")) / "bench"


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="latency, throughput, memory and quality of the engine's configurations")
    p.add_argument("--preset", choices=["tiny", "sd15"], default="tiny",
                   help="tiny: a tiny SD-v1.5-layout model, fewer steps (CI smoke run); sd15: the real SD v1.5 "
                        "architecture with random weights (per graph on a CPU, end to end on a GPU)")
    p.add_argument("--model", type=Path, help="a checkpoint (diffusers folder / .safetensors) or an engine folder; "
                                              "default: the preset's model, built once into --cache")
    p.add_argument("--engine", type=Path, help="the engine folder of --model's checkpoint (when --model is a checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and the plots")
    p.add_argument("--compare", type=Path, help="an earlier results.json: print the change of every common measurement")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (torch; onnxruntime uses its CUDA provider)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime (default: all cores)")
    p.add_argument("--steps", type=int, help="DDIM steps of the end-to-end runs (default: the preset's)")
    p.add_argument("--repeats", type=int, help="timed repeats per graph measurement (default: the preset's)")
    p.add_argument("--mode", choices=["full", "graphs"], help="full: per graph + end to end; graphs: per graph only "
                                                              "(default: sd15 runs full on a GPU only)")
    p.add_argument("--graphs", help="per-graph measurements of these graphs only, comma-separated "
                                    "(text_encoder,vae_encoder,vae_decoder,unet; default: all)")
    p.add_argument("--precisions", help="the engine precisions to measure, comma-separated (default: all it has)")
    p.add_argument("--batches", help="per-graph batch sizes, comma-separated (default: the preset's)")
    p.add_argument("--image", type=Path, action="append",
                   help="radiograph(s) to edit (default: pydicom-data's RG1_UNCR.dcm and phantom patients)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where preset models and engines are kept")
    p.add_argument("--no-isolate", action="store_true", help="run every configuration in this process (no per-process RSS)")
    p.add_argument("--paired", action="store_true",
                   help="also time torch fp32 and every engine precision in turn, round after round, each in its own "
                        "process (--no-isolate: all in this one), and report each round's ratio (steady on machines "
                        "whose speed drifts between runs; needs the checkpoint)")
    p.set_defaults(func=run_bench_cli)
    return p


def register(sub) -> None:
    """The ``prism_rt.commands`` entry point: ``prism-rt bench``."""
    add_bench_parser(sub)


def _prepare_preset(preset: str, cache: Path, progress) -> dict:
    """The preset's checkpoint and engine (with its precision variants), built once."""
    from prism_export.tiny import SD15, TinySpec, save_tiny_model

    folder = cache / preset
    checkpoint, engine = folder / "model", folder / "engine"
    if not (checkpoint / "model_index.json").is_file():
        shutil.rmtree(checkpoint, ignore_errors=True)
        progress(f"building the {preset} model into {checkpoint} (once) …")
        save_tiny_model(checkpoint, SD15 if preset == "sd15" else TinySpec())
    if not (engine / "manifest.json").is_file():
        from prism_export.onnx_export import export_engine
        from prism_export.variants import VariantSettings

        shutil.rmtree(engine, ignore_errors=True)
        if preset == "sd15":
            settings = VariantSettings(calibration_count=1, calibration_steps=3, calibration_samples=6, self_replace=(0.6,))
        else:
            settings = VariantSettings(calibration_count=1, calibration_steps=10, calibration_samples=12, self_replace=(0.6,))
        progress(f"exporting the {preset} engine with fp16, int8 and int8-cpu variants into {engine} (once"
                 + ("; about 25 min and 23 GB of memory on a CPU" if preset == "sd15" else "; about 2 min") + ") …")
        export_engine(checkpoint, engine, progress=progress, precisions=("fp16", "int8", "int8-cpu"),
                      variant_settings=settings)
    return {"checkpoint": str(checkpoint), "engine": str(engine)}


def _paths(args, progress) -> dict:
    if args.model is None:
        return _prepare_preset(args.preset, args.cache, progress)
    model = args.model.expanduser()
    if not model.exists():
        raise ModelError(f"--model {model} does not exist")
    if (model / "manifest.json").is_file():  # an engine: its source checkpoint, when still there, runs the torch rows
        source = json.loads((model / "manifest.json").read_text()).get("source", {}).get("path")
        checkpoint = source if source and Path(source).exists() else None
        if checkpoint is None:
            progress(f"the engine's source checkpoint {source} is not here: the torch rows (and the PRISM reference) "
                     "are skipped")
        return {"checkpoint": checkpoint, "engine": str(model)}
    return {"checkpoint": str(model), "engine": str(args.engine) if args.engine else None}


def _images(args, size: int, count: int) -> list:
    from prism_rt.imageio import load_image

    if args.image:
        return [load_image(p).pixels for p in args.image][:max(count, 1)]
    images = []
    try:
        import data_store

        dicom = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
        if dicom.is_file():
            images.append(load_image(dicom).pixels)
    except ImportError:
        pass
    from prism_export.variants import default_calibration_items

    while len(images) < count:
        images += [item.pixels for item in default_calibration_items(count + 1, size)[1:]]
    return images[:count]


def run_bench_cli(args) -> int:
    try:
        from .report import compare, markdown, plots
        from .suite import PRESETS, BenchPlan, run_bench

        import skimage  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        print(f"error: prism-rt bench needs '{exc.name}': pip install 'prism-rt[bench]'", file=sys.stderr)
        return 2
    out = args.out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    if args.compare is not None and not args.compare.is_file():
        raise OutputError(f"--compare {args.compare} is not a file; give an earlier results.json")
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in (("steps", args.steps), ("repeats", args.repeats), ("mode", args.mode)) if v}
    if any(v is not None and v < 1 for v in (args.steps, args.repeats, args.threads) if isinstance(v, int)):
        raise SettingsError("--steps, --repeats and --threads must be ≥ 1")
    if args.batches:
        try:
            batches = tuple(int(b) for b in args.batches.split(",") if b)
        except ValueError:
            raise SettingsError(f"--batches takes integers such as 1,2; got {args.batches!r}") from None
        if not batches or min(batches) < 1:
            raise SettingsError("--batches needs batch sizes ≥ 1")
        overrides.update(batches=batches, cpu_batches=batches, add_edit_batch=False)
    if args.graphs:
        from prism_rt.backend import GRAPHS

        graphs = tuple(g for g in args.graphs.split(",") if g)
        bad = [g for g in graphs if g not in GRAPHS]
        if bad or not graphs:
            raise SettingsError(f"unknown graph(s) {bad} in --graphs; choose from {', '.join(GRAPHS)}")
        overrides["graphs"] = graphs
    preset = replace(preset, **overrides)

    def progress(line):
        print(line, flush=True)

    paths = _paths(args, progress)
    from prism_rt.manifest import load_manifest

    precisions = ("fp32",)
    size = None
    if paths.get("engine"):
        manifest = load_manifest(paths["engine"])
        precisions = manifest.precisions
        if args.precisions:
            wanted = tuple(x for x in args.precisions.split(",") if x)
            missing = [x for x in wanted if x not in precisions]
            if missing or not wanted:
                raise SettingsError(f"--precisions {args.precisions!r}: the engine has {', '.join(precisions)}")
            precisions = wanted
        size = int(manifest.model["image_size"])
    if size is None:
        size = 128
    if args.paired and not (paths.get("checkpoint") and paths.get("engine")):
        raise SettingsError("--paired times the engine against torch fp32 and needs both: give --model CHECKPOINT "
                            "--engine ENGINE, or an engine whose manifest names its source checkpoint (still there)")
    plan = BenchPlan(preset=preset, paths=paths, device=args.device, threads=args.threads,
                     images=_images(args, size, preset.throughput_images), engine_precisions=precisions,
                     isolate=not args.no_isolate, paired=args.paired)
    demo = Path(paths["engine"]) / "demo.json" if paths.get("engine") else None
    if demo is not None and demo.is_file() and not args.image:  # a phantom engine: its edit, judged on the truth
        from prism_rt.imageio import load_image

        spec, root = json.loads(demo.read_text()), demo.parent
        first = load_image(root / spec["image"]).pixels
        plan.images = [first] + plan.images[1:]
        plan.prompt, plan.target = spec["prompt"], spec["targets"][0]
        if spec.get("classifier") and spec.get("truth") and spec.get("mask"):
            plan.judge = {"classifier": str(root / spec["classifier"]), "truth": load_image(root / spec["truth"]).pixels,
                          "mask": load_image(root / spec["mask"]).pixels > 0.5}
    results = run_bench(plan, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    written = plots(results, out)
    print(markdown(results))
    if args.compare:
        print(compare(results, args.compare))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {', '.join(p.name for p in written)}")
    return 0


__all__ = ["add_bench_parser", "run_bench_cli", "PrismError"]
