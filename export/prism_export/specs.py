"""One description per network (STYLE §3): names, dtypes, symbolic dims with min/opt/max ranges,
and sample inputs, for each of the four graphs of an engine.

The same spec serves the ONNX export (which axes are dynamic, what to trace with), the parity
check (which shapes to compare at, valid random inputs), the manifest (I/O table, profiles) and
later the TensorRT build (optimisation profiles). A shape entry is an int (fixed) or a small
expression over named dims: ``"batch"``, ``"8*latent_height"``, ``"edits+1"``.

Why the UNet dims are what they are: one call carries ``N = U + G·(1+K)`` items (U unconditional
items, G groups of a source and K edit items; ``prism_rt.torch_backend.controlled_unet``). N, G
and K are independent graph dims; the runtime supplies consistent values. K = 0 (inversion) is a
legal value of the exported graph, checked by the parity cases. Spatial dims of the UNet are
fixed at the model's latent size, because the graph bakes two size-dependent decisions: which
self-attention layers are controlled (``self_max_queries``) and which layers feed the blend maps.
Batch stays ≤ 63: diffusers' upsampler takes another code path from 64 items on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from prism_rt.deployment import eval_dim

MAX_BATCH = 63  # diffusers' Upsample2D switches code paths at 64 items


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int32
    shape: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class DimRange:
    """A symbolic dim: the range the engine supports (min/opt/max, as TensorRT profiles take
    them) and the value it is traced with (never 0 or 1, which torch.export specialises)."""

    min: int
    opt: int
    max: int
    trace: int

    def to_json(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class ModelDims:
    """Sizes of the model the graphs are built for."""

    image_size: int
    latent_channels: int
    latent_downsample: int
    text_width: int
    max_tokens: int
    vocab_size: int
    blend_downsample: int

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_downsample

    @property
    def blend_size(self) -> int:
        """Side of the blend maps, as the controlled UNet computes it."""
        from prism_rt.torch_backend.controlled_unet import side_after

        return side_after(self.latent_size, self.blend_downsample)

    @classmethod
    def from_components(cls, components, unet_graph) -> "ModelDims":
        te = components.text_encoder.config
        return cls(
            image_size=int(components.image_size),
            latent_channels=int(components.unet.config.in_channels),
            latent_downsample=2 ** (len(components.vae.config.block_out_channels) - 1),
            text_width=int(te.hidden_size), max_tokens=int(te.max_position_embeddings),
            vocab_size=int(te.vocab_size), blend_downsample=int(unet_graph.blend_downsample))

    @classmethod
    def from_manifest(cls, raw: dict) -> "ModelDims":
        """The sizes an engine folder's manifest (``manifest.json``, as a dict) records."""
        m = raw["model"]
        return cls(image_size=int(m["image_size"]), latent_channels=int(m["latent_channels"]),
                   latent_downsample=int(m["latent_downsample"]), text_width=int(m["text_width"]),
                   max_tokens=int(m["max_tokens"]), vocab_size=int(m["vocab_size"]),
                   blend_downsample=int(raw["control"]["blend_downsample"]))


@dataclass(frozen=True)
class GraphSpec:
    """Base of the per-graph specs; subclasses define ``name``, ``inputs``, ``outputs``, ``dims``."""

    model: ModelDims
    name: ClassVar[str] = ""

    def inputs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def outputs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def dims(self) -> dict[str, DimRange]:
        raise NotImplementedError

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs()]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs()]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis: symbolic dim}}`` of inputs and outputs."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs(), *self.outputs()) if any(isinstance(d, str) for d in t.shape)}

    def input_shapes(self, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(eval_dim(d, values) for d in t.shape) for t in self.inputs()}

    def output_shapes(self, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(eval_dim(d, values) for d in t.shape) for t in self.outputs()}

    def profile(self) -> dict[str, dict[str, list[int]]]:
        """Per input, the min/opt/max shapes (a TensorRT optimisation profile)."""
        dims = self.dims()
        out = {}
        for t in self.inputs():
            out[t.name] = {level: [eval_dim(d, {k: getattr(r, level) for k, r in dims.items()}) for d in t.shape]
                           for level in ("min", "opt", "max")}
        return out

    def trace_values(self) -> dict[str, int]:
        return {k: r.trace for k, r in self.dims().items()}

    def parity_cases(self) -> list[dict[str, int]]:
        """Dim values the export compares ONNX against torch at."""
        raise NotImplementedError

    def sample_inputs(self, rng: np.random.Generator | None = None, **values: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def torch_dynamic_shapes(self) -> dict:
        """``dynamic_shapes`` for ``torch.export``: every symbolic input axis ``Dim.DYNAMIC``.

        Named ``Dim``s with ranges are not used: torch.export raises a constraint violation for
        every relation it derives beyond the declared range (e.g. N ≥ G·(1+K) in the UNet) and
        the ONNX exporter's retry doubles the trace time. The ranges live in this spec instead
        and are checked at parity time; the ONNX dims are renamed after export.
        """
        from torch.export import Dim

        return {t.name: ({i: Dim.DYNAMIC for i, d in enumerate(t.shape) if isinstance(d, str)} or None)
                for t in self.inputs()}

    def to_json(self) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs()],
            "outputs": [t.to_json() for t in self.outputs()],
            "dims": {k: r.to_json() for k, r in self.dims().items()},
            "profile": self.profile(),
        }


