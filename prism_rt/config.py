"""Configuration as data: one frozen dataclass per concern; defaults are PRISM's published settings."""
from __future__ import annotations

import enum
import math
from numbers import Integral
from dataclasses import dataclass

from .errors import SettingsError


class InversionMethod(str, enum.Enum):
    """How the source image is inverted (PRISM_METHOD §4)."""

    NULL_TEXT = "null-text"
    """PRISM's own: per-step optimised null embeddings. Best reconstruction of the CFG path, ~600
    UNet forwards + 500 backwards per image; needs autograd (torch backend only)."""
    NEGATIVE_PROMPT = "negative-prompt"
    """Miyake et al. 2023: the source prompt replaces the null embedding. Free, approximate."""
    DIRECT = "direct"
    """Ju et al. 2024: the source branch is pinned to the stored inversion path. Free, exact
    source reconstruction; the source's noise prediction is never used."""
    DDIM = "ddim"
    """Plain DDIM inversion, no correction: for comparison only."""


class Fit(str, enum.Enum):
    """How an input image is fitted to the model's square size (PRISM_METHOD §3)."""

    RESIZE = "resize"
    """Stretch to the model size without cropping: how PRISM trained. Default."""
    CROP = "crop"
    """Centre-crop to a square, then resize: the published inference code; cuts off the
    costophrenic angles on portrait radiographs."""
    PAD = "pad"
    """Pad to a square with the image's edge mean, then resize: keeps the aspect ratio."""


class BlendMaps(str, enum.Enum):
    """Which cross-attention maps the controlled UNet returns for LocalBlend (compiled into the graph)."""

    AFTER_CONTROL = "after-control"
    """The edit items' maps with refine / replace and reweighting applied: what the published
    prompt-to-prompt controller's LocalBlend reads (it stores each map, then overwrites the edit
    rows in place). Default."""
    BEFORE_CONTROL = "before-control"
    """Each item's own maps, as its attention computed them; engines exported before this choice
    existed return these."""


GUIDANCE_RANGE = (1.0, 30.0)
"""Classifier-free guidance scales accepted: 1 is no guidance; beyond ~30 the guided noise leaves
the range the model was trained on and images saturate."""

EDIT_WEIGHT_RANGE = (0.0, 10.0)
"""Attention reweighting factors accepted for the edit words (PRISM: 2; 0 removes the words'
attention; beyond 10 the softmax is dominated by one token)."""


def _finite_in(name: str, value: float, low: float, high: float, *, open_low: bool = False, hint: str = "") -> None:
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        raise SettingsError(f"{name} must be in {'(' if open_low else '['}{low:g}, {high:g}], got {value}" +
                            (f"; {hint}" if hint else ""))


@dataclass(frozen=True)
class SamplerConfig:
    """DDIM sampler (PRISM_METHOD §2).

    steps: more steps = slower (linear) and closer inversion; PRISM uses 50.
    guidance: classifier-free guidance scale w; PRISM uses 7.5. Higher = stronger edits, larger
    inversion drift without null-text/direct correction.
    """

    steps: int = 50
    guidance: float = 7.5
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, Integral) or self.num_train_timesteps < 1:
            raise SettingsError(f"num_train_timesteps must be a whole number ≥ 1, got {self.num_train_timesteps!r}")
        _finite_in("beta_start", self.beta_start, 0.0, 1.0, open_low=True)
        _finite_in("beta_end", self.beta_end, self.beta_start, 1.0)
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise SettingsError(f"beta_schedule must be scaled_linear or linear, got {self.beta_schedule!r}")
        if not isinstance(self.steps_offset, Integral) or not 0 <= self.steps_offset < self.num_train_timesteps:
            raise SettingsError(f"steps_offset must be a whole number in [0, num_train_timesteps), got {self.steps_offset!r}")
        if not isinstance(self.steps, Integral) or not 1 <= self.steps <= self.num_train_timesteps:
            raise SettingsError(f"steps must be in 1..{self.num_train_timesteps}, got {self.steps}")
        if not GUIDANCE_RANGE[0] <= self.guidance <= GUIDANCE_RANGE[1]:  # also refuses NaN
            raise SettingsError(f"guidance must be in [{GUIDANCE_RANGE[0]:g}, {GUIDANCE_RANGE[1]:g}], got {self.guidance}; "
                                "PRISM uses 7.5")


