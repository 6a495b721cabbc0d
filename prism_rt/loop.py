"""The inversion and editing loops of PRISM (PRISM_METHOD §4–5), written once against the backend
interface and the array API: they never know which backend runs the graphs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Any, Callable

import numpy as np

from .blend import apply_blend, blend_mask
from .config import InversionMethod
from .errors import NonFiniteError, SettingsError
from .schedule import DDIMSchedule, classifier_free_guidance, ddim_step


@dataclass
class Counter:
    """UNet work actually done: calls, and batch items evaluated (forward only)."""

    unet_calls: int = 0
    unet_items: int = 0
    unet_backward_items: int = 0

    def to_json(self) -> dict:
        return dict(unet_calls=self.unet_calls, unet_items=self.unet_items, unet_backward_items=self.unet_backward_items)


def check_finite(backend, graph: str, outputs: dict, step: int | None = None) -> dict:
    """A NaN or Inf in any output is an error, never a black image."""
    xp = backend.xp
    for value in outputs.values():
        if value.shape and 0 in value.shape:
            continue
        if not bool(xp.all(xp.isfinite(value))):
            raise NonFiniteError(graph, step)
    return outputs


def run_graph(backend, graph: str, step: int | None = None, **inputs) -> dict:
    return check_finite(backend, graph, backend.run(graph, **inputs), step)


def encode_prompts(backend, tokenizer, prompts: list[str], allow_empty: bool = False):
    """Text embeddings [B,77,D]; ``allow_empty`` for the unconditional embedding of ""."""
    ids = tokenizer.encode_batch_padded(prompts, allow_empty=allow_empty)
    return run_graph(backend, "text_encoder", input_ids=backend.asarray(ids))["hidden"]


def encode_image(backend, pixels: np.ndarray):
    """pixels [3,S,S] in [-1,1] → the VAE posterior mean × scaling factor, [1,4,h,w]."""
    return run_graph(backend, "vae_encoder", pixels=backend.asarray(pixels[None].astype(np.float32)))["latent_mean"]


def decode_latents(backend, latents) -> np.ndarray:
    """[B,4,h,w] → host pixels [B,3,H,W] in [-1,1] (clipped)."""
    out = run_graph(backend, "vae_decoder", latents=latents)["pixels"]
    return np.clip(backend.to_numpy(out), -1.0, 1.0)


def _no_controls(backend, groups: int, tokens: int) -> dict:
    return dict(
        cross_alpha=backend.asarray(np.zeros((groups, 0, tokens), np.float32)),
        token_mapper=backend.asarray(np.zeros((groups, 0, tokens, tokens), np.float32)),
        refine_alpha=backend.asarray(np.zeros((groups, 0, tokens), np.float32)),
        equalizer=backend.asarray(np.zeros((groups, 0, tokens), np.float32)),
        self_replace=backend.asarray(np.zeros((groups, 0), np.float32)),
    )


def unet_noise(backend, counter: Counter, latents, t: int, text, controls: dict, step: int | None = None):
    out = run_graph(backend, "unet", step=step, latents=latents, timestep=backend.asarray(np.array([t], np.float32)),
                    text=text, **controls)
    counter.unet_calls += 1
    counter.unet_items += int(latents.shape[0])
    return out["noise"], out["blend_maps"]


def noise_difference_maps(backend, schedule: DDIMSchedule, z0, source_embedding, null_embedding, target_embeddings,
                          guidance: float, counter: Counter, *, samples: int = 10, strength: float = 0.5,
                          max_batch: int = 63, seed: int = 0):
    """The noise-prediction difference of each target, relative to its image mean, [K,1,h,w].

    ``z_t = √ᾱ_t z0 + √(1−ᾱ_t) n`` at ``t = strength · T`` for ``samples`` draws of ``n`` (numpy,
    seeded: every backend sees the same draws); for each draw the guided noise
    ``ε_u + w (ε_c − ε_u)`` under the source caption and under each target caption;
    ``d_k = mean over draws and channels |ε_target_k − ε_source|``; returns ``d_k / mean(d_k)``
    (``d_k / mean > threshold`` is the DiffEdit mask; one set of UNet calls serves any number of
    thresholds: ``Engine._fixed_masks`` applies each item's).
    """
    xp = backend.xp
    targets = int(target_embeddings.shape[0])
    per_draw = 2 + targets  # uncond, source, targets
    if per_draw > max_batch:
        raise SettingsError(f"the noise blend needs {per_draw} UNet items per noise draw (2 + {targets} target captions) "
                            f"but --max-batch is {max_batch}; raise --max-batch to at least {per_draw} or edit fewer captions at once")
    t = min(int(round(strength * schedule.config.num_train_timesteps)), schedule.config.num_train_timesteps - 1)
    alpha = float(schedule.alphas_cumprod[t])
    rng = np.random.default_rng(seed)
    draws = rng.standard_normal((samples, *tuple(int(d) for d in z0.shape[1:]))).astype(np.float32)
    text_one = xp.concat([null_embedding, source_embedding, target_embeddings], axis=0)
    diff_sum = None
    per_call = max(1, max_batch // per_draw)
    for start in range(0, samples, per_call):
        count = min(per_call, samples - start)
        noised = alpha ** 0.5 * z0 + (1 - alpha) ** 0.5 * backend.asarray(draws[start:start + count])  # [c,4,h,w]
        latents = xp.concat([noised[j:j + 1] for j in range(count) for _ in range(per_draw)], axis=0)
        text = xp.concat([text_one] * count, axis=0)
        noise, _ = unet_noise(backend, counter, latents, t, text, _no_controls(backend, 1, int(text.shape[1])))  # K = 0: nothing is controlled
        for j in range(count):
            e = noise[j * per_draw:(j + 1) * per_draw]
            guided = classifier_free_guidance(e[:1], e[1:], guidance)  # [1+K,4,h,w]
            diff = xp.mean(xp.abs(guided[1:] - guided[:1]), axis=1, keepdims=True)  # [K,1,h,w]
            diff_sum = diff if diff_sum is None else diff_sum + diff
    mean = xp.mean(xp.reshape(diff_sum, (targets, -1)), axis=1)
    return diff_sum / xp.maximum(mean[:, None, None, None], xp.finfo(diff_sum.dtype).tiny)


def ddim_inversion(backend, schedule: DDIMSchedule, z0, source_embedding, counter: Counter,
                   progress: Callable[[], None] | None = None) -> list:
    """DDIM inversion with ``ε(z, t, c_src)`` (w = 1): the trajectory ``z*_0 … z*_T``."""
    tokens = int(source_embedding.shape[1])
    controls = _no_controls(backend, int(z0.shape[0]), tokens)
    trajectory = [z0]
    z = z0
    for i in range(len(schedule.timesteps)):
        t, alpha_t, alpha_next = schedule.inverse_alphas(i)
        noise, _ = unet_noise(backend, counter, z, t, source_embedding, controls, step=i)
        z = ddim_step(z, noise, alpha_t, alpha_next)
        trajectory.append(z)
        if progress:
            progress()
    return trajectory


@dataclass
class EditOutcome:
    latents: Any  # [1+K,4,h,w] final latents, source first
    masks: Any | None  # [1+K,1,h,w] last LocalBlend mask, or None


@dataclass
class EditInputs:
    """Everything the edit loop needs for one chunk (a source item + K edit items)."""

    method: InversionMethod
    latents_T: Any  # [1,4,h,w]
    source_embedding: Any  # [1,T,D]
    target_embeddings: Any  # [K,T,D], one per item
    null_embedding: Any  # [1,T,D]: the embedding of ""
    null_embeddings: Any | None = None  # [steps,1,T,D] null-text's per-step ∅_i
    trajectory: list | None = None  # z*_0 … z*_T (direct)
    guidance: float = 7.5
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    fixed_masks: Any | None = None  # [1+K,1,h,w] LocalBlend masks known before the loop (noise_blend)
    extras: dict = field(default_factory=dict)


def edit_loop(backend, schedule: DDIMSchedule, plan, inputs: EditInputs, counter: Counter,
              progress: Callable[[], None] | None = None) -> EditOutcome:
    """Prompt-to-prompt editing of one image: :func:`edit_loop_groups` with one group."""
    return edit_loop_groups(backend, schedule, [plan], [inputs], counter, progress)[0]


def edit_loop_groups(backend, schedule: DDIMSchedule, plans: Sequence, inputs: Sequence[EditInputs], counter: Counter,
                     progress: Callable[[], None] | None = None) -> list[EditOutcome]:
    """Prompt-to-prompt editing from ``z*_T`` of G images at once: group g is image g's source
    item and its K edit items (every group has the same K), all in one UNet batch
    ``N = U + G·(1+K)`` (the controlled UNet's layout: unconditional halves first, then the
    groups); each group's control tensors come from its own plan.

    Which items carry an unconditional CFG half depends on the inversion: all of them for ddim
    and null-text; the edits only for negative-prompt (the source's two halves are equal) and
    direct (the source's noise is never used: its latent is pinned to ``z*_{t_prev}``).
    """
    xp = backend.xp
    first = inputs[0]
    method = first.method
    groups = len(inputs)
    edits = len(plans[0].items)
    if any(len(p.items) != edits for p in plans) or any(i.method != method for i in inputs):
        raise ValueError("every group of one edit batch needs the same number of edit items and inversion method")
    items = 1 + edits
    steps = len(schedule.timesteps)
    source_uncond = method in (InversionMethod.DDIM, InversionMethod.NULL_TEXT)
    uncond_items = list(range(items)) if source_uncond else list(range(1, items))
    n_uncond = len(uncond_items)
    uncond_global = [g * items + j for g in range(groups) for j in uncond_items]

    latents = xp.concat([x.latents_T for x in inputs for _ in range(items)], axis=0)
    cond_text = xp.concat([t for x in inputs for t in (x.source_embedding, x.target_embeddings)], axis=0)
    static = dict(
        token_mapper=backend.asarray(np.stack([p.token_mapper for p in plans])),
        refine_alpha=backend.asarray(np.stack([p.refine_alpha for p in plans])),
        equalizer=backend.asarray(np.stack([p.equalizer for p in plans])),
    )
    fixed = first.fixed_masks is not None
    if fixed and any(x.fixed_masks is None for x in inputs):
        raise ValueError("either every group of one edit batch has a fixed blend mask or none has")
    blending = plans[0].blend_words is not None and not fixed
    blend_weights = [backend.asarray(p.blend_words) for p in plans] if blending else None
    blend_from = int(first.blend_start * steps)
    maps_sum: list = [None] * groups
    masks: list = [None] * groups
    latent_hw = (int(latents.shape[2]), int(latents.shape[3]))
    uncond_index = xp.asarray(np.array(uncond_global, np.int64))

    for i in range(steps):
        t, alpha_t, alpha_prev = schedule.forward_alphas(i)
        if method == InversionMethod.NULL_TEXT:
            uncond = [x.null_embeddings[i] for x in inputs]
        elif method == InversionMethod.NEGATIVE_PROMPT:
            uncond = [x.source_embedding for x in inputs]
        else:
            uncond = [x.null_embedding for x in inputs]
        batch_latents = xp.concat([xp.take(latents, uncond_index, axis=0), latents], axis=0) if n_uncond else latents
        text = (xp.concat([u for g in range(groups) for u in [uncond[g]] * n_uncond] + [cond_text], axis=0)
                if n_uncond else cond_text)
        controls = dict(static,
                        cross_alpha=backend.asarray(np.stack([p.cross_alpha[i] for p in plans])),
                        self_replace=backend.asarray(np.stack([p.self_replace[i] for p in plans])))
        noise, blend_maps = unet_noise(backend, counter, batch_latents, t, text, controls, step=i)
        n_uncond_all = n_uncond * groups
        guided_groups = []
        for g in range(groups):
            noise_u = noise[g * n_uncond: (g + 1) * n_uncond]
            noise_c = noise[n_uncond_all + g * items: n_uncond_all + (g + 1) * items]
            if n_uncond == items:
                guided_groups.append(classifier_free_guidance(noise_u, noise_c, first.guidance))
            else:  # the source has no unconditional half: its CFG is its conditional noise
                guided_groups.append(xp.concat([noise_c[:1], classifier_free_guidance(noise_u, noise_c[1:], first.guidance)],
                                               axis=0))
        guided = guided_groups[0] if groups == 1 else xp.concat(guided_groups, axis=0)
        latents = ddim_step(latents, guided, alpha_t, alpha_prev)
        if method == InversionMethod.DIRECT:
            # pin each source to its inversion path (set, not offset-add: immune to rounding)
            latents = xp.concat([part for g, x in enumerate(inputs)
                                 for part in (x.trajectory[steps - i - 1], latents[g * items + 1:(g + 1) * items])], axis=0)
        if fixed or (blending and blend_maps.shape[-1] > 0):
            blended = []
            for g in range(groups):
                if blending:
                    maps = blend_maps[g]
                    maps_sum[g] = maps if maps_sum[g] is None else maps_sum[g] + maps
                group_latents = latents[g * items:(g + 1) * items]
                if i >= blend_from:
                    masks[g] = (inputs[g].fixed_masks if fixed else
                                blend_mask(xp, maps_sum[g], blend_weights[g], latent_hw, first.blend_threshold))
                    group_latents = apply_blend(group_latents, masks[g])
                blended.append(group_latents)
            latents = blended[0] if groups == 1 else xp.concat(blended, axis=0)
        if progress:
            progress()
    return [EditOutcome(latents=latents[g * items:(g + 1) * items], masks=masks[g]) for g in range(groups)]