def _rng(rng):
    return rng if rng is not None else np.random.default_rng(0)


@dataclass(frozen=True)
class TextEncoderSpec(GraphSpec):
    name: ClassVar[str] = "text_encoder"

    def inputs(self):
        return (TensorSpec("input_ids", "int32", ("batch", self.model.max_tokens)),)

    def outputs(self):
        return (TensorSpec("hidden", "float32", ("batch", self.model.max_tokens, self.model.text_width)),)

    def dims(self):
        return {"batch": DimRange(1, 3, MAX_BATCH, trace=3)}

    def parity_cases(self):
        return [{"batch": 1}, {"batch": 2}, {"batch": 5}]

    def sample_inputs(self, rng=None, batch: int = 1):
        ids = _rng(rng).integers(0, self.model.vocab_size, (batch, self.model.max_tokens))
        return {"input_ids": ids.astype(np.int32)}


@dataclass(frozen=True)
class VaeEncoderSpec(GraphSpec):
    """pixels in [-1, 1] → posterior mean × scaling factor. Spatial dims are dynamic (the VAE has
    no size-dependent branch); the runtime uses the model size."""

    name: ClassVar[str] = "vae_encoder"

    def inputs(self):
        return (TensorSpec("pixels", "float32", ("batch", 3, "8*latent_height", "8*latent_width")),)

    def outputs(self):
        return (TensorSpec("latent_mean", "float32", ("batch", self.model.latent_channels, "latent_height", "latent_width")),)

    def dims(self):
        side = self.model.latent_size
        return {"batch": DimRange(1, 1, MAX_BATCH, trace=3),
                "latent_height": DimRange(max(2, side // 2), side, side, trace=side),
                "latent_width": DimRange(max(2, side // 2), side, side, trace=side)}

    def parity_cases(self):
        side, half = self.model.latent_size, max(2, self.model.latent_size // 2)
        return [{"batch": 1, "latent_height": side, "latent_width": side},
                {"batch": 2, "latent_height": side, "latent_width": side},
                {"batch": 1, "latent_height": half, "latent_width": side}]

    def sample_inputs(self, rng=None, batch: int = 1, latent_height: int | None = None, latent_width: int | None = None):
        h = 8 * (latent_height or self.model.latent_size)
        w = 8 * (latent_width or self.model.latent_size)
        return {"pixels": _rng(rng).uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)}


@dataclass(frozen=True)
class VaeDecoderSpec(GraphSpec):
    name: ClassVar[str] = "vae_decoder"

    def inputs(self):
        return (TensorSpec("latents", "float32", ("batch", self.model.latent_channels, "latent_height", "latent_width")),)

    def outputs(self):
        return (TensorSpec("pixels", "float32", ("batch", 3, "8*latent_height", "8*latent_width")),)

    def dims(self):
        return VaeEncoderSpec(self.model).dims()

    def parity_cases(self):
        return VaeEncoderSpec(self.model).parity_cases()

    def sample_inputs(self, rng=None, batch: int = 1, latent_height: int | None = None, latent_width: int | None = None):
        h, w = latent_height or self.model.latent_size, latent_width or self.model.latent_size
        return {"latents": _rng(rng).standard_normal((batch, self.model.latent_channels, h, w)).astype(np.float32)}


@dataclass(frozen=True)
class UNetSpec(GraphSpec):
    """The controlled UNet. ``batch`` = N = U + G·(1+K); ``groups`` = G; ``edits`` = K (0 allowed)."""

    name: ClassVar[str] = "unet"
    self_max_queries: int = 32 * 32
    opt_edits: int = 5  # PRISM's default sweep: one target × five self-window values
    min_edits: int = 0  # 1 if an exporter's graph cannot run K = 0 (the runtime then pads)

    def inputs(self):
        m, t = self.model, self.model.max_tokens
        c = ("groups", "edits")
        return (
            TensorSpec("latents", "float32", ("batch", m.latent_channels, m.latent_size, m.latent_size)),
            TensorSpec("timestep", "float32", (1,)),
            TensorSpec("text", "float32", ("batch", t, m.text_width)),
            TensorSpec("cross_alpha", "float32", (*c, t)),
            TensorSpec("token_mapper", "float32", (*c, t, t)),
            TensorSpec("refine_alpha", "float32", (*c, t)),
            TensorSpec("equalizer", "float32", (*c, t)),
            TensorSpec("self_replace", "float32", c),
        )

    def outputs(self):
        m = self.model
        return (TensorSpec("noise", "float32", ("batch", m.latent_channels, m.latent_size, m.latent_size)),
                TensorSpec("blend_maps", "float32", ("groups", "edits+1", m.max_tokens, m.blend_size, m.blend_size)))

    def dims(self):
        k = self.opt_edits
        # traced at U=3, G=2, K=3 (N=11): no dim 0 or 1, no two dims equal by accident
        return {"batch": DimRange(1, 1 + 2 * k, MAX_BATCH, trace=11),
                "groups": DimRange(1, 1, 8, trace=2),
                "edits": DimRange(self.min_edits, k, MAX_BATCH - 1, trace=3)}

    def trace_values(self):
        return {"uncond": 3, "groups": 2, "edits": 3}

    def parity_cases(self):
        """Inversion (K=0), a direct edit (U=K), a ddim/null-text edit (U=1+K), two groups."""
        return [{"uncond": 0, "groups": 1, "edits": 0}, {"uncond": 1, "groups": 1, "edits": 0},
                {"uncond": 2, "groups": 1, "edits": 2}, {"uncond": 3, "groups": 1, "edits": 2},
                {"uncond": 1, "groups": 2, "edits": 1}]

    def sample_inputs(self, rng=None, uncond: int = 1, groups: int = 1, edits: int = 1):
        """Random inputs in the controls' valid ranges (token_mapper rows sum to 1, refine 0/1), the
        latents laid out as the edit loop gives them: each unconditional item repeats the latent of a
        conditional one (the last ``uncond`` of them), the conditional items' latents differ."""
        rng, m, t = _rng(rng), self.model, self.model.max_tokens
        n = uncond + groups * (1 + edits)
        mapper = rng.random((groups, edits, t, t)) ** 8
        mapper /= mapper.sum(-1, keepdims=True)
        cond = rng.standard_normal((n - uncond, m.latent_channels, m.latent_size, m.latent_size)).astype(np.float32)
        return {
            "latents": np.concatenate([cond[np.arange(-uncond, 0) % len(cond)], cond]),
            "timestep": np.array([rng.integers(1, 1000)], np.float32),
            "text": rng.standard_normal((n, t, m.text_width)).astype(np.float32),
            "cross_alpha": rng.random((groups, edits, t)).astype(np.float32),
            "token_mapper": mapper.astype(np.float32),
            "refine_alpha": (rng.random((groups, edits, t)) > 0.2).astype(np.float32),
            "equalizer": rng.uniform(0.5, 2.0, (groups, edits, t)).astype(np.float32),
            "self_replace": rng.random((groups, edits)).astype(np.float32),
        }

    @staticmethod
    def case_dims(case: dict[str, int]) -> dict[str, int]:
        """Graph dim values of a parity case given as U, G, K."""
        return {"batch": case["uncond"] + case["groups"] * (1 + case["edits"]),
                "groups": case["groups"], "edits": case["edits"]}


SPECS = (TextEncoderSpec, VaeEncoderSpec, VaeDecoderSpec, UNetSpec)


def graph_specs(model: ModelDims, self_max_queries: int = 32 * 32) -> dict[str, GraphSpec]:
    return {"text_encoder": TextEncoderSpec(model), "vae_encoder": VaeEncoderSpec(model),
            "vae_decoder": VaeDecoderSpec(model), "unet": UNetSpec(model, self_max_queries=self_max_queries)}
