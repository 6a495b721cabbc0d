"""Judging counterfactuals: an attribute classifier in ONNX, PRISM's Counterfactual Prediction
Gain, identity preservation outside the attribute, and the error to a known true counterfactual.

A classifier is any ONNX file with one image input ``[B, C, H, W]`` (C = 1 gray or 3 repeated)
and one output ``[B, L]`` of logits (or probabilities), one per label. Its labels and input
convention are read from the model's metadata (``prism.labels``: JSON list of CheXpert label
names; ``prism.input``: ``"gray [0,1]"`` or ``"gray [-1,1]"``; ``prism.output``: ``"logits"`` or
``"probabilities"``) or given by the caller, so a user's own CheXpert classifier plugs in.

Identity is measured against the source's **reconstruction**, not the source: the VAE's own loss
is not an edit error; it is reported separately (``vae``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captions import CHEXPERT_LABELS
from .errors import ModelError, PromptError, SettingsError


class ClassifierError(ModelError):
    """The classifier file cannot be used."""


@dataclass
class Classifier:
    path: Path
    labels: tuple[str, ...]
    input_name: str
    channels: int
    size: tuple[int, int]
    value_range: tuple[float, float]
    outputs_logits: bool
    session: object

    @classmethod
    def load(cls, path, labels: tuple[str, ...] | None = None) -> "Classifier":
        import onnxruntime as ort

        path = Path(path).expanduser()
        if not path.is_file():
            raise ClassifierError(f"classifier {path} does not exist; give an ONNX attribute classifier")
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own types
            raise ClassifierError(f"cannot load the classifier {path} with onnxruntime: {exc}") from None
        meta = session.get_modelmeta().custom_metadata_map
        if labels is None:
            try:
                labels = tuple(json.loads(meta["prism.labels"]))
            except (KeyError, ValueError):
                raise ClassifierError(f"the classifier {path} has no 'prism.labels' metadata; pass its labels "
                                      "(--classifier-labels 'Support Devices,Pleural Effusion,…')") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) < 1:
            raise ClassifierError(f"the classifier {path} must take one image [B,C,H,W] and give [B,labels]; "
                                  f"it takes {[(i.name, i.shape) for i in inputs]}")
        _, c, h, w = inputs[0].shape
        if c not in (1, 3) or not isinstance(h, int) or not isinstance(w, int):
            raise ClassifierError(f"the classifier {path} input {inputs[0].shape} needs a fixed H, W and 1 or 3 channels")
        convention = meta.get("prism.input", "gray [0,1]")
        value_range = (-1.0, 1.0) if "[-1,1]" in convention.replace(" ", "") else (0.0, 1.0)
        return cls(path, tuple(labels), inputs[0].name, int(c), (int(h), int(w)), value_range,
                   meta.get("prism.output", "logits") != "probabilities", session)

    def index(self, label: str) -> int:
        if label not in self.labels:
            raise SettingsError(f"the classifier {self.path.name} has no label {label!r}; it has {', '.join(self.labels)}")
        return self.labels.index(label)

    def probabilities(self, images01) -> np.ndarray:
        """Gray images in [0,1] (a list or [B,H,W], any size) → [B, labels] probabilities."""
        from PIL import Image

        batch = []
        for image in images01:
            image = np.asarray(image, np.float32)
            if image.shape != self.size:
                image = np.asarray(Image.fromarray(image).resize(self.size[::-1], Image.BILINEAR))
            lo, hi = self.value_range
            batch.append(lo + (hi - lo) * image)
        x = np.stack(batch)[:, None]
        if self.channels == 3:
            x = np.repeat(x, 3, axis=1)
        out = self.session.run(None, {self.input_name: x.astype(np.float32)})[0]
        return 1 / (1 + np.exp(-out)) if self.outputs_logits else out


def edit_direction(source_prompt: str, target_prompt: str, labels) -> tuple[str, str]:
    """The attribute an edit changes, from the captions: a label named in one and not the other
    (removal if it is in the source). Exactly one such label must be among ``labels``."""
    changed = []
    for label in labels:
        a, b = label.lower() in source_prompt.lower(), label.lower() in target_prompt.lower()
        if a != b:
            changed.append((label, "remove" if a else "add"))
    if len(changed) != 1:
        raise PromptError(f"cannot tell which of the classifier's labels ({', '.join(labels)}) the edit "
                          f"{source_prompt!r} → {target_prompt!r} changes (found {[c[0] for c in changed] or 'none'}); "
                          "name exactly one of them in one caption and not the other")
    return changed[0]


def _masked_quality(reference: np.ndarray, image: np.ndarray, *regions: np.ndarray | None) -> list[dict]:
    """L1 / PSNR / SSIM of ``image`` against ``reference`` within each region (None = the whole
    image); the SSIM map is computed once for all regions."""
    from .metrics import psnr_from_mse, ssim_map as structural_similarity_map

    ssim_map = structural_similarity_map(reference, image, data_range=1.0)
    out = []
    for region in regions:
        region = np.ones(reference.shape, bool) if region is None else region
        if not region.any():
            out.append({"l1": None, "psnr_db": None, "ssim": None, "fraction": 0.0})
            continue
        diff = (image - reference)[region]
        mse = float(np.mean(diff ** 2))
        out.append({"l1": float(np.abs(diff).mean()), "psnr_db": psnr_from_mse(mse),
                    "ssim": float(ssim_map[region].mean()), "fraction": float(region.mean())})
    return out


def edit_metrics(classifier: Classifier | None, attribute: str | None, direction: str | None,
                 source01: np.ndarray, reconstruction01: np.ndarray, counterfactual01: np.ndarray,
                 mask: np.ndarray | None = None, truth01: np.ndarray | None = None) -> dict:
    """Metrics of one counterfactual (all gray [0,1], the same size). ``mask``: where the attribute
    is (True inside); identity is measured outside it. ``truth01``: the true counterfactual."""
    row: dict = {}
    if classifier is not None and attribute is not None:
        k = classifier.index(attribute)
        p_source, p_cf = classifier.probabilities([source01, counterfactual01])[:, k]
        gain = float(p_source - p_cf) if direction == "remove" else float(p_cf - p_source)
        row["classifier"] = {"attribute": attribute, "direction": direction, "p_source": float(p_source),
                             "p_counterfactual": float(p_cf), "cpg": gain,
                             "flipped": bool((p_cf < 0.5) if direction == "remove" else (p_cf >= 0.5))
                             and bool((p_source >= 0.5) if direction == "remove" else (p_source < 0.5))}
    if mask is None:
        (row["identity"],) = _masked_quality(reconstruction01, counterfactual01, None)
        row["identity_outside_mask"] = row["identity"]
    else:
        row["identity"], row["identity_outside_mask"] = _masked_quality(reconstruction01, counterfactual01, None, ~mask)
    (row["vae"],) = _masked_quality(source01, reconstruction01, None)
    if truth01 is not None:
        inside = np.ones(truth01.shape, bool) if mask is None else mask
        row["truth"] = {"l1_inside": float(np.abs(counterfactual01 - truth01)[inside].mean()) if inside.any() else None,
                        "l1_outside": float(np.abs(counterfactual01 - truth01)[~inside].mean()) if (~inside).any() else None,
                        **ground_truth_check(source01, reconstruction01, counterfactual01, truth01, mask)}
    return row


ATTRIBUTE_DELTA = 0.1
"""A pixel belongs to the attribute when the true counterfactual differs from the source there by
more than this (of the intensity range)."""
CHANGE_DELTA = 0.05
"""A pixel is changed by the edit when the counterfactual differs from the reconstruction by more."""
LEFT_SUCCESS = 0.1
"""Ground-truth success: at most this fraction of the attribute's pixels left as in the source."""


