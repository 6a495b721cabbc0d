"""LocalBlend (Hertz et al. 2022, prompt-to-prompt ``LocalBlend``), in array-API form so the mask
math runs on the backend's own arrays (numpy on the host, tensors on a device)."""
from __future__ import annotations

import numpy as np


def _clamped_shift_indices(n: int, shift: int) -> np.ndarray:
    return np.clip(np.arange(n) + shift, 0, n - 1)


def max_pool(xp, maps, radius: int = 1):
    """(2·radius+1)² max-pool (3×3 by default), stride 1, on the last two axes; radius 0 returns
    ``maps``. Replicate padding equals -inf padding here: the replicated edge value is already
    inside every edge window."""
    if radius == 0:
        return maps
    h, w = maps.shape[-2], maps.shape[-1]
    shifts = range(-radius, radius + 1)
    rows = [xp.take(maps, xp.asarray(_clamped_shift_indices(h, s)), axis=maps.ndim - 2) for s in shifts]
    out = None
    for r in rows:
        for s in shifts:
            shifted = xp.take(r, xp.asarray(_clamped_shift_indices(w, s)), axis=maps.ndim - 1)
            out = shifted if out is None else xp.maximum(out, shifted)
    return out


def nearest_resize(xp, maps, size: tuple[int, int]):
    """Nearest-neighbour resize of the last two axes as torch's ``interpolate(mode="nearest")``:
    source index ``floor(dst · in/out)``."""
    (h, w), (oh, ow) = maps.shape[-2:], size

    def idx(n_in, n_out):
        return xp.asarray(np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1))

    maps = xp.take(maps, idx(h, oh), axis=maps.ndim - 2)
    return xp.take(maps, idx(w, ow), axis=maps.ndim - 1)


def blend_mask(xp, maps_sum, token_weights, latent_hw: tuple[int, int], threshold: float, dilation: int = 1):
    """The LocalBlend mask of each item, as a float array [1+K, 1, h, w].

    maps_sum: cross-attention maps accumulated over the steps so far, [1+K, T, hb, wb] (already
    averaged over heads and blend layers); token_weights: [1+K, T], 1 on the blend word's tokens
    (the source word for item 0, the edit word for each edit). Sum over the word's tokens, 3×3
    max-pool (``dilation`` 1; (2·dilation+1)², 0 = none), upsample to the latent size, divide by
    each item's maximum, threshold, and take the union with the source's mask.
    """
    maps = xp.sum(maps_sum * token_weights[:, :, None, None], axis=1)  # [1+K, hb, wb]
    maps = nearest_resize(xp, max_pool(xp, maps, dilation), latent_hw)
    peak = xp.max(xp.reshape(maps, (maps.shape[0], -1)), axis=1)
    peak = xp.where(peak > 0, peak, xp.ones_like(peak))  # a word with no attention at all: empty mask
    maps = maps / peak[:, None, None]
    mask = maps > threshold
    mask = xp.logical_or(mask[:1], mask)
    return xp.astype(mask, maps_sum.dtype)[:, None]


def apply_blend(latents, mask):
    """``z_k ← z_0 + mask ⊙ (z_k − z_0)``: outside the mask every item follows the source."""
    return latents[:1] + mask * (latents - latents[:1])
