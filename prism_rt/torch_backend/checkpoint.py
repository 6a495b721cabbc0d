"""Loading Stable Diffusion v1.x weights for the PyTorch backend (PRISM_METHOD.md §1).

PRISM fine-tunes the UNet only and releases it as a bare state dict, so three local layouts must
load into the same :class:`SDComponents`: a diffusers SD folder; that folder plus a separate UNet
state dict (``unet_weights``, possibly saved by Accelerate with a ``module.`` prefix); a single-file
checkpoint in the original LDM/CompVis key layout. Nothing is ever downloaded.

Why it is built the way it is:

* Pickle files (``.bin``, ``.ckpt``, ``.pt``) can execute code when loaded, so they are refused
  unless the caller passes ``allow_pickle``; even then they are read with
  ``torch.load(weights_only=True)``.
* Every state dict we apply ourselves is checked strictly (missing, unexpected keys, shapes): a
  silently half-loaded UNet produces plausible-looking but wrong radiographs.
* Single files are converted with diffusers' own LDM→diffusers functions
  (``diffusers.loaders.single_file_utils``) into models built from a local config folder, rather
  than with ``StableDiffusionPipeline.from_single_file``. The latter does work offline with a
  local ``config``, but it loads with ``strict=False``: a key missing from the file leaves that
  layer randomly initialised (without accelerate) or on the meta device (with it), without error.
* Hashes are streamed (files can be GBs) and recorded with library versions in ``provenance`` so
  that a result can be traced to the exact weights that produced it.
* torch & co. are imported inside functions so that this module imports without them and can
  report :class:`MissingExtraError` instead of an ImportError traceback.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, CheckpointKeysError, MissingExtraError, ModelError
from ..manifest import sha256_file  # noqa: F401  (re-exported: streamed, never the whole file in memory)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

EXPECTED = (
    "expected a diffusers Stable Diffusion folder (model_index.json, or unet/ vae/ text_encoder/ "
    "tokenizer/ subfolders) or a .safetensors single-file checkpoint"
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")
# weight-file stems: diffusers models, transformers models (safetensors stem, pickle stem)
_STEMS = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
          "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
          "text_encoder": ("model", "pytorch_model")}
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class SDComponents:
    """The loaded model: modules in eval mode, frozen, on the requested device and dtype."""

    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"
    tokenizer_dir: Path  # holds tokenizer.json, or vocab.json + merges.txt
    scheduler_config: dict  # the scheduler's config.json content ({} if none)
    image_size: int  # unet sample_size × the VAE's downsampling factor (512 for SD v1.5)
    scaling_factor: float  # latent scale (0.18215 for SD v1.x)
    provenance: dict = field(default_factory=dict)  # JSON-serialisable record of what was read


def _require_stack():
    """Import the backend's dependencies, or say which one is missing and how to install it."""
    for module in ("torch", "diffusers", "transformers", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError("torch", module, "The PyTorch backend") from None


def _versions() -> dict:
    import diffusers, safetensors, torch, transformers  # noqa: E401

    return {m.__name__: m.__version__ for m in (diffusers, transformers, torch, safetensors)}


def _resolve_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).removeprefix("torch.").lower())
    if name is None:
        raise ModelError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return getattr(torch, name)


def _read_state_dict(path: Path, allow_pickle: bool, what: str) -> dict:
    """Read a flat tensor dict from .safetensors (or, only if allowed, a pickle file)."""
    import torch

    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"{what} {path} is a pickle file ({path.suffix}), which can execute code when "
                "loaded; convert it to safetensors or pass --allow-pickle if you trust the file")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
    elif path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # SafetensorError, OSError, …: a corrupt or truncated file
            raise ModelError(f"cannot read {what} {path}: not a valid safetensors file "
                             f"({type(e).__name__}: {e})") from None
    else:
        raise ModelError(f"{what} {path} has an unknown format; expected a .safetensors file")
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # Lightning / LDM checkpoints nest the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{what} {path} does not hold a flat state dict of tensors")
    return sd


