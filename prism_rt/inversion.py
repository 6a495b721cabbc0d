"""A saved inversion: one image inverted once, reused for many edits (as PRISM caches them).

File layout (``.npz``, no pickles; read with ``numpy.load(path, allow_pickle=False)``):

=====================  ==========================  ============================================
array                  shape / dtype               meaning
=====================  ==========================  ============================================
``trajectory``         [T+1, 1, 4, h, w] float32   DDIM inversion path ``z*_0 … z*_T``;
                                                   ``z*_T`` is where editing starts, ``z*_0``
                                                   the encoded image, the rest pins the source
                                                   under direct inversion (it replaces the
                                                   paper's offsets, PRISM_METHOD §4)
``null_embeddings``    [T, 1, 77, D] float32       null-text's per-step ∅_i (null-text only)
``fitted_pixels``      [3, S, S] float32           the model input, in [-1, 1]
``meta``               0-d unicode                 JSON: format version, method, source prompt,
                                                   sampler and inversion settings, fit, input
                                                   and model provenance, timings, UNet counts
=====================  ==========================  ============================================
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import InversionConfig, InversionMethod, SamplerConfig
from .errors import InversionFileError

FORMAT_VERSION = 1

LATENT_LIMIT = 1e3
"""Largest |value| accepted in a trajectory. SD's scaled VAE latents have unit variance, and DDIM
inversion keeps ``z*_T`` near the prior's scale (|z| of a few, up to ~10 with high guidance);
1e3 leaves two orders of margin and refuses forged or corrupted files (1e30 would overflow fp16
and turn into NaN far from the cause)."""
EMBEDDING_LIMIT = 1e3
"""Largest |value| accepted in null-text embeddings: CLIP text states are O(1)–O(30)."""


@dataclass
class Inversion:
    method: InversionMethod
    source_prompt: str
    sampler: SamplerConfig
    config: InversionConfig
    trajectory: np.ndarray  # [T+1, 1, 4, h, w]
    fitted_pixels: np.ndarray  # [3, S, S]
    null_embeddings: np.ndarray | None = None  # [T, 1, 77, D]
    meta: dict = field(default_factory=dict)  # fit, source image, model, timings, counts

    @property
    def steps(self) -> int:
        return self.trajectory.shape[0] - 1

    @staticmethod
    def check_path(path) -> Path:
        """Where an inversion may be saved: a ``.npz`` file name (checked before any work)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise InversionFileError(f"inversion files are .npz; got {path.name!r}, name it e.g. {path.stem}.npz")
        return path

    def save(self, path) -> Path:
        """Write atomically (``prism_rt.publish.staged_file``): a partial file never appears under
        ``path``, a kill leaves at most a hidden staging file that the next run removes, and a
        read-only folder or a full disk is an :class:`OutputError` naming ``path``."""
        from .publish import staged_file

        path = self.check_path(path)
        meta = dict(self.meta, format_version=FORMAT_VERSION, method=self.method.value,
                    source_prompt=self.source_prompt, sampler=self.sampler.__dict__,
                    inversion={k: (v.value if hasattr(v, "value") else v) for k, v in self.config.__dict__.items()})
        arrays = dict(trajectory=self.trajectory.astype(np.float32), fitted_pixels=self.fitted_pixels.astype(np.float32),
                      meta=np.array(json.dumps(meta)))
        if self.null_embeddings is not None:
            arrays["null_embeddings"] = self.null_embeddings.astype(np.float32)
        with staged_file(path, flag="--save") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # to an open file: given a name, numpy would append ".npz" to it
        return path

    @classmethod
    def load(cls, path, *, max_pixels: int | None = None) -> "Inversion":
        """Read and check a saved inversion; anything unusable is an :class:`InversionFileError`
        naming the file, raised here rather than after an edit has run: shapes against the
        sampler's steps, every array finite and within :data:`LATENT_LIMIT` /
        :data:`EMBEDDING_LIMIT`, the model input within [-1, 1], and the fit (positive sizes, a
        box inside the image, an original size within ``max_pixels``, default
        ``imageio.DEFAULT_MAX_PIXELS``, since outputs are written at that size)."""
        path = Path(path)
        if not path.is_file():
            raise InversionFileError(f"inversion file {path} does not exist; create one with `prism-rt invert … --save {path}`")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(str(arrays["meta"]))
            if not isinstance(meta, dict):
                raise ValueError(f"its meta record is a JSON {type(meta).__name__}, not an object")
        except Exception as exc:  # zip, npy and JSON errors alike: the file is not ours
            why = " ".join(str(exc).split())[:240]
            raise InversionFileError(f"{path} is not a readable prism-rt inversion file ({why}); recreate it with `prism-rt invert --save`") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise InversionFileError(f"{path} has format version {meta.get('format_version')}, this prism-rt reads {FORMAT_VERSION}; recreate it with `prism-rt invert --save`")
        try:
            method = InversionMethod(meta["method"])
            sampler = SamplerConfig(**meta["sampler"])
            inv_cfg = dict(meta["inversion"])
            inv_cfg["method"] = InversionMethod(inv_cfg["method"])
            config = InversionConfig(**inv_cfg)
            trajectory = arrays["trajectory"]
            if trajectory.ndim != 5 or trajectory.shape[0] != sampler.steps + 1:
                raise ValueError(f"trajectory shape {trajectory.shape} does not fit {sampler.steps} steps")
            nulls = arrays.get("null_embeddings")
            if method == InversionMethod.NULL_TEXT and (nulls is None or nulls.shape[0] != sampler.steps):
                raise ValueError("null-text inversion without one null embedding per step")
            _check_arrays(trajectory, arrays["fitted_pixels"], nulls)
            _check_fit(meta.get("fit"), arrays["fitted_pixels"], max_pixels)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InversionFileError(f"{path} is inconsistent: {exc}; recreate it with `prism-rt invert --save`") from None
        source_prompt = meta.get("source_prompt", "")
        for key in ("format_version", "method", "source_prompt", "sampler", "inversion"):
            meta.pop(key, None)
        return cls(method=method, source_prompt=source_prompt, sampler=sampler,
                   config=config, trajectory=trajectory, fitted_pixels=arrays["fitted_pixels"], null_embeddings=nulls, meta=meta)


