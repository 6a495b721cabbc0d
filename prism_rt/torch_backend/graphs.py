"""The four graphs as torch modules with plain-tensor I/O: what the torch backend runs and what
the export stage exports, so export parity is tested against the code that defines behaviour."""
from __future__ import annotations

import torch
from torch import nn

from ..config import BlendMaps
from .controlled_unet import ControlledUNet


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long(), return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """Returns the posterior **mean** × scaling factor: inversion must be deterministic."""

    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(scaling_factor)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        moments = self.vae.quant_conv(self.vae.encoder(pixels)) if self.vae.quant_conv is not None else self.vae.encoder(pixels)
        mean = moments[:, : moments.shape[1] // 2]
        return mean * self.scaling_factor


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]


def build_graphs(components, self_max_queries: int = 32 * 32,
                 blend_maps: BlendMaps | str = BlendMaps.AFTER_CONTROL,
                 blend_downsample: int | None = None) -> dict[str, nn.Module]:
    """``blend_downsample``: LocalBlend reads the cross-attention maps at 1/N of the latent side
    (None: a quarter, SD v1.5's 16×16; the nearest size the UNet has)."""
    sf = components.scaling_factor
    return {
        "text_encoder": TextEncoderGraph(components.text_encoder).eval(),
        "vae_encoder": VaeEncoderGraph(components.vae, sf).eval(),
        "vae_decoder": VaeDecoderGraph(components.vae, sf).eval(),
        "unet": ControlledUNet(components.unet, self_max_queries=self_max_queries, blend_maps=blend_maps,
                               blend_downsample=blend_downsample or 4).eval(),
    }
