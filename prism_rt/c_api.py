"""The Python side of the C ABI (``bindings/c/prism_rt.h``): plain strings, bytes and JSON in and
out, so the C++ glue only converts types and holds the GIL.

Options are JSON objects whose keys are ``prism-rt edit``'s long flags with underscores
(``{"steps": 3, "self_replace": [0.5], "inversion": "direct"}``), checked by the config
dataclasses; an unknown key is refused with a :class:`SettingsError` that lists the known ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import ControlConfig, Fit, InversionConfig, OrtOptions, RunLimits
from .engine import Engine, is_engine_dir
from .errors import InputImageError, PrismError, SettingsError
from .image_limits import DEFAULT_MAX_PIXELS
from .imageio import load_image, to_uint

ENGINE_KEYS = ("backend", "device", "precision", "threads", "self_max_queries", "no_cpu_arena", "portable_graphs",
               "trt_cache", "unet_weights", "config", "allow_pickle")
SAMPLER_KEYS = ("inversion", "steps", "guidance", "fit", "null_inner_steps", "max_pixels")
CONTROL_KEYS = ("mode", "cross_replace", "self_replace", "edit_weight", "edit_words", "blend_words", "blend_threshold",
                "blend_dilation", "edit_negative", "noise_blend", "noise_blend_threshold", "composite", "legacy")
EDIT_KEYS = SAMPLER_KEYS + CONTROL_KEYS + ("max_batch",)
WHOLE_KEYS = ("blend_dilation", "steps", "null_inner_steps", "max_pixels", "max_batch", "threads", "self_max_queries")
NUMBER_KEYS = ("guidance", "cross_replace", "edit_weight", "blend_threshold")
TUPLE_KEYS = ("self_replace", "edit_words", "blend_words", "noise_blend_threshold", "composite")


def _options(text: str | None, known: tuple[str, ...], what: str) -> dict:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"{what} is not valid JSON ({exc}): give an object such as {{\"steps\": 3}}") from None
    if not isinstance(options, dict):
        raise SettingsError(f"{what} must be a JSON object, got {type(options).__name__}")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SettingsError(f"{what} has unknown keys {unknown}; the known keys are {', '.join(known)}")
    for key, value in options.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = number and float(value).is_integer()
        if value is not None and ((key in WHOLE_KEYS and not whole) or (key in NUMBER_KEYS and not number)):
            raise SettingsError(f"{what}: {key} must be a {'whole ' if key in WHOLE_KEYS else ''}number, got {value!r}")
    return {k: _tuple(v) if k in TUPLE_KEYS else int(v) if k in WHOLE_KEYS and v is not None else v
            for k, v in options.items()}


def _tuple(value):
    """A JSON list as a tuple, one number as a tuple of one (``"self_replace": 0.5``)."""
    if isinstance(value, list):
        return tuple(value)
    return (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _take(options: dict, *keys: str) -> dict:
    """The given keys' entries, removed from ``options``."""
    return {k: options.pop(k) for k in keys if k in options}


def _checked(make, what: str):
    """A config made from JSON values; a wrong JSON type (a string for a number) is a SettingsError too."""
    try:
        return make()
    except PrismError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{what}: {exc}") from None


def load_engine(path: str, options_json: str | None = None) -> Engine:
    """``Engine.load`` with ``prism-rt``'s model flags as JSON keys (``precision``, ``device``, ``threads``…)."""
    o = _options(options_json, ENGINE_KEYS, "the engine options")
    ort = {"cpu_arena": not o.pop("no_cpu_arena", False), "cpu_graphs": not o.pop("portable_graphs", False)}
    if "trt_cache" in o:  # a folder, or "off" as on the command line
        ort["trt_cache"] = False if o["trt_cache"] == "off" else o["trt_cache"]
        del o["trt_cache"]
    if is_engine_dir(path):
        o["options"] = _checked(lambda: OrtOptions(threads=o.pop("threads", None), **ort), "the engine options")
    elif ort != {"cpu_arena": True, "cpu_graphs": True}:  # what Engine.load would refuse less clearly
        raise SettingsError("no_cpu_arena, portable_graphs and trt_cache are onnxruntime settings; "
                            f"{path} is a checkpoint, run on torch")
    return _checked(lambda: Engine.load(path, **o), "the engine options")


