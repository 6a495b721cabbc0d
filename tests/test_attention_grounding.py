"""The phantom model's word-grounding loss (prism_export.attention_grounding): token positions
against the runtime's own tokenizer, the loss against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prism_export.attention_grounding import grounding_loss, install, pixel_loss, uninstall, word_token_weights


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import CLIPTokenizer

    from prism_export.clip_vocab import write_clip_tokenizer_files
    from prism_rt.tokenizer import ClipTokenizer

    folder = write_clip_tokenizer_files(tmp_path_factory.mktemp("tok"))
    return CLIPTokenizer.from_pretrained(folder), ClipTokenizer.from_folder(folder)


def test_word_tokens_are_where_the_runtime_finds_the_words(tokenizers):
    hf, ours = tokenizers
    captions = ["Chest X-ray showing Pleural Effusion, Support Devices", "Chest X-ray showing No Finding",
                "Chest X-ray showing Cardiomegaly"]
    weights = word_token_weights(hf, captions, ("devices", "effusion", "cardiomegaly"))
    assert weights.shape == (3, 3, 77)

    def positions(caption, *words):
        return sorted(i for w in words for i in ours.word_token_indices(caption, w))

    assert torch.nonzero(weights[0, 0]).flatten().tolist() == positions(captions[0], "Support", "Devices")
    assert torch.nonzero(weights[0, 1]).flatten().tolist() == positions(captions[0], "Pleural", "Effusion")
    assert not weights[0, 2].any() and not weights[1].any()
    assert torch.nonzero(weights[2, 2]).flatten().tolist() == positions(captions[2], "Cardiomegaly")


def test_grounding_loss_is_the_share_of_attention_outside_the_region():
    tokens = torch.zeros(2, 2, 5)
    tokens[0, 0, 1] = 1  # item 0 names attribute 0 (token 1); item 1 names nothing
    masks = torch.zeros(2, 2, 4, 4)
    masks[0, 0, :2, :2] = 1.0  # attribute 0's region: the top-left quarter
    inside = torch.zeros(2, 16, 5)
    inside[:, :, 0] = 1.0
    inside[0, [0, 1, 4, 5], 1] = 1.0  # token 1 attends only inside the region
    flat = torch.full((2, 16, 5), 0.2)
    assert grounding_loss([inside], tokens, masks).item() == pytest.approx(0.0)
    assert grounding_loss([flat], tokens, masks).item() == pytest.approx(0.75)  # 12 of 16 cells outside
    # a 2×2 layer: the region pools to one cell of four; the mean over layers
    flat_small = torch.full((2, 4, 5), 0.2)
    assert grounding_loss([flat, flat_small], tokens, masks).item() == pytest.approx(0.75)
    assert grounding_loss([flat], torch.zeros(2, 2, 5), masks).item() == 0.0  # nothing named: no loss


def test_pixel_loss_is_the_cross_entropy_of_each_location_against_the_region():
    tokens = torch.zeros(2, 2, 5)
    tokens[0, 0, 1] = 1
    masks = torch.zeros(2, 2, 4, 4)
    masks[0, 0, :2, :2] = 1.0
    exact = torch.zeros(2, 16, 5)
    exact[:, :, 0] = 1.0
    exact[0, [0, 1, 4, 5], 0], exact[0, [0, 1, 4, 5], 1] = 0.0, 1.0  # the region attends only to the word
    assert pixel_loss([exact], tokens, masks).item() == pytest.approx(0.0, abs=1e-5)
    # concentrated in one cell of the region (what the token loss accepts): 3 region cells at p = 0
    one = torch.zeros(2, 16, 5)
    one[:, :, 0] = 1.0
    one[0, 0, 0], one[0, 0, 1] = 0.0, 1.0
    assert grounding_loss([one], tokens, masks).item() == pytest.approx(0.0)
    assert pixel_loss([one], tokens, masks).item() == pytest.approx(-3 * np.log(1e-6) / 16, rel=1e-4)
    # the map divided by its peak: half the region's share everywhere else costs what half costs
    half = exact.clone()
    half[0, [0, 1, 4, 5], 0], half[0, [0, 1, 4, 5], 1] = 0.6, 0.4  # the region: 0.4 on the word, the peak
    half[0, [2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], 0] = 0.8
    half[0, [2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], 1] = 0.2  # elsewhere 0.2: half the peak
    expected = -(4 * np.log(1 - 1e-6) + 12 * np.log(0.5)) / 16
    assert pixel_loss([half], tokens, masks).item() == pytest.approx(expected, rel=1e-5)
    flat = torch.full((2, 16, 5), 0.2)  # the same share everywhere: every location is at the peak
    assert pixel_loss([flat], tokens, masks).item() == pytest.approx(-12 * np.log(1e-6) / 16, rel=2e-3)  # float32 clamp
    assert pixel_loss([flat], torch.zeros(2, 2, 5), masks).item() == 0.0  # nothing named: no loss


def test_recording_processors_keep_the_unet_outputs(tiny_model_dir):
    """The explicit-probability processors compute what the fused kernel does."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    g = torch.Generator().manual_seed(0)
    z, text, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([300])
    with torch.no_grad():
        want = unet(z, t, encoder_hidden_states=text).sample
        recorder = install(unet)
        recorder.on = True
        got = unet(z, t, encoder_hidden_states=text).sample
        uninstall(unet)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(recorder.maps) == len(cross) - sum(n.startswith("mid_block") for n in cross) > 0  # no mid block
    for probs in recorder.maps:
        np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-5)
