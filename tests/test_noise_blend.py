"""LocalBlend with a mask from the noise predictions (DiffEdit): the mask against its definition
computed with the stock diffusers UNet, and what an empty / a full mask must do to an edit."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from prism_rt.config import ControlConfig, RunLimits
from prism_rt.engine import Engine
from prism_rt.loop import Counter, encode_prompts, noise_difference_maps
from prism_rt.schedule import DDIMSchedule

SOURCE = "Chest X-ray showing Support Devices"
TARGETS = ["Chest X-ray showing No Finding", "Chest X-ray showing Pleural Effusion, Support Devices"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, backend="torch")


@pytest.fixture(scope="module")
def inversion(engine, dicom_path):
    from prism_rt.imageio import load_image

    return engine.invert(load_image(dicom_path), SOURCE, method="direct", sampler=engine.sampler(steps=4))


def _reference_masks(tiny_model_dir, z0, embeddings, guidance, samples, strength, threshold):
    """The definition, written out with diffusers' own UNet and scheduler tables."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    t = int(round(strength * scheduler.config.num_train_timesteps))
    alpha = scheduler.alphas_cumprod[t].item()
    draws = np.random.default_rng(0).standard_normal((samples, *z0.shape[1:])).astype(np.float32)
    null, source, targets = embeddings[1:2], embeddings[0:1], embeddings[2:]
    total = torch.zeros(targets.shape[0], 1, *z0.shape[2:])
    with torch.no_grad():
        for n in draws:
            zt = alpha ** 0.5 * z0 + (1 - alpha) ** 0.5 * torch.from_numpy(n)[None]

            def guided(c):
                u = unet(zt, torch.tensor(t), encoder_hidden_states=null).sample
                return u + guidance * (unet(zt, torch.tensor(t), encoder_hidden_states=c).sample - u)

            e_source = guided(source)
            for k in range(targets.shape[0]):
                total[k] += (guided(targets[k:k + 1]) - e_source).abs().mean(1)
    mean = total.reshape(targets.shape[0], -1).mean(1)
    return total, (total > threshold * mean[:, None, None, None]).float()


@pytest.mark.slow
def test_noise_masks_follow_their_definition(engine, inversion, tiny_model_dir):
    backend = engine.backend
    embeddings = encode_prompts(backend, engine.tokenizer, [SOURCE, "", *TARGETS], allow_empty=True)
    z0 = torch.from_numpy(inversion.trajectory[0])
    schedule = DDIMSchedule.from_config(inversion.sampler)
    counter = Counter()
    # max_batch 9: two draws of 4 items per UNet call, so the draws are chunked (3 calls for 5)
    maps = noise_difference_maps(backend, schedule, z0, embeddings[0:1], embeddings[1:2], embeddings[2:], 7.5,
                                 counter, samples=5, strength=0.5, max_batch=9)
    masks = (maps > 1.0).float()  # threshold 1.0, as Engine._fixed_masks applies it
    diff, expected = _reference_masks(tiny_model_dir, z0, embeddings, 7.5, 5, 0.5, 1.0)
    assert counter.unet_calls == 3 and counter.unet_items == 5 * 4
    assert masks.shape == (2, 1, *z0.shape[2:])
    # the map itself is the definition's difference over its image mean
    torch.testing.assert_close(maps, diff / diff.reshape(2, -1).mean(1)[:, None, None, None], rtol=1e-3, atol=1e-4)
    # equal except where the difference sits within float rounding of the threshold
    near = (diff / (diff.reshape(2, -1).mean(1)[:, None, None, None]) - 1.0).abs() < 1e-4
    assert torch.equal(masks.bool() | near, expected.bool() | near)
    assert 0.05 < expected.mean() < 0.95  # a real partition, not an empty or a full mask


@pytest.mark.slow
def test_an_empty_mask_keeps_the_reconstruction_and_a_full_one_changes_nothing(engine, inversion):
    plain = engine.edit(inversion, TARGETS[:1], ControlConfig(self_replace=(0.5,)))
    full = engine.edit(inversion, TARGETS[:1], ControlConfig(self_replace=(0.5,), noise_blend=True, noise_blend_threshold=0.0))
    empty = engine.edit(inversion, TARGETS[:1], ControlConfig(self_replace=(0.5,), noise_blend=True, noise_blend_threshold=1e9))
    assert full.masks[0].mean() == 1.0 and empty.masks[0].mean() == 0.0
    np.testing.assert_allclose(full.edits[0], plain.edits[0], atol=1e-4)  # z0 + 1·(z − z0) rounds
    # from the blend's start on the edit is pinned to the source everywhere: it decodes to the reconstruction
    np.testing.assert_allclose(empty.edits[0], empty.reconstruction, atol=1e-5)
    assert np.abs(plain.edits[0] - plain.reconstruction).max() > 0.05  # the edit itself does change the image


