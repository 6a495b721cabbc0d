"""How much noise error int8-cpu's quantized convolutions add at best (a study, run by hand).

Each 3×3 convolution int8-cpu quantizes (every one outside ``UNET_FLOAT_SCOPES``: the ResNet
``conv1`` / ``conv2`` and the down / up samplers) is emulated in torch the way ONNX Runtime's
``QLinearConv`` computes it: u8 asymmetric per-tensor input, s8 symmetric per-output-channel
weights, u8 per-tensor output. Each activation range is that call's own min / max, which no static
calibration can beat, so the figures are a floor for static quantization of those layers. Linear
layers stay float. For several sets of convolutions the script reports the rms noise error
``rms(ε_q − ε) / rms(ε)`` of one UNet call against fp32:

    python benchmarks/int8_conv_floor.py --unet /path/to/stable-diffusion-v1-5/unet --out floor.json

Inputs: batch 2 (one guided step) at one timestep; latents and text embeddings N(0, 1) (``--seed``),
or, with ``--image`` and ``--prompt`` (a full diffusers model folder), the image's VAE latents noised
to the timestep and the text encoder's embeddings of "" and the prompt — what a trained model sees.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def fake_quant_activation(x, bits: int = 8, fixed: tuple | None = None):
    """u8 asymmetric per-tensor quantize → dequantize over x's own range, or over ``fixed`` (lo, hi)
    (a static calibration's range); 0 is always representable."""
    import torch

    lo, hi = (x.min(), x.max()) if fixed is None else (torch.tensor(fixed[0]), torch.tensor(fixed[1]))
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    levels = 2 ** bits - 1
    scale = torch.clamp((hi - lo) / levels, min=torch.finfo(x.dtype).tiny)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def fake_quant_weight(w):
    """s8 symmetric per-output-channel quantize → dequantize ([-127, 127], zero point 0)."""
    import torch

    scale = torch.clamp(w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True) / 127, min=torch.finfo(w.dtype).tiny)
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


class Emulation:
    """Swaps chosen convolutions of ``unet`` for their QLinearConv emulation, and back."""

    def __init__(self, unet, float_scopes):
        import torch

        from prism_export.variants import in_scope

        self.convs = {name: m for name, m in unet.named_modules()
                      if isinstance(m, torch.nn.Conv2d) and not any(in_scope([name], s) for s in float_scopes)}
        self.weights = {name: m.weight.data.clone() for name, m in self.convs.items()}
        self.hooks: list = []
        self.ranges: dict[tuple[str, str], tuple[float, float]] = {}  # (conv, "in" | "out") → static range

    def record(self):
        """Widen ``ranges`` by every call until the next ``set`` (a MinMax calibration)."""
        def widen(key, x):
            lo, hi = self.ranges.get(key, (float("inf"), float("-inf")))
            self.ranges[key] = (min(lo, float(x.min())), max(hi, float(x.max())))

        self.set([])
        for name, module in self.convs.items():
            self.hooks.append(module.register_forward_pre_hook(lambda mod, args, n=name: widen((n, "in"), args[0])))
            self.hooks.append(module.register_forward_hook(lambda mod, args, y, n=name: widen((n, "out"), y)))

    def set(self, names, activation_bits: int = 8, inputs: bool = True, weights: bool = True, outputs: bool = True,
            static: bool = False):
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for name, module in self.convs.items():
            module.weight.data.copy_(self.weights[name])
        for name in names:
            module = self.convs[name]
            if weights:
                module.weight.data.copy_(fake_quant_weight(self.weights[name]))
            fixed_in, fixed_out = (self.ranges[(name, "in")], self.ranges[(name, "out")]) if static else (None, None)
            if inputs:
                self.hooks.append(module.register_forward_pre_hook(
                    lambda mod, args, b=activation_bits, r=fixed_in: (fake_quant_activation(args[0], b, r), *args[1:])))
            if outputs:
                self.hooks.append(module.register_forward_hook(
                    lambda mod, args, y, b=activation_bits, r=fixed_out: fake_quant_activation(y, b, r)))


