"""diffusers → original LDM/CompVis key layout, to build single-file SD checkpoints for the tests.

A port of diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` (which is not
shipped in the wheel). The tests write a single file from the tiny diffusers model with this and
load it back through diffusers' own LDM → diffusers conversion, so a round trip that reproduces
the original outputs shows the single-file path is right. Like the original script it is a
*string-replacement* mapping that hard-codes SD v1's block layout (4 blocks, 2 resnets down / 3 up),
which also covers the tiny model (replacements for absent blocks simply never match).
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------- UNet
_UNET_MAP = [  # (stable-diffusion, HF diffusers)
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
_UNET_MAP_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_UNET_MAP_LAYER: list[tuple[str, str]] = []
for i in range(4):
    for j in range(2):  # down blocks: 2 resnets (+ attentions except in the last block)
        _UNET_MAP_LAYER.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
        if i < 3:
            _UNET_MAP_LAYER.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
    for j in range(3):  # up blocks: 3 resnets (+ attentions except in the first block)
        _UNET_MAP_LAYER.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
        if i > 0:
            _UNET_MAP_LAYER.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    if i < 3:
        _UNET_MAP_LAYER.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        _UNET_MAP_LAYER.append(
            (f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0.")
        )
_UNET_MAP_LAYER.append(("middle_block.1.", "mid_block.attentions.0."))
for j in range(2):
    _UNET_MAP_LAYER.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))


def convert_unet_state_dict(sd: dict) -> dict:
    """diffusers UNet2DConditionModel keys → ``model.diffusion_model`` keys (without the prefix)."""
    mapping = {k: k for k in sd}
    for ldm, hf in _UNET_MAP:
        if hf in mapping:
            mapping[hf] = ldm
    for k, v in mapping.items():
        if "resnets" in k:
            for ldm, hf in _UNET_MAP_RESNET:
                v = v.replace(hf, ldm)
            mapping[k] = v
    for k, v in mapping.items():
        for ldm, hf in _UNET_MAP_LAYER:
            v = v.replace(hf, ldm)
        mapping[k] = v
    return {v: sd[k] for k, v in mapping.items()}


# ----------------------------------------------------------------------------------------- VAE
_VAE_MAP = [
    ("nin_shortcut", "conv_shortcut"),
    ("norm_out", "conv_norm_out"),
    ("mid.attn_1.", "mid_block.attentions.0."),
]
for i in range(4):
    for j in range(2):
        _VAE_MAP.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
    if i < 3:
        _VAE_MAP.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
        _VAE_MAP.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(3):  # decoder up blocks are numbered in reverse in LDM
        _VAE_MAP.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
for i in range(2):
    _VAE_MAP.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))

_VAE_MAP_ATTN = [  # current diffusers Attention names
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def convert_vae_state_dict(sd: dict) -> dict:
    """diffusers AutoencoderKL keys → ``first_stage_model`` keys; mid attention linear → 1×1 conv."""
    mapping = {k: k for k in sd}
    for k, v in mapping.items():
        for ldm, hf in _VAE_MAP:
            v = v.replace(hf, ldm)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for ldm, hf in _VAE_MAP_ATTN:
                v = v.replace(hf, ldm)
            mapping[k] = v
    out = {v: sd[k] for k, v in mapping.items()}
    for k, w in out.items():
        for name in ("q", "k", "v", "proj_out"):
            if f"mid.attn_1.{name}.weight" in k:
                out[k] = w.reshape(*w.shape, 1, 1)
    return out


# -------------------------------------------------------------------------------- text encoder
def convert_text_encoder_state_dict(sd: dict) -> dict:
    """transformers CLIPTextModel keys → ``cond_stage_model.transformer`` keys (without the prefix).

    transformers ≥ 5.6 flattened CLIPTextModel (no ``text_model.`` level); LDM keys always have it.
    """
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def to_ldm_checkpoint(unet, vae, text_encoder) -> dict:
    """A full SD v1 single-file state dict (contiguous tensors, ready for safetensors)."""
    out = {}
    for prefix, sd in (
        ("model.diffusion_model.", convert_unet_state_dict(unet.state_dict())),
        ("first_stage_model.", convert_vae_state_dict(vae.state_dict())),
        ("cond_stage_model.transformer.", convert_text_encoder_state_dict(text_encoder.state_dict())),
    ):
        out.update({prefix + k: v.detach().clone().contiguous() for k, v in sd.items()})
    return out