def load_state_dict_strict(module, sd: dict, what: str) -> None:
    """Load ``sd`` into ``module`` only if keys and shapes match exactly; name what differs."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointKeysError(what, missing, unexpected)
    for key, value in sd.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"{what} does not match the model: {key} has shape {tuple(value.shape)} in the "
                f"file but {tuple(expected[key].shape)} in the model; check that it is the same "
                "architecture (SD v1.x)")
    module.load_state_dict(sd, strict=True)


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or all((path / s).is_dir() for s in _SUBFOLDERS)


def _tokenizer_dir(folder: Path) -> Path:
    tok = folder / "tokenizer"
    if (tok / "tokenizer.json").is_file() or all(
            (tok / f).is_file() for f in ("vocab.json", "merges.txt")):
        return tok
    raise ModelError(f"{folder} has no usable tokenizer: {tok} needs tokenizer.json or "
                     "vocab.json + merges.txt")


def _scheduler_config(folder: Path) -> dict:
    cfg = folder / "scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the scheduler config {cfg}: {e}") from None


def _component_files(folder: Path, name: str, allow_pickle: bool) -> tuple[dict, list[Path]]:
    """Which weight files ``from_pretrained`` will read for a component, and how to ask for them."""
    sub = folder / name
    if not (sub / "config.json").is_file():
        raise ModelError(f"{folder} has no {name}/config.json; {EXPECTED}")
    stem, pickle_stem = _STEMS[name]
    single, index = sub / f"{stem}.safetensors", sub / f"{stem}.safetensors.index.json"
    if single.is_file():
        return {"use_safetensors": True}, [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the shard index {index}: {e}") from None
        return {"use_safetensors": True}, [sub / s for s in shards]
    variants = sorted(sub.glob(f"{stem}.*.safetensors"))  # e.g. <stem>.fp16.safetensors
    if variants:
        variant = variants[0].name[len(stem) + 1:-len(".safetensors")]
        return {"use_safetensors": True, "variant": variant}, [variants[0]]
    pickles = sorted(sub.glob(f"{pickle_stem}*.bin"))
    if pickles:
        if not allow_pickle:
            raise ModelError(
                f"{sub} holds only pickle weights ({pickles[0].name}), which can execute code when "
                "loaded; convert them to safetensors or pass --allow-pickle if you trust the file")
        return {"use_safetensors": False}, pickles
    raise ModelError(f"{sub} holds no weights ({stem}.safetensors expected)")


def _load_diffusers_folder(folder: Path, allow_pickle: bool, dtype, weights: list) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    # every component's files are checked (pickle!) before the first, possibly slow, load
    plan = {name: _component_files(folder, name, allow_pickle) for name in _STEMS}
    models = []
    # the CLIP text encoder is cast afterwards: transformers 4 calls the argument torch_dtype, 5 dtype
    for name, cls, dtype_kw in (("unet", UNet2DConditionModel, {"torch_dtype": dtype}),
                                ("vae", AutoencoderKL, {"torch_dtype": dtype}),
                                ("text_encoder", CLIPTextModel, {})):
        kwargs, files = plan[name]
        try:
            models.append(cls.from_pretrained(str(folder), subfolder=name, local_files_only=True,
                                              **dtype_kw, **kwargs))
        except Exception as e:
            raise ModelError(f"cannot load the {name} from {folder / name}: "
                             f"{type(e).__name__}: {e}") from None
        weights += [{"path": str(f.resolve()), "sha256": sha256_file(f)} for f in files]
    return tuple(models)


def _load_single_file(path: Path, config: Path, allow_pickle: bool, weights: list) -> tuple:
    """Convert an LDM-layout single file with diffusers' converters into ``config``'s models."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)
    except ImportError as e:
        raise ModelError(f"this diffusers version lacks the LDM single-file converters ({e}); "
                         "convert the checkpoint to a diffusers folder first") from None
    sd = _read_state_dict(path, allow_pickle, "single-file checkpoint")
    weights.append({"path": str(path.resolve()), "sha256": sha256_file(path)})
    for prefix, part in (("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"),
                         ("cond_stage_model.transformer.", "CLIP text encoder")):
        if not any(k.startswith(prefix) for k in sd):
            hint = (" (it looks like a diffusers UNet state dict: pass it as the UNet weights "
                    "together with a diffusers SD folder)" if "conv_in.weight" in sd else "")
            raise ModelError(f"{path} is not an SD v1.x single-file checkpoint: it has no {part} "
                             f"keys ({prefix}*){hint}; {EXPECTED}")
    try:
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(config), subfolder="unet", local_files_only=True))
        vae = AutoencoderKL.from_config(
            AutoencoderKL.load_config(str(config), subfolder="vae", local_files_only=True))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(
            str(config), subfolder="text_encoder", local_files_only=True))
    except Exception as e:
        raise ModelError(f"cannot build the models from the configs in {config}: "
                         f"{type(e).__name__}: {e}") from None
    clip_sd = convert_ldm_clip_checkpoint(sd)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    te_keys = text_encoder.state_dict()
    clip_sd = {k: v for k, v in clip_sd.items() if k in te_keys or not k.endswith("position_ids")}
    for module, convert, part in (
        (unet, lambda: convert_ldm_unet_checkpoint(sd, dict(unet.config)), "UNet"),
        (vae, lambda: convert_ldm_vae_checkpoint(sd, dict(vae.config)), "VAE"),
        (text_encoder, lambda: clip_sd, "text encoder"),
    ):
        what = f"the {part} of {path}"
        try:
            converted = convert()
        except Exception as e:  # the converters index by the config's block layout
            raise ModelError(f"{what} does not fit the configs in {config} ({type(e).__name__}: "
                             f"{e}); pass a --config folder of the same architecture") from None
        load_state_dict_strict(module, {k: v for k, v in converted.items() if v is not None}, what)
    del sd
    return unet, vae, text_encoder