@pytest.mark.slow
def test_noise_blend_confines_the_change_to_its_mask(engine, inversion):
    result = engine.edit(inversion, TARGETS, ControlConfig(self_replace=(0.5,), noise_blend=True, noise_blend_threshold=1.0),
                         RunLimits(max_batch=63))
    for stats, mask in zip(result.item_stats(), result.masks):
        assert 0 < mask.mean() < 1
        assert stats["mean_abs_diff_outside_mask"] < stats["mean_abs_diff_inside_mask"]
    assert result.counts["unet_items"] > 0 and "noise_blend_s" in result.timings
    # each target has its own mask
    assert np.mean(result.masks[0] != result.masks[1]) > 0.01


@pytest.mark.slow
def test_grouped_noise_blend_equals_one_image_at_a_time(engine, inversion):
    flipped = (np.ascontiguousarray(inversion.fitted_pixels[0, :, ::-1]) + 1) / 2  # [-1, 1] → gray [0, 1]
    other = engine.invert(flipped, SOURCE, method="direct", sampler=inversion.sampler)
    control = ControlConfig(self_replace=(0.4, 0.8), noise_blend=True)
    grouped = engine.edit_many([inversion, other], TARGETS[:1], control, RunLimits(max_batch=63))
    alone = [engine.edit(inv, TARGETS[:1], control) for inv in (inversion, other)]
    assert [r.settings["images_in_batch"] for r in grouped] == [2, 2]
    for g, a in zip(grouped, alone):
        for x, y in zip(g.edits, a.edits):
            np.testing.assert_allclose(x, y, atol=1e-3)
        for x, y in zip(g.masks, a.masks):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_several_thresholds_are_items_of_one_batch(engine, inversion):
    """Thresholds are a sweep like the self window: one edit call, one set of noise draws, each item
    thresholding the same map; equal to running each threshold alone."""
    control = ControlConfig(self_replace=(0.4, 0.8), noise_blend=True, noise_blend_threshold=(0.8, 1.5))
    both = engine.edit(inversion, TARGETS[:1], control, RunLimits(max_batch=63))
    assert [i.name for i in both.items] == ["edit-1-s0.40-m0.80", "edit-1-s0.80-m0.80",
                                            "edit-1-s0.40-m1.50", "edit-1-s0.80-m1.50"]
    assert [i.blend_threshold for i in both.items] == [0.8, 0.8, 1.5, 1.5]
    for offset, threshold in ((0, 0.8), (2, 1.5)):
        alone = engine.edit(inversion, TARGETS[:1], replace(control, noise_blend_threshold=threshold),
                            RunLimits(max_batch=63))
        assert [i.name for i in alone.items] == ["edit-1-s0.40", "edit-1-s0.80"]  # one threshold: names as before
        for k in range(2):
            np.testing.assert_array_equal(both.masks[offset + k], alone.masks[k])
            np.testing.assert_allclose(both.edits[offset + k], alone.edits[k], atol=1e-3)
    low, high = both.masks[0] > 0.5, both.masks[2] > 0.5
    assert high.sum() < low.sum() and not (high & ~low).any()  # a higher threshold: a strict subset
    assert np.abs(both.edits[0] - both.edits[2]).max() > 0.01  # and a different counterfactual


def test_noise_blend_thresholds_are_checked():
    assert ControlConfig(noise_blend=True, noise_blend_threshold=1.2).noise_blend_threshold == (1.2,)
    for bad in ((), (1.0, -0.5)):
        with pytest.raises(ValueError, match="noise_blend_threshold"):
            ControlConfig(noise_blend=True, noise_blend_threshold=bad)


def test_a_batch_too_small_for_one_noise_draw_is_a_settings_error(engine, inversion):
    from prism_rt.errors import SettingsError

    embeddings = encode_prompts(engine.backend, engine.tokenizer, [SOURCE, "", *TARGETS], allow_empty=True)
    counter = Counter()
    with pytest.raises(SettingsError, match="at least 4"):  # uncond + source + 2 targets
        noise_difference_maps(engine.backend, DDIMSchedule.from_config(inversion.sampler),
                              torch.from_numpy(inversion.trajectory[0]), embeddings[0:1], embeddings[1:2],
                              embeddings[2:], 7.5, counter, max_batch=3)
    assert counter.unet_calls == 0


def test_noise_blend_and_blend_words_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        ControlConfig(noise_blend=True, blend_words=("Devices", "Finding"))
