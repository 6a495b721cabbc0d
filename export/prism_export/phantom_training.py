"""What the phantom training's parts share: its settings (:class:`TrainConfig`), the attribute
labels in the classifier's order, the learning-rate schedule, the progress line, and rendering a
training set of phantoms (:mod:`prism_export.phantom`). The driver is :mod:`prism_export.train_phantom`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

LABEL_NAMES: tuple[str, ...] = ("Support Devices", "Pleural Effusion", "Cardiomegaly")
"""Classifier outputs, in order."""


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    threads: int = 1
    size: int = 128
    n_train: int = 5000
    n_heldout: int = 256
    prevalence: float = 0.45
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    vae_steps: int = 6000
    vae_batch: int = 4  # small batches, many steps: converges faster per CPU second
    vae_crop: int = 64
    vae_full_fraction: float = 0.25  # last part of the VAE steps on full images (batch / 4)
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    vae_edge: float = 0.5
    vae_detail: float = 8.0
    # text encoder + UNet
    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    unet_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    unet_steps: int = 1600
    unet_batch: int = 32
    unet_lr: float = 6e-4
    caption_dropout: float = 0.1
    ema: float = 0.995
    # classifier
    cls_steps: int = 400
    cls_batch: int = 32
    cls_lr: float = 2e-3
    n_examples: int = 4
    log_every: int = 50
    # word grounding (prism_export.attention_grounding): weight of the loss on the attribute words'
    # cross-attention outside their regions; 0 = plain denoising (the model before grounding)
    attention_loss: float = 0.0
    # weight of TokenCompose's pixel loss on the same maps (every cell of the region attends to the word)
    attention_pixel_loss: float = 0.0
    # a trained phantom model whose VAE (and classifier) to reuse instead of training them again
    vae_from: str | None = None
    # a trained phantom model whose UNet and text encoder to start from (fine-tuning, e.g. with the
    # pixel grounding loss) instead of a fresh initialisation; needs vae_from (the latents must match)
    unet_from: str | None = None

    @property
    def grounded(self) -> bool:
        """Whether a word-grounding loss is trained (the regions' masks are then rendered)."""
        return self.attention_loss > 0 or self.attention_pixel_loss > 0


def log_line(msg: str) -> None:
    """The training's progress line, time-stamped."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, base: float, warmup: int = 50, floor: float = 0.1) -> float:
    """Linear warm-up to ``base``, then a cosine decay to ``floor``·``base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def render_set(seeds, size: int, prevalence: float, with_masks: bool = False):
    """(images float32 N×size×size in [0,1], label matrix N×3 in :data:`LABEL_NAMES` order,
    captions, and with ``with_masks`` every attribute's region: where toggling it changes the
    image, [N, len(ATTRIBUTES), size, size] bool in ``phantom.ATTRIBUTES`` order; else None)."""
    import numpy as np

    from .phantom import ATTRIBUTES, render, render_image, sample_attributes, sample_patient

    images, labels, captions, masks = [], [], [], []
    for s in seeds:
        p = sample_patient(int(s))
        at = sample_attributes(int(s), prevalence)
        if with_masks:
            ph = render(p, at, size)
            img, lab, cap = ph.image, ph.labels, ph.caption
            masks.append(np.stack([ph.masks[name] for name in ATTRIBUTES]))
        else:
            img = render_image(p, at, size)
            lab = at.labels()
            cap = at.caption()
        images.append(img)
        labels.append([lab[n] for n in LABEL_NAMES])
        captions.append(cap)
    return (np.stack(images), np.asarray(labels, dtype=np.float32), captions,
            np.stack(masks) if with_masks else None)
