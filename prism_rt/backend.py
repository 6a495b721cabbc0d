"""The backend interface: a backend runs named graphs on named arrays.

The loops (``prism_rt.loop``) are written once against this interface and the array API, and
never know which backend runs them. Graphs and their I/O (ARCHITECTURE.md):

=============  =====================================================  ==========================
graph          inputs                                                 outputs
=============  =====================================================  ==========================
text_encoder   input_ids int32 [B,77]                                 hidden [B,77,D]
vae_encoder    pixels [B,3,H,W] in [-1,1]                             latent_mean [B,4,h,w] (× scaling)
vae_decoder    latents [B,4,h,w] (scaled)                             pixels [B,3,H,W] in ~[-1,1]
unet           latents, timestep, text, cross_alpha, token_mapper,    noise [N,4,h,w],
               refine_alpha, equalizer, self_replace                  blend_maps [G,1+K,77,hb,wb]
=============  =====================================================  ==========================
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "unet")


class BackendKind(str, enum.Enum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class ModelInfo:
    """What the loops need to know about the model behind a backend."""

    image_size: int
    latent_channels: int
    latent_downsample: int  # image side / latent side (8 for SD v1.x)
    text_width: int
    max_tokens: int
    tokenizer_dir: Path
    scheduler_config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    self_max_queries: int = 32 * 32
    blend_downsample: int | None = None  # latent side / LocalBlend map side, chosen by layer resolution
    blend_maps: str = "after-control"  # config.BlendMaps: the LocalBlend maps after or before control

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_downsample


class Backend(Protocol):
    kind: BackendKind
    info: ModelInfo
    supports_autograd: bool

    @property
    def xp(self) -> Any:
        """The array-API namespace of this backend's arrays."""

    def asarray(self, array: np.ndarray) -> Any:
        """Host array → this backend's array (device, float dtype)."""

    def to_numpy(self, array: Any) -> np.ndarray:
        ...

    def run(self, graph: str, **inputs: Any) -> dict[str, Any]:
        """Run one named graph; inputs and outputs are this backend's arrays."""

    def describe(self) -> dict:
        """Library versions, device and precision, for provenance."""
