"""Procedural chest radiograph phantoms with ground-truth counterfactuals.

A *patient* (anatomy, exposure, position, noise) is drawn from a seed; *attributes* (support
devices, pleural effusion, cardiomegaly) are rendered on that same patient, so toggling one
attribute yields the exact counterfactual: the image changes where the attribute is and
nowhere else (bit-exact outside its mask). That is what a PRISM edit should achieve, so these
phantoms serve as a training set for a small SD-v1.5-layout model (``train_phantom``) and as
an evaluation set with known answers.

Conventions
-----------
* PA view, MONOCHROME2: bright = dense. ``image`` is float32 H×W in [0, 1].
* The patient's right is on the image's left (as on any PA radiograph): a "right" effusion
  sits in the image's left lung, the heart and a pacemaker are usually on the image's right.
* Anatomy is defined analytically in patient coordinates (x, y in about [-1, 1], y down) and
  evaluated at every pixel through the patient's pose (shift, rotation, scale), so nothing is
  resampled and every structure has compact support (smoothstep edges, no Gaussian tails).
* Labels use CheXpert's names; "No Finding" is 1 iff neither effusion nor cardiomegaly is
  present (as in CheXpert, support devices may coexist with No Finding); the caption is
  :func:`prism_rt.captions.chexpert_caption` of the labels.
* Training seeds are 0…N; held-out evaluation patients use seeds ≥ :data:`HELDOUT_SEED0`.

Modules: the cases (patients, attributes, seeds) in :mod:`prism_export.phantom_patient`, the
rendering in :mod:`prism_export.phantom_render`; this one makes the rendered phantoms, their
counterfactuals and masks, and writes data sets. numpy and scipy.ndimage only.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from prism_rt.captions import chexpert_caption

from .phantom_patient import ATTRIBUTES, Attributes, Patient, sample_attributes, sample_patient, toggle
from .phantom_render import anatomy_masks, compose

# read from here by code outside prism_export (benchmarks/prism_bench/evaluate_cli.py)
from .phantom_patient import HELDOUT_SEED0, LABEL_OF  # noqa: E402,F401


@dataclass(frozen=True)
class Phantom:
    """One rendered radiograph. ``masks[attr]``: where toggling that attribute changes the
    image (dilated by 1 px); ``anatomy``: "heart" (the heart as drawn), "lungs", "thorax"
    (between the inner rib margins, above the diaphragm) as bool masks."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    labels: dict[str, int]
    caption: str
    patient: Patient
    attributes: Attributes
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ctr(self) -> float:
        return measure_ctr(self.anatomy["heart"], self.anatomy["thorax"])


def measure_ctr(heart: np.ndarray, thorax: np.ndarray) -> float:
    """Cardiothoracic ratio from masks: widest horizontal extent of the heart / of the thorax."""
    def width(mask):
        cols = np.flatnonzero(mask.any(axis=0))
        return 0 if cols.size == 0 else cols[-1] - cols[0] + 1
    return float(width(heart) / max(width(thorax), 1))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def render_image(patient: Patient, attributes: Attributes, size: int = 128) -> np.ndarray:
    """The image alone (no masks): the fast path for training sets."""
    return compose(patient, attributes, int(size))


def _dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=px) if mask.any() else mask


def render(patient: Patient, attributes: Attributes, size: int = 128) -> Phantom:
    """Render ``attributes`` on ``patient`` with masks, labels, caption and anatomy masks."""
    size = int(size)
    img = compose(patient, attributes, size)
    masks = {}
    for name in ATTRIBUTES:
        other = compose(patient, toggle(patient, attributes, name), size)
        masks[name] = _dilate(other != img, 1)
    anatomy = anatomy_masks(patient, attributes, size)
    labels = attributes.labels()
    return Phantom(image=img, masks=masks, labels=labels, caption=chexpert_caption(labels), patient=patient,
                   attributes=attributes, anatomy=anatomy)


