"""The cases of the phantom data set: patients (anatomy, exposure, pose, noise) and the attributes
rendered on them, each drawn deterministically from a seed. :mod:`prism_export.phantom` renders them
(conventions there); toggling an attribute (:func:`toggle`) gives the exact counterfactual case.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from prism_rt.captions import chexpert_caption

HELDOUT_SEED0 = 1_000_000
"""Held-out (evaluation) patients use seeds ≥ this; training uses 0…N."""

ATTRIBUTES: tuple[str, ...] = ("devices", "effusion", "cardiomegaly")
"""Attribute names: keys of :attr:`Phantom.masks` and of :func:`counterfactuals`."""

LABEL_OF: dict[str, str] = {"devices": "Support Devices", "effusion": "Pleural Effusion",
                            "cardiomegaly": "Cardiomegaly"}
"""Attribute → CheXpert label name."""

LABELS: tuple[str, ...] = ("No Finding", "Cardiomegaly", "Pleural Effusion", "Support Devices")
"""The CheXpert labels a phantom carries (in CheXpert's order)."""

DEVICE_KINDS: tuple[str, ...] = ("pacemaker", "ecg", "line", "ett")
"""pacemaker/ICD box with leads into the heart; ECG electrodes with wires; central venous line;
endotracheal tube."""

Side = Literal["left", "right"]

_PATIENT_STREAM = 0x50A7
_ATTR_STREAM = 0xA77B


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patient:
    """Anatomy, exposure and pose of one synthetic patient (all drawn from ``seed``)."""

    seed: int
    # thorax
    thorax_half_width: float  # lateral inner rib margin at the widest point (patient units)
    body_half_width: float
    apex_y: float
    mid_y: float  # level of the widest thorax
    dome_y_right: float  # top of the right hemidiaphragm (image left)
    dome_y_left: float
    cp_depth: float  # how far the costophrenic angle lies below the dome
    mediastinum_x: float
    mediastinum_half_width: float
    # heart (normal size)
    ctr: float  # normal cardiothoracic ratio, 0.38–0.48
    heart_x: float
    heart_y: float
    heart_aspect: float  # b / a of the heart ellipse
    heart_angle: float  # radians, long axis rotated toward the apex (image right, down)
    # bones
    rib_y0: float
    rib_dy: float
    rib_tilt: float
    rib_curve: float
    rib_width: float
    clavicle_y: float
    # exposure and pose
    exposure: float  # attenuation gain
    gamma: float
    black: float
    white: float
    noise_sigma: float
    texture_amp: float
    shift: tuple[float, float]
    rotation: float  # radians
    scale: float
    effusion_side: Side  # the side an effusion appears on when toggled on

    @property
    def name(self) -> str:
        return f"phantom-{self.seed}"


@dataclass(frozen=True)
class Attributes:
    """What is rendered on a patient, plus the sampled sizes/kinds so toggling is deterministic
    (a device set stays the same device set when devices are toggled off and on again)."""

    devices: bool = False
    effusion: Side | None = None
    cardiomegaly: bool = False
    device_kinds: tuple[str, ...] = ("pacemaker",)
    device_seed: int = 0
    effusion_size: float = 0.6  # 0…1, height of the meniscus
    cardiomegaly_ctr: float = 0.6  # 0.55–0.65

    def __post_init__(self):
        if self.effusion not in (None, "left", "right"):
            raise ValueError(f"effusion must be None, 'left' or 'right', got {self.effusion!r}")
        unknown = [k for k in self.device_kinds if k not in DEVICE_KINDS]
        if unknown or not self.device_kinds:
            raise ValueError(f"device_kinds must be a non-empty subset of {DEVICE_KINDS}, got {self.device_kinds!r}")

    def labels(self) -> dict[str, int]:
        """CheXpert labels (0/1)."""
        eff, cm = self.effusion is not None, bool(self.cardiomegaly)
        return {"No Finding": int(not (eff or cm)), "Cardiomegaly": int(cm),
                "Pleural Effusion": int(eff), "Support Devices": int(bool(self.devices))}

    def caption(self) -> str:
        return chexpert_caption(self.labels())


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def sample_patient(seed: int) -> Patient:
    """A patient drawn deterministically from ``seed``."""
    r = np.random.default_rng([int(seed), _PATIENT_STREAM])
    u = lambda a, b: float(r.uniform(a, b))  # noqa: E731
    dome_r = u(0.22, 0.34)
    return Patient(
        seed=int(seed),
        thorax_half_width=u(0.74, 0.83), body_half_width=u(0.93, 1.08),
        apex_y=u(-0.78, -0.68), mid_y=u(0.05, 0.2),
        dome_y_right=dome_r, dome_y_left=dome_r + u(0.02, 0.09), cp_depth=u(0.24, 0.34),
        mediastinum_x=u(-0.02, 0.03), mediastinum_half_width=u(0.1, 0.14),
        ctr=u(0.38, 0.48), heart_x=u(0.06, 0.13), heart_y=dome_r + u(-0.16, -0.08),
        heart_aspect=u(0.68, 0.8), heart_angle=u(0.35, 0.6),
        rib_y0=u(-0.8, -0.72), rib_dy=u(0.12, 0.14), rib_tilt=u(0.2, 0.32), rib_curve=u(0.7, 0.9),
        rib_width=u(0.045, 0.06), clavicle_y=u(-0.7, -0.6),
        exposure=u(0.85, 1.15), gamma=u(0.8, 1.25), black=u(0.0, 0.06), white=u(0.9, 1.0),
        noise_sigma=u(0.006, 0.014), texture_amp=u(0.7, 1.3),
        shift=(u(-0.04, 0.04), u(-0.04, 0.04)), rotation=u(-0.05, 0.05), scale=u(0.95, 1.05),
        effusion_side="right" if r.random() < 0.5 else "left",
    )


def sample_attributes(rng: np.random.Generator | int, prevalence: float = 0.45) -> Attributes:
    """Independent attributes, each present with probability ``prevalence``. An int seeds its own
    stream (distinct from the patient's, so ``sample_attributes(s)`` pairs with ``sample_patient(s)``)."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng([int(rng), _ATTR_STREAM])
    devices = bool(rng.random() < prevalence)
    side = "right" if rng.random() < 0.5 else "left"
    effusion = side if rng.random() < prevalence else None
    cardiomegaly = bool(rng.random() < prevalence)
    probs = {"pacemaker": 0.5, "ecg": 0.45, "line": 0.4, "ett": 0.3}
    kinds = tuple(k for k in DEVICE_KINDS if rng.random() < probs[k])
    if not kinds:
        kinds = (DEVICE_KINDS[int(rng.integers(len(DEVICE_KINDS)))],)
    return Attributes(devices=devices, effusion=effusion, cardiomegaly=cardiomegaly, device_kinds=kinds,
                      device_seed=int(rng.integers(2 ** 31)), effusion_size=float(rng.uniform(0.35, 1.0)),
                      cardiomegaly_ctr=float(rng.uniform(0.55, 0.65)))


def toggle(patient: Patient, attributes: Attributes, name: str) -> Attributes:
    """``attributes`` with ``name`` switched; effusion switched on takes the patient's side."""
    if name == "devices":
        return replace(attributes, devices=not attributes.devices)
    if name == "effusion":
        return replace(attributes, effusion=None if attributes.effusion else patient.effusion_side)
    if name == "cardiomegaly":
        return replace(attributes, cardiomegaly=not attributes.cardiomegaly)
    raise ValueError(f"unknown attribute {name!r}; expected one of {ATTRIBUTES}")