def _image(path: str | None, pixels, height: int, width: int, bits: int, max_pixels: int):
    if (path is None) == (pixels is None):
        raise InputImageError("give the image as a file path or as a pixel buffer, exactly one of the two")
    if path is not None:
        return load_image(path, max_pixels=max_pixels)
    if bits not in (8, 16):
        raise InputImageError(f"a pixel buffer is 8 or 16 bits a pixel, got bits={bits}")
    if height < 1 or width < 1 or height * width > max_pixels:
        raise InputImageError(f"a pixel buffer of {height}×{width} is outside 1…{max_pixels:,} pixels; "
                              "raise max_pixels for larger radiographs")
    dtype = np.uint8 if bits == 8 else np.uint16
    array = np.frombuffer(pixels, dtype=dtype, count=height * width).reshape(height, width)
    return array.astype(np.float32) / np.float32(2 ** bits - 1)


def edit(engine: Engine, image_path: str | None, pixels, height: int, width: int, bits: int, source: str,
         targets: list[str], options_json: str | None = None) -> tuple[list[tuple[int, int, bytes]], str]:
    """Invert the image under ``source`` and edit it to each of ``targets``. Returns the
    counterfactuals (one per item: target × self-window …) at the input's geometry as (height,
    width, native-endian uint16 bytes in [0, 65535]), and a result.json-like record."""
    o, what = _options(options_json, EDIT_KEYS, "the edit options"), "the edit options"
    image = _image(image_path, pixels, int(height), int(width), int(bits), int(o.pop("max_pixels", DEFAULT_MAX_PIXELS)))
    sampler = _checked(lambda: engine.sampler(**_take(o, "steps", "guidance")), what)
    inversion_config = _checked(lambda: InversionConfig(**_take(o, "null_inner_steps")), what)
    method, fit = o.pop("inversion", None), _checked(lambda: Fit(o.pop("fit", Fit.RESIZE.value)), what)
    limits = _checked(lambda: RunLimits(**_take(o, "max_batch")), what)
    control = _checked(lambda: ControlConfig(**o), what)
    if isinstance(targets, str) or not targets:
        raise SettingsError("give at least one edited caption (target)")
    _checked(lambda: control.check_inversion(engine.check_inversion_method(method)), what)
    inversion = engine.invert(image, source, method=method, sampler=sampler, inversion=inversion_config, fit=fit)
    result = engine.edit(inversion, list(targets), control, limits)
    images = [to_uint(x, 16) for x in result.images("input")]
    record = {
        "source_prompt": source, "targets": list(targets),
        "inversion": {"method": inversion.method.value, "sampler": inversion.sampler.__dict__,
                      "timings": inversion.meta.get("timings", {}), "counts": inversion.meta.get("counts", {})},
        "reconstruction_error": result.reconstruction_error,
        "items": result.item_stats(),
        "edit_words": [list(words) for words in result.plan_words],
        "timings": result.timings, "counts": result.counts, "settings": result.settings, "warnings": result.warnings,
        "provenance": {key: inversion.meta.get(key, {}) for key in ("source_image", "fit", "model", "backend")},
        "images": {"geometry": "input", "dtype": "uint16", "range": [0, 65535]},
    }
    shaped = [(int(x.shape[0]), int(x.shape[1]), np.ascontiguousarray(x).tobytes()) for x in images]
    return shaped, json.dumps(record, default=_jsonable)


def error_line(exc: BaseException) -> str:
    """One line for ``prism_last_error``: a PrismError's own text, else the exception's type and text."""
    text = str(exc) if isinstance(exc, PrismError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
