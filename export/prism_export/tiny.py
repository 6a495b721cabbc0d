"""Tiny Stable-Diffusion-v1.5-shaped models with random weights, for tests and smoke runs.

The block layout is SD v1.5's (three cross-attention down blocks and a plain one, the mirror
for up, two layers per block, one mid block, a 4-level VAE, a CLIP text encoder with the real
vocabulary), scaled down in width so that a 50-step inversion takes seconds on a CPU. The model
is saved in the diffusers layout and loaded through the same code as a real checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a model of SD v1.5's layout. The defaults are tiny: ``image_size`` 128 gives a
    16×16 latent and 4×4 blend maps; :data:`SD15` is the real architecture (860 M UNet)."""

    image_size: int = 128
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    unet_heads: int = 2
    unet_norm_groups: int = 16
    vae_channels: tuple[int, ...] = (8, 16, 32, 32)
    vae_layers: int = 1
    vae_norm_groups: int = 8
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 64
    seed: int = 0
    calibrate_latent_scale: bool = True


SD15 = TinySpec(image_size=512, unet_channels=(320, 640, 1280, 1280), unet_heads=8, unet_norm_groups=32,
                vae_channels=(128, 256, 512, 512), vae_layers=2, vae_norm_groups=32, text_width=768,
                text_layers=12, text_heads=12, text_intermediate=3072, calibrate_latent_scale=False)
"""Stable Diffusion v1.5's architecture (random weights, the real scaling factor 0.18215)."""


def build_tiny_components(spec: TinySpec = TinySpec()):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(spec.seed)
    n = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels, layers_per_block=spec.vae_layers, norm_num_groups=spec.vae_norm_groups,
        sample_size=spec.image_size, scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (n - 1), in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=spec.unet_channels, layers_per_block=2, norm_num_groups=spec.unet_norm_groups,
        cross_attention_dim=spec.text_width, attention_head_dim=spec.unet_heads,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=spec.text_width, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=spec.text_width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    for module in (vae, unet, text_encoder):
        module.eval()
    if spec.calibrate_latent_scale:
        vae.register_to_config(scaling_factor=_unit_variance_scale(vae, spec.image_size))
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, scheduler=scheduler)


def _unit_variance_scale(vae, size: int) -> float:
    """1 / std of the posterior mean on smooth test images, as SD's 0.18215 was chosen: a random
    VAE's latents are ~0.05 in scale, which would make relative latent errors meaningless."""
    import torch

    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    return float(round(1.0 / mean.std().item(), 4))


def save_tiny_model(out: Path, spec: TinySpec = TinySpec()) -> Path:
    """Build a tiny model and save it as a diffusers StableDiffusionPipeline folder."""
    import tempfile

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .clip_vocab import write_clip_tokenizer_files

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        # from_pretrained: the plain constructor silently builds an empty vocabulary in transformers 5
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(Path(tmp)))
        pipe = StableDiffusionPipeline(
            **build_tiny_components(spec), tokenizer=tokenizer,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
    return out
