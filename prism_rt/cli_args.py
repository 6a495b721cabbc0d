"""The command-line pieces every ``prism-rt`` subcommand shares (``edit``, ``invert``, ``batch``,
``serve``, ``triton-repo``): the parser class, argument types, the model / inversion / common flag
groups, and turning parsed arguments into settings and an Engine. Defaults come from the config
dataclasses, the one source of them."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .config import ControlConfig, Fit, InversionConfig, InversionMethod, OrtOptions, SamplerConfig
from .precision import CHOICES as PRECISIONS


def default(cls, name: str):
    """A config dataclass field's default: the one source of the CLI's defaults."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line naming the flag, with a pointer to --help."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show a default only where it says something
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help
        return super()._get_help_string(action)


def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.4,0.6; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def pair(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not any(parts):
        raise argparse.ArgumentTypeError(f"expected SRC_WORD,EDIT_WORD such as devices,devices (one side may be empty: "
                                         f"Devices, for a removal); got {text!r}")
    return parts[0], parts[1]


def trt_cache(text: str):
    if text.strip().lower() in ("off", "none", "no", "false", "0"):
        return False
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, or off")
    return Path(text)


def path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


def words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def model_args(p: argparse.ArgumentParser, model_required: bool = True):
    g = p.add_argument_group("model")
    g.add_argument("--model", type=path, required=model_required,
                   help="an engine folder from `prism-export export` (runs on onnxruntime), or a diffusers SD v1.x "
                        "folder / single-file .safetensors checkpoint (runs on torch)")
    g.add_argument("--backend", choices=["onnxruntime", "torch"],
                   help="default: what --model is (engine folder: onnxruntime; checkpoint: torch)")
    g.add_argument("--device", default="cpu",
                   help="torch: cpu or cuda[:N]; onnxruntime: cpu, cuda[:N] or tensorrt[:N] (execution provider)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="an engine folder's variant (`prism-rt info ENGINE` lists them with their measured quality); "
                        "torch: fp32 or fp16 graphs (loops stay fp32)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="torch on CUDA: replay the UNet call of each loop from a CUDA graph (default: on for CUDA; "
                        "one capture per batch shape)")
    g.add_argument("--channels-last", action="store_true",
                   help="torch: NHWC memory layout for the UNet and VAE convolutions (same outputs; on CUDA possibly "
                        "faster: benchmarks/gpu_check.sh measures it)")
    g.add_argument("--io-binding", action=argparse.BooleanOptionalAction, default=None,
                   help="onnxruntime: keep the loops' arrays on the device as torch tensors bound by pointer (no host "
                        "copy per step; default: on for cuda/tensorrt where torch is installed)")
    g.add_argument("--threads", type=positive,
                   help="CPU threads of onnxruntime / torch (default: every core; on a shared machine 1–2 is often "
                        "much faster)")
    g.add_argument("--unet-weights", type=path, help="checkpoint: a fine-tuned UNet state dict (PRISM's model.safetensors)")
    g.add_argument("--config", type=path, help="checkpoint: a diffusers SD folder giving configs and tokenizer for a "
                                                 "single-file checkpoint")
    g.add_argument("--allow-pickle", action="store_true", help="checkpoint: allow .ckpt/.bin pickle weights (they can "
                                                               "execute code)")
    g.add_argument("--self-max-queries", type=positive,
                   help="self-attention layers with at most this many queries are controlled (PRISM 1024, the torch "
                        "default; p2p 256); an engine folder has the value it was exported with")
    g.add_argument("--no-cpu-arena", action="store_true",
                   help="onnxruntime on a CPU: free every tensor after each call (lower resident memory, slower)")
    g.add_argument("--portable-graphs", action="store_true",
                   help="onnxruntime on a CPU: run the portable graphs TensorRT builds from instead of the CPU twins "
                        "with fused attention (same outputs to ~1e-6, far more memory at SD v1.5 size)")
    g.add_argument("--trt-cache", type=trt_cache, metavar="DIR|off",
                   help="onnxruntime on --device tensorrt: keep TensorRT's built engines and timing cache in DIR "
                        "(default ENGINE/trt-cache, or ~/.cache/prism_rt/trt where the engine folder is read-only); "
                        "off: build anew in each process")
    g.add_argument("--trt-max-edits", type=positive, metavar="K",
                   help="onnxruntime on --device tensorrt: edit items per image the TensorRT profiles are built for "
                        "(default: what the engine's manifest records, one edit × five self values)")
    g.add_argument("--trt-max-groups", type=positive, metavar="G",
                   help="onnxruntime on --device tensorrt: images per UNet call the profiles are built for (default 1)")


def invert_args(p: argparse.ArgumentParser, required_prompt: bool):
    from .imageio import DEFAULT_MAX_PIXELS

    g = p.add_argument_group("image and inversion")
    g.add_argument("--image", type=path, required=required_prompt, help="PNG, JPEG (8/16 bit) or DICOM radiograph")
    g.add_argument("--prompt", required=required_prompt, help="the source caption")
    g.add_argument("--inversion", choices=[m.value for m in InversionMethod],
                   help="default: null-text on torch (PRISM's), direct on onnxruntime (no gradients there)")
    g.add_argument("--steps", type=int, default=default(SamplerConfig, "steps"), help="DDIM steps")
    g.add_argument("--guidance", type=float, default=default(SamplerConfig, "guidance"),
                   help="classifier-free guidance scale, in [1, 30]")
    g.add_argument("--fit", default=Fit.RESIZE.value, choices=[f.value for f in Fit],
                   help="how the image is fitted to the model's square")
    g.add_argument("--null-inner-steps", type=int, default=default(InversionConfig, "null_inner_steps"),
                   help="null-text: optimisation steps per diffusion step")
    g.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (checked from the header, before decoding)")


def common_args(p: argparse.ArgumentParser):
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks of internal errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


# -- settings from the arguments (checked by the dataclasses themselves) ---------------------------
def control_from_args(args) -> ControlConfig:
    return ControlConfig(cross_replace=args.cross_replace, self_replace=tuple(args.self_replace),
                         edit_weight=args.edit_weight, edit_words=args.edit_words, blend_words=args.blend_words,
                         blend_threshold=args.blend_threshold,
                         blend_dilation=args.blend_dilation, noise_blend=args.noise_blend,
                         noise_blend_threshold=args.noise_blend_threshold, composite=tuple(args.composite),
                         mode=args.mode, legacy=args.legacy, edit_negative=args.edit_negative)


def load_engine(args):
    from .engine import Engine
    from .errors import BackendError

    if getattr(args, "io_binding", None) is not None and not is_engine_args(args):
        raise BackendError("--io-binding applies to engine folders on onnxruntime; the torch backend's loops already "
                           "keep their arrays on the device")

    options = OrtOptions(threads=args.threads, cpu_arena=not args.no_cpu_arena, cpu_graphs=not args.portable_graphs,
                         trt_cache=args.trt_cache, deployment=deployment_from_args(args),
                         io_binding=getattr(args, "io_binding", None))
    return Engine.load(args.model, backend=args.backend, device=args.device, precision=args.precision,
                       self_max_queries=args.self_max_queries, unet_weights=args.unet_weights, config=args.config,
                       allow_pickle=args.allow_pickle, threads=args.threads,
                       **({"cuda_graphs": args.cuda_graphs} if getattr(args, "cuda_graphs", None) is not None else {}),
                       **({"channels_last": True} if getattr(args, "channels_last", False) else {}),
                       **({"options": options} if is_engine_args(args) else {}))


def deployment_from_args(args):
    """--trt-max-edits / --trt-max-groups over the manifest's deployment; None when neither is given."""
    edits, groups = getattr(args, "trt_max_edits", None), getattr(args, "trt_max_groups", None)
    if edits is None and groups is None:
        return None
    import json

    from .deployment import Deployment

    try:  # an unreadable manifest is refused, with its fix, when the engine loads
        recorded = json.loads((Path(args.model) / "manifest.json").read_text(encoding="utf-8")).get("deployment") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    base = Deployment.from_json(recorded)
    return Deployment(max_edits=edits or base.max_edits, max_groups=groups or base.max_groups)


def is_engine_args(args) -> bool:
    from .engine import is_engine_dir

    return args.backend == "onnxruntime" or (args.backend is None and is_engine_dir(args.model))