def _check_arrays(trajectory: np.ndarray, fitted: np.ndarray, nulls: np.ndarray | None) -> None:
    if trajectory.shape[1] != 1 or trajectory.shape[2] != 4 or min(trajectory.shape) < 1:
        raise ValueError(f"trajectory shape {trajectory.shape} is not [T+1, 1, 4, h, w]")
    if fitted.ndim != 3 or fitted.shape[0] != 3 or fitted.shape[1] != fitted.shape[2] or fitted.shape[1] < 1:
        raise ValueError(f"fitted_pixels shape {fitted.shape} is not [3, S, S]")
    if nulls is not None and (nulls.ndim != 4 or nulls.shape[1] != 1):
        raise ValueError(f"null_embeddings shape {nulls.shape} is not [T, 1, 77, D]")
    for name, array, limit in (("trajectory", trajectory, LATENT_LIMIT), ("fitted_pixels", fitted, 1.0 + 1e-3),
                               ("null_embeddings", nulls, EMBEDDING_LIMIT)):
        if array is None:
            continue
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{name} has dtype {array.dtype}, float32 expected")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds NaN or Inf values")
        peak = float(np.abs(array).max())
        if peak > limit:
            raise ValueError(f"{name} holds |values| up to {peak:.3g}, above the plausible {limit:g}")


def _check_fit(fit, fitted: np.ndarray, max_pixels: int | None) -> None:
    """The fit maps results back to the input's geometry; a forged one must not size outputs."""
    from .config import Fit
    from .imageio import DEFAULT_MAX_PIXELS

    if not isinstance(fit, dict):
        raise ValueError("the fit record is missing")
    mode = Fit(fit["mode"]).value
    h, w, size = (fit[k] for k in ("orig_height", "orig_width", "size"))
    box, pad = fit["box"], fit.get("pad_value", 0.0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w, size, *box)) or len(box) != 4:
        raise ValueError(f"fit sizes {h}, {w}, {size}, {box} are not integers")
    if min(h, w, size) < 1:
        raise ValueError(f"fit original size {h}×{w} (model size {size}) is not positive")
    if size != fitted.shape[-1]:
        raise ValueError(f"fit size {size} does not match the {fitted.shape[-1]}-pixel model input")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if h * w > limit:
        raise ValueError(f"fit original size {h}×{w} exceeds the limit of {limit:,} pixels")
    top, left, bh, bw = box
    outer = {"crop": (h, w), "pad": (max(h, w), max(h, w)), "resize": (h, w)}[mode]
    if min(top, left) < 0 or min(bh, bw) < 1 or top + bh > outer[0] or left + bw > outer[1]:
        raise ValueError(f"fit box {box} does not lie inside the {outer[0]}×{outer[1]} {mode} frame")
    if not isinstance(pad, (int, float)) or not np.isfinite(pad):
        raise ValueError(f"fit pad value {pad!r} is not a finite number")
