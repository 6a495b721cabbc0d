"""The one owner of the controlled UNet call's layout and of its control tensors.

One UNet call evaluates ``N = U + G·(1+K)`` items: the unconditional halves first (U of them),
then G groups (images), each its source item followed by its K edit items. Which items carry an
unconditional classifier-free-guidance half depends on the inversion: every item for ddim and
null-text; the edit items only for negative-prompt (the source's two halves would be equal) and
direct (the source's noise is never used: its latent is pinned to the inversion path). With K = 0
and G = 1 the call is a plain UNet call (inversion, noise-blend draws).

Control tensors (ARCHITECTURE.md, "controlled UNet"), per group g and edit item k:
``cross_alpha [G,K,T]``, ``token_mapper [G,K,T,T]``, ``refine_alpha [G,K,T]``,
``equalizer [G,K,T]``, ``self_replace [G,K]``; with every control neutral the graph is a plain
UNet. Everything that knows this layout lives here: the loops, the engine's chunking, the ONNX
Runtime backend's K = 0 padding, the export's parity cases and the benchmark's inputs ask it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .config import InversionMethod
from .errors import SettingsError
from .schedule import classifier_free_guidance

CONTROL_INPUTS = ("cross_alpha", "token_mapper", "refine_alpha", "equalizer", "self_replace")
"""The controlled UNet's control inputs, in graph order (after latents, timestep, text)."""

UNET_INPUTS = ("latents", "timestep", "text", *CONTROL_INPUTS)


def source_has_uncond(method: InversionMethod | str) -> bool:
    """Whether each group's source item carries an unconditional half (ddim, null-text)."""
    return InversionMethod(method) in (InversionMethod.DDIM, InversionMethod.NULL_TEXT)


@dataclass(frozen=True)
class UNetBatch:
    """The layout of one UNet call: ``groups`` images × (source + ``edits`` items), and whether
    the source items carry an unconditional half (``source_uncond``; the edit items always do)."""

    groups: int
    edits: int
    source_uncond: bool = True

    @classmethod
    def for_method(cls, method: InversionMethod | str, groups: int, edits: int) -> "UNetBatch":
        return cls(groups, edits, source_has_uncond(method))

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def items(self) -> int:
        """Items per group: the source and its edits."""
        return 1 + self.edits

    @property
    def uncond_items(self) -> tuple[int, ...]:
        """The items of a group (0 = its source) that carry an unconditional half."""
        return tuple(range(0 if self.source_uncond else 1, self.items))

    @property
    def uncond(self) -> int:
        """U: unconditional items in the call."""
        return self.groups * len(self.uncond_items)

    @property
    def cond(self) -> int:
        return self.groups * self.items

    @property
    def size(self) -> int:
        """N = U + G·(1+K)."""
        return self.uncond + self.cond

    @property
    def dims(self) -> dict[str, int]:
        """The graph's dynamic dimension values of this call."""
        return {"batch": self.size, "groups": self.groups, "edits": self.edits}

    # -- assembling a call and reading its outputs ---------------------------------------------
    def assemble(self, xp, latents, uncond_text: Sequence, cond_text):
        """The call's ``latents [N,…]`` and ``text [N,T,D]`` from the groups' latents
        ``[G·(1+K),…]``, each group's unconditional embedding ``[1,T,D]`` and the conditional
        embeddings ``[G·(1+K),T,D]`` (source, then edits, per group)."""
        if not self.uncond:
            return latents, cond_text
        # slices, not an index array: nothing crosses from the host per step
        uncond = [latents[g * self.items + j:g * self.items + j + 1] for g in range(self.groups) for j in self.uncond_items]
        per_group = len(self.uncond_items)
        text = xp.concat([u for u in uncond_text for _ in range(per_group)] + [cond_text], axis=0)
        return xp.concat([*uncond, latents], axis=0), text

    def guide(self, xp, noise, guidance: float):
        """Classifier-free guidance of every conditional item, ``[G·(1+K),…]``: ``ε_u + w(ε_c − ε_u)``;
        a source without an unconditional half keeps its conditional noise."""
        per_group = len(self.uncond_items)
        guided = []
        for g in range(self.groups):
            noise_u = noise[g * per_group:(g + 1) * per_group]
            noise_c = noise[self.uncond + g * self.items:self.uncond + (g + 1) * self.items]
            if self.source_uncond:
                guided.append(classifier_free_guidance(noise_u, noise_c, guidance))
            else:
                guided.append(xp.concat([noise_c[:1], classifier_free_guidance(noise_u, noise_c[1:], guidance)], axis=0))
        return guided[0] if self.groups == 1 else xp.concat(guided, axis=0)

    def group(self, x, g: int):
        """Group g's rows of an array laid out ``[G·(1+K),…]``."""
        return x[g * self.items:(g + 1) * self.items]

    def set_sources(self, xp, latents, sources: Sequence):
        """``latents [G·(1+K),…]`` with each group's source row replaced by ``sources[g] [1,…]``."""
        return xp.concat([part for g, source in enumerate(sources)
                          for part in (source, latents[g * self.items + 1:(g + 1) * self.items])], axis=0)


# -- chunking ----------------------------------------------------------------------------------
def edits_per_chunk(method: InversionMethod | str, max_batch: int) -> int:
    """The most edit items of one image whose call fits ``max_batch``."""
    source_uncond = source_has_uncond(method)
    per = (max_batch - (2 if source_uncond else 1)) // 2
    if per < 1:
        raise SettingsError(f"--max-batch {max_batch} is too small for one edit item "
                            f"(one needs {UNetBatch(1, 1, source_uncond).size}); use at least 4")
    return per


