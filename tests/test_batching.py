"""Several images edited in one UNet batch (the controlled UNet's group axis) give what editing
each alone gives."""
from __future__ import annotations

import numpy as np
import pytest

from prism_rt.config import ControlConfig, RunLimits
from prism_rt.engine import Engine

SOURCES = ("Chest X-ray showing Support Devices", "Chest X-ray showing No Finding, Support Devices")
TARGET = "Chest X-ray showing No Finding"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, backend="torch")


@pytest.mark.parametrize("method, blend", [("direct", True), ("ddim", False), ("negative-prompt", True)])
def test_grouped_edit_equals_one_image_at_a_time(engine, dicom_path, method, blend):
    from prism_rt.imageio import load_image

    pixels = load_image(dicom_path).pixels
    images = [pixels, np.ascontiguousarray(pixels[:, ::-1])]  # two different images
    sampler = engine.sampler(steps=6)
    inversions = [engine.invert(img, src, method=method, sampler=sampler) for img, src in zip(images, SOURCES)]
    control = ControlConfig(self_replace=(0.4, 0.8), blend_words=("Devices", "Finding") if blend else None)
    grouped = engine.edit_many(inversions, [TARGET], control, RunLimits(max_batch=63))
    assert [r.settings["images_in_batch"] for r in grouped] == [2, 2]
    # one batch per step for both images: half the UNet calls of two separate runs
    alone = [engine.edit(inv, [TARGET], control) for inv in inversions]
    assert grouped[0].counts["unet_calls"] == alone[0].counts["unet_calls"]
    for g, a in zip(grouped, alone):
        assert [i.name for i in g.items] == [i.name for i in a.items]
        np.testing.assert_allclose(g.reconstruction, a.reconstruction, atol=1e-4)
        for x, y in zip(g.edits, a.edits):
            np.testing.assert_allclose(x, y, atol=1e-3)
        if blend:
            for x, y in zip(g.masks, a.masks):
                assert np.mean(x != y) < 0.01
    # images that do not differ would hide a mix-up between groups: they do differ
    assert np.abs(grouped[0].edits[0] - grouped[1].edits[0]).max() > 0.05


def test_too_small_a_batch_falls_back_to_one_image_at_a_time(engine, dicom_path):
    from prism_rt.imageio import load_image

    pixels = load_image(dicom_path).pixels
    sampler = engine.sampler(steps=3)
    inversions = [engine.invert(pixels, SOURCES[0], method="direct", sampler=sampler)] * 2
    results = engine.edit_many(inversions, [TARGET], ControlConfig(self_replace=(0.5,)), RunLimits(max_batch=4))
    assert len(results) == 2 and [r.settings["images_in_batch"] for r in results] == [1, 1]
