"""The quality of a precision variant against the fp32 reference, as the manifest records it.

The fp32 engine and the variant invert (direct inversion: ONNX Runtime has no autograd) and edit the
same calibration images; :func:`image_quality` gives the PSNR and SSIM (:mod:`prism_rt.metrics`) of
the variant's counterfactuals and reconstructions against fp32's, :func:`noise_error` the error of
its UNet's noise prediction on the recorded inputs. These are in-sample figures: the images are the
calibration images, as the export has no others.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from prism_rt.manifest import MANIFEST_NAME
from prism_rt.metrics import psnr, ssim
from prism_rt.precision import Precision

from .calibration import CalibrationItem, Run, invert_and_edit
from .variant_config import VariantSettings


def image_quality(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """PSNR (capped at 99 dB) and SSIM, data range 1, of each counterfactual and reconstruction."""
    edits, recons = [], []
    for ref, got in zip(reference, candidate):
        for i, (r, g) in enumerate(zip(ref, got)):
            (recons if i == 0 else edits).append((psnr(r, g), ssim(r, g)))

    def summary(rows):
        if not rows:
            return None
        psnr_db, ssim_ = np.array(rows).T
        return {"psnr_db_min": round(float(psnr_db.min()), 2), "psnr_db_mean": round(float(psnr_db.mean()), 2),
                "ssim_min": round(float(ssim_.min()), 4), "ssim_mean": round(float(ssim_.mean()), 4), "count": len(rows)}

    return {"counterfactuals": summary(edits), "reconstructions": summary(recons)}


def noise_error(backend, calls: Sequence[tuple[dict, np.ndarray]]) -> dict:
    """The variant UNet's noise prediction against fp32's on the recorded inputs."""
    max_abs = max_rel = 0.0
    sq_err = sq_ref = 0.0
    for feeds, reference in calls:
        got = np.asarray(backend.run("unet", **feeds)["noise"], dtype=np.float64)
        diff = np.abs(got - reference)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(diff.max() / max(np.abs(reference).max(), 1e-12)))
        sq_err += float((diff ** 2).sum())
        sq_ref += float((reference.astype(np.float64) ** 2).sum())
    return {"max_abs": max_abs, "max_rel": max_rel, "rms_rel": float(np.sqrt(sq_err / max(sq_ref, 1e-24))),
            "calls": len(calls),
            "metric": "max_rel = max|Δ| / max|fp32| per call; rms_rel = ‖Δ‖ / ‖fp32‖ over all calls"}


def measure_variant(root: Path, raw: dict, precision: Precision, entry: dict, staging: Path,
                    items: Sequence[CalibrationItem], reference: Run, checks: Sequence, settings: VariantSettings) -> dict:
    """Invert + edit with the variant staged in ``staging`` and compare with the fp32 run ``reference``.

    The staged files are read in place: a temporary engine folder links the fp32 engine's files and
    the staged folder under the variant's name, with a manifest whose ``variants`` holds ``entry``."""
    from prism_rt.engine import Engine

    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        view = Path(tmp) / "engine"
        view.mkdir()
        for child in root.iterdir():
            if child.name not in (MANIFEST_NAME, precision.folder) and not child.name.startswith("."):
                (view / child.name).symlink_to(child.resolve(), target_is_directory=child.is_dir())
        (view / precision.folder).symlink_to(staging.resolve(), target_is_directory=True)
        trial = dict(raw, variants={precision.value: entry})
        (view / MANIFEST_NAME).write_text(json.dumps(trial, indent=2, default=str))
        engine = Engine.load(view, backend="onnxruntime", precision=precision.value, threads=settings.threads,
                             cpu_arena=False)
        run = invert_and_edit(engine, items, settings, record=False)
        noise = noise_error(engine.backend, checks)
        del engine
    return {"reference": "fp32 engine, same images, direct inversion, same settings",
            "images": image_quality(reference.images, run.images), "noise": noise,
            "calibration_images": [i.name for i in items], "steps": settings.calibration_steps,
            "seconds": {"fp32": round(reference.seconds, 1), precision.value: round(run.seconds, 1)},
            "note": "in-sample: measured on the calibration images"}