def counterfactuals(patient: Patient, attributes: Attributes, size: int = 128) -> dict[str, Phantom]:
    """The same patient with each attribute toggled (keys :data:`ATTRIBUTES`)."""
    return {name: render(patient, toggle(patient, attributes, name), size) for name in ATTRIBUTES}


def phantom(seed: int, size: int = 128, attributes: Attributes | None = None) -> Phantom:
    """``render(sample_patient(seed), attributes or sample_attributes(seed), size)``."""
    return render(sample_patient(seed), attributes if attributes is not None else sample_attributes(seed), size)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _save_png(path: Path, pixels: np.ndarray, bits: int) -> None:
    from PIL import Image

    top = 65535 if bits == 16 else 255
    arr = np.clip(np.rint(np.asarray(pixels, dtype=np.float64) * top), 0, top).astype(np.uint16 if bits == 16 else np.uint8)
    Image.fromarray(arr).save(path)


def _attr_json(at: Attributes) -> dict:
    d = asdict(at)
    d["device_kinds"] = list(at.device_kinds)
    return d


def write_phantom_set(out_dir, seeds, size: int = 128) -> Path:
    """Write, per seed: ``{name}.png`` (16-bit), ``{name}_mask_{attr}.png`` (8-bit 0/255) and
    ``{name}_cf_{attr}.png`` (the counterfactual, 16-bit), plus ``phantoms.csv`` and
    ``phantoms.json`` (caption, labels, seed, attributes, files). Returns the CSV's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        patient, attrs = sample_patient(int(seed)), sample_attributes(int(seed))
        ph = render(patient, attrs, size)
        name = patient.name
        _save_png(out / f"{name}.png", ph.image, 16)
        row = {"seed": int(seed), "file": f"{name}.png", "caption": ph.caption, **ph.labels,
               "effusion_side": attrs.effusion or "", "device_kinds": " ".join(attrs.device_kinds),
               "ctr": round(ph.ctr, 4)}
        for attr, cf in counterfactuals(patient, attrs, size).items():
            _save_png(out / f"{name}_mask_{attr}.png", ph.masks[attr].astype(np.float64), 8)
            _save_png(out / f"{name}_cf_{attr}.png", cf.image, 16)
            row[f"mask_{attr}"] = f"{name}_mask_{attr}.png"
            row[f"cf_{attr}"] = f"{name}_cf_{attr}.png"
            row[f"cf_{attr}_caption"] = cf.caption
        row["attributes"] = json.dumps(_attr_json(attrs))
        rows.append(row)
    csv_path = out / "phantoms.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["seed"])
        writer.writeheader()
        writer.writerows(rows)
    meta = [{**{k: v for k, v in row.items() if k != "attributes"}, "attributes": json.loads(row["attributes"])}
            for row in rows]
    (out / "phantoms.json").write_text(json.dumps({"size": size, "convention": "MONOCHROME2, PA (patient right "
                                                   "= image left)", "phantoms": meta}, indent=1))
    return csv_path


def contact_sheet(seeds, size: int = 128, path=None) -> np.ndarray:
    """Rows = patients; columns = base (no attribute), +devices, +effusion, +cardiomegaly, all."""
    tiles = []
    for seed in seeds:
        p, at = sample_patient(int(seed)), sample_attributes(int(seed))
        none = replace(at, devices=False, effusion=None, cardiomegaly=False)
        row = [render_image(p, none, size), render_image(p, replace(none, devices=True), size),
               render_image(p, replace(none, effusion=p.effusion_side), size),
               render_image(p, replace(none, cardiomegaly=True), size),
               render_image(p, replace(none, devices=True, effusion=p.effusion_side, cardiomegaly=True), size)]
        tiles.append(np.concatenate([np.pad(t, 2, constant_values=1.0) for t in row], axis=1))
    sheet = np.concatenate(tiles, axis=0)
    if path is not None:
        _save_png(Path(path), sheet, 8)
    return sheet
