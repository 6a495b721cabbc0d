"""User masks, as RadEdit (Pérez-García et al., ECCV 2024) has them and PRISM does not: a **keep
mask** (the image never changes inside it, e.g. the lungs when editing a device) and an **edit
mask** (the edit is confined to it). Both are images in the input's geometry, white = the region.

They act through the editing loop's existing blend (``prism_rt.loop``), with no graph of their own:
one region per image, 1 where the edit may change the latents — inside the edit mask (everywhere
without one) and outside the keep mask — applied at every step like LocalBlend,
``z_k ← z_0 + region ⊙ (z_k − z_0)``, and combined with LocalBlend's mask where both are on. Each
mask is fitted to the model square as the image was (crop / pad / resize). A latent cell counts as
kept when any of its pixels is in the keep mask (nothing inside is regenerated) and as editable
when any of its pixels is in the edit mask. Inside the keep mask the decoded counterfactual is then
the reconstruction up to the VAE decoder's reach across the mask's edge; :func:`paste_kept` makes
it exact in model space.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputImageError, MaskError

_MEANING = {"keep": "the region that must not change", "edit": "the region the edit may change"}


@dataclass(frozen=True)
class UserMasks:
    """One image's keep and edit masks, bool [H, W] in the input's geometry (None: not given)."""

    keep: np.ndarray | None = None
    edit: np.ndarray | None = None

    @classmethod
    def read(cls, keep=None, edit=None, image_shape: tuple[int, int] | None = None) -> "UserMasks | None":
        """Masks from paths, PIL images or arrays ([H, W] or [H, W, C]; a pixel is in the region when
        it exceeds half the mask's maximum, so 0/1 and 0/255 masks both work); None when neither
        is given. ``image_shape`` (H, W): the input image's, which each mask must have."""
        if keep is None and edit is None:
            return None
        masks = cls(keep=None if keep is None else read_mask(keep, "keep", image_shape),
                    edit=None if edit is None else read_mask(edit, "edit", image_shape))
        if masks.keep is not None and masks.edit is not None and not (masks.edit & ~masks.keep).any():
            raise MaskError("the keep mask covers the whole edit mask, so nothing may change; keep less or edit "
                            "a region outside the keep mask")
        return masks

    def region(self, fit, latent_size: int) -> np.ndarray:
        """float32 [1, 1, h, w]: 1 on the latent cells the edit may change (module docstring)."""
        region = np.ones((latent_size, latent_size), np.float32)
        if self.edit is not None:
            region *= _coverage(self.edit, fit, latent_size) > 0
        if self.keep is not None:
            region *= ~(_coverage(self.keep, fit, latent_size) > 0)
        if not region.any():
            raise MaskError(f"at the model's latent resolution ({latent_size}×{latent_size}) no cell is left to edit: "
                            "the keep mask covers every cell the edit mask touches; keep less, or edit a larger region")
        return region[None, None]

    def kept_pixels(self, fit) -> np.ndarray | None:
        """bool [S, S]: the keep mask fitted to the model square (any coverage), or None."""
        return None if self.keep is None else _coverage(self.keep, fit, fit.size) > 0


def read_mask(mask: Any, kind: str, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """bool [H, W]; ``kind`` ("keep" / "edit") names the mask in errors."""
    from .imageio import load_image

    name = str(mask) if isinstance(mask, (str, os.PathLike)) else f"the {kind} mask array"
    if isinstance(mask, (str, os.PathLike)):
        try:
            gray = load_image(Path(mask)).pixels
        except InputImageError as exc:
            raise MaskError(f"{kind} mask {exc}") from None
    else:
        if hasattr(mask, "convert"):  # a PIL image
            mask = np.asarray(mask.convert("F"))
        gray = np.asarray(mask, dtype=np.float32)
        if gray.ndim == 3:
            gray = gray.max(axis=-1)
        if gray.ndim != 2 or gray.size == 0:
            raise MaskError(f"{name} must be [H, W] (or [H, W, C]) like the image, got shape {gray.shape}")
    if not np.isfinite(gray).all():
        raise MaskError(f"{name} holds NaN or Inf values; save the {kind} mask as a black-and-white image")
    if image_shape is not None and tuple(gray.shape) != tuple(image_shape):
        raise MaskError(f"the {kind} mask {name} is {gray.shape[1]}×{gray.shape[0]} pixels (width×height) but the image "
                        f"is {image_shape[1]}×{image_shape[0]}; draw the mask on the input image itself, at its size")
    peak = float(gray.max())
    if peak <= 0:
        raise MaskError(f"the {kind} mask {name} is empty (every pixel black); paint {_MEANING[kind]} white, "
                        f"or leave out the {kind} mask")
    return gray > peak / 2


def _coverage(mask: np.ndarray, fit, side: int) -> np.ndarray:
    """The fraction of each cell of a side×side grid over the model square that ``mask`` (input
    geometry) covers, with the image's fit (``imageio.FitInfo``) applied first."""
    from PIL import Image

    top, left, height, width = fit.box
    mask = mask.astype(np.float32)
    if fit.mode == "crop":
        mask = mask[top:top + height, left:left + width]
    elif fit.mode == "pad":
        square = np.zeros((max(fit.orig_height, fit.orig_width),) * 2, np.float32)
        square[top:top + height, left:left + width] = mask
        mask = square
    cells = Image.fromarray(np.ascontiguousarray(mask)).resize((side, side), Image.Resampling.BOX)
    return np.asarray(cells, np.float32)


def paste_kept(reconstruction: np.ndarray, image: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """``image`` with the reconstruction's pixels inside ``kept`` ([S, S] bool): exactly unchanged there."""
    if kept is None:
        return image
    return np.where(kept[None], reconstruction, image).astype(image.dtype, copy=False)


def fit_of(inversion):
    """The ``imageio.FitInfo`` an inversion recorded (how its image was fitted to the model square)."""
    from .imageio import FitInfo

    raw = (inversion.meta or {}).get("fit")
    if not raw:
        raise MaskError("this inversion does not record the input image's geometry, which masks are drawn in; "
                        "invert the image again with this version of prism_rt")
    return FitInfo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})


def masks_for(inversions, keep_masks, edit_masks) -> list:
    """One :class:`UserMasks` (or None) per inversion, read and checked against each input's size
    before any model work. ``keep_masks`` / ``edit_masks``: None, or one entry (None or a mask) per
    inversion."""
    count = len(inversions)
    keep_masks = [None] * count if keep_masks is None else list(keep_masks)
    edit_masks = [None] * count if edit_masks is None else list(edit_masks)
    if len(keep_masks) != count or len(edit_masks) != count:
        raise MaskError(f"give one keep mask and one edit mask (or None) per image: {count} images, "
                        f"{len(keep_masks)} keep masks, {len(edit_masks)} edit masks")
    out = []
    for inversion, keep, edit in zip(inversions, keep_masks, edit_masks):
        if keep is None and edit is None:
            out.append(None)
            continue
        fit = fit_of(inversion)
        out.append(UserMasks.read(keep, edit, (fit.orig_height, fit.orig_width)))
    return out
