"""DDIM step math against diffusers' DDIMScheduler and the closed form of PRISM_METHOD §2."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from prism_rt.config import SamplerConfig
from prism_rt.schedule import DDIMSchedule, classifier_free_guidance, ddim_step


def diffusers_ddim(steps):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("steps", [50, 20, 7])
def test_timesteps_and_alphas_match_diffusers(steps):
    ours = DDIMSchedule.from_config(SamplerConfig(steps=steps))
    ref = diffusers_ddim(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-6)
    if steps == 50:
        assert list(ours.timesteps[:3]) == [981, 961, 941] and ours.timesteps[-1] == 1


def test_forward_step_matches_diffusers_step():
    ours = DDIMSchedule.from_config(SamplerConfig(steps=50))
    ref = diffusers_ddim(50)
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 25, 49):  # 49: the last step goes to ᾱ_0 (set_alpha_to_one=False)
        t, a_t, a_prev = ours.forward_alphas(i)
        expected = ref.step(eps, int(ref.timesteps[i]), z).prev_sample
        torch.testing.assert_close(ddim_step(z, eps, a_t, a_prev), expected, rtol=1e-5, atol=1e-5)


def test_inverse_step_closed_form():
    """Inversion step i: ε at the target t; from the level of t−20 (ᾱ_0 when below 0) to t."""
    s = DDIMSchedule.from_config(SamplerConfig(steps=50))
    t, a_from, a_to = s.inverse_alphas(0)
    assert t == 1 and a_from == s.alphas_cumprod[0] and a_to == s.alphas_cumprod[1]
    t, a_from, a_to = s.inverse_alphas(49)
    assert t == 981 and a_from == s.alphas_cumprod[961] and a_to == s.alphas_cumprod[981]
    z, eps = np.float64(0.3), np.float64(-1.2)
    x0 = (z - np.sqrt(1 - a_from) * eps) / np.sqrt(a_from)
    assert ddim_step(z, eps, a_from, a_to) == pytest.approx(np.sqrt(a_to) * x0 + np.sqrt(1 - a_to) * eps, rel=1e-12)


def test_inverse_then_forward_with_the_same_noise_is_identity():
    s = DDIMSchedule.from_config(SamplerConfig(steps=50))
    rng = np.random.default_rng(0)
    z, eps = rng.standard_normal((4, 8, 8)), rng.standard_normal((4, 8, 8))
    _, a_from, a_to = s.inverse_alphas(10)
    np.testing.assert_allclose(ddim_step(ddim_step(z, eps, a_from, a_to), eps, a_to, a_from), z, atol=1e-10)


def test_classifier_free_guidance():
    u, c = np.array([1.0, 2.0]), np.array([3.0, 2.5])
    np.testing.assert_allclose(classifier_free_guidance(u, c, 7.5), [1 + 7.5 * 2, 2 + 7.5 * 0.5])
