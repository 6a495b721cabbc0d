"""The model ``prism-rt serve`` puts on Triton: its tensors, each request's checks, and the batch of
requests Triton's dynamic batcher hands over, run through :meth:`Engine.edit_many`.

Tensors (Triton's batch dimension first; one image per request):

==================  ======  ===============  ==================================================
``image``           UINT16  [1, H, W]        the radiograph's grey levels, 0…65535 (an 8-bit
                                             image is sent widened: level × 257)
``prompt``          BYTES   [1, 1]           its source caption
``targets``         BYTES   [1, K]           the edited captions
``params``          BYTES   [1, 1]           JSON: ``prism-rt edit``'s settings under their
                                             long-flag names (:data:`PARAM_KEYS`); ``{}`` for
                                             PRISM's defaults
``keep_mask``       UINT8   [1, H, W]        optional: nonzero where the image must never change
``edit_mask``       UINT8   [1, H, W]        optional: nonzero where the edit may act
                                             (``prism_rt.user_masks``; the image's H, W)
``counterfactuals`` UINT16  [1, K·S, H, W]   one per edit item, at the input's geometry
``result``          BYTES   [1, 1]           JSON: items, reconstruction_error, timings, settings
==================  ======  ===============  ==================================================

This module imports no Triton code: :class:`EditService` maps a list of requests (dicts of numpy
arrays) to a list of responses, so it runs the same under PyTriton and in a plain test.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .config import ControlConfig, Fit, InversionConfig, InversionMethod, RunLimits, SamplerConfig
from .errors import PrismError, SettingsError

INPUTS = (("image", np.uint16, (-1, -1)), ("prompt", bytes, (1,)), ("targets", bytes, (-1,)), ("params", bytes, (1,)))
OPTIONAL_INPUTS = (("keep_mask", np.uint8, (-1, -1)), ("edit_mask", np.uint8, (-1, -1)))
OUTPUTS = (("counterfactuals", np.uint16, (-1, -1, -1)), ("result", bytes, (1,)))
"""(name, dtype, shape without Triton's batch dimension) of the model's tensors."""

SAMPLER_KEYS = ("inversion", "steps", "guidance", "fit", "null_inner_steps")
CONTROL_KEYS = ("mode", "cross_replace", "self_replace", "edit_weight", "edit_words", "blend_words",
                "blend_threshold", "blend_dilation", "edit_negative", "noise_blend", "noise_blend_threshold", "composite",
                "legacy")
PARAM_KEYS = SAMPLER_KEYS + CONTROL_KEYS + ("seed",)
"""The ``params`` keys: ``prism-rt edit``'s flags with underscores (``--self-replace`` →
``self_replace``); ``seed`` is recorded only (every step is deterministic)."""

DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_MAX_TARGETS = 8


class RequestError(PrismError, ValueError):
    """One request is malformed or asks for something refused; the message says which and why."""


@dataclass(frozen=True)
class EditSettings:
    """One request's settings. Requests run as one ``edit_many`` call (one UNet batch per step)
    only where their :meth:`group_key` matches: inversion method, steps and guidance (the sampler
    every inversion of the call shares), the whole :class:`ControlConfig` (one control plan per
    call) and the number of targets (``edit_many`` stacks each image's items). ``fit`` and
    ``null_inner_steps`` act on each image's own inversion and need not match."""

    method: InversionMethod
    steps: int
    guidance: float
    fit: Fit
    null_inner_steps: int
    control: ControlConfig
    seed: int = 0

    def group_key(self, targets: int) -> tuple:
        return self.method, self.steps, self.guidance, self.control, targets

    def to_json(self) -> dict:
        control = {f.name: getattr(self.control, f.name) for f in fields(ControlConfig)}
        return {"inversion": self.method.value, "steps": self.steps, "guidance": self.guidance, "fit": self.fit.value,
                "null_inner_steps": self.null_inner_steps, "seed": self.seed, **control}


def parse_params(text: str, engine) -> EditSettings:
    """``params`` JSON → settings, checked by the config dataclasses (as ``prism-rt edit``'s flags)."""
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise RequestError(f"params is not valid JSON ({exc.msg} at character {exc.pos}); send an object such as "
                           '{"steps": 50, "self_replace": [0.5]}') from None
    if not isinstance(raw, dict):
        raise RequestError(f"params must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(PARAM_KEYS))
    if unknown:
        raise RequestError(f"unknown params {', '.join(map(repr, unknown))}; known: {', '.join(PARAM_KEYS)}")
    control = {k: _tuple(k, raw[k]) for k in CONTROL_KEYS if k in raw}
    if control.get("blend_words") is not None and len(control["blend_words"]) != 2:
        raise RequestError(f"params: blend_words is [source word, edit word], got {json.dumps(raw['blend_words'])}")
    try:
        for key in ("steps", "null_inner_steps", "seed", "blend_dilation"):
            if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int)):
                raise SettingsError(f"{key} must be a whole number, got {raw[key]!r}")
        for key in ("guidance", "cross_replace", "edit_weight", "blend_threshold"):
            if raw.get(key) is not None and (isinstance(raw[key], bool) or not isinstance(raw[key], (int, float))):
                raise SettingsError(f"{key} must be a number, got {raw[key]!r}")
        steps, guidance = raw.get("steps", SamplerConfig.steps), float(raw.get("guidance", SamplerConfig.guidance))
        SamplerConfig(steps=steps, guidance=guidance)
        InversionConfig(null_inner_steps=raw.get("null_inner_steps", InversionConfig.null_inner_steps))
        method = engine.check_inversion_method(raw.get("inversion"))
        control_config = ControlConfig(**control)
        control_config.check_inversion(method)
        fit = Fit(raw.get("fit", Fit.RESIZE.value))
        settings = EditSettings(method=method, steps=steps, guidance=guidance, fit=fit,
                                null_inner_steps=raw.get("null_inner_steps", InversionConfig.null_inner_steps),
                                control=control_config, seed=int(raw.get("seed", 0)))
        hash(settings)  # the group key: a nested list where a word or number belongs is refused here
        return settings
    except (PrismError, ValueError, TypeError) as exc:
        raise RequestError(f"params: {exc}") from None


