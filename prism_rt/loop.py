"""The inversion and editing loops of PRISM (PRISM_METHOD §4–5), written once against the backend
interface and the array API: they never know which backend runs the graphs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Any, Callable

import numpy as np

from .blend import apply_blend, blend_mask
from .config import InversionMethod
from .errors import NonFiniteError, SettingsError
from .finite_guard import FiniteGuard
from .schedule import DDIMSchedule, classifier_free_guidance, ddim_step
from .unet_batch import StepControls, UNetBatch, empty_controls


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


def unet_noise(backend, counter: Counter, latents, t, text, controls: dict, step: int | None = None,
               guard: FiniteGuard | None = None):
    """One UNet call laid out as ``prism_rt.unet_batch`` describes: the noise prediction of every
    item and the conditional items' LocalBlend maps. ``t``: an int, or the timestep already on
    the backend ([1] float32, :func:`timesteps_on_backend`); ``guard``: check finiteness there
    (read once per loop) instead of now."""
    timestep = backend.asarray(np.array([t], np.float32)) if isinstance(t, (int, np.integer)) else t
    out = backend.run("unet", latents=latents, timestep=timestep, text=text, **controls)
    if guard is None:
        check_finite(backend, "unet", out, step)
    else:
        guard.add(out, step)
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
                            f"but a UNet call takes at most {max_batch} (--max-batch, and on TensorRT the profile's batch); raise it to "
                            f"at least {per_draw} (--max-batch, --trt-max-edits) or edit fewer captions at once")
    t = min(int(round(strength * schedule.config.num_train_timesteps)), schedule.config.num_train_timesteps - 1)
    alpha = float(schedule.alphas_cumprod[t])
    rng = np.random.default_rng(seed)
    draws = rng.standard_normal((samples, *tuple(int(d) for d in z0.shape[1:]))).astype(np.float32)
    text_one = xp.concat([null_embedding, source_embedding, target_embeddings], axis=0)
    diff_sum = None
    per_call = max(1, max_batch // per_draw)
    plain = _on_backend(backend, empty_controls(1, int(text_one.shape[1])))
    for start in range(0, samples, per_call):
        count = min(per_call, samples - start)
        noised = alpha ** 0.5 * z0 + (1 - alpha) ** 0.5 * backend.asarray(draws[start:start + count])  # [c,4,h,w]
        latents = xp.concat([noised[j:j + 1] for j in range(count) for _ in range(per_draw)], axis=0)
        text = xp.concat([text_one] * count, axis=0)
        noise, _ = unet_noise(backend, counter, latents, t, text, plain)
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
    controls = _on_backend(backend, empty_controls(int(z0.shape[0]), int(source_embedding.shape[1])))
    timesteps, guard = timesteps_on_backend(backend, schedule), FiniteGuard(backend, "unet")
    trajectory = [z0]
    z = z0
    steps = len(schedule.timesteps)
    for i in range(steps):
        _, alpha_t, alpha_next = schedule.inverse_alphas(i)
        noise, _ = unet_noise(backend, counter, z, timesteps[steps - 1 - i], source_embedding, controls, step=i, guard=guard)
        z = ddim_step(z, noise, alpha_t, alpha_next)
        trajectory.append(z)
        if progress:
            progress()
    guard.check()
    return trajectory


def timesteps_on_backend(backend, schedule: DDIMSchedule):
    """The schedule's timesteps as the UNet's ``timestep`` input, [steps,1] float32 on the backend,
    copied once per loop: ``[i]`` is denoising step i's (inversion step i uses ``[steps−1−i]``)."""
    return backend.asarray(np.asarray(schedule.timesteps, np.float32)[:, None])


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
    blend_dilation: int = 1
    fixed_masks: Any | None = None  # [1+K,1,h,w] LocalBlend masks known before the loop (noise_blend)
    region: Any | None = None  # [1,1,h,w] user masks (prism_rt.user_masks): 1 where the edit may change, every step
    edit_negative: str = "empty"  # ControlConfig.edit_negative: "source" guides the edit items away from the source caption


def edit_loop(backend, schedule: DDIMSchedule, plan, inputs: EditInputs, counter: Counter,
              progress: Callable[[], None] | None = None) -> EditOutcome:
    """Prompt-to-prompt editing of one image: :func:`edit_loop_groups` with one group."""
    return edit_loop_groups(backend, schedule, [plan], [inputs], counter, progress)[0]


