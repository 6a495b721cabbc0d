"""``prism-export bundle-demo``: a trained phantom model → the bundled ``engines/phantom-demo``.

The engine (fp32 + the chosen variants, calibrated on phantom patients), the model's attribute
classifier, a few held-out phantom radiographs with their masks and true counterfactuals, and
``demo.json`` (what ``prism-rt demo`` edits). Everything is staged and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prism_rt.manifest import MANIFEST_NAME
from prism_rt.precision import Precision
from prism_rt.publish import staged_dir

from .onnx_export import ExportError, export_engine
from .calibration import CALIBRATION_SEED0
from .variant_config import VariantSettings

DEMO_IMAGES = 3


# How the demo edits: PRISM's own attention LocalBlend on "Devices" (the edit prompt has no word
# for what goes: ""), its maps at the latent's size (the engine is exported with --blend-downsample
# 1) taken without the published 3×3 pool, which would widen every lead by a cell on each side, at
# threshold 0.15 of the peak (0.3 published; lower keeps the leads' faint ends), the edit guided
# away from the source caption (--edit-negative source: what the edit drops is pushed out, where
# guidance from "" redrew part of a lead), and classifier-free guidance 3 instead of SD's 7.5 (this
# small model's edits stay plausible there). Chosen on phantoms 1000100–1000123 (0.15: the lowest
# threshold whose blend mask still meets IoU 0.5 there) and measured on 1000200–1000249 and
# 1000300–1000349 (benchmarks/RESULTS.md).
DEMO_EDIT_ARGS = ("--guidance", "3", "--blend-words", "Devices,", "--blend-dilation", "0", "--blend-threshold", "0.15",
                  "--edit-negative", "source")


def _demo_seeds(count: int) -> list[int]:
    """Held-out patients that carry support devices (the demo removes them)."""
    from . import phantom

    seeds, seed = [], phantom.HELDOUT_SEED0
    while len(seeds) < count:
        if phantom.sample_attributes(seed).devices:
            seeds.append(seed)
        seed += 1
    return seeds


def _calibration_folder(folder: Path, count: int, size: int) -> Path:
    """Phantom patients (their own seed range) with their captions and the devices edit."""
    from . import phantom

    folder.mkdir(parents=True)
    captions = {}
    for seed in range(CALIBRATION_SEED0, CALIBRATION_SEED0 + count):
        patient, attributes = phantom.sample_patient(seed), phantom.sample_attributes(seed)
        sample = phantom.render(patient, attributes, size)
        toggled = phantom.counterfactuals(patient, attributes, size)["devices"]
        name = f"calibration-{seed}.png"
        phantom._save_png(folder / name, sample.image, 16)
        captions[name] = {"prompt": sample.caption, "targets": [toggled.caption]}
    (folder / "captions.json").write_text(json.dumps(captions, indent=1))
    return folder


def _compact_tokenizer_view(model: Path, folder: Path) -> Path:
    """The model folder with its tokenizer as vocab.json + merges.txt (1.5 MB) in place of
    tokenizer.json (3.6 MB): the same real CLIP vocabulary and ids, a smaller bundle."""
    from .clip_vocab import write_clip_tokenizer_files

    folder.mkdir(parents=True)
    for child in model.iterdir():
        if child.name != "tokenizer":
            (folder / child.name).symlink_to(child.resolve(), target_is_directory=child.is_dir())
    write_clip_tokenizer_files(folder / "tokenizer")
    return folder


def bundle_demo(model: Path, out: Path, precisions=("int8-cpu",), calibration_count: int = 4,
                calibration_steps: int = 50, progress=print, blend_downsample: int | None = None) -> Path:
    model, out = Path(model), Path(out)
    classifier = model / "classifier.onnx"
    if not classifier.is_file():
        raise ExportError(f"{model} has no classifier.onnx; train the model with `prism-export train-phantom`")
    if out.exists():
        raise ExportError(f"{out} exists; remove it first (the bundle is rebuilt whole)")
    calibration = out.parent / f".{out.name}.calibration-{os.getpid()}"
    view_folder = out.parent / f".{out.name}.model-{os.getpid()}"
    # staged and renamed onto out whole (prism_rt.publish), a killed build's staging folder swept
    try:
        with staged_dir(out, marker=MANIFEST_NAME) as staging:
            _bundle(model, staging, classifier, calibration, view_folder, precisions, calibration_count,
                    calibration_steps, progress, blend_downsample)
    finally:
        shutil.rmtree(calibration, ignore_errors=True)
        shutil.rmtree(view_folder, ignore_errors=True)
    return out


def _bundle(model: Path, staging: Path, classifier: Path, calibration: Path, view_folder: Path, precisions,
            calibration_count: int, calibration_steps: int, progress, blend_downsample: int | None = None) -> None:
    """The demo engine's contents, into ``staging``."""
    from . import phantom

    size = json.loads((model / "unet" / "config.json").read_text())["sample_size"] * 8
    calibration = _calibration_folder(calibration, calibration_count, size)
    settings = VariantSettings(calibration_images=calibration, calibration_count=calibration_count,
                               calibration_steps=calibration_steps, calibration_samples=64)
    view = _compact_tokenizer_view(model, view_folder)
    export_engine(view, staging, progress=progress, precisions=tuple(p for p in map(Precision.parse, precisions) if not p.is_reference),
                  variant_settings=settings, blend_downsample=blend_downsample)
    shutil.copy2(classifier, staging / "classifier.onnx")
    seeds = _demo_seeds(DEMO_IMAGES)
    phantom.write_phantom_set(staging / "images", seeds, size)
    first = json.loads((staging / "images" / "phantoms.json").read_text())["phantoms"][0]
    training = json.loads((model / "training.json").read_text()) if (model / "training.json").is_file() else None
    (staging / "demo.json").write_text(json.dumps({
        "image": f"images/{first['file']}", "prompt": first["caption"], "targets": [first["cf_devices_caption"]],
        "classifier": "classifier.onnx", "truth": f"images/{first['cf_devices']}",
        "mask": f"images/{first['mask_devices']}",
        "about": "held-out phantom patient (never trained on); the edit removes the support devices; "
                 "images/ holds its mask and true counterfactual",
        "edit_args": list(DEMO_EDIT_ARGS),
        "training": training,
    }, indent=1) + "\n")