@dataclass(frozen=True)
class InversionConfig:
    """Inversion settings (PRISM_METHOD §4).

    null_inner_steps / null_epsilon / null_lr: null-text optimisation; fewer inner steps = faster,
    worse reconstruction. The threshold is an absolute MSE on latents.
    """

    method: InversionMethod = InversionMethod.NULL_TEXT
    null_inner_steps: int = 10
    null_epsilon: float = 1e-5
    null_lr: float = 1e-2

    def __post_init__(self):
        if not 0 <= self.null_inner_steps <= 1000:
            raise SettingsError(f"null_inner_steps must be in [0, 1000], got {self.null_inner_steps}; PRISM uses 10")
        _finite_in("null_epsilon", self.null_epsilon, 0.0, 1.0)
        _finite_in("null_lr", self.null_lr, 0.0, 1.0, open_low=True, hint="PRISM uses 0.01")


SELF_REPLACE_SWEEP = (0.4, 0.5, 0.6, 0.7, 0.8)
"""PRISM's self-attention windows: each edit is made with each, and the filter keeps one."""

NOISE_BLEND_THRESHOLDS = (0.85, 1.0, 1.7)
"""noise_blend's default thresholds: chosen on validation phantom patients (README, "Edit precision
on phantoms"), never on the held-out ones."""


COMPOSITE_THRESHOLDS = (0.0, 0.08)
"""The difference composite's default candidates (a fraction of the intensity range; 0 = the plain
counterfactual): chosen on validation phantom patients (README, "Edit precision on phantoms"), not
on the patients of the report."""


def _floats(value) -> tuple[float, ...]:
    """One number or several (any iterable; None = none) as a tuple of floats."""
    return (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value or ())


EDIT_NEGATIVES = ("empty", "source")
"""``ControlConfig.edit_negative``'s values."""


