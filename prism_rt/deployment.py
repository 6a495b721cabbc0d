"""What an engine is deployed for, and the TensorRT optimisation profiles that follow from it.

The exported ONNX graphs take any batch up to their exported range (UNet N ≤ 63); TensorRT tunes
its kernels for a profile's ``opt`` shape and reserves activation memory for its ``max`` shape, so
building every graph for N = 63 costs memory and speed nobody uses. The profiles come instead
from the largest call the deployment makes: ``max_edits`` edit items per image (one edit × PRISM's
five self-attention windows by default), ``max_groups`` images per UNet call, and the UNet batch
that implies — every item with its unconditional half, N = 2·G·(1+K) (ddim / null-text layout,
``prism_rt.unet_batch``), the smallest call (direct inversion) N = 1. ``prism-export export``
records them in the manifest (``--max-edits``, ``--max-groups``, ``--max-batch``); a load may
override them (``OrtOptions.deployment``). Calls larger than the profile are refused by the
backend with the ``--max-batch`` that splits them.

Per graph (calls made by ``prism_rt.engine``): the text encoder encodes the source, "" and the
targets at once (at most 2 + K prompts); the VAE encodes and decodes one image per call.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import SettingsError

DEFAULT_MAX_EDITS = 5  # one edit × PRISM's five self-replace values (0.4 … 0.8)
DEFAULT_MAX_GROUPS = 1
_EXPR = re.compile(r"^(?:(\d+)\*)?([a-z_]+)(?:\+(\d+))?$")


def eval_dim(entry: int | str, values: dict[str, int]) -> int:
    """A manifest shape entry: an int, or ``[k*]name[+c]`` evaluated with ``values``."""
    if isinstance(entry, int):
        return entry
    match = _EXPR.match(entry.replace(" ", ""))
    if match is None or match.group(2) not in values:
        raise ValueError(f"cannot evaluate dim {entry!r} with {values}")
    factor, name, offset = match.groups()
    return int(factor or 1) * int(values[name]) + int(offset or 0)


@dataclass(frozen=True)
class Deployment:
    """The largest calls an engine is built for (TensorRT profiles, memory estimates).

    max_edits: edit items K of one image in one UNet call (targets × self-replace values); more
      are split into chunks, each repeating the source (slower), fewer leave memory unused.
    max_groups: images G per UNet call (``edit_many``); each adds 2·(1+K) items.
    max_batch: the UNet batch N the profile goes up to; None: 2·G·(1+K), every item with its
      unconditional half (the largest layout a G × K call has).
    """

    max_edits: int = DEFAULT_MAX_EDITS
    max_groups: int = DEFAULT_MAX_GROUPS
    max_batch: int | None = None

    def __post_init__(self):
        if int(self.max_edits) < 1 or int(self.max_groups) < 1:
            raise SettingsError(f"max_edits and max_groups must be ≥ 1, got {self.max_edits} and {self.max_groups}; "
                                f"the defaults are {DEFAULT_MAX_EDITS} (one edit × five self values) and 1")
        if self.max_batch is not None and int(self.max_batch) < 3:
            raise SettingsError(f"max_batch {self.max_batch} is smaller than one edit call (3 items: an unconditional "
                                "half, the source and one edit item); use at least 3, or None for 2·G·(1+K)")

    @property
    def unet_batch(self) -> int:
        return int(self.max_batch) if self.max_batch is not None else 2 * self.max_groups * (1 + self.max_edits)

    def calls(self, graph: str) -> dict[str, tuple[int | None, int, int]]:
        """(min, opt, max) of the dims of ``graph``'s calls (min None: the exported minimum)."""
        k, g, n = self.max_edits, self.max_groups, self.unet_batch
        return {"unet": {"batch": (1, n, n), "groups": (1, g, g), "edits": (None, k, k)},
                "text_encoder": {"batch": (1, min(2 + k, 3), 2 + k)},
                "vae_encoder": {"batch": (1, 1, 1)}, "vae_decoder": {"batch": (1, 1, 1)}}.get(graph, {})

    def dims(self, graph: str, exported: dict) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each symbolic dim of ``graph`` for this deployment, within the
        ``exported`` ranges (the manifest's ``dims``: objects with min/opt/max); an exported range
        smaller than the deployment is an error naming both fixes."""
        wanted = self.calls(graph)
        out = {}
        for name, rng in exported.items():
            lo, opt, hi = wanted.get(name, (rng.min, rng.opt, rng.max))
            lo = rng.min if lo is None else max(lo, rng.min)
            if hi > rng.max:
                raise SettingsError(f"the deployment needs {graph} {name} up to {hi} but the engine was exported for "
                                    f"at most {rng.max}; lower max_edits / max_groups / max_batch, or re-export")
            out[name] = (lo, min(max(opt, lo), hi), hi)
        return out

    def profile(self, entry) -> dict[str, dict[str, list[int]]]:
        """Per input of a manifest graph entry, its min / opt / max shapes for this deployment."""
        dims = self.dims(entry.name, entry.dims)
        return {t.name: {level: [eval_dim(d, {k: v[i] for k, v in dims.items()}) for d in t.shape]
                         for i, level in enumerate(("min", "opt", "max"))} for t in entry.inputs}

    def to_json(self) -> dict:
        return {**asdict(self), "unet_batch": self.unet_batch}

    @classmethod
    def from_json(cls, d: dict | None) -> "Deployment":
        """The manifest's ``deployment`` (an engine exported before it was recorded: the defaults)."""
        d = d or {}
        return cls(max_edits=int(d.get("max_edits", DEFAULT_MAX_EDITS)),
                   max_groups=int(d.get("max_groups", DEFAULT_MAX_GROUPS)),
                   max_batch=None if d.get("max_batch") is None else int(d["max_batch"]))
