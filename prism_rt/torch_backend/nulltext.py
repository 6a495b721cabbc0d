"""Null-text inversion (Mokady et al. 2023, "Null-text Inversion for Editing Real Images using
Guided Diffusion Models"), PRISM's schedule (PRISM_METHOD §4): needs autograd, so torch only."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import InversionConfig
from ..errors import NonFiniteError
from ..schedule import DDIMSchedule, classifier_free_guidance, ddim_step


def null_text_inversion(backend, schedule: DDIMSchedule, trajectory: list, source_embedding: torch.Tensor,
                        null_embedding: torch.Tensor, guidance: float, config: InversionConfig, counter,
                        progress: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Optimise one null embedding ∅_i per step so that the guided forward step from ``z̄`` lands
    on ``z*_{t_prev}``; returns ``[∅_0 … ∅_{T−1}]``, each [1,T,D].

    Per step i: a fresh Adam (lr ``1e-2·(1 − i/100)``) over a copy of the previous ∅; ``ε_c``
    once without grad; up to ``null_inner_steps`` iterations, stopping when the loss measured
    before that iteration's Adam step is below ``ε + i·2e-5`` (an absolute MSE on latents).
    """
    steps = len(schedule.timesteps)
    z = trajectory[-1]
    null = null_embedding.detach()
    result = []
    for i in range(steps):
        t, alpha_t, alpha_prev = schedule.forward_alphas(i)
        timestep = torch.tensor([float(t)], device=z.device, dtype=z.dtype)
        target = trajectory[steps - i - 1]
        null = null.clone().detach().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=config.null_lr * (1.0 - i / 100.0))
        with torch.no_grad():
            noise_cond = backend.unet_plain(z, timestep, source_embedding)
        counter.unet_calls += 1
        counter.unet_items += 1
        for _ in range(config.null_inner_steps):
            noise_uncond = backend.unet_plain(z, timestep, null)
            counter.unet_calls += 1
            counter.unet_items += 1
            counter.unet_backward_items += 1
            rebuilt = ddim_step(z, classifier_free_guidance(noise_uncond, noise_cond, guidance), alpha_t, alpha_prev)
            loss = F.mse_loss(rebuilt, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            if not torch.isfinite(loss):
                raise NonFiniteError("unet (null-text optimisation)", i)
            if loss_value < config.null_epsilon + i * 2e-5:
                break
        null = null.detach()
        result.append(null)
        with torch.no_grad():
            noise_uncond = backend.unet_plain(z, timestep, null)
            counter.unet_calls += 1
            counter.unet_items += 1
            z = ddim_step(z, classifier_free_guidance(noise_uncond, noise_cond, guidance), alpha_t, alpha_prev)
        if progress:
            progress()
    return result
