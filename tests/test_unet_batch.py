"""The UNet call's layout (prism_rt.unet_batch) against hand-worked examples."""
from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from prism_rt.config import InversionMethod
from prism_rt.errors import SettingsError
from prism_rt.unet_batch import (CONTROL_INPUTS, UNetBatch, edits_per_chunk, neutral_controls, pad_empty_edits,
                                 plan_chunks, unpad_outputs)


@pytest.mark.parametrize("method, groups, edits, uncond, size", [
    ("ddim", 1, 0, 1, 2),              # a guided step of one image
    ("null-text", 1, 5, 6, 12),        # PRISM's five self values: 2·(1+5)
    ("direct", 1, 5, 5, 11),           # the source has no unconditional half
    ("negative-prompt", 3, 2, 6, 15),  # 3 images: U = 3·2, N = 6 + 3·3
    ("ddim", 2, 3, 8, 16),
])
def test_sizes_by_hand(method, groups, edits, uncond, size):
    batch = UNetBatch.for_method(method, groups, edits)
    assert (batch.uncond, batch.size) == (uncond, size)
    assert batch.dims == {"batch": size, "groups": groups, "edits": edits}


def test_assemble_and_guide_a_hand_worked_batch():
    # direct, G = 2, K = 1: conditional rows [s0, e0, s1, e1], unconditional halves of e0 and e1 only
    batch = UNetBatch.for_method("direct", 2, 1)
    latents = np.arange(4, dtype=np.float32).reshape(4, 1)          # s0=0, e0=1, s1=2, e1=3
    cond_text = 10 + np.arange(4, dtype=np.float32).reshape(4, 1, 1)
    uncond_text = [np.full((1, 1, 1), -1.0, np.float32), np.full((1, 1, 1), -2.0, np.float32)]
    call_latents, call_text = batch.assemble(xp, latents, uncond_text, cond_text)
    assert call_latents[:, 0].tolist() == [1, 3, 0, 1, 2, 3]
    assert call_text[:, 0, 0].tolist() == [-1, -2, 10, 11, 12, 13]
    # noise = [u(e0), u(e1), c(s0), c(e0), c(s1), c(e1)]; w = 3: ε = u + 3(c − u); sources keep c
    noise = np.array([1, 2, 10, 20, 30, 40], np.float32).reshape(6, 1)
    guided = batch.guide(xp, noise, 3.0)
    assert guided[:, 0].tolist() == [10, 1 + 3 * (20 - 1), 30, 2 + 3 * (40 - 2)]
    pinned = batch.set_sources(xp, latents, [np.full((1, 1), 7.0), np.full((1, 1), 8.0)])
    assert pinned[:, 0].tolist() == [7, 1, 8, 3]
    assert batch.group(latents, 1)[:, 0].tolist() == [2, 3]


def test_guide_with_every_item_conditioned():
    batch = UNetBatch.for_method("ddim", 1, 1)
    noise = np.array([1, 2, 5, 6], np.float32).reshape(4, 1)  # u(s), u(e), c(s), c(e)
    assert batch.guide(xp, noise, 2.0)[:, 0].tolist() == [1 + 2 * 4, 2 + 2 * 4]


@pytest.mark.parametrize("method, max_batch, per", [("ddim", 32, 15), ("null-text", 4, 1), ("direct", 32, 15),
                                                     ("direct", 5, 2), ("negative-prompt", 3, 1)])
def test_edits_per_chunk_fill_but_never_exceed_the_batch(method, max_batch, per):
    assert edits_per_chunk(method, max_batch) == per
    assert UNetBatch.for_method(method, 1, per).size <= max_batch < UNetBatch.for_method(method, 1, per + 1).size


def test_too_small_a_batch_is_a_settings_error():
    with pytest.raises(SettingsError, match="too small"):
        edits_per_chunk("ddim", 3)


def test_plan_chunks_groups_whole_images_else_splits_items():
    # direct, K = 5: one image is 11 items; 32 fits two images per call
    assert plan_chunks("direct", 5, 5, 32) == [([0, 1], list(range(5))), ([2, 3], list(range(5))), ([4], list(range(5)))]
    # max_batch 5 fits 2 items of one image per call: each image alone, its items in 3 chunks
    assert plan_chunks(InversionMethod.DIRECT, 2, 5, 5) == [([0], [0, 1]), ([0], [2, 3]), ([0], [4]),
                                                            ([1], [0, 1]), ([1], [2, 3]), ([1], [4])]
    for images, items in plan_chunks("ddim", 7, 4, 23):
        assert UNetBatch.for_method("ddim", len(images), len(items)).size <= 23


