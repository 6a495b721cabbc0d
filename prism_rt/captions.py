"""PRISM's training captions from CheXpert labels (PRISM_METHOD §1).

PRISM (Kumar et al., MIDL 2025) fine-tuned Stable Diffusion on CheXpert with the caption
``"Chest X-ray showing " + ", ".join(positive labels)``, or ``"Normal chest X-ray with no
significant findings"`` when no label is positive. Prompts written the same way sit where the
model was trained, so edits are built from them. Uncertain labels (-1) count as not positive, as
in PRISM's training.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .errors import PromptError

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CAPTION_PREFIX = "Chest X-ray showing "
NORMAL_CAPTION = "Normal chest X-ray with no significant findings"


def _is_positive(value) -> bool:
    """1 is positive; 0, -1 (uncertain), NaN, None and empty cells are not."""
    if value is None or isinstance(value, str) and not value.strip():
        return False
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"a CheXpert label value must be 1, 0, -1 or empty, got {value!r}") from exc
    return not math.isnan(number) and number == 1.0


def _check_names(names: Iterable[str]) -> set[str]:
    names = set(names)
    unknown = sorted(n for n in names if n not in CHEXPERT_LABELS)
    if unknown:
        raise PromptError(f"unknown CheXpert label(s) {unknown}; valid labels are: {', '.join(CHEXPERT_LABELS)}")
    return names


def chexpert_caption(labels: Mapping[str, object] | Iterable[str]) -> str:
    """PRISM's caption for one image.

    ``labels``: a mapping label → value (a CheXpert CSV row; columns that are not labels, such as
    ``Path`` or ``Sex``, are ignored, but a non-empty mapping without any label is an error) or an iterable of the positive label names. Names are the
    14 CheXpert labels, spelt as in the CSV; an unknown name in an iterable is an error.
    """
    if isinstance(labels, str):
        labels = [labels]
    if isinstance(labels, Mapping):
        if labels and not any(name in CHEXPERT_LABELS for name in labels):
            raise PromptError(f"none of the keys {sorted(map(str, labels))[:8]} is a CheXpert label; "
                              f"valid labels are: {', '.join(CHEXPERT_LABELS)}")
        positive = {name for name, value in labels.items() if name in CHEXPERT_LABELS and _is_positive(value)}
    else:
        positive = _check_names(labels)
    ordered = [name for name in CHEXPERT_LABELS if name in positive]
    return CAPTION_PREFIX + ", ".join(ordered) if ordered else NORMAL_CAPTION
