"""``prism-export train-phantom``: train a small SD-v1.5-layout model on procedural chest phantoms.

Everything is trained here, on a CPU, seeded and reproducible (for a given thread count):

1. render the training set (:mod:`.phantom`: patients 0…N-1, independent attributes), gray → 3
   channels in [-1, 1]; held-out patients (seeds ≥ ``HELDOUT_SEED0``) for evaluation;
2. a small attribute classifier (Support Devices, Pleural Effusion, Cardiomegaly), exported to
   ``classifier.onnx`` (input ``image`` [B,1,128,128] gray in [0,1], output ``logits`` [B,3]);
3. the VAE (AutoencoderKL, 4 levels: 128 px → 16×16×4), L1 + edge + tiny KL, then its
   ``scaling_factor`` = 1 / std of the posterior means (as SD's 0.18215 was chosen);
4. the text encoder (CLIP, real 49408-token vocabulary, narrow) and the UNet (SD v1.5 block
   layout) jointly, epsilon prediction on the precomputed latents (posterior mean × scale), DDPM
   scaled-linear betas 0.00085 → 0.012 over 1000 steps, captions = PRISM's CheXpert captions with
   10 % dropped to "" (classifier-free guidance), EMA of the weights;
5. saved as a diffusers StableDiffusionPipeline folder (the same code path as ``save_tiny_model``)
   plus ``classifier.onnx``, ``training.json`` and a few held-out ``examples/``.

The models are built by :func:`prism_export.tiny.build_tiny_components`, so they have exactly the
layout the rest of prism_rt loads and exports. The settings, schedule and training-set rendering are
in :mod:`prism_export.phantom_training`, the classifier in :mod:`prism_export.phantom_classifier`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .phantom_classifier import export_classifier, train_classifier
from .phantom_training import LABEL_NAMES, TrainConfig, log_line, lr_at, render_set


# --------------------------------------------------------------------------------------------
def _to_model(images, idx):
    """uint/float gray N×H×W (numpy, [0,1]) rows ``idx`` → torch N×3×H×W in [-1, 1]."""
    import torch

    x = torch.from_numpy(images[idx]).float()[:, None] * 2.0 - 1.0
    return x.expand(-1, 3, -1, -1).contiguous()


def _psnr(vae, images, masks=None, batch: int = 16):
    """Mean PSNR (dB, [0,1] gray) of decode(mean(encode(x))) and, with device masks, the mean
    absolute error inside them."""
    import numpy as np
    import torch

    psnrs, dev_err, dev_n = [], 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            idx = np.arange(i, min(i + batch, len(images)))
            x = _to_model(images, idx)
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            rec01 = ((rec.mean(dim=1) + 1) / 2).clamp(0, 1).numpy()
            ref = images[idx]
            mse = ((rec01 - ref) ** 2).reshape(len(idx), -1).mean(axis=1)
            psnrs.extend(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))
            if masks is not None:
                m = masks[idx]
                dev_err += float(np.abs(rec01 - ref)[m].sum())
                dev_n += int(m.sum())
    return float(np.mean(psnrs)), (dev_err / dev_n if dev_n else None)


def train_vae(cfg: TrainConfig, vae, images, held_images, held_masks, log=log_line):
    import numpy as np
    import torch

    torch.manual_seed(cfg.seed + 1)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    n_full = int(round(cfg.vae_steps * cfg.vae_full_fraction))
    losses, t0 = [], time.perf_counter()
    size = images.shape[-1]
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr)
        full = step >= cfg.vae_steps - n_full or cfg.vae_crop >= size
        b = max(cfg.vae_batch // 4, 1) if full else cfg.vae_batch
        idx = torch.randint(0, len(images), (b,), generator=g).numpy()
        x = _to_model(images, idx)
        if not full:
            c = cfg.vae_crop
            crops = []
            for k in range(b):
                r0, c0 = rng.integers(0, size - c + 1, 2)
                crops.append(x[k, :, r0:r0 + c, c0:c0 + c])
            x = torch.stack(crops)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample  # deterministic: inversion encodes with the mean too
        # detail weighting: thin bright structures (device leads, rib cortices) are a few % of the
        # pixels; weight the L1 by the local high-pass magnitude so that they are not averaged away
        hp = (x - torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)).abs()
        w = 1.0 + cfg.vae_detail * hp
        l1 = (w * (rec - x).abs()).mean() / w.mean()
        edge = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + cfg.vae_edge * edge + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(l1.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            dt = (time.perf_counter() - t0) / (step + 1)
            log(f"vae step {step + 1}/{cfg.vae_steps} l1 {np.mean(losses[-cfg.log_every:]):.4f} "
                f"{dt:.3f} s/step, {'full' if full else 'crop'}, eta {(cfg.vae_steps - step - 1) * dt / 60:.1f} min")
    vae.eval()
    psnr, dev_err = _psnr(vae, held_images, held_masks)
    return losses, psnr, dev_err


def encode_latents(vae, images, batch: int = 32):
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(vae.encode(_to_model(images, np.arange(i, min(i + batch, len(images))))).latent_dist.mean)
    return torch.cat(out)


def train_unet(cfg: TrainConfig, unet, text_encoder, tokenizer, latents, captions, held_latents, held_captions, log=log_line,
               region_masks=None, held_region_masks=None):
    """``region_masks`` [N, A, h, w] (each attribute's region at the latent size, ``A`` =
    ``phantom.ATTRIBUTES``): with ``cfg.attention_loss`` > 0 the attribute words' attention is
    trained into them (:mod:`.attention_grounding`)."""
    import copy

    import numpy as np
    import torch
    from diffusers import DDPMScheduler

    torch.manual_seed(cfg.seed + 2)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="epsilon")
    alphas = noise_sched.alphas_cumprod
    vocab = sorted(set(captions) | set(held_captions) | {""})
    ids = tokenizer(vocab, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    cap_index = torch.tensor([vocab.index(c) for c in captions])
    held_index = torch.tensor([vocab.index(c) for c in held_captions])
    empty = vocab.index("")
    params_u = list(unet.parameters())
    params_t = list(text_encoder.parameters())
    opt = torch.optim.AdamW([{"params": params_u, "weight_decay": 1e-2}, {"params": params_t, "weight_decay": 0.0}],
                            lr=cfg.unet_lr)
    ema_u, ema_t = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_u.parameters()) + list(ema_t.parameters())
    live_params = params_u + params_t
    for p in ema_params:
        p.requires_grad_(False)
    grounding = cfg.grounded and region_masks is not None
    if grounding or held_region_masks is not None:
        from . import attention_grounding as ag
        from .phantom import ATTRIBUTES

        vocab_tokens = ag.word_token_weights(tokenizer, vocab, tuple(ATTRIBUTES))  # [captions, A, 77]
    if grounding:
        recorder = ag.install(unet)
        ground_losses = []
    unet.train()
    text_encoder.train()

    def noised(z0, t, noise):
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    losses, t0 = [], time.perf_counter()
    for step in range(cfg.unet_steps):
        lr = lr_at(step, cfg.unet_steps, cfg.unet_lr, warmup=100)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        z0 = latents[idx]
        cidx = cap_index[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        cidx[drop] = empty
        used, inverse = torch.unique(cidx, return_inverse=True)
        emb = text_encoder(ids[used])[0][inverse]
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        if grounding:
            recorder.on, recorder.maps = True, []
        pred = unet(noised(z0, t, noise), t, encoder_hidden_states=emb).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        if grounding:
            recorder.on = False
            words, regions = vocab_tokens[cidx], region_masks[idx]
            ground = (cfg.attention_loss * ag.grounding_loss(recorder.maps, words, regions)
                      + cfg.attention_pixel_loss * ag.pixel_loss(recorder.maps, words, regions))
            ground_losses.append(ground.item())
            loss = loss + ground
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live_params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1 - decay)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.unet_steps:
            dt = (time.perf_counter() - t0) / (step + 1)
            extra = f" grounding {np.mean(ground_losses[-cfg.log_every:]):.3f}" if grounding else ""
            log(f"unet step {step + 1}/{cfg.unet_steps} loss {np.mean(losses[-cfg.log_every:]):.4f}{extra} lr {lr:.2e} "
                f"{dt:.3f} s/step, eta {(cfg.unet_steps - step - 1) * dt / 60:.1f} min")
    # held-out denoising loss of the EMA model at fixed timesteps and noise
    gv = torch.Generator().manual_seed(12345)
    val = {}
    with torch.no_grad():
        emb_all = ema_t(ids)[0]
        n = min(len(held_latents), 64)
        for tv in (50, 250, 500, 750, 950):
            t = torch.full((n,), tv)
            noise = torch.randn(held_latents[:n].shape, generator=gv)
            pred = ema_u(noised(held_latents[:n], t, noise), t, encoder_hidden_states=emb_all[held_index[:n]]).sample
            val[str(tv)] = float(torch.nn.functional.mse_loss(pred, noise))
    if held_region_masks is not None:  # how much of each word's attention falls in its region (EMA model)
        rec = ag.install(ema_u)
        held_tokens = vocab_tokens[held_index[:n]]
        shares = {}
        with torch.no_grad():
            for tv in (250, 500, 750):
                t = torch.full((n,), tv)
                noise = torch.randn(held_latents[:n].shape, generator=gv)
                rec.on, rec.maps = True, []
                ema_u(noised(held_latents[:n], t, noise), t, encoder_hidden_states=emb_all[held_index[:n]])
                rec.on = False
                shares[str(tv)] = round(1.0 - float(ag.grounding_loss(rec.maps, held_tokens, held_region_masks[:n])), 4)
        ag.uninstall(ema_u)
        val["word_attention_in_region"] = shares
    if grounding:
        ag.uninstall(unet)
    unet.eval()
    text_encoder.eval()
    return ema_u, ema_t, losses, val


# --------------------------------------------------------------------------------------------
def _versions() -> dict:
    import diffusers
    import numpy
    import onnx
    import torch
    import transformers

    return {m.__name__: m.__version__ for m in (torch, diffusers, transformers, numpy, onnx)}


def _mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2 ** 20, 2)


def run(cfg: TrainConfig, log=log_line) -> Path:
    import tempfile
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .clip_vocab import write_clip_tokenizer_files
    from .phantom import ATTRIBUTES, write_phantom_set
    from .phantom_patient import HELDOUT_SEED0
    from .tiny import TinySpec, build_tiny_components

    torch.set_num_threads(cfg.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                    "versions": _versions(), "times_s": {}, "train_seeds": [0, cfg.n_train - 1],
                    "heldout_seeds": [HELDOUT_SEED0, HELDOUT_SEED0 + cfg.n_heldout - 1]}
    t_start = time.perf_counter()

    def stage(name, t):
        record["times_s"][name] = round(time.perf_counter() - t, 1)
        (out / "training.json").write_text(json.dumps(record, indent=1))
        return time.perf_counter()

    t = time.perf_counter()
    log(f"rendering {cfg.n_train} training + {cfg.n_heldout} held-out phantoms at {cfg.size} px")
    images, labels, captions, train_regions = render_set(range(cfg.n_train), cfg.size, cfg.prevalence,
                                                         with_masks=cfg.grounded)
    held, held_labels, held_captions, held_regions = render_set(range(HELDOUT_SEED0, HELDOUT_SEED0 + cfg.n_heldout),
                                                                cfg.size, cfg.prevalence, with_masks=True)
    # the devices' masks of the patients that have them (the VAE's device-region error)
    has_devices = held_labels[:, LABEL_NAMES.index("Support Devices")] > 0
    held_masks = held_regions[:, list(ATTRIBUTES).index("devices")] & has_devices[:, None, None]
    record["prevalence"] = {n: float(labels[:, k].mean()) for k, n in enumerate(LABEL_NAMES)}
    record["captions"] = {c: captions.count(c) for c in sorted(set(captions))}
    log(f"prevalence {record['prevalence']}")
    t = stage("render", t)

    if cfg.vae_from:
        import shutil

        shutil.copy2(Path(cfg.vae_from) / "classifier.onnx", out / "classifier.onnx")
        previous = json.loads((Path(cfg.vae_from) / "training.json").read_text())
        record["classifier"] = dict(previous.get("classifier", {}), copied_from=str(cfg.vae_from))
        log(f"classifier copied from {cfg.vae_from}")
    elif cfg.cls_steps > 0:
        model, acc, cls_losses = train_classifier(cfg, images, labels, held, held_labels, log)
        export_classifier(model, out / "classifier.onnx", cfg.size)
        record["classifier"] = {"heldout_accuracy": acc, "mean_accuracy": float(np.mean(list(acc.values()))),
                                "labels": list(LABEL_NAMES), "final_loss": float(np.mean(cls_losses[-25:])),
                                "file": "classifier.onnx"}
        log(f"classifier held-out accuracy {acc}")
        t = stage("classifier", t)

    spec = TinySpec(image_size=cfg.size, unet_channels=tuple(cfg.unet_channels), unet_heads=cfg.unet_heads,
                    unet_norm_groups=16, vae_channels=tuple(cfg.vae_channels), vae_layers=1, vae_norm_groups=8,
                    text_width=cfg.text_width, text_layers=cfg.text_layers, text_heads=cfg.text_heads,
                    text_intermediate=4 * cfg.text_width, seed=cfg.seed, calibrate_latent_scale=False)
    comps = build_tiny_components(spec)
    vae, unet, text_encoder = comps["vae"], comps["unet"], comps["text_encoder"]
    record["parameters_M"] = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 3)
                              for k, m in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}
    log(f"parameters (M): {record['parameters_M']}")

    if cfg.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(cfg.vae_from) / "vae").eval()
        psnr, dev_err = _psnr(vae, held, held_masks)
        record["vae"] = {"heldout_psnr_db": round(psnr, 2), "heldout_device_mae": dev_err, "copied_from": str(cfg.vae_from)}
    else:
        vae_losses, psnr, dev_err = train_vae(cfg, vae, images, held, held_masks, log)
        record["vae"] = {"heldout_psnr_db": round(psnr, 2), "heldout_device_mae": dev_err,
                         "final_l1": float(np.mean(vae_losses[-25:])),
                         "l1_curve": vae_losses[:: max(1, len(vae_losses) // 100)]}
    log(f"vae held-out PSNR {psnr:.2f} dB, device-region MAE {dev_err}")
    if cfg.unet_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(Path(cfg.unet_from) / "unet")
        text_encoder = CLIPTextModel.from_pretrained(Path(cfg.unet_from) / "text_encoder")
        record["unet_from"] = str(cfg.unet_from)
        log(f"UNet and text encoder start from {cfg.unet_from}")
    means = encode_latents(vae, images)
    scale = float(round(1.0 / means[: min(len(means), 1024)].std().item(), 5))
    vae.register_to_config(scaling_factor=scale)
    latents = means * scale
    held_latents = encode_latents(vae, held) * scale
    record["vae"]["scaling_factor"] = scale
    log(f"latents {tuple(latents.shape)}, scaling_factor {scale}")
    vae.requires_grad_(False)
    t = stage("vae", t)

    with tempfile.TemporaryDirectory() as tmp:
        # from_pretrained: the plain constructor silently builds an empty vocabulary in transformers 5
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(Path(tmp)))
        latent_side = int(latents.shape[-1])

        def regions(masks):  # each attribute's region at the latent size (the fraction of each cell)
            return None if masks is None else torch.nn.functional.adaptive_avg_pool2d(
                torch.from_numpy(masks).float(), latent_side)

        ema_u, ema_t, unet_losses, val = train_unet(cfg, unet, text_encoder, tokenizer, latents, captions,
                                                    held_latents, held_captions, log, regions(train_regions),
                                                    regions(held_regions[:64]))
        record["unet"] = {"final_loss": float(np.mean(unet_losses[-50:])), "heldout_loss_by_t": val,
                          "loss_curve": unet_losses[:: max(1, len(unet_losses) // 200)], "ema": cfg.ema}
        log(f"unet held-out eps-MSE by t: {val}")
        t = stage("unet", t)
        pipe = StableDiffusionPipeline(vae=vae, unet=ema_u, text_encoder=ema_t, tokenizer=tokenizer,
                                       scheduler=comps["scheduler"], safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
    if cfg.n_examples:
        write_phantom_set(out / "examples", range(HELDOUT_SEED0, HELDOUT_SEED0 + cfg.n_examples), cfg.size)
    record["sizes_mb"] = {d: _mb(out / d) for d in ("unet", "vae", "text_encoder") if (out / d).exists()}
    record["total_s"] = round(time.perf_counter() - t_start, 1)
    stage("save", t)
    log(f"done in {record['total_s'] / 60:.1f} min: {out}")
    return out


# --------------------------------------------------------------------------------------------
def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_train_phantom_parser(sub) -> argparse.ArgumentParser:
    d = TrainConfig(out=Path("."))
    p = sub.add_parser("train-phantom", help="train a small SD-v1.5-layout model on procedural chest phantoms (CPU)")
    p.add_argument("--out", type=Path, required=True, help="folder to create (must not exist, or be empty)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default %(default)s)")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training patients (default %(default)s)")
    p.add_argument("--n-heldout", type=int, default=d.n_heldout, help="held-out patients (default %(default)s)")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help="default %(default)s")
    p.add_argument("--unet-steps", type=int, default=d.unet_steps, help="default %(default)s")
    p.add_argument("--cls-steps", type=int, default=d.cls_steps, help="classifier steps (default %(default)s)")
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--unet-batch", type=int, default=d.unet_batch)
    p.add_argument("--unet-lr", type=float, default=d.unet_lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--unet-channels", type=_channels, default=d.unet_channels, help="e.g. 32,64,64,64")
    p.add_argument("--vae-channels", type=_channels, default=d.vae_channels, help="e.g. 16,32,64,64")
    p.add_argument("--text-width", type=int, default=d.text_width)
    p.add_argument("--n-examples", type=int, default=d.n_examples, help="held-out phantoms written to examples/")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--attention-loss", type=float, default=d.attention_loss,
                   help="weight of the word-grounding loss: each attribute word's cross-attention trained into its "
                        "region, so that LocalBlend's word maps localise (default %(default)s: none)")
    p.add_argument("--attention-pixel-loss", type=float, default=d.attention_pixel_loss,
                   help="weight of the pixel-level grounding loss: every location of the region attends to its "
                        "words, none outside (TokenCompose's second loss; default %(default)s: none)")
    p.add_argument("--vae-from", type=Path, help="a trained phantom model whose VAE and classifier are reused (no VAE "
                                                 "or classifier training)")
    p.add_argument("--unet-from", type=Path, help="a trained phantom model whose UNet and text encoder training starts "
                                                  "from (fine-tuning; needs --vae-from, usually the same model)")
    return p


def run_train_phantom(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    if args.unet_from and not args.vae_from:
        print("error: --unet-from needs --vae-from (the UNet was trained on that VAE's latents); give the same model "
              "to both", file=sys.stderr)
        return 2
    cfg = TrainConfig(out=out, seed=args.seed, threads=args.threads, n_train=args.n_train, n_heldout=args.n_heldout,
                      vae_steps=args.vae_steps, unet_steps=args.unet_steps, cls_steps=args.cls_steps,
                      vae_batch=args.vae_batch, unet_batch=args.unet_batch, unet_lr=args.unet_lr,
                      unet_channels=args.unet_channels,
                      vae_channels=args.vae_channels, text_width=args.text_width, n_examples=args.n_examples,
                      log_every=args.log_every, attention_loss=args.attention_loss,
                      attention_pixel_loss=args.attention_pixel_loss,
                      vae_from=str(args.vae_from) if args.vae_from else None,
                      unet_from=str(args.unet_from) if args.unet_from else None)
    run(cfg)
    return 0
