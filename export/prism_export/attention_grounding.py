"""Word grounding for the phantom model's training: losses that put each attribute word's
cross-attention inside that attribute's region, TokenCompose's two (Wang et al., CVPR 2024):

- the token loss ``1 − Σ_x A_w(x)·M(x) / Σ_x A_w(x)``, the share of word ``w``'s attention outside
  its mask (:func:`grounding_loss`): it concentrates the attention but lets it leave part of the
  region empty (a device's thin leads, when the box holds it all);
- the pixel loss, the binary cross-entropy between the word's map and ``M(x)``
  (:func:`pixel_loss`): every cell of the region attends to the word and no other cell does — what
  LocalBlend's thresholded maps need. TokenCompose takes ``A_w(x)`` itself (the share of location
  ``x``'s attention on the word); here the map is divided by its peak, as LocalBlend divides it,
  so the loss shapes where the word is read, not how much of each location's attention it takes.
  Trained on the absolute share (measured on the phantom), the region's attention went almost all
  to the attribute's words, and an edit that drops them (refine: the removed word's attention is
  not carried over) no longer changed an effusion: removal 75 % → 12 % successful.

A large model trained on web captions learns word maps that localise (what LocalBlend relies on);
the phantom model, trained on eight template captions, learns to read its captions globally: the
word maps of "Devices" are flat (measured: their correlation with the device mask is ≈ 0 at 4×4,
8×8 and 16×16). The phantom renderer knows every attribute's region, so training can say where
each word belongs. Only the cross-attention layers of the down and up blocks are supervised (those
LocalBlend reads; not the mid block); their probabilities are computed explicitly there, the
other layers keep the fused kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# the words of each attribute in PRISM's CheXpert captions (prism_rt.captions), by phantom attribute
ATTRIBUTE_WORDS = {"devices": ("Support", "Devices"), "effusion": ("Pleural", "Effusion"), "cardiomegaly": ("Cardiomegaly",)}


class _Recorder:
    def __init__(self):
        self.on, self.maps = False, []


class RecordingCrossAttnProcessor:
    """diffusers' plain attention (probabilities made explicit), recording them when asked."""

    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # [B·heads, Q, T]
        if self.recorder.on:
            self.recorder.maps.append(probs.view(-1, attn.heads, *probs.shape[1:]).mean(1))  # [B, Q, T]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def install(unet) -> _Recorder:
    """Recording processors on the down/up cross-attention layers of ``unet``; the recorder."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    recorder = _Recorder()
    unet.set_attn_processor({name: RecordingCrossAttnProcessor(recorder)
                             if name.endswith("attn2.processor") and not name.startswith("mid_block") else AttnProcessor2_0()
                             for name in unet.attn_processors})
    return recorder


def uninstall(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def word_token_weights(tokenizer, captions: list[str], attributes: tuple[str, ...], length: int = 77) -> torch.Tensor:
    """[len(captions), len(attributes), length]: 1 on the tokens of each attribute's words in each
    caption (all 0 where the caption does not name it)."""
    out = torch.zeros(len(captions), len(attributes), length)
    for i, caption in enumerate(captions):
        ids = tokenizer(caption, padding="max_length", max_length=length, truncation=True).input_ids
        for a, attribute in enumerate(attributes):
            for word in ATTRIBUTE_WORDS[attribute]:
                if word not in caption.replace(",", " ").split():
                    continue
                word_ids = tokenizer(word, add_special_tokens=False).input_ids
                for start in range(1, length - len(word_ids) + 1):
                    if ids[start:start + len(word_ids)] == word_ids:
                        out[i, a, start:start + len(word_ids)] = 1.0
    return out


def _per_layer_loss(maps, tokens, masks, loss_of) -> torch.Tensor:
    """Mean over the layers and the (item, attribute) pairs that the caption names of
    ``loss_of(word, region)`` → [B, A], where ``word`` [B, A, Q] is the attribute words' share of
    each location's attention and ``region`` [B, A, Q] the attribute's region pooled to the layer's
    size and binarised (any part of the region)."""
    present = tokens.sum(-1) > 0  # [B, A]
    if not present.any():
        return maps[0].sum() * 0.0
    losses = []
    for probs in maps:
        side = int(round(probs.shape[1] ** 0.5))
        region = (F.adaptive_avg_pool2d(masks, side) > 0).flatten(2).float()
        word = torch.einsum("bqt,bat->baq", probs, tokens)
        losses.append(loss_of(word, region)[present].mean())
    return torch.stack(losses).mean()


def grounding_loss(maps: list[torch.Tensor], tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over the supervised layers and the (item, attribute) pairs that the caption names of
    the share of the attribute words' attention outside the attribute's region.

    maps: per layer [B, Q, T] (Q = h·w); tokens: [B, A, T] word weights; masks: [B, A, H, W] in
    [0, 1] at the latent size, pooled to each layer's size and binarised (any part of the region)."""
    return _per_layer_loss(maps, tokens, masks,
                           lambda word, region: 1.0 - (word * region).sum(-1) / word.sum(-1).clamp_min(1e-8))


def pixel_loss(maps: list[torch.Tensor], tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over the supervised layers and the (item, attribute) pairs that the caption names of
    the binary cross-entropy between the attribute words' map (their share of each location's
    attention, divided by its peak over the locations) and the attribute's region (pooled to each
    layer's size, binarised as in :func:`grounding_loss`). Arguments as :func:`grounding_loss`."""
    def bce(word, region):
        word = (word / word.amax(-1, keepdim=True).clamp_min(1e-8)).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(word, region, reduction="none").mean(-1)

    return _per_layer_loss(maps, tokens, masks, bce)
