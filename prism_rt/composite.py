"""Difference composite: keep a counterfactual's change only where it is large.

An edit changes the pixels it must (the device, the effusion) a lot and the rest of the image a
little — texture that drifted while the edit branch was regenerated, decoder leakage around the
latent blend mask. Compositing the counterfactual onto the reconstruction where the change is
large removes the small, diffuse part and keeps the edit (the sparsification step of ACE,
Jeanneret et al. 2023, which keeps the regions of large difference and restores the rest):

    d = blur(|mean_c(x_k − x_0)|) / range     (change on the [0, 1] intensity scale)
    m = feather(grow(d > threshold))
    x_k ← x_0 + m ⊙ (x_k − x_0)

Outside ``m`` the counterfactual *is* the reconstruction. The filter (``--select``) still judges
the composited image, so a threshold that removes too much of the edit is not chosen.

Plain numpy (the runtime's host arrays), matching ``scipy.ndimage``'s ``gaussian_filter``
(``truncate=4``, mirrored edges) and ``maximum_filter``; tested against it.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BLUR_SIGMA = 1.5
"""Pixels: the change is averaged over about a 3-pixel neighbourhood before thresholding, so single
noisy pixels neither pass nor break a region."""
GROW = 1
"""Pixels the thresholded region grows by (a 3×3 maximum) before feathering."""
FEATHER_SIGMA = 1.5
"""Pixels: the soft edge of the composite mask, so no seam shows."""


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes, as ``scipy.ndimage.gaussian_filter(x, (0,…, σ, σ))``
    (kernel radius ``int(4σ + 0.5)``, edges mirrored including the edge pixel)."""
    if sigma <= 0:
        return np.asarray(x, np.float32)
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = np.asarray(x, np.float32)
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        out = sliding_window_view(np.pad(out, pad, mode="symmetric"), 2 * radius + 1, axis=axis) @ taps
    return out


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Maximum over a (2·pixels+1)² window of the last two axes (``scipy.ndimage.maximum_filter``)."""
    if pixels <= 0:
        return mask
    size = 2 * pixels + 1
    pad = [(0, 0)] * (mask.ndim - 2) + [(pixels, pixels)] * 2
    return sliding_window_view(np.pad(mask, pad, mode="edge"), (size, size), axis=(-2, -1)).max(axis=(-2, -1))


def composite_mask(reference: np.ndarray, image: np.ndarray, threshold: float, value_range: float = 2.0,
                   blur_sigma: float = BLUR_SIGMA, grow_pixels: int = GROW,
                   feather_sigma: float = FEATHER_SIGMA) -> np.ndarray:
    """The soft mask [H, W] in [0, 1] where ``image`` differs from ``reference`` by more than
    ``threshold`` (a fraction of ``value_range``: 2 for model space [-1, 1], 1 for [0, 1]).
    Images are [C, H, W] (the change is taken on the channel mean, the gray value) or [H, W]."""
    delta = np.asarray(image, np.float32) - np.asarray(reference, np.float32)
    if delta.ndim == 3:
        delta = delta.mean(0)
    change = gaussian_blur(np.abs(delta) / value_range, blur_sigma)
    hard = grow((change > threshold).astype(np.float32), grow_pixels)
    return np.clip(gaussian_blur(hard, feather_sigma), 0.0, 1.0)


def difference_composite(reference: np.ndarray, image: np.ndarray, threshold: float,
                         value_range: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(``image`` composited onto ``reference`` where it changed by more than ``threshold``, the
    mask). Same shapes and dtype as ``image``. Threshold 0 keeps every change: ``image`` itself
    (so the plain counterfactual can stay a candidate beside composited ones)."""
    if threshold == 0:
        return np.array(image, copy=True), np.ones(np.shape(image)[-2:], np.float32)
    mask = composite_mask(reference, image, threshold, value_range)
    reference = np.asarray(reference, np.float32)
    out = reference + mask * (np.asarray(image, np.float32) - reference)
    return out.astype(np.asarray(image).dtype, copy=False), mask


def composite_result(result, thresholds):
    """An ``EditResult`` with every counterfactual composited onto its reconstruction at each of
    ``thresholds``: one item per (item, threshold), named ``…-c0.08`` when there are several
    thresholds; ``composite_masks`` holds each item's mask. ``()`` returns ``result`` as is."""
    thresholds = tuple(thresholds)
    if not thresholds:
        return result
    start = time.perf_counter()
    items, edits, masks, composite_masks = [], [], [], []
    for item, image, mask in zip(result.items, result.edits, result.masks):
        for threshold in thresholds:
            image_out, kept = difference_composite(result.reconstruction, image, threshold)
            name = item.name + (f"-c{threshold:g}" if len(thresholds) > 1 else "")
            items.append(replace(item, name=name, composite=threshold))
            edits.append(image_out)
            masks.append(mask)
            composite_masks.append(kept)
    timings = dict(result.timings, composite_s=time.perf_counter() - start)
    return replace(result, items=tuple(items), edits=edits, masks=masks, composite_masks=composite_masks, timings=timings)
