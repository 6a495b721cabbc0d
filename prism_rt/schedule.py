"""DDIM schedule and step math (Song et al. 2021, "Denoising Diffusion Implicit Models"), η = 0.

The functions take arrays of any array-API namespace (numpy, torch), so the same code runs on
the host and on a device without copies. Notation of PRISM_METHOD §2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import SamplerConfig


def ddim_step(latents, noise, alpha_t, alpha_next):
    """One deterministic DDIM step from the level of ``alpha_t`` to that of ``alpha_next``.

    ``x̂0 = (z − √(1−ᾱ_t)·ε)/√ᾱ_t``; ``z' = √ᾱ_next·x̂0 + √(1−ᾱ_next)·ε``. With ᾱ_next > ᾱ_t this
    is the forward (denoising) step, with ᾱ_next < ᾱ_t the inverse step of DDIM inversion.
    ``alpha_*`` are Python floats (cumulative alphas).
    """
    sqrt_a_t, sqrt_1m_a_t = float(alpha_t) ** 0.5, (1.0 - float(alpha_t)) ** 0.5
    pred_x0 = (latents - sqrt_1m_a_t * noise) / sqrt_a_t
    return float(alpha_next) ** 0.5 * pred_x0 + (1.0 - float(alpha_next)) ** 0.5 * noise


def classifier_free_guidance(noise_uncond, noise_cond, guidance: float):
    """``ε = ε(∅) + w·(ε(c) − ε(∅))`` (Ho & Salimans 2022)."""
    return noise_uncond + guidance * (noise_cond - noise_uncond)


@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps and cumulative alphas of a DDIM sampler as diffusers' DDIMScheduler makes
    them ("leading" spacing, ``steps_offset``), computed in float64 on the host."""

    config: SamplerConfig
    alphas_cumprod: np.ndarray
    timesteps: np.ndarray

    @classmethod
    def from_config(cls, config: SamplerConfig) -> "DDIMSchedule":
        n = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
        elif config.beta_schedule == "linear":
            betas = np.linspace(config.beta_start, config.beta_end, n)
        else:
            raise ValueError(f"unsupported beta_schedule {config.beta_schedule!r} (scaled_linear, linear)")
        # float64 throughout; diffusers' float32 cumprod differs by < 3e-7
        alphas_cumprod = np.cumprod(1.0 - betas)
        ratio = n // config.steps
        timesteps = (np.arange(config.steps) * ratio)[::-1].astype(np.int64) + config.steps_offset
        return cls(config, alphas_cumprod, timesteps)

    @property
    def step_ratio(self) -> int:
        return self.config.num_train_timesteps // self.config.steps

    @property
    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def alpha(self, t: int) -> float:
        """ᾱ_t, with the final alpha for t < 0."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def forward_alphas(self, i: int) -> tuple[int, float, float]:
        """Denoising step i (0 = noisiest): (t, ᾱ_t, ᾱ_prev)."""
        t = int(self.timesteps[i])
        return t, self.alpha(t), self.alpha(t - self.step_ratio)

    def inverse_alphas(self, i: int) -> tuple[int, float, float]:
        """Inversion step i (0 = cleanest): t = timesteps[N−1−i], the noise is evaluated at the
        target t on the current latent; returns (t, ᾱ_{t−ratio}, ᾱ_t)."""
        t = int(self.timesteps[len(self.timesteps) - 1 - i])
        return t, self.alpha(t - self.step_ratio), self.alpha(t)