def edit_loop_groups(backend, schedule: DDIMSchedule, plans: Sequence, inputs: Sequence[EditInputs], counter: Counter,
                     progress: Callable[[], None] | None = None) -> list[EditOutcome]:
    """Prompt-to-prompt editing (Hertz et al. 2022) from ``z*_T`` of G images at once: group g is
    image g's source item and its K edit items (every group has the same K), all in one UNet call
    per step (``prism_rt.unet_batch.UNetBatch``); each group's control tensors come from its own
    plan. Per step i: ``ε = CFG(UNet(z_t, t, c, controls_i))``, ``z_{t_prev} = DDIM(z_t, ε)``;
    direct inversion pins each source to ``z*_{t_prev}`` (set, not offset-added: immune to
    rounding); LocalBlend keeps everything outside each item's mask on the source, and so does
    each image's user-mask region (keep / edit masks) at every step.
    """
    xp = backend.xp
    first = inputs[0]
    if any(len(p.items) != len(plans[0].items) for p in plans) or any(x.method != first.method for x in inputs):
        raise ValueError("every group of one edit batch needs the same number of edit items and inversion method")
    if len({x.fixed_masks is None for x in inputs}) != 1:
        raise ValueError("either every group of one edit batch has a fixed blend mask or none has")
    batch = UNetBatch.for_method(first.method, len(inputs), len(plans[0].items))
    steps = len(schedule.timesteps)
    controls = StepControls(backend, plans)
    blend = _LocalBlend(backend, batch, plans, inputs, steps)
    latents = xp.concat([x.latents_T for x in inputs for _ in range(batch.items)], axis=0)
    cond_text = xp.concat([t for x in inputs for t in (x.source_embedding, x.target_embeddings)], axis=0)

    timesteps, guard = timesteps_on_backend(backend, schedule), FiniteGuard(backend, "unet")
    for i in range(steps):
        _, alpha_t, alpha_prev = schedule.forward_alphas(i)
        call_latents, call_text = batch.assemble(xp, latents, [_uncond_embedding(x, i) for x in inputs], cond_text)
        noise, blend_maps = unet_noise(backend, counter, call_latents, timesteps[i], call_text, controls.at(i), step=i,
                                       guard=guard)
        latents = ddim_step(latents, batch.guide(xp, noise, first.guidance), alpha_t, alpha_prev)
        if first.method == InversionMethod.DIRECT:
            latents = batch.set_sources(xp, latents, [x.trajectory[steps - i - 1] for x in inputs])
        latents = blend.step(i, latents, blend_maps)
        if progress:
            progress()
    guard.check()
    return [EditOutcome(latents=batch.group(latents, g), masks=blend.masks[g]) for g in range(batch.groups)]


def _uncond_embedding(inputs: EditInputs, step: int):
    """The unconditional half's text at a step: null-text's ∅_i, the source caption for
    negative-prompt (and for direct with ``edit_negative`` "source": direct's source item has no
    unconditional half, so only the edit items are guided from it), else the embedding of ""."""
    if inputs.method == InversionMethod.NULL_TEXT:
        return inputs.null_embeddings[step]
    if inputs.method == InversionMethod.NEGATIVE_PROMPT or (
            inputs.method == InversionMethod.DIRECT and inputs.edit_negative == "source"):
        return inputs.source_embedding
    return inputs.null_embedding


def _on_backend(backend, controls: dict) -> dict:
    return {name: backend.asarray(value) for name, value in controls.items()}


class _LocalBlend:
    """LocalBlend over the steps of one edit run: each group's mask from its accumulated
    cross-attention maps (or its fixed noise-blend mask), applied from ``blend_start`` on, times
    the group's user-mask region (if any), which applies from the first step."""

    def __init__(self, backend, batch: UNetBatch, plans: Sequence, inputs: Sequence[EditInputs], steps: int):
        first = inputs[0]
        self.xp, self.batch, self.inputs = backend.xp, batch, inputs
        self.fixed = first.fixed_masks is not None
        self.from_attention = plans[0].blend_words is not None and not self.fixed
        self.weights = [backend.asarray(p.blend_words) for p in plans] if self.from_attention else None
        self.start = int(first.blend_start * steps)
        self.threshold, self.dilation = first.blend_threshold, first.blend_dilation
        self.latent_hw = tuple(int(d) for d in first.latents_T.shape[2:])
        self.maps_sum: list = [None] * batch.groups
        self.masks: list = [None] * batch.groups
        self.regions = [x.region for x in inputs]
        if len({r is None for r in self.regions}) != 1:
            raise ValueError("either every group of one edit batch has user masks or none has")

    def step(self, i: int, latents, blend_maps):
        local = self.fixed or (self.from_attention and blend_maps.shape[-1] > 0)
        if not local and self.regions[0] is None:
            return latents
        xp, blended = self.xp, []
        for g in range(self.batch.groups):
            if local and self.from_attention:
                self.maps_sum[g] = blend_maps[g] if self.maps_sum[g] is None else self.maps_sum[g] + blend_maps[g]
            group_latents = self.batch.group(latents, g)
            mask = None
            if local and i >= self.start:
                mask = (self.inputs[g].fixed_masks if self.fixed else
                        blend_mask(xp, self.maps_sum[g], self.weights[g], self.latent_hw, self.threshold,
                                   self.dilation))
            if self.regions[g] is not None:
                mask = self.regions[g] if mask is None else mask * self.regions[g]
            if mask is not None:
                self.masks[g] = xp.broadcast_to(mask, (int(group_latents.shape[0]), *mask.shape[1:]))
                group_latents = apply_blend(group_latents, self.masks[g])
            blended.append(group_latents)
        return blended[0] if self.batch.groups == 1 else xp.concat(blended, axis=0)