def _load_unet_weights(unet, path: Path, allow_pickle: bool) -> dict:
    """Apply a fine-tuned UNet state dict (PRISM's release); strip Accelerate's ``module.``."""
    if path.is_dir():  # an Accelerate / save_pretrained output folder
        found = [path / n for n in ("model.safetensors", "diffusion_pytorch_model.safetensors")
                 if (path / n).is_file()]
        if not found:
            raise ModelError(f"UNet weights folder {path} holds no model.safetensors")
        path = found[0]
    if not path.is_file():
        raise ModelError(f"UNet weights {path} do not exist")
    sd = _read_state_dict(path, allow_pickle, "UNet weights")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    load_state_dict_strict(unet, sd, f"UNet weights {path}")
    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


def load_checkpoint(model, *, unet_weights=None, allow_pickle: bool = False, config=None,
                    device="cpu", dtype=None) -> SDComponents:
    """Load an SD v1.x model from local files.

    ``model``: a diffusers SD folder or a single-file LDM checkpoint (``.safetensors``; ``.ckpt``
    only with ``allow_pickle``). ``config``: a local diffusers SD v1.x folder giving the component
    configs and the tokenizer — required for single files (configs are never downloaded), unused
    otherwise. ``unet_weights``: a UNet state dict file replacing the UNet's weights. ``dtype``:
    a torch dtype or its name (default float32).
    """
    _require_stack()
    import torch

    dtype = _resolve_dtype(dtype)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; {EXPECTED}")
    weights: list[dict] = []
    if path.is_dir():
        if not _is_diffusers_folder(path):
            raise ModelError(f"{path} is not a model folder; {EXPECTED}")
        fmt, source = "diffusers", path
    elif path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        if config is None:
            raise ModelError(
                f"{path} is a single-file checkpoint, whose component configs cannot be downloaded "
                "here; pass --config DIR (a diffusers SD v1.x folder with the same architecture, "
                "which also provides the tokenizer)")
        source = Path(config).expanduser()
        if not source.is_dir() or not _is_diffusers_folder(source):
            raise ModelError(f"config {source} is not a diffusers SD folder; --config needs a "
                             "folder with model_index.json or unet/ vae/ text_encoder/ tokenizer/")
        fmt = "single-file"
    else:
        raise ModelError(f"{path} is not a model: {EXPECTED}")
    tokenizer_dir, scheduler_config = _tokenizer_dir(source), _scheduler_config(source)
    if fmt == "diffusers":
        unet, vae, text_encoder = _load_diffusers_folder(path, allow_pickle, dtype, weights)
    else:
        unet, vae, text_encoder = _load_single_file(path, source, allow_pickle, weights)
    unet_record = None
    if unet_weights is not None:
        unet_record = _load_unet_weights(unet, Path(unet_weights).expanduser(), allow_pickle)
    try:
        for module in (unet, vae, text_encoder):
            if next(module.parameters()).dtype != dtype:  # (diffusers warns on any dtype cast)
                module.to(dtype=dtype)
            module.to(torch.device(device)).eval().requires_grad_(False)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:  # no CUDA build: Assertion
        raise BackendError(f"cannot move the model to device {device!r} as {dtype}: {e}") from None
    provenance = {
        "format": fmt, "path": str(path.resolve()),
        "config": str(source.resolve()) if fmt == "single-file" else None,
        "weights": weights, "unet_weights": unet_record,
        "dtype": str(dtype).removeprefix("torch."), "device": str(device), "versions": _versions(),
    }
    return SDComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer_dir=tokenizer_dir,
        scheduler_config=scheduler_config,
        image_size=int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        scaling_factor=float(vae.config.scaling_factor), provenance=provenance,
    )