def _tuple(key: str, value):
    """JSON lists → the tuples ControlConfig holds; one number or word where several may be → one."""
    if key not in ("self_replace", "noise_blend_threshold", "composite", "edit_words", "blend_words") or value is None:
        return value
    values = tuple(value) if isinstance(value, list) else (value,)
    if not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in values):
        raise RequestError(f"params: {key} takes a number or word, or a list of them; got {json.dumps(value)}")
    return values


def _text(array: np.ndarray, name: str) -> str:
    value = array.reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise RequestError(f"{name} is not UTF-8 text") from None


@dataclass
class ParsedRequest:
    levels: np.ndarray  # [H, W] uint16
    prompt: str
    targets: list[str]
    settings: EditSettings
    masks: Any = None  # user_masks.UserMasks or None


class EditService:
    """Checks each request and runs the valid ones, grouped by :meth:`EditSettings.group_key`,
    through ``engine.edit_many``; ``max_pixels`` / ``max_targets`` bound what one request may ask."""

    def __init__(self, engine, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_targets: int = DEFAULT_MAX_TARGETS,
                 limits: RunLimits | None = None):
        self.engine, self.max_pixels, self.max_targets = engine, int(max_pixels), int(max_targets)
        self.limits = limits or RunLimits()

    def parse(self, request: dict) -> ParsedRequest:
        missing = [name for name, _, _ in INPUTS if name not in request]
        if missing:
            raise RequestError(f"missing input tensor(s) {', '.join(missing)}")
        image = np.asarray(request["image"])
        if image.shape[0] != 1:
            raise RequestError(f"send one image per request (batch dimension 1, got {image.shape[0]}); Triton's "
                               "dynamic batcher gathers concurrent requests")
        if image.ndim != 3 or min(image.shape[1:]) < 1:
            raise RequestError(f"image must be [1, H, W] grey levels, got shape {list(image.shape)}")
        height, width = image.shape[1:]
        if height * width > self.max_pixels:
            raise RequestError(f"image is {width}×{height} = {height * width / 1e6:.1f} Mpx, over this server's limit "
                               f"of {self.max_pixels / 1e6:g} Mpx (--max-pixels); downscale it first")
        prompt = _text(request["prompt"], "prompt").strip()
        if not prompt:
            raise RequestError("prompt is empty; send the image's source caption")
        targets = [_text(np.asarray([t]), "targets").strip() for t in np.asarray(request["targets"]).reshape(-1)]
        if not targets or not all(targets):
            raise RequestError("targets needs one or more non-empty edited captions")
        if len(targets) > self.max_targets:
            raise RequestError(f"{len(targets)} targets, over this server's limit of {self.max_targets} (--max-targets)")
        settings = parse_params(_text(request["params"], "params"), self.engine)
        masks = {}
        for name, _, _ in OPTIONAL_INPUTS:
            if request.get(name) is not None:
                mask = np.asarray(request[name])
                if mask.shape != image.shape:
                    raise RequestError(f"{name} must be [1, H, W] like the image, {list(image.shape)}; got "
                                       f"{list(mask.shape)}")
                masks[name] = mask[0]
        from .user_masks import UserMasks

        user_masks = UserMasks.read(masks.get("keep_mask"), masks.get("edit_mask"), (height, width))
        return ParsedRequest(np.asarray(image[0], dtype=np.uint16), prompt, targets, settings, user_masks)

    def __call__(self, requests: list[dict]) -> list[dict]:
        """One response per request: its outputs, or ``{"error": message}``."""
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, ParsedRequest]]] = {}
        for k, request in enumerate(requests):
            try:
                parsed = self.parse(request)
            except PrismError as exc:
                responses[k] = {"error": str(exc)}
                continue
            groups.setdefault(parsed.settings.group_key(len(parsed.targets)), []).append((k, parsed))
        for members in groups.values():
            try:
                outputs = self._run([p for _, p in members])
            except PrismError as exc:
                if len(members) == 1:
                    responses[members[0][0]] = {"error": str(exc)}
                    continue
                outputs = []  # one bad prompt must not fail the others: run them apart
                for _, p in members:
                    try:
                        outputs.extend(self._run([p]))
                    except PrismError as one:
                        outputs.append({"error": str(one)})
            for (k, _), output in zip(members, outputs):
                responses[k] = output
        return responses

    def _run(self, members: list[ParsedRequest]) -> list[dict]:
        engine, first = self.engine, members[0].settings
        sampler = engine.sampler(steps=first.steps, guidance=first.guidance)
        for p in members:  # prompt errors before any model work
            engine.plan(p.prompt, p.targets, p.settings.control, p.settings.steps)
        inversions = [engine.invert((p.levels.astype(np.float64) / 65535.0).astype(np.float32), p.prompt,
                                    method=p.settings.method, sampler=sampler, fit=p.settings.fit,
                                    inversion=InversionConfig(null_inner_steps=p.settings.null_inner_steps))
                      for p in members]
        results = engine.edit_many(inversions, [p.targets for p in members], first.control, self.limits,
                                   keep_masks=[p.masks and p.masks.keep for p in members],
                                   edit_masks=[p.masks and p.masks.edit for p in members])
        return [_response(p, result, len(members)) for p, result in zip(members, results)]


def _response(request: ParsedRequest, result, grouped: int) -> dict:
    from .imageio import to_uint

    images = np.stack([to_uint(image, 16) for image in result.images("input")])
    report = {"items": [{"name": it.name, "target": it.target, "self_replace": it.self_replace,
                         "blend_threshold": it.blend_threshold, "composite": it.composite} for it in result.items],
              "reconstruction_error": _finite(result.reconstruction_error), "timings": result.timings,
              "settings": {**result.settings, **request.settings.to_json(), "requests_in_call": grouped},
              "warnings": list(result.warnings)}
    return {"counterfactuals": images[None], "result": np.array([[json.dumps(report).encode()]], dtype=object)}


def _finite(value: float):
    return float(value) if math.isfinite(value) else None