def ground_truth_check(source01: np.ndarray, reconstruction01: np.ndarray, counterfactual01: np.ndarray,
                       truth01: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """What the classifier cannot see, from the true counterfactual. ``left``: of the attribute's
    pixels (where truth and source differ by > ``ATTRIBUTE_DELTA``), the fraction the edit left
    closer to the source than to the truth — a device still visible, an effusion not added;
    ``success``: ``left`` ≤ ``LEFT_SUCCESS``. ``change_iou``: IoU of the pixels the edit changed
    (counterfactual vs reconstruction, > ``CHANGE_DELTA``) with the attribute's mask (or, without
    one, with the attribute's pixels)."""
    attribute = np.abs(truth01 - source01) > ATTRIBUTE_DELTA
    if attribute.any():
        left = float((np.abs(counterfactual01 - truth01) > np.abs(counterfactual01 - source01))[attribute].mean())
    else:
        left = None
    region = attribute if mask is None else mask
    changed = np.abs(counterfactual01 - reconstruction01) > CHANGE_DELTA
    union = (changed | region).sum()
    return {"left": left, "success": None if left is None else left <= LEFT_SUCCESS,
            "change_iou": float((changed & region).sum() / union) if union else None}


def blend_mask_overlap(blend_mask: np.ndarray, attribute_mask: np.ndarray, cell: int) -> dict:
    """How a LocalBlend mask (image size, > 0.5 = editable; it is constant over each latent cell of
    ``cell`` × ``cell`` pixels) covers the attribute's mask. ``iou_latent``: IoU on the latent grid,
    where the attribute's cells are those holding any of its pixels — the best a mask on that grid
    can do is 1 (a pixel IoU cannot reach 1: a 2-pixel lead fills its 8-pixel cells); ``iou``: the
    same in pixels; ``recall``: the share of the attribute's pixels the mask leaves editable;
    ``cover``: the share of the image it leaves editable."""
    editable, attribute = np.asarray(blend_mask) > 0.5, np.asarray(attribute_mask, bool)
    h, w = attribute.shape
    if h % cell or w % cell or editable.shape != attribute.shape:
        raise ValueError(f"masks {editable.shape} / {attribute.shape} are not whole {cell}-pixel latent cells")

    def cells(m):
        return m.reshape(h // cell, cell, w // cell, cell)

    mask_cells, attribute_cells = cells(editable).mean(axis=(1, 3)) > 0.5, cells(attribute).any(axis=(1, 3))
    iou = lambda a, b: float((a & b).sum() / (a | b).sum()) if (a | b).any() else None  # noqa: E731
    return {"iou_latent": iou(mask_cells, attribute_cells), "iou": iou(editable, attribute),
            "recall": float(editable[attribute].mean()) if attribute.any() else None, "cover": float(editable.mean())}


def select(rows: list[dict]) -> dict:
    """PRISM's filter over one edit's candidates (self-window values, noise-blend thresholds):
    among the counterfactuals that flip the attribute, the one with the best identity to the
    source's reconstruction over the whole image (highest SSIM, then lowest L1; PRISM's own filter
    compares whole images too). It needs no mask, so candidates with different blend masks compare
    fairly, and evaluation selects exactly as ``prism-rt edit --select`` does. ``None`` when none
    flips."""
    flipped = [(i, r) for i, r in enumerate(rows) if r.get("classifier", {}).get("flipped")]
    if not flipped:
        best_gain = max(range(len(rows)), key=lambda i: rows[i].get("classifier", {}).get("cpg", -1.0))
        return {"selected": None, "flipped": False, "best_cpg_index": best_gain,
                "note": "no candidate flips the attribute"}
    i, _ = max(flipped, key=lambda ir: (ir[1]["identity"]["ssim"], -ir[1]["identity"]["l1"]))
    return {"selected": i, "flipped": True}


def to01(model_pixels: np.ndarray) -> np.ndarray:
    """Model-space [3,S,S] (or [S,S]) in [-1,1] → gray [S,S] in [0,1]."""
    x = np.asarray(model_pixels, np.float32)
    return np.clip(((x.mean(0) if x.ndim == 3 else x) + 1) / 2, 0, 1)


def select_edits(classifier: Classifier, source_prompt: str, result, fitted_pixels: np.ndarray) -> list[dict]:
    """``prism-rt edit --select``: per edited caption, the candidate (self-window value, noise-blend
    threshold) whose counterfactual flips the attribute with the best identity score (PRISM's
    filter), with every candidate's metrics (identity also outside its blend mask, if any)."""
    source01, recon01 = to01(fitted_pixels), to01(result.reconstruction)
    by_target: dict[str, list[int]] = {}
    for i, item in enumerate(result.items):
        by_target.setdefault(item.target, []).append(i)
    out = []
    for target, indices in by_target.items():
        attribute, direction = edit_direction(source_prompt, target, classifier.labels)
        rows = []
        for i in indices:
            mask = result.masks[i]
            rows.append({"item": result.items[i].name, "self_replace": result.items[i].self_replace,
                         "blend_threshold": result.items[i].blend_threshold, "composite": result.items[i].composite,
                         **edit_metrics(classifier, attribute, direction, source01, recon01, to01(result.edits[i]),
                                        None if mask is None else mask > 0.5)})
        chosen = select(rows)
        out.append({"target": target, "attribute": attribute, "direction": direction,
                    "selected_item": rows[chosen["selected"]]["item"] if chosen["selected"] is not None else None,
                    **chosen, "candidates": rows})
    return out


__all__ = ["Classifier", "ClassifierError", "edit_direction", "edit_metrics", "select", "CHEXPERT_LABELS"]
