"""LocalBlend mask math (array API) against torch's max_pool2d / interpolate, in numpy and torch."""
import array_api_compat.numpy as xnp
import array_api_compat.torch as xtorch
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prism_rt.blend import apply_blend, blend_mask, max_pool, nearest_resize


def torch_reference(maps_sum, weights, size, threshold, k=1):
    maps = (maps_sum * weights[:, :, None, None]).sum(1, keepdim=True)
    maps = F.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))  # the published code's pool
    mask = F.interpolate(maps, size=size)
    mask = mask / mask.amax(dim=(2, 3), keepdim=True)
    mask = mask.gt(threshold)
    return (mask[:1] + mask).float()


@pytest.mark.parametrize("xp,conv", [(xnp, np.asarray), (xtorch, torch.as_tensor)])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_blend_mask_matches_torch(xp, conv, size):
    rng = np.random.default_rng(0)
    maps = (0.1 * rng.random((3, 77, 6, 6))).astype(np.float32)
    maps[:, :, :2, :2] += 1.0  # a blob in one corner: the mask must be neither empty nor full
    weights = np.zeros((3, 77), np.float32)
    weights[0, 5], weights[1, [5, 6]], weights[2, 9] = 1, 1, 1
    ours = blend_mask(xp, conv(maps), conv(weights), size, 0.3)
    ref = torch_reference(torch.as_tensor(maps), torch.as_tensor(weights), size, 0.3)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    assert 0 < float(np.asarray(ours).mean()) < 1


@pytest.mark.parametrize("xp,conv", [(xnp, np.asarray), (xtorch, torch.as_tensor)])
@pytest.mark.parametrize("dilation", [0, 2])
def test_blend_dilation_is_the_pool_radius(xp, conv, dilation):
    rng = np.random.default_rng(1)
    maps = (0.1 * rng.random((2, 77, 8, 8))).astype(np.float32)
    maps[:, :, 3, 3:6] += 1.0  # a thin bar: the pool widens it
    weights = np.zeros((2, 77), np.float32)
    weights[:, 4] = 1
    ours = np.asarray(blend_mask(xp, conv(maps), conv(weights), (16, 16), 0.3, dilation))
    ref = torch_reference(torch.as_tensor(maps), torch.as_tensor(weights), (16, 16), 0.3, dilation).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours[0].sum() == {0: 3 * 4, 2: 5 * 7 * 4}[dilation]  # the bar's 3 cells, or grown by 2 on every side


def test_max_pool_and_resize_by_hand():
    x = np.zeros((1, 3, 3), np.float32)
    x[0, 0, 0] = 1
    np.testing.assert_array_equal(max_pool(xnp, x)[0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    y = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    np.testing.assert_array_equal(nearest_resize(xnp, y, (4, 4))[0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def test_apply_blend_keeps_source_outside_mask():
    z = np.stack([np.zeros((4, 2, 2)), np.ones((4, 2, 2))]).astype(np.float32)
    mask = np.zeros((2, 1, 2, 2), np.float32)
    mask[:, :, 0, 0] = 1
    out = apply_blend(z, mask)
    assert out[1, :, 0, 0].tolist() == [1, 1, 1, 1] and out[1, :, 1, 1].tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(out[0], z[0])


def test_word_without_attention_gives_empty_mask():
    maps = np.zeros((2, 77, 4, 4), np.float32)
    weights = np.zeros((2, 77), np.float32)
    weights[:, 3] = 1
    assert np.asarray(blend_mask(xnp, maps, weights, (8, 8), 0.3)).sum() == 0
