"""The Python API.

    engine = Engine.from_dir("engines/phantom-demo", precision="fp32", options=OrtOptions(threads=2))
    inversion = engine.invert("cxr.dcm", "Chest X-ray showing Support Devices")
    result = engine.edit(inversion, ["Chest X-ray showing No Finding"])
    result.save("out/cxr")

``Engine.from_dir`` runs an engine folder (``prism-export export``) on ONNX Runtime;
``Engine.from_checkpoint`` runs a diffusers checkpoint on the PyTorch reference backend (the only
one with autograd, so the only one for null-text inversion). Every setting is checked here, before
any model work, with a typed error; callers (CLI, batch jobs, services) only parse.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backend import BackendKind
from .blend import nearest_resize
from .composite import composite_result
from .config import BlendMaps, ControlConfig, Fit, InversionConfig, InversionMethod, OrtOptions, RunLimits, SamplerConfig
from .errors import BackendError, InputImageError, InversionFileError, MissingExtraError, ModelError, SettingsError
from .inversion import Inversion
from .loop import (Counter, EditInputs, ddim_inversion, decode_latents, edit_loop_groups, encode_image, encode_prompts,
                   noise_difference_maps)
from .manifest import MANIFEST_NAME
from .nvtx import stage
from .precision import Precision
from .progress import Progress
from .result import EditResult
from .schedule import DDIMSchedule
from .unet_batch import call_limits, plan_chunks
from .user_masks import fit_of, masks_for, paste_kept

__all__ = ["EditResult", "Engine", "is_engine_dir"]


def is_engine_dir(path) -> bool:
    """An engine folder (``prism-export export``) has a manifest; anything else is a checkpoint."""
    return (Path(path) / MANIFEST_NAME).is_file()


@dataclass
class _Prepared:
    """One image's edit inputs on the backend, made once however its items are chunked."""

    inversion: Inversion
    plan: Any  # control.ControlPlan
    embeddings: Any  # [2 + targets, T, D]: source, "", each target
    targets: list
    trajectory: list
    nulls: Any
    noise_maps: dict | None
    timings: dict
    counter: Counter
    region: Any = None  # [1,1,h,w] user masks' editable latent cells (user_masks), or None
    kept: np.ndarray | None = None  # [S,S] the keep mask in model space, pasted from the reconstruction

    def inputs(self, backend, items: list[int], control: ControlConfig) -> tuple[Any, EditInputs]:
        xp = backend.xp
        sub = self.plan.subset(items)
        rows = {t: self.embeddings[2 + i:3 + i] for i, t in enumerate(self.targets)}
        fixed = None
        if self.noise_maps is not None:  # the source row is never blended; each item's mask is its threshold's
            masks = [xp.astype(self.noise_maps[it.target] > it.blend_threshold, self.noise_maps[it.target].dtype)
                     for it in sub.items]
            fixed = xp.concat([xp.zeros_like(masks[0]), *masks], axis=0)
        return sub, EditInputs(
            method=self.inversion.method, latents_T=self.trajectory[-1], source_embedding=self.embeddings[0:1],
            target_embeddings=xp.concat([rows[it.target] for it in sub.items], axis=0),
            null_embedding=self.embeddings[1:2], null_embeddings=self.nulls, trajectory=self.trajectory,
            guidance=self.inversion.sampler.guidance, blend_threshold=control.blend_threshold,
            blend_start=control.blend_start, blend_dilation=control.blend_dilation, fixed_masks=fixed,
            region=self.region, edit_negative=control.edit_negative)


