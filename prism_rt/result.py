"""What an edit returns: the counterfactuals in model space, and how to save them or put them back
into the input image's geometry."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .inversion import Inversion

RECONSTRUCTION_WARNING = 0.5
"""A reconstruction error (‖z_src − z*_0‖ / ‖z*_0‖) above this is reported as a warning: the
source branch did not come back to the image, so the counterfactuals are not edits of it (wrong
model for the image, too few steps, or a guidance far from the inversion's)."""


@dataclass
class EditResult:
    """Model-space outputs ([3,S,S] in [-1,1]) and what is needed to map them back."""

    items: tuple  # control.EditItem, one per edit × self-window value (× blend threshold)
    reconstruction: np.ndarray  # the source branch, decoded
    edits: list[np.ndarray]
    masks: list[np.ndarray | None]  # per item, the last LocalBlend mask at image size [S,S], or None
    reconstruction_error: float
    counts: dict
    timings: dict
    plan_words: tuple = ()
    settings: dict = field(default_factory=dict)
    composite_masks: list[np.ndarray | None] | None = None  # per item, the difference composite's mask [S,S] in [0,1]
    inversion: "Inversion | None" = None  # the inversion this edit started from (its fit, source image)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.composite_masks is None:
            self.composite_masks = [None] * len(self.items)
        if not np.isfinite(self.reconstruction_error) or self.reconstruction_error > RECONSTRUCTION_WARNING:
            message = (f"reconstruction error {self.reconstruction_error:.3g} (> {RECONSTRUCTION_WARNING}): the source "
                       "branch did not return to the image, so these are not edits of it; check that the inversion "
                       "was made with this model and sampler")
            if message not in self.warnings:
                self.warnings.append(message)

    def item_stats(self) -> list[dict]:
        """Mean |Δ| (on the [0,1] scale, model space) of each edit against the reconstruction,
        inside and outside its blend mask."""
        stats = []
        recon = (self.reconstruction.mean(0) + 1) / 2
        for item, image, mask, kept in zip(self.items, self.edits, self.masks, self.composite_masks):
            delta = np.abs((image.mean(0) + 1) / 2 - recon)
            row = {"name": item.name, "target": item.target, "self_replace": item.self_replace,
                   "blend_threshold": item.blend_threshold, "composite": item.composite,
                   "mean_abs_diff": float(delta.mean())}
            if kept is not None:
                row["composite_fraction"] = float(kept.mean())
            if mask is not None:
                inside = mask > 0.5
                row["mask_fraction"] = float(inside.mean())
                row["mean_abs_diff_inside_mask"] = float(delta[inside].mean()) if inside.any() else None
                row["mean_abs_diff_outside_mask"] = float(delta[~inside].mean()) if (~inside).any() else None
            stats.append(row)
        return stats

    # -- images and files ------------------------------------------------------------------------
    def _fit(self):
        from .imageio import FitInfo

        if self.inversion is None or "fit" not in self.inversion.meta:
            raise ValueError("this result does not know the input's geometry (it was made without its inversion)")
        raw = self.inversion.meta["fit"]
        return FitInfo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})

    def images(self, geometry: str = "input") -> list[np.ndarray]:
        """The counterfactuals as float32 [0, 1] grey images, one per item: at the input image's
        geometry (``"input"``: its size, the model's fit undone) or the model's (``"model"``: S×S)."""
        if geometry == "model":
            return [((image.mean(0) + 1) / 2).astype(np.float32) for image in self.edits]
        if geometry != "input":
            raise ValueError(f"geometry is 'input' or 'model', not {geometry!r}")
        from .imageio import unfit

        fit = self._fit()
        return [unfit(image, fit) for image in self.edits]

    def reconstruction_image(self, geometry: str = "input") -> np.ndarray:
        """The source branch's image, like :meth:`images`."""
        if geometry == "model":
            return ((self.reconstruction.mean(0) + 1) / 2).astype(np.float32)
        from .imageio import unfit

        return unfit(self.reconstruction, self._fit())

    def save(self, out, *, figure: bool = True, extras: bool = False, selection: list[dict] | None = None,
             parameters: dict | None = None) -> Path:
        """Write the counterfactuals, ``result.json`` and (``figure``) ``figure.png`` into the
        folder ``out``, published as a whole (an existing ``out`` is replaced, never merged);
        ``extras``: also the reconstruction, difference maps and masks."""
        from .outputs import write_edit_outputs

        if self.inversion is None:
            raise ValueError("this result does not know its inversion; pass it to write_edit_outputs yourself")
        return write_edit_outputs(out, self, self.inversion, parameters or {}, selection=selection, figure=figure,
                                  extras=extras)