@dataclass(frozen=True)
class ControlConfig:
    """Prompt-to-prompt attention control (PRISM_METHOD §5).

    cross_replace: fraction of the steps (from the start) in which cross-attention of the edits is
      replaced by the source's. Longer = closer to the source, weaker edit. PRISM: 0.8.
    self_replace: the self-attention window(s); each value s replaces self-attention during the
      first s of the steps. Several values are run as extra items of one batch. PRISM sweeps
      0.4…0.8. Longer = more of the source's structure kept.
    (Which self-attention layers are controlled is a property of the UNet graph, not of an edit:
    ``Engine.load(..., self_max_queries=...)``.)
    edit_weight: reweighting of the edit words (PRISM: 2.0); None or 1.0 = no reweighting.
    edit_words: the words reweighted; None = the words of each target not in the source.
    blend_words: (source word, edit word) for LocalBlend; None = no LocalBlend. One may be "": that
      side adds nothing to the mask (a removal: the edit has no word for what goes).
    blend_threshold / blend_start: LocalBlend mask threshold (0.3) and the fraction of steps
      after which the blend applies (0.2).
    blend_dilation: the radius, in map cells, of the max-pool that grows the word map before the
      threshold; the published 3 × 3 is 1, 0 = none. On maps as fine as the latent (a small
      model's, ``blend_downsample`` 1) the published pool triples the width of every thin
      structure (a device's leads: one latent cell added on each side).
    noise_blend: LocalBlend with a mask from the noise predictions instead of the cross-attention
      maps (DiffEdit, Couairon et al. 2022): the source latent noised to ``noise_blend_strength``
      of the diffusion time with ``noise_blend_samples`` noise draws, the guided noise predicted
      under the source and under each target caption, |difference| averaged over draws and
      channels; the mask is where it exceeds ``noise_blend_threshold`` × its mean over the image.
      Several thresholds (like ``self_replace``) run as extra items of one batch, each edit with
      its own mask from the same prediction differences: a higher threshold edits less of the
      image; ``--select`` then keeps, per edit, the item that flips the attribute with the best
      identity (the smallest sufficient mask). For models whose cross-attention does not localise
      words (small or briefly trained ones); needs no blend words. Exclusive with ``blend_words``.
    composite: difference composite threshold(s) (``prism_rt.composite``), a fraction of the
      intensity range; () = off. Each counterfactual is composited onto the reconstruction where
      its (blurred) change exceeds the threshold, so the small diffuse changes an edit leaves
      elsewhere are dropped and only the edit's own change is kept; 0 keeps the plain
      counterfactual. Several values multiply the candidates (no extra UNet work); ``--select``
      keeps one (default candidates ``COMPOSITE_THRESHOLDS``: plain and 0.08). Not applied with
      ``legacy``.
    legacy: reproduce the published PRISM code (no attention control, no blend: null-text +
      plain prompt swap).
    edit_negative: what the edit items' classifier-free guidance steers away from. ``"empty"``
      (default, the published method): the embedding of "" — each edit is guided toward its
      caption from nothing. ``"source"``: the source caption — each edit is guided along the
      difference between its caption and the source's (Miyake et al.'s negative prompt, applied
      to the edit items only), so what the edit drops (a device) is pushed out and the rest is
      left to the source's path. For direct inversion (the source item has no unconditional
      half; its path stays exact) and negative-prompt (where it is already so).
    """

    cross_replace: float = 0.8
    self_replace: tuple[float, ...] = SELF_REPLACE_SWEEP
    edit_weight: float | None = 2.0
    edit_words: tuple[str, ...] | None = None
    blend_words: tuple[str, str] | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    blend_dilation: int = 1
    noise_blend: bool = False
    noise_blend_threshold: tuple[float, ...] = NOISE_BLEND_THRESHOLDS  # one value or several
    noise_blend_samples: int = 10
    noise_blend_strength: float = 0.5
    composite: tuple[float, ...] = ()
    mode: str = "refine"
    legacy: bool = False
    edit_negative: str = "empty"

    def __post_init__(self):
        if self.edit_negative not in EDIT_NEGATIVES:
            raise SettingsError(f"edit_negative must be one of {', '.join(EDIT_NEGATIVES)} (the caption the edits' "
                                f"guidance steers away from), got {self.edit_negative!r}")
        if self.legacy and self.edit_negative != "empty":
            raise SettingsError("legacy reproduces the published code (null-text, guidance from the empty caption); "
                                "drop edit_negative or legacy")
        if self.edit_weight is not None:
            _finite_in("edit_weight", self.edit_weight, *EDIT_WEIGHT_RANGE, hint="PRISM uses 2.0; 1 = no reweighting")
        _finite_in("blend_threshold", self.blend_threshold, 0.0, 1.0, open_low=True,
                   hint="a fraction of each item's peak attention; the published value is 0.3")
        dilation = self.blend_dilation
        if isinstance(dilation, bool) or not isinstance(dilation, int) or not 0 <= dilation <= 4:
            raise SettingsError(f"blend_dilation must be a whole number of map cells in 0…4 (the published 3×3 "
                                f"max-pool is 1; 0 = none), got {self.blend_dilation!r}")
        _finite_in("blend_start", self.blend_start, 0.0, 1.0, hint="a fraction of the steps; the published value is 0.2")
        if not 0.0 <= self.cross_replace <= 1.0:
            raise SettingsError(f"cross_replace must be in [0, 1], got {self.cross_replace}")
        if not self.self_replace:
            raise SettingsError("self_replace needs at least one value")
        for s in self.self_replace:
            if not 0.0 <= s <= 1.0:
                raise SettingsError(f"self_replace values must be in [0, 1], got {s}")
        if self.mode not in ("refine", "replace"):
            raise SettingsError(f"mode must be refine or replace, got {self.mode!r}")
        if self.blend_words is not None and (len(self.blend_words) != 2 or not any(w.strip() for w in self.blend_words)):
            raise SettingsError(f"blend_words is (source word, edit word), one of them possibly empty (a removal: "
                                f"('Devices', '')); got {self.blend_words!r}")
        if self.noise_blend and self.blend_words is not None:
            raise SettingsError("choose one LocalBlend mask: blend_words (attention maps) or noise_blend, not both")
        if not 0.0 < self.noise_blend_strength < 1.0:
            raise SettingsError(f"noise_blend_strength must be in (0, 1), got {self.noise_blend_strength}")
        if self.noise_blend_samples < 1:
            raise SettingsError(f"noise_blend_samples must be ≥ 1, got {self.noise_blend_samples}")
        object.__setattr__(self, "noise_blend_threshold", _floats(self.noise_blend_threshold))
        if not self.noise_blend_threshold or not all(math.isfinite(v) and v >= 0 for v in self.noise_blend_threshold):
            raise SettingsError(f"noise_blend_threshold needs one or more finite values ≥ 0 (× the mean prediction "
                                f"difference, 0 = the whole image; default {NOISE_BLEND_THRESHOLDS}), got {self.noise_blend_threshold}")
        object.__setattr__(self, "composite", _floats(self.composite))
        if any(not 0.0 <= v < 1.0 for v in self.composite) or len({f"{v:g}" for v in self.composite}) != len(self.composite):
            raise SettingsError(f"composite thresholds must be distinct values in [0, 1) (a fraction of the intensity "
                             f"range, 0 = the plain counterfactual; {COMPOSITE_THRESHOLDS} is the default), "
                             f"got {self.composite}")

    def check_inversion(self, method: "InversionMethod | str") -> None:
        """Raise ``SettingsError`` unless these settings can edit an inversion made with ``method``
        (checked before any work: an inversion may take minutes)."""
        method = InversionMethod(method)
        if self.edit_negative == "source" and method in (InversionMethod.NULL_TEXT, InversionMethod.DDIM):
            raise SettingsError(f"edit_negative 'source' needs direct or negative-prompt inversion, not {method.value}: "
                                f"{method.value}'s source item is guided too, and its unconditional half is what keeps "
                                f"its path; use --inversion direct, or drop --edit-negative")