def call_limits(backend, max_batch: int) -> dict[str, int]:
    """The most a UNet call may hold: ``batch`` (items), and where the backend bounds them
    (TensorRT's optimisation profiles) ``groups`` and ``edits``. ``max_batch`` within what the
    backend takes, so a run splits into calls the engine can run instead of failing."""
    unet = (getattr(backend, "limits", None) or {}).get("unet", {})  # onnxruntime: per graph and dim
    calls = {"batch": min(int(max_batch), int(unet.get("batch", max_batch)))}
    for dim in ("groups", "edits"):
        if unet.get(dim) is not None:
            calls[dim] = int(unet[dim])
    return calls


def plan_chunks(method: InversionMethod | str, images: int, edits: int, max_batch: int,
                max_groups: int | None = None, max_edits: int | None = None) -> list[tuple[list[int], list[int]]]:
    """How ``images`` images of ``edits`` items each are split into UNet calls of at most
    ``max_batch`` items (and at most ``max_groups`` images and ``max_edits`` edit items per image,
    where the backend has such limits: TensorRT's profiles): a list of (image indices, edit item
    indices) chunks. Whole images are grouped as many to a call as fit; an image whose own items
    do not fit in one call is run alone, its items split into chunks (each chunk repeats the
    source item)."""
    one = UNetBatch.for_method(method, 1, edits)
    per_call = min(max_batch // one.size, max_groups or images)
    if per_call >= 1 and (max_edits is None or edits <= max_edits):
        return [(list(range(i, min(i + per_call, images))), list(range(edits))) for i in range(0, images, per_call)]
    per = min(edits_per_chunk(method, max_batch), max_edits or edits)
    return [([image], list(range(k, min(k + per, edits)))) for image in range(images) for k in range(0, edits, per)]


# -- control tensors ---------------------------------------------------------------------------
def neutral_controls(groups: int, edits: int, tokens: int = 77) -> dict[str, np.ndarray]:
    """Controls that leave every item as a plain UNet computes it: a = 0, identity mapper, r = 1,
    eq = 1, self_replace = 0."""
    return dict(
        cross_alpha=np.zeros((groups, edits, tokens), np.float32),
        token_mapper=np.broadcast_to(np.eye(tokens, dtype=np.float32), (groups, edits, tokens, tokens)).copy(),
        refine_alpha=np.ones((groups, edits, tokens), np.float32),
        equalizer=np.ones((groups, edits, tokens), np.float32),
        self_replace=np.zeros((groups, edits), np.float32),
    )


def empty_controls(groups: int = 1, tokens: int = 77) -> dict[str, np.ndarray]:
    """Controls of a call with no edit items (K = 0): nothing is controlled. A plain UNet call of
    any N items is G = 1, K = 0: its last item is the group's source, the other N − 1 are read as
    unconditional halves, and no item is rewritten (inversion, the noise-blend draws)."""
    return neutral_controls(groups, 0, tokens)


def pad_empty_edits(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A K = 0 call as a K = 1 call, for engines that cannot take empty edit tensors: one neutral
    edit item per group, a copy of the group's source (a neutral item leaves the source untouched:
    the control only ever rewrites edit items). The call's other N − G items stay unconditional."""
    groups, tokens = feeds["cross_alpha"].shape[0], feeds["cross_alpha"].shape[2]
    uncond = feeds["latents"].shape[0] - groups

    def pad(x):  # [U + G, …] → [U + 2G, …]: each group's source, then its copy
        cond = x[uncond:][:, None]
        return np.concatenate([x[:uncond], np.concatenate([cond, cond], axis=1).reshape(2 * groups, *x.shape[1:])])

    return dict(feeds, latents=pad(feeds["latents"]), text=pad(feeds["text"]), **neutral_controls(groups, 1, tokens))


def unpad_outputs(feeds: dict[str, np.ndarray], noise: np.ndarray, blend_maps: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs of a :func:`pad_empty_edits` call (given its unpadded ``feeds``), the neutral
    items dropped."""
    groups = feeds["cross_alpha"].shape[0]
    uncond = feeds["latents"].shape[0] - groups
    cond = noise[uncond:].reshape(groups, 2, *noise.shape[1:])[:, 0]
    return {"noise": np.concatenate([noise[:uncond], cond]), "blend_maps": blend_maps[:, :1]}


class StepControls:
    """The control tensors of a run of edit steps, one group per plan (``control.ControlPlan``),
    copied to the backend once: the step-independent ones as they are, the per-step ones for
    every step at once ([steps,G,…]), which :meth:`at` indexes on the device (no host copy per
    step; a few KiB per step at 77 tokens)."""

    def __init__(self, backend, plans: Sequence[Any]):
        self.backend = backend
        self.plans = list(plans)
        self.static = {name: backend.asarray(np.stack([getattr(p, name) for p in self.plans]))
                       for name in ("token_mapper", "refine_alpha", "equalizer")}
        self.per_step = {name: backend.asarray(np.stack([getattr(p, name) for p in self.plans], axis=1))
                         for name in ("cross_alpha", "self_replace")}

    def at(self, step: int) -> dict[str, Any]:
        return dict(self.static, **{name: value[step] for name, value in self.per_step.items()})
