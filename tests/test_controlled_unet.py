"""The controlled UNet: neutral controls are the stock UNet; layers are chosen by resolution."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from prism_rt.torch_backend.controlled_unet import ControlledUNet, neutral_controls


@pytest.fixture(scope="module")
def unets(tiny_model_dir):
    stock = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    return stock, ControlledUNet(copy.deepcopy(stock)).eval()


@pytest.mark.parametrize("groups,edits,uncond", [(1, 2, 3), (2, 1, 0), (3, 0, 3)])
def test_neutral_controls_equal_stock_unet(unets, groups, edits, uncond):
    stock, controlled = unets
    n = uncond + groups * (1 + edits)
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 77, 32, generator=g)
    t = torch.tensor([541.0])
    with torch.no_grad():
        expected = stock(z, t, encoder_hidden_states=text).sample
        noise, maps = controlled(z, t, text, **neutral_controls(groups, edits))
    assert (noise - expected).abs().max().item() <= 1e-5
    assert maps.shape == (groups, 1 + edits, 77, 4, 4)
    # probabilities averaged over heads and layers still sum to one over the tokens
    torch.testing.assert_close(maps.sum(2), torch.ones(groups, 1 + edits, 4, 4), rtol=1e-5, atol=1e-5)


def test_blend_layers_selected_by_resolution(unets):
    _, controlled = unets
    # SD v1.5 geometry: the two 1/4-side layers of the down blocks and the three of the up blocks
    assert controlled.blend_downsample == 4
    assert len(controlled.blend_layers) == 5
    assert sum(n.startswith("down_blocks") for n in controlled.blend_layers) == 2
    assert not any(n.startswith("mid_block") for n in controlled.blend_layers)


def test_control_changes_edit_items_only(unets):
    """Replacing attention changes the edit item and never the source item; when the edit item
    is identical to the source, replacing its attention by the source's changes nothing."""
    _, controlled = unets
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 16, 16, generator=g).expand(2, 4, 16, 16).contiguous()
    text = torch.randn(2, 77, 32, generator=g)
    same_text = text[:1].expand(2, 77, 32).contiguous()
    t = torch.tensor([301.0])
    off = neutral_controls(1, 1)
    on = dict(off, self_replace=torch.ones(1, 1), cross_alpha=torch.ones(1, 1, 77))
    with torch.no_grad():
        free, _ = controlled(z, t, text, **off)
        pinned, _ = controlled(z, t, text, **on)
        twin_free, _ = controlled(z, t, same_text, **off)
        twin_pinned, _ = controlled(z, t, same_text, **on)
    torch.testing.assert_close(pinned[0], free[0], rtol=0, atol=1e-6)
    assert (pinned[1] - free[1]).abs().max() > 1e-3
    torch.testing.assert_close(twin_pinned, twin_free, rtol=1e-5, atol=1e-5)


def test_blend_downsample_picks_the_layers_of_that_resolution(unets):
    """``blend_downsample=2``: the maps of the half-side layers (two down, three up), 8×8 for a
    16×16 latent, with the same outputs as the quarter-side default."""
    _, quarter = unets
    half = ControlledUNet(copy.deepcopy(quarter.unet), blend_downsample=2).eval()
    assert half.blend_downsample == 2 and len(half.blend_layers) == 5
    assert all(".1.attentions." in n or n.startswith("up_blocks.2.") for n in half.blend_layers), half.blend_layers
    g = torch.Generator().manual_seed(3)
    z, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        noise_q, maps_q = quarter(z, torch.tensor([401.0]), text, **neutral_controls(1, 1))
        noise_h, maps_h = half(z, torch.tensor([401.0]), text, **neutral_controls(1, 1))
    assert maps_q.shape[-2:] == (4, 4) and maps_h.shape[-2:] == (8, 8)
    torch.testing.assert_close(noise_h, noise_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps_h.sum(2), torch.ones(1, 2, 8, 8), rtol=1e-5, atol=1e-5)