@dataclass(frozen=True)
class RunLimits:
    """max_batch: the largest UNet batch run at once; larger edit batches are split into chunks,
    each carrying the source branch (costs one extra source item per chunk)."""

    max_batch: int = 32

    def __post_init__(self):
        if not 1 <= self.max_batch <= 4096:
            raise SettingsError(f"max_batch must be in [1, 4096], got {self.max_batch}; the default is 32")


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime session settings of an engine folder (``Engine.from_dir``).

    threads: intra-op threads (None: onnxruntime's default, every core). On a machine whose cores
      other work shares, 1–2 threads are often faster than the default.
    cpu_arena: on a CPU keep one memory arena for all graphs (faster: no fresh pages per call);
      False frees every tensor after each call (lowest resident memory, for long-lived services).
    cpu_graphs: on a CPU run each graph's CPU twin where the engine has one (attention fused into
      ``MultiHeadAttention``: same outputs to ~1e-6, a fraction of the memory at SD v1.5 size);
      False runs the portable graphs TensorRT builds from.
    session_config: ``SessionOptions.add_session_config_entry`` settings, e.g.
      ``{"session.intra_op.allow_spinning": "0"}`` where other work shares the cores.
    trt_cache (device ``tensorrt``): where TensorRT's built engines and timing cache are kept
      between processes — None: ``ENGINE/trt-cache`` (or the user's cache folder where the engine
      folder is read-only); a path: there; False: build anew in each process.
    deployment (device ``tensorrt``): a :class:`prism_rt.deployment.Deployment`, the largest
      calls TensorRT's optimisation profiles cover (more edits per call: more memory, fewer
      chunks); None: what the export recorded in the manifest (one edit × five self values).
    io_binding: keep the loops' arrays on the device (torch tensors bound to onnxruntime by
      pointer: no host copy per step). None: on for cuda/tensorrt where torch is installed.
    """

    threads: int | None = None
    cpu_arena: bool = True
    cpu_graphs: bool = True
    session_config: dict | None = None
    trt_cache: object = None  # str | Path | bool | None
    deployment: object = None  # prism_rt.deployment.Deployment | None
    io_binding: bool | None = None

    def __post_init__(self):
        if self.threads is not None and int(self.threads) < 1:
            raise SettingsError(f"threads must be ≥ 1 (or None for every core), got {self.threads}")
