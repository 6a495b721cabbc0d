"""Difference composite: the numpy filters against scipy.ndimage, and what the composite must do
to a hand-made edit (keep a large local change, drop a small diffuse one, be the reference
outside its mask)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from prism_rt.composite import composite_mask, difference_composite, gaussian_blur, grow


@pytest.mark.parametrize("sigma", [0.7, 1.5, 3.0])
def test_gaussian_blur_is_scipys(sigma):
    x = np.random.default_rng(0).random((2, 37, 41)).astype(np.float32)
    np.testing.assert_allclose(gaussian_blur(x, sigma), ndimage.gaussian_filter(x, (0, sigma, sigma)), atol=1e-6)


@pytest.mark.parametrize("pixels", [1, 2])
def test_grow_is_scipys_maximum_filter(pixels):
    m = (np.random.default_rng(1).random((3, 30, 33)) > 0.93).astype(np.float32)
    size = 2 * pixels + 1
    np.testing.assert_array_equal(grow(m, pixels), ndimage.maximum_filter(m, size=(1, size, size)))


def _scene():
    rng = np.random.default_rng(2)
    reference = rng.uniform(-0.8, 0.8, (1, 64, 64)).astype(np.float32).repeat(3, 0)
    image = reference + rng.normal(0, 0.02, (1, 64, 64)).astype(np.float32)  # diffuse drift: 0.5 % of the range
    image[:, 20:30, 30:44] -= 0.6  # the edit: 30 % of the range, in a 10×14 box
    return reference, image


def test_composite_keeps_the_edit_and_drops_the_drift():
    reference, image = _scene()
    out, mask = difference_composite(reference, image, threshold=0.08)
    assert out.shape == image.shape and out.dtype == image.dtype and mask.shape == (64, 64)
    box = np.zeros((64, 64), bool)
    box[20:30, 30:44] = True
    # the edit is kept away from the box's feathered edge (to 1 % of its 0.6 change)
    np.testing.assert_allclose(out[:, 23:27, 33:41], image[:, 23:27, 33:41], atol=6e-3)
    # beyond the filters' reach (blur radius 6 + grow 1 + feather radius 6 pixels) the drift is
    # gone: the output is the reference, exactly
    far = ~ndimage.binary_dilation(box, np.ones((3, 3), bool), iterations=13)
    assert far.sum() > 0.5 * far.size
    assert mask[far].max() == 0.0
    np.testing.assert_array_equal(out[:, far], reference[:, far])
    # by the definition: reference + mask · (image − reference)
    np.testing.assert_allclose(out, reference + mask * (image - reference), atol=1e-6)


def test_threshold_is_on_the_given_value_range():
    reference, image = _scene()
    model_space = composite_mask(reference, image, 0.08, value_range=2.0)
    unit_space = composite_mask((reference + 1) / 2, (image + 1) / 2, 0.08, value_range=1.0)
    np.testing.assert_allclose(model_space, unit_space, atol=1e-6)
    # a threshold above every change keeps nothing; 0 is the plain image
    assert composite_mask(reference, image, 0.5).max() == 0.0
    out, mask = difference_composite(reference, image, 0.0)
    np.testing.assert_array_equal(out, image)
    assert mask.shape == (64, 64) and mask.min() == 1.0


@pytest.fixture(scope="module")
def edited(tiny_model_dir, dicom_path):
    from prism_rt.config import ControlConfig, RunLimits
    from prism_rt.engine import Engine
    from prism_rt.imageio import load_image

    engine = Engine.load(tiny_model_dir, backend="torch")
    inversion = engine.invert(load_image(dicom_path), "Chest X-ray showing Support Devices", method="direct",
                              sampler=engine.sampler(steps=4))
    targets = ["Chest X-ray showing No Finding"]

    def run(**kw):
        return engine.edit(inversion, targets, ControlConfig(self_replace=(0.4, 0.8), **kw), RunLimits(max_batch=8))

    return run


def test_engine_composites_its_own_edit(edited):
    """``composite=(t,)`` is the plain edit composited afterwards; several thresholds are extra
    candidates named by threshold, each the plain edit's item composited at it."""
    plain = edited()
    one = edited(composite=(0.05,))
    assert [i.name for i in one.items] == [i.name for i in plain.items]
    assert all(i.composite == 0.05 for i in one.items) and all(i.composite is None for i in plain.items)
    for before, after, kept in zip(plain.edits, one.edits, one.composite_masks):
        np.testing.assert_allclose(after, difference_composite(plain.reconstruction, before, 0.05)[0], atol=1e-6)
        assert 0.0 <= kept.min() and kept.max() <= 1.0
    np.testing.assert_array_equal(one.reconstruction, plain.reconstruction)

    three = edited(composite=(0.0, 0.05, 0.2))
    assert [i.name for i in three.items] == [f"{i.name}-c{t:g}" for i in plain.items for t in (0, 0.05, 0.2)]
    np.testing.assert_allclose(three.edits[0], plain.edits[0], atol=1e-6)  # 0: the plain counterfactual
    np.testing.assert_allclose(three.edits[1], one.edits[0], atol=1e-6)
    stats = three.item_stats()
    assert [s["composite"] for s in stats] == [0.0, 0.05, 0.2] * 2
    # a higher threshold keeps less of the change
    assert stats[0]["composite_fraction"] == 1.0
    assert stats[2]["composite_fraction"] <= stats[1]["composite_fraction"] <= 1.0
    assert stats[2]["mean_abs_diff"] <= stats[1]["mean_abs_diff"] + 1e-6 <= stats[0]["mean_abs_diff"] + 2e-6


@pytest.mark.parametrize("bad", [(1.0,), (-0.1,), (0.1, 0.1), (0.08, 0.0800000001)])
def test_composite_thresholds_are_checked(bad):
    from prism_rt.config import ControlConfig

    with pytest.raises(ValueError, match="composite"):
        ControlConfig(composite=bad)
