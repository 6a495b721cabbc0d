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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import InversionConfig, InversionMethod, SamplerConfig
from .errors import InversionFileError

FORMAT_VERSION = 1


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

    def save(self, path) -> Path:
        """Write atomically: a partial file never appears under ``path``."""
        path = Path(path)
        if path.suffix != ".npz":
            raise InversionFileError(f"inversion files are .npz; got {path.name!r}, name it e.g. {path.stem}.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InversionFileError(f"cannot write {path}: {exc.strerror}; choose another --save path") from None
        meta = dict(self.meta, format_version=FORMAT_VERSION, method=self.method.value,
                    source_prompt=self.source_prompt, sampler=self.sampler.__dict__,
                    inversion={k: (v.value if hasattr(v, "value") else v) for k, v in self.config.__dict__.items()})
        arrays = dict(trajectory=self.trajectory.astype(np.float32), fitted_pixels=self.fitted_pixels.astype(np.float32),
                      meta=np.array(json.dumps(meta)))
        if self.null_embeddings is not None:
            arrays["null_embeddings"] = self.null_embeddings.astype(np.float32)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path) -> "Inversion":
        path = Path(path)
        if not path.is_file():
            raise InversionFileError(f"inversion file {path} does not exist; create one with `prism-rt invert … --save {path}`")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(str(arrays["meta"]))
        except Exception as exc:  # zip, npy and JSON errors alike: the file is not ours
            raise InversionFileError(f"{path} is not a readable prism-rt inversion file ({exc}); recreate it with `prism-rt invert --save`") from None
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
        except (KeyError, TypeError, ValueError) as exc:
            raise InversionFileError(f"{path} is inconsistent: {exc}; recreate it with `prism-rt invert --save`") from None
        source_prompt = meta.get("source_prompt", "")
        for key in ("format_version", "method", "source_prompt", "sampler", "inversion"):
            meta.pop(key, None)
        return cls(method=method, source_prompt=source_prompt, sampler=sampler,
                   config=config, trajectory=trajectory, fitted_pixels=arrays["fitted_pixels"], null_embeddings=nulls, meta=meta)
