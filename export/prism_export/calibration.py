"""Calibration data of the precision variants: images with their captions, and the fp32 engine's
inversion + edit trajectories over them, with every UNet call's inputs recorded.

The int8 variants are calibrated on the recorded UNet inputs (latents, timesteps, text embeddings
and control tensors of real trajectories, not random tensors), and every variant is measured by
running the same images again (:mod:`prism_export.quality`). The built-in images are pydicom-data's
CR radiograph (when installed) and phantom patients apart from the training and evaluation ones.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .variant_config import VariantError, VariantSettings

DEFAULT_SOURCE_PROMPT = "Chest X-ray showing No Finding"
DEFAULT_TARGETS = ("Chest X-ray showing Support Devices", "Chest X-ray showing Pleural Effusion")
CALIBRATION_SEED0 = 2_000_000  # phantom patients for calibration: apart from training (0…) and evaluation (1e6…)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


@dataclass(frozen=True)
class CalibrationItem:
    """One calibration image (gray, [0,1], any size) with its caption and edited captions."""

    name: str
    pixels: np.ndarray = field(repr=False)
    prompt: str = DEFAULT_SOURCE_PROMPT
    targets: tuple[str, ...] = DEFAULT_TARGETS


def load_calibration_items(folder: Path, count: int) -> list[CalibrationItem]:
    """Images of ``folder`` (PNG, JPEG, DICOM), sorted by name, the first ``count``. Captions come
    from ``folder/captions.json`` (``{"file.png": {"prompt": "...", "targets": ["...", ...]}}``) when
    present, otherwise a normal caption with a support-device and an effusion edit."""
    from prism_rt.imageio import load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise VariantError(f"--calibration-images {folder} is not a folder; give a folder of PNG/JPEG/DICOM radiographs")
    captions = {}
    if (folder / "captions.json").is_file():
        try:
            captions = json.loads((folder / "captions.json").read_text())
        except ValueError as exc:
            raise VariantError(f"{folder / 'captions.json'} is not valid JSON ({exc}); see `prism-export export --help`") from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise VariantError(f"--calibration-images {folder} holds no PNG, JPEG or DICOM image")
    items = []
    for path in files:
        entry = captions.get(path.name, {})
        items.append(CalibrationItem(path.name, load_image(path).pixels, entry.get("prompt", DEFAULT_SOURCE_PROMPT),
                                     tuple(entry.get("targets", DEFAULT_TARGETS))))
    return items


def default_calibration_items(count: int, size: int) -> list[CalibrationItem]:
    """The built-in set: the real CR radiograph of pydicom-data (when installed), then phantom
    patients (``prism_export.phantom``) with their captions and the edit that toggles devices."""
    items = []
    try:
        import data_store

        from prism_rt.imageio import load_image

        dicom = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
        if dicom.is_file():
            items.append(CalibrationItem("RG1_UNCR.dcm", load_image(dicom).pixels))
    except ImportError:
        pass
    seed = CALIBRATION_SEED0
    while len(items) < count:
        items.append(phantom_item(seed, size))
        seed += 1
    return items[:count]


def phantom_item(seed: int, size: int) -> CalibrationItem:
    """Phantom patient ``seed`` (``prism_export.phantom``) with its caption and the edit that toggles
    its support devices."""
    from . import phantom

    patient, attributes = phantom.sample_patient(seed), phantom.sample_attributes(seed)
    sample = phantom.render(patient, attributes, size=size)
    toggled = phantom.counterfactuals(patient, attributes, size=size)["devices"]
    return CalibrationItem(f"phantom-{seed}", sample.image, sample.caption,
                           (toggled.caption,) if toggled.caption != sample.caption else DEFAULT_TARGETS)


class RecordingBackend:
    """Wraps a backend; keeps a copy of every UNet call's inputs and noise output."""

    def __init__(self, backend):
        self._backend = backend
        self.unet_calls: list[tuple[dict, np.ndarray]] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def run(self, graph: str, **inputs):
        outputs = self._backend.run(graph, **inputs)
        if graph == "unet":
            self.unet_calls.append(({k: np.array(v, copy=True) for k, v in inputs.items()},
                                    np.array(outputs["noise"], copy=True)))
        return outputs


@dataclass
class Run:
    """What one pass of the calibration images produced."""

    images: list[np.ndarray]  # per item: [1 + edits, S, S] in [0,1] (reconstruction first)
    unet_calls: list
    seconds: float


def invert_and_edit(engine, items: Sequence[CalibrationItem], settings: VariantSettings, record: bool) -> Run:
    """Direct inversion (ONNX Runtime has no autograd) and edit of every item with ``engine``;
    ``record``: keep every UNet call's inputs and noise output."""
    from prism_rt.config import ControlConfig
    from prism_rt.engine import Engine

    runner = engine
    if record:
        runner = Engine(RecordingBackend(engine.backend), engine.tokenizer, engine.model_path)
    sampler = engine.sampler(steps=settings.calibration_steps)
    control = ControlConfig(self_replace=tuple(settings.self_replace))
    images, start = [], time.perf_counter()
    for item in items:
        inversion = runner.invert(item.pixels, item.prompt, method="direct", sampler=sampler)
        result = runner.edit(inversion, list(item.targets), control)
        stack = np.stack([result.reconstruction, *result.edits]).mean(1)  # gray
        images.append(np.clip((stack + 1) / 2, 0, 1))
    calls = runner.backend.unet_calls if record else []
    return Run(images, calls, time.perf_counter() - start)


def spread_index(total: int, count: int) -> list[int]:
    """At most ``count`` indices into ``total`` items, evenly spread (all of them when fewer)."""
    if total <= count:
        return list(range(total))
    return np.unique(np.linspace(0, total - 1, count).round().astype(int)).tolist()


def spread(calls: list, count: int) -> list:
    """At most ``count`` of ``calls``, evenly spread (:func:`spread_index`)."""
    return [calls[i] for i in spread_index(len(calls), count)]