class Inputs:
    """One guided call's UNet inputs at a timestep: random, or a real image and caption."""

    def __init__(self, unet, model: Path, image: Path | None, prompt: str | None, seed: int):
        import torch

        self.g = torch.Generator().manual_seed(seed)
        cfg = unet.config
        self.shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.width = cfg.cross_attention_dim
        self.x0 = self.text = None
        if image is not None:
            self._encode(model, image, prompt)

    def _encode(self, model: Path, image: Path, prompt: str):
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        from prism_rt.imageio import fit_to_model, load_image

        vae = AutoencoderKL.from_pretrained(model / "vae").eval()
        side = self.shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)
        pixels, _ = fit_to_model(load_image(image).pixels, side)
        tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
        ids = tokenizer(["", prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            self.x0 = vae.encode(torch.from_numpy(pixels)[None]).latent_dist.mean * vae.config.scaling_factor
            self.text = CLIPTextModel.from_pretrained(model / "text_encoder").eval()(ids).last_hidden_state
        self.scheduler = DDIMScheduler.from_pretrained(model / "scheduler")

    def at(self, timestep: int):
        import torch

        noise = torch.randn(self.shape, generator=self.g)
        if self.x0 is None:
            return torch.cat([noise, torch.randn(self.shape, generator=self.g)]), \
                torch.randn(2, 77, self.width, generator=self.g)
        latents = self.scheduler.add_noise(self.x0, noise, torch.tensor([timestep]))
        return latents.repeat(2, 1, 1, 1), self.text


def main(argv=None) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from prism_export.variants import UNET_FLOAT_SCOPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", type=Path, required=True, help="a diffusers UNet folder (or a model folder holding unet/)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--timestep", type=int, default=500)
    p.add_argument("--image", type=Path, help="a radiograph (PNG / JPEG / DICOM); needs --prompt and a model folder")
    p.add_argument("--prompt", help="its caption")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--calibration-timesteps", default="",
                   help="comma-separated timesteps: also report static ranges calibrated on calls at these "
                        "timesteps (other latents and text, same distribution), as int8-cpu's build does")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.image is None) != (args.prompt is None):
        p.error("--image and --prompt go together")
    folder = args.unet / "unet" if (args.unet / "unet" / "config.json").exists() else args.unet
    if args.image is not None and folder == args.unet:
        p.error("--image needs a full model folder (vae/, text_encoder/, tokenizer/, scheduler/ beside unet/)")
    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    emulation = Emulation(unet, UNET_FLOAT_SCOPES)
    quantized = list(emulation.convs)
    if not quantized:
        raise SystemExit(f"{folder}: no convolution outside the float scopes {UNET_FLOAT_SCOPES}")

    inputs = Inputs(unet, args.unet, args.image, args.prompt, args.seed)
    latents, text = inputs.at(args.timestep)

    def call():
        with torch.no_grad():
            return unet(latents, torch.tensor(args.timestep), encoder_hidden_states=text).sample

    started = time.perf_counter()
    reference = call()
    call_s = time.perf_counter() - started
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    within = lambda prefix: [n for n in quantized if n == prefix or n.startswith(prefix + ".")]  # noqa: E731
    up_blocks = {".".join(n.split(".")[:2]) for n in within("up_blocks")}
    last_up = max(up_blocks, key=lambda b: int(b.split(".")[1])) if up_blocks else None
    sets = {
        "all (input + weights + output, as QLinearConv)": dict(names=quantized),
        "all, no output requantization": dict(names=quantized, outputs=False),
        "all, input only": dict(names=quantized, weights=False, outputs=False),
        "all, output only": dict(names=quantized, inputs=False, weights=False),
        "all, weights only": dict(names=quantized, inputs=False, outputs=False),
        "all, 10-bit activations": dict(names=quantized, activation_bits=10),
        "down_blocks": dict(names=within("down_blocks")),
        "mid_block": dict(names=within("mid_block")),
        "up_blocks": dict(names=within("up_blocks")),
        "down / up samplers": dict(names=[n for n in quantized if "samplers." in n]),
    }
    calibration = [int(t) for t in args.calibration_timesteps.split(",") if t.strip()]
    if calibration:
        emulation.record()
        for t in calibration:
            calibration_latents, calibration_text = inputs.at(t)
            with torch.no_grad():
                unet(calibration_latents, torch.tensor(t), encoder_hidden_states=calibration_text)
        sets[f"all, static ranges from t = {args.calibration_timesteps}"] = dict(names=quantized, static=True)
    if last_up:
        sets[f"all but {last_up}"] = dict(names=[n for n in quantized if n not in within(last_up)])
        sets.update({f"only {n}": dict(names=[n]) for n in within(last_up)})
    results = {"unet": str(folder), "timestep": args.timestep, "seed": args.seed,
               "inputs": {"image": str(args.image), "prompt": args.prompt} if args.image else "N(0, 1)", "fp32_call_s": round(call_s, 2),
               "float_scopes": list(UNET_FLOAT_SCOPES), "quantized_convolutions": len(quantized), "sets": {}}
    for name, settings in sets.items():
        if not settings["names"]:
            continue
        emulation.set(**settings)
        error = rms(call() - reference) / rms(reference)
        results["sets"][name] = {"convolutions": len(settings["names"]), "noise_rms": round(error, 5)}
        print(f"{name:48s} {len(settings['names']):3d} convs  {100 * error:5.2f} %", flush=True)
    emulation.set([])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