class Engine:
    """An engine runs PRISM's inversion and editing loops on one backend. Make one with
    :meth:`from_dir` (an engine folder, ONNX Runtime) or :meth:`from_checkpoint` (a diffusers
    checkpoint, PyTorch).

    One engine may be called from many threads at once (``invert``, ``edit``, ``edit_many``),
    and N threads give exactly a serial run's outputs. Shared, read only after loading: the
    backend's graphs and weights, the tokenizer (truncation and padding fixed at load) and
    ``model_path``. Per call: the latents, plans, masks, counters, timings and progress. ONNX
    Runtime sessions run concurrently (onnxruntime releases the GIL inside ``run``); the torch
    backend serialises its graph calls with a lock, since its controlled UNet holds one call's
    attention state (torch's intra-op threads still parallelise each call)."""

    def __init__(self, backend, tokenizer, model_path: str):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_path = model_path

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, engine_dir, *, precision: Precision | str = Precision.FP32, device: str = "cpu",
                 options: OrtOptions | None = None, self_max_queries: int | None = None,
                 blend_maps: BlendMaps | str | None = None) -> "Engine":
        """An engine folder from ``prism-export export`` on ONNX Runtime. ``precision``: one the
        folder holds (``prism-rt info ENGINE`` lists them with their measured quality);
        ``device``: ``cpu``, ``cuda[:N]`` or ``tensorrt[:N]`` (execution provider); ``options``:
        :class:`~prism_rt.config.OrtOptions`. ``self_max_queries`` and ``blend_maps`` are
        compiled into the graph: they may be given only to check them."""
        from .ort_backend import load_ort_backend
        from .tokenizer import ClipTokenizer

        precision, options = Precision.parse(precision), options or OrtOptions()
        impl = load_ort_backend(engine_dir, device=device, self_max_queries=self_max_queries, precision=precision.value,
                                threads=options.threads, cpu_arena=options.cpu_arena, cpu_graphs=options.cpu_graphs,
                                session_config=options.session_config, trt_cache=options.trt_cache,
                                deployment=options.deployment, io_binding=options.io_binding)
        if blend_maps is not None and BlendMaps(blend_maps).value != impl.info.blend_maps:
            raise BackendError(f"the engine {engine_dir} returns the LocalBlend maps {impl.info.blend_maps}, not "
                               f"{BlendMaps(blend_maps).value}: re-export it with `prism-export export … --blend-maps "
                               f"{BlendMaps(blend_maps).value}`")
        return cls(impl, ClipTokenizer.from_folder(impl.info.tokenizer_dir), str(engine_dir))

    @classmethod
    def from_checkpoint(cls, path, *, unet_weights=None, config=None, allow_pickle: bool = False,
                        precision: Precision | str = Precision.FP32, device: str = "cpu",
                        self_max_queries: int | None = None, threads: int | None = None,
                        blend_maps: BlendMaps | str = BlendMaps.AFTER_CONTROL, cuda_graphs: bool | None = None,
                        blend_downsample: int | None = None, channels_last: bool = False) -> "Engine":
        """A diffusers SD v1.x folder or single-file checkpoint on the PyTorch reference backend.
        ``unet_weights``: a fine-tuned UNet state dict (PRISM's ``model.safetensors``);
        ``config``: the SD folder giving configs and tokenizer for a single-file checkpoint;
        ``precision``: fp32 or fp16 graphs (the loops stay fp32); ``self_max_queries``:
        self-attention layers with at most this many queries are controlled (PRISM 32², the
        original prompt-to-prompt 16²); ``threads``: torch's intra-op threads (process-wide);
        ``blend_maps``: LocalBlend reads the cross-attention maps after control (the published
        controller's) or before; ``cuda_graphs``: replay the UNet call from CUDA graphs (default:
        on for CUDA devices); ``blend_downsample``: LocalBlend's maps at 1/N of the latent side
        (default a quarter, SD v1.5's 16×16; an engine folder has what it was exported with);
        ``channels_last``: NHWC convolutions (same outputs; on CUDA possibly faster)."""
        from .tokenizer import ClipTokenizer

        precision = Precision.parse(precision)
        for module in ("torch", "diffusers", "transformers", "safetensors"):
            try:
                __import__(module)
            except ImportError:
                raise MissingExtraError("torch", module, "The PyTorch backend") from None
        if is_engine_dir(path):
            raise BackendError(f"{path} is an engine folder (it has {MANIFEST_NAME}); load it with Engine.from_dir")
        if threads is not None:
            import torch

            torch.set_num_threads(int(OrtOptions(threads=threads).threads))
        from .torch_backend.backend import load_torch_backend

        impl = load_torch_backend(path, unet_weights=unet_weights, allow_pickle=allow_pickle, config=config,
                                  device=device, self_max_queries=self_max_queries or 32 * 32,
                                  precision=precision.value, blend_maps=BlendMaps(blend_maps), cuda_graphs=cuda_graphs,
                                  blend_downsample=blend_downsample, channels_last=channels_last)
        return cls(impl, ClipTokenizer.from_folder(impl.info.tokenizer_dir), str(path))

    @classmethod
    def load(cls, path, backend: str | BackendKind | None = None, *, device: str = "cpu", precision="fp32",
             self_max_queries: int | None = None, unet_weights=None, config=None, allow_pickle: bool = False,
             threads: int | None = None, options: OrtOptions | None = None, blend_maps: BlendMaps | str | None = None,
             cuda_graphs: bool | None = None, blend_downsample: int | None = None, channels_last: bool = False,
             **ort_settings) -> "Engine":
        """:meth:`from_dir` for an engine folder, :meth:`from_checkpoint` otherwise; ``backend``
        (optional) must agree with what ``path`` is. ``ort_settings``: :class:`OrtOptions` fields."""
        kind = (BackendKind.ONNXRUNTIME if is_engine_dir(path) else BackendKind.TORCH) if backend is None else BackendKind(backend)
        if kind is BackendKind.ONNXRUNTIME:
            if unet_weights is not None or config is not None or allow_pickle:
                raise BackendError("--unet-weights, --config and --allow-pickle apply to checkpoints; an engine folder "
                                   "already holds its weights: re-export with `prism-export export --model … "
                                   "--unet-weights … --out ENGINE`")
            if not is_engine_dir(path):
                raise BackendError(f"{path} is not an engine folder (no {MANIFEST_NAME}); onnxruntime runs engine folders "
                                   f"from `prism-export export --model {path} --out ENGINE`, or run the checkpoint on torch")
            if cuda_graphs or channels_last:
                raise BackendError("--cuda-graphs and --channels-last apply to the torch backend (a checkpoint as --model);"
                                   " onnxruntime engine folders run without them")
            options = replace(options or OrtOptions(), **({"threads": threads} if threads else {}), **ort_settings)
            engine = cls.from_dir(path, precision=precision, device=device, options=options,
                                  self_max_queries=self_max_queries, blend_maps=blend_maps)
            exported = engine.backend.info.blend_downsample
            if blend_downsample is not None and exported is not None and int(blend_downsample) != int(exported):
                raise BackendError(f"the engine {path} returns LocalBlend maps at 1/{exported} of the latent side, not "
                                   f"1/{blend_downsample}: re-export it with `prism-export export … --blend-downsample "
                                   f"{blend_downsample}`")
            return engine
        if kind is BackendKind.TORCH:
            if options is not None or any(v not in (None, False) and k in ("session_config", "trt_cache")
                                          for k, v in ort_settings.items()):
                raise BackendError("session_config and trt_cache are onnxruntime settings; the torch backend takes none")
            return cls.from_checkpoint(path, unet_weights=unet_weights, config=config, allow_pickle=allow_pickle,
                                       precision=precision, device=device, self_max_queries=self_max_queries,
                                       threads=threads, blend_maps=blend_maps or BlendMaps.AFTER_CONTROL,
                                       cuda_graphs=cuda_graphs, blend_downsample=blend_downsample,
                                       channels_last=channels_last)
        raise BackendError(f"backend {kind.value!r} is not available in this version; engine folders run on onnxruntime "
                           "(--device tensorrt uses its TensorRT execution provider), checkpoints on torch")

    # -- settings ------------------------------------------------------------------------------
    @property
    def default_inversion(self) -> InversionMethod:
        """PRISM's null-text inversion where the backend has gradients (torch), else direct
        inversion (exact source reconstruction, no optimisation)."""
        return InversionMethod.NULL_TEXT if self.backend.supports_autograd else InversionMethod.DIRECT

    def sampler(self, steps: int = 50, guidance: float = 7.5) -> SamplerConfig:
        """DDIM with the model's own beta schedule (SD v1.x: scaled_linear 0.00085…0.012)."""
        cfg = self.backend.info.scheduler_config
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset")
        model = {k: cfg[k] for k in keys if k in cfg}
        try:
            SamplerConfig(**model)
        except (SettingsError, TypeError) as exc:
            raise ModelError(f"the model {self.model_path} has an unusable noise schedule ({exc}); re-export the engine "
                             "from a checkpoint whose scheduler config is SD v1.x's") from None
        return SamplerConfig(steps=steps, guidance=guidance, **model)

    def call_limits(self, limits: RunLimits) -> dict[str, int]:
        """:func:`prism_rt.unet_batch.call_limits` of this engine's backend."""
        return call_limits(self.backend, limits.max_batch)

    def check_inversion_method(self, method: InversionMethod | str | None) -> InversionMethod:
        """The inversion method to run (None: :attr:`default_inversion`), refused early where the
        backend cannot run it."""
        method = self.default_inversion if method is None else InversionMethod(method)
        if method is InversionMethod.NULL_TEXT and not self.backend.supports_autograd:
            raise BackendError(f"null-text inversion needs gradients, which the {self.backend.kind.value} backend "
                               "does not have; use --inversion direct or negative-prompt, or run the checkpoint "
                               "(not the engine folder) on torch")
        return method

    # -- inversion -----------------------------------------------------------------------------
    def invert(self, image, prompt: str, *, method: InversionMethod | str | None = None,
               sampler: SamplerConfig | None = None, inversion: InversionConfig | None = None,
               fit: Fit | str = Fit.RESIZE, progress: bool = False) -> Inversion:
        """Invert ``image`` (a path, a ``SourceImage``, a PIL image or a [H,W] / [H,W,3] array in
        [0,1]) under its caption ``prompt``. ``method`` None: :attr:`default_inversion`."""
        from .imageio import SourceImage, fit_to_model, load_image

        method = self.check_inversion_method(method)
        sampler = sampler or self.sampler()
        inversion = replace(inversion or InversionConfig(), method=method)
        self.tokenizer.encode_batch_padded([prompt])  # prompt errors before any work
        source = image if isinstance(image, SourceImage) else load_image(image) if isinstance(image, (str, Path)) else None
        pixels01 = source.pixels if source is not None else _as_gray01(image)
        fitted, fit_info = fit_to_model(pixels01, self.backend.info.image_size, Fit(fit))
        schedule = DDIMSchedule.from_config(sampler)
        counter, timings = Counter(), {}
        bar = Progress(progress, len(schedule.timesteps) * (2 if method is InversionMethod.NULL_TEXT else 1), "invert")

        start = time.perf_counter()
        with stage("encode"):
            z0 = encode_image(self.backend, fitted)
            source_embedding = encode_prompts(self.backend, self.tokenizer, [prompt])
        timings["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with stage("ddim_inversion"):
            trajectory = ddim_inversion(self.backend, schedule, z0, source_embedding, counter, bar.update_one)
        timings["ddim_inversion_s"] = time.perf_counter() - start
        nulls = None
        if method is InversionMethod.NULL_TEXT:
            from .torch_backend.nulltext import null_text_inversion

            start = time.perf_counter()
            with stage("null_text"):
                null0 = encode_prompts(self.backend, self.tokenizer, [""], allow_empty=True)
                found = null_text_inversion(self.backend, schedule, trajectory, source_embedding, null0,
                                            sampler.guidance, inversion, counter, bar.update_one)
            nulls = np.stack([self.backend.to_numpy(n) for n in found])
            timings["null_text_s"] = time.perf_counter() - start
        bar.close()
        traj = self.backend.to_numpy(self.backend.xp.stack(trajectory)).astype(np.float32)  # one copy, not one per step
        meta = {
            "fit": fit_info.to_json(),
            "source_image": _source_meta(source),
            "model": {"path": self.model_path, "provenance": self.backend.info.provenance},
            "backend": self.backend.describe(),
            "timings": timings,
            "counts": counter.to_json(),
        }
        return Inversion(method=method, source_prompt=prompt, sampler=sampler, config=inversion, trajectory=traj,
                         fitted_pixels=fitted, null_embeddings=nulls, meta=meta)

    # -- editing -------------------------------------------------------------------------------
    def plan(self, source: str, targets: Sequence[str], control: ControlConfig | None = None, steps: int = 50):
        """The prompt-to-prompt control plan; raises PromptError/SettingsError on bad prompts or
        settings, so callers can check an edit before spending time on the inversion."""
        from .control import build_control_plan

        return build_control_plan(self.tokenizer, source, list(targets), control or ControlConfig(), steps)

    def edit(self, inversion: Inversion, targets: Sequence[str], control: ControlConfig | None = None,
             limits: RunLimits | None = None, progress: bool = False, *, keep_mask=None, edit_mask=None) -> EditResult:
        """The counterfactuals of one image under each edited caption in ``targets``
        (:meth:`edit_many` of one image). ``keep_mask``: the image never changes inside it;
        ``edit_mask``: the edit is confined to it; each a path, PIL image or array in the input
        image's geometry, white = the region (``prism_rt.user_masks``)."""
        return self.edit_many([inversion], [list(targets)], control, limits, progress,
                              keep_masks=[keep_mask], edit_masks=[edit_mask])[0]

    def edit_many(self, inversions: Sequence[Inversion], targets, control: ControlConfig | None = None,
                  limits: RunLimits | None = None, progress: bool = False, *, keep_masks=None,
                  edit_masks=None) -> list[EditResult]:
        """Edits of several images, their groups batched into one UNet call per step (the
        controlled UNet's G axis): throughput for batch jobs. ``targets``: the edited captions of
        every image, or one list per image (each with as many captions). All inversions need the
        same method and sampler. Whole images are grouped as many to a call as fit ``max_batch``;
        an image whose own items do not fit is run alone, its items split into chunks.
        ``keep_masks`` / ``edit_masks``: None or one entry (None or a mask, as :meth:`edit`) per image."""
        control, limits = control or ControlConfig(), limits or RunLimits()
        inversions = list(inversions)
        if not inversions:
            return []
        per_image = _targets_per_image(targets, len(inversions))
        first = inversions[0]
        control.check_inversion(first.method)
        for inv in inversions:
            self._check_inversion(inv)
            if inv.method != first.method or inv.sampler != first.sampler:
                raise SettingsError("edit_many needs inversions made with one method and sampler; edit the others apart")
        plans = [self.plan(inv.source_prompt, t, control, first.sampler.steps) for inv, t in zip(inversions, per_image)]
        masks = masks_for(inversions, keep_masks, edit_masks)
        schedule = DDIMSchedule.from_config(first.sampler)
        prepared = [self._prepare(inv, t, plan, control, limits, schedule) for inv, t, plan in zip(inversions, per_image, plans)]
        latent = self.backend.info.latent_size
        for p, m in zip(prepared, masks) if any(masks) else ():  # a batch blends all its images or none
            region = m.region(fit_of(p.inversion), latent) if m else np.ones((1, 1, latent, latent), np.float32)
            p.region, p.kept = self.backend.asarray(region), m and m.kept_pixels(fit_of(p.inversion))
        calls = self.call_limits(limits)
        chunks = plan_chunks(first.method, len(inversions), len(plans[0].items), calls["batch"], calls.get("groups"),
                             calls.get("edits"))
        runs = [{"source": None, "edits": [], "masks": [], "chunks": 0, "groups": 0, "items": 0} for _ in inversions]
        bar = Progress(progress, len(chunks) * first.sampler.steps,
                       "edit" if len(inversions) == 1 else f"edit {len(inversions)} images")
        for images, items in chunks:
            counter, start = Counter(), time.perf_counter()
            subs, inputs = zip(*(prepared[k].inputs(self.backend, items, control) for k in images))
            with stage("edit_loop"):
                outcomes = edit_loop_groups(self.backend, schedule, subs, inputs, counter, bar.update_one)
            elapsed = time.perf_counter() - start
            for k, outcome in zip(images, outcomes):
                run = runs[k]
                if run["source"] is None:
                    run["source"] = outcome.latents[:1]
                    run["masks"].append(outcome.masks[0] if outcome.masks is not None else None)
                run["edits"].append(outcome.latents[1:])
                run["masks"].extend(list(outcome.masks[1:]) if outcome.masks is not None else [None] * len(items))
                run["chunks"] += 1
                run["groups"], run["items"] = max(run["groups"], len(images)), max(run["items"], len(items))
                prepared[k].timings["edit_loop_s"] = prepared[k].timings.get("edit_loop_s", 0.0) + elapsed
                for key, value in counter.to_json().items():
                    setattr(prepared[k].counter, key, getattr(prepared[k].counter, key) + value)
        bar.close()
        return [self._result(p, run, control) for p, run in zip(prepared, runs)]

    def _prepare(self, inversion: Inversion, targets: list, plan, control: ControlConfig, limits: RunLimits,
                 schedule: DDIMSchedule) -> _Prepared:
        backend, xp = self.backend, self.backend.xp
        counter, timings = Counter(), {}
        start = time.perf_counter()
        with stage("encode"):
            embeddings = encode_prompts(backend, self.tokenizer, [inversion.source_prompt, "", *targets], allow_empty=True)
        on_device = backend.asarray(inversion.trajectory)  # one copy, not one per step
        trajectory = [on_device[i] for i in range(int(on_device.shape[0]))]
        nulls = (xp.stack([backend.asarray(n) for n in inversion.null_embeddings])
                 if inversion.null_embeddings is not None else None)
        timings["encode_s"] = time.perf_counter() - start
        noise_maps = None
        if control.noise_blend and not control.legacy:
            start = time.perf_counter()
            with stage("noise_blend"):
                stacked = noise_difference_maps(
                    backend, schedule, trajectory[0], embeddings[0:1], embeddings[1:2], embeddings[2:],
                    inversion.sampler.guidance, counter, samples=control.noise_blend_samples,
                    strength=control.noise_blend_strength, max_batch=self.call_limits(limits)["batch"])
            noise_maps = {t: stacked[i:i + 1] for i, t in enumerate(targets)}
            timings["noise_blend_s"] = time.perf_counter() - start
        return _Prepared(inversion, plan, embeddings, list(targets), trajectory, nulls, noise_maps, timings, counter)

    def _result(self, prepared: _Prepared, run: dict, control: ControlConfig) -> EditResult:
        backend, xp = self.backend, self.backend.xp
        start = time.perf_counter()
        final = xp.concat([run["source"], *run["edits"]], axis=0)
        z0 = prepared.trajectory[0]
        recon_error = float(xp.linalg.vector_norm(final[:1] - z0) / xp.linalg.vector_norm(z0))
        with stage("decode"):
            images = np.concatenate([decode_latents(backend, final[i:i + 1]) for i in range(final.shape[0])], axis=0)
        images[1:] = paste_kept(images[0], images[1:], prepared.kept)
        size = images.shape[-1]
        masks = [None if m is None else backend.to_numpy(nearest_resize(xp, m[0], (size, size))) for m in run["masks"]]
        timings = dict(prepared.timings, decode_s=time.perf_counter() - start)
        result = EditResult(
            items=prepared.plan.items, reconstruction=images[0], edits=list(images[1:]), masks=masks[1:],
            reconstruction_error=recon_error, counts=prepared.counter.to_json(), timings=timings,
            plan_words=prepared.plan.edit_words, inversion=prepared.inversion,
            settings={"chunks": run["chunks"], "items_per_chunk": run["items"], "images_in_batch": run["groups"],
                      "mode": control.mode, "blend_downsample": backend.info.blend_downsample,
                      "blend_maps": backend.info.blend_maps, "user_masks_editable_fraction":
                          None if prepared.region is None else float(xp.mean(prepared.region)),
                      "backend": backend.kind.value})
        return composite_result(result, () if control.legacy else control.composite)

    def _check_inversion(self, inversion: Inversion):
        latent = self.backend.info.latent_size
        shape = inversion.trajectory.shape
        if shape[-1] != latent or shape[-2] != latent or shape[2] != self.backend.info.latent_channels:
            raise InversionFileError(f"the inversion's latents are {shape[2]}×{shape[3]}×{shape[4]}, this model's are "
                                     f"{self.backend.info.latent_channels}×{latent}×{latent}: invert the image with this model")
        if inversion.null_embeddings is not None and inversion.null_embeddings.shape[-1] != self.backend.info.text_width:
            raise InversionFileError("the inversion's null embeddings do not fit this model's text encoder: invert the image with this model")


def _targets_per_image(targets, images: int) -> list[list[str]]:
    targets = list(targets)
    per_image = [list(t) for t in targets] if targets and not isinstance(targets[0], str) else [targets] * images
    if len(per_image) != images or len({len(t) for t in per_image}) != 1:
        raise SettingsError("edit_many needs one target list for all images, or one per image, all of one length")
    if not per_image[0]:
        raise SettingsError("give at least one edited caption (target)")
    return per_image


def _as_gray01(image: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("F")) / 255.0
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].mean(-1)
    if array.ndim != 2:
        raise InputImageError(f"an image array must be [H, W] or [H, W, 3] with values in [0, 1]; got shape {array.shape}")
    return np.clip(array, 0.0, 1.0)


def _source_meta(source) -> dict:
    if source is None:
        return {"kind": "array"}
    return {"path": source.path, "kind": source.kind, "sha256": source.sha256, "bit_depth": source.bit_depth, **source.meta}