def test_neutral_controls_are_the_identity():
    controls = neutral_controls(2, 3, tokens=5)
    assert tuple(controls) == CONTROL_INPUTS
    assert controls["token_mapper"].shape == (2, 3, 5, 5)
    np.testing.assert_array_equal(controls["token_mapper"][1, 2], np.eye(5))
    assert controls["cross_alpha"].sum() == 0 and controls["self_replace"].sum() == 0
    assert controls["refine_alpha"].min() == 1 and controls["equalizer"].min() == 1


def test_padding_an_empty_edit_call_round_trips():
    # U = 3 unconditional rows, G = 2 groups, K = 0: the padded call has one neutral copy per group
    rng = np.random.default_rng(0)
    feeds = {"latents": rng.standard_normal((5, 2)).astype(np.float32),
             "text": rng.standard_normal((5, 4, 3)).astype(np.float32),
             **neutral_controls(2, 0, tokens=4)}
    padded = pad_empty_edits(feeds)
    assert padded["latents"].shape == (7, 2) and padded["cross_alpha"].shape == (2, 1, 4)
    np.testing.assert_array_equal(padded["latents"][[3, 4, 5, 6]], feeds["latents"][[3, 3, 4, 4]])
    # a graph that returns its latents as noise: unpadding gives back exactly the unpadded call's rows
    maps = np.zeros((2, 2, 4, 1, 1), np.float32)
    out = unpad_outputs(feeds, padded["latents"], maps)
    np.testing.assert_array_equal(out["noise"], feeds["latents"])
    assert out["blend_maps"].shape == (2, 1, 4, 1, 1)


def test_plan_chunks_respect_the_backends_group_and_edit_limits():
    """TensorRT's profiles bound the images (G) and edit items (K) of a call, not only N."""
    assert plan_chunks("direct", 5, 5, 32, max_groups=1) == [([i], list(range(5))) for i in range(5)]
    assert plan_chunks("direct", 2, 10, 63, max_groups=1, max_edits=5) == [
        ([0], list(range(5))), ([0], list(range(5, 10))), ([1], list(range(5))), ([1], list(range(5, 10)))]
    assert plan_chunks("direct", 3, 5, 63, max_groups=2, max_edits=5) == [([0, 1], list(range(5))), ([2], list(range(5)))]


def test_engine_splits_its_calls_to_fit_the_backends_profile(monkeypatch):
    """An engine whose backend takes at most G = 1, K = 5, N = 12 (the default TensorRT
    deployment) runs two images × two targets × five values in calls that fit, with the results
    of one unbounded batch."""
    from pathlib import Path

    from prism_rt.config import ControlConfig, OrtOptions, RunLimits
    from prism_rt.engine import Engine

    engine_dir = Path(__file__).resolve().parents[1] / "engines" / "phantom-demo"
    engine = Engine.load(engine_dir, options=OrtOptions(threads=1))
    source = "Chest X-ray showing No Finding, Support Devices"
    targets = ["Chest X-ray showing No Finding", "Chest X-ray showing Pleural Effusion, Support Devices"]
    inversions = [engine.invert(engine_dir / "images" / name, source, method="direct", sampler=engine.sampler(steps=3))
                  for name in ("phantom-1000003.png", "phantom-1000005.png")]
    control = ControlConfig(noise_blend=True)
    free = engine.edit_many(inversions, [targets] * 2, control, RunLimits(max_batch=63))
    calls = []
    run = engine.backend.run

    def bounded(graph, **inputs):
        if graph == "unet":
            calls.append((int(inputs["latents"].shape[0]), *map(int, inputs["cross_alpha"].shape[:2])))
        return run(graph, **inputs)

    monkeypatch.setattr(engine.backend, "limits", dict(engine.backend.limits, unet={"batch": 12, "groups": 1, "edits": 5}))
    monkeypatch.setattr(engine.backend, "run", bounded)
    assert engine.call_limits(RunLimits(max_batch=32)) == {"batch": 12, "groups": 1, "edits": 5}
    bounded_results = engine.edit_many(inversions, [targets] * 2, control, RunLimits(max_batch=32))
    assert calls and all(n <= 12 and g <= 1 and k <= 5 for n, g, k in calls), set(calls)
    for a, b in zip(free, bounded_results):
        assert [i.name for i in a.items] == [i.name for i in b.items]
        for x, y in zip(a.edits, b.edits):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
