"""The Python API: ``Engine.load(path, backend=...)``, ``engine.invert(image, prompt)``,
``engine.edit(inversion, targets)``. No global state; one engine per thread."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backend import BackendKind
from .blend import nearest_resize
from .composite import composite_result
from .config import ControlConfig, Fit, InversionConfig, InversionMethod, RunLimits, SamplerConfig
from .errors import BackendError, InputImageError, InversionFileError, MissingExtraError
from .inversion import Inversion
from .loop import (Counter, EditInputs, ddim_inversion, decode_latents, edit_loop, edit_loop_groups, encode_image,
                   encode_prompts, noise_difference_maps)
from .schedule import DDIMSchedule


@dataclass
class EditResult:
    """Model-space outputs ([3,S,S] in [-1,1]) and what is needed to map them back."""

    items: tuple  # control.EditItem, one per edit × self-window value
    reconstruction: np.ndarray  # the source branch, decoded
    edits: list[np.ndarray]
    masks: list[np.ndarray | None]  # per item, the last LocalBlend mask at image size [S,S], or None
    reconstruction_error: float
    counts: dict
    timings: dict
    plan_words: tuple = ()
    settings: dict = field(default_factory=dict)
    composite_masks: list[np.ndarray] | None = None  # per item, the difference composite's mask [S,S] in [0,1]

    def __post_init__(self):
        if self.composite_masks is None:
            self.composite_masks = [None] * len(self.items)

    def item_stats(self) -> list[dict]:
        """Mean |Δ| (on the [0,1] scale, model space) of each edit against the reconstruction,
        inside and outside its blend mask."""
        stats = []
        recon = (self.reconstruction.mean(0) + 1) / 2
        for item, image, mask, kept in zip(self.items, self.edits, self.masks, self.composite_masks):
            delta = np.abs((image.mean(0) + 1) / 2 - recon)
            row = {"name": item.name, "target": item.target, "self_replace": item.self_replace,
                   "blend_threshold": item.blend_threshold, "composite": item.composite,
                   "mean_abs_diff": float(delta.mean())}
            if kept is not None:
                row["composite_fraction"] = float(kept.mean())
            if mask is not None:
                inside = mask > 0.5
                row["mask_fraction"] = float(inside.mean())
                row["mean_abs_diff_inside_mask"] = float(delta[inside].mean()) if inside.any() else None
                row["mean_abs_diff_outside_mask"] = float(delta[~inside].mean()) if (~inside).any() else None
            stats.append(row)
        return stats


class Engine:
    def __init__(self, backend, tokenizer, model_path: str):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_path = model_path

    @classmethod
    def load(cls, path, backend: str | BackendKind = BackendKind.TORCH, *, device: str = "cpu",
             unet_weights=None, allow_pickle: bool = False, config=None, self_max_queries: int | None = None,
             precision: str = "fp32", threads: int | None = None, cpu_arena: bool = True,
             cpu_graphs: bool = True, session_config: dict[str, str] | None = None,
             trt_cache: str | Path | bool | None = None) -> "Engine":
        """``precision``: an engine folder's variant (fp32, fp16, int8, int8-cpu; see ``prism-rt info``),
        or the torch backend's dtype (fp32, fp16: the graphs run in half precision, the loops in fp32).
        ``threads``: onnxruntime's intra-op threads (None: its default, all cores).
        ``cpu_arena``: onnxruntime on a CPU keeps one memory arena for all graphs (faster: no fresh
        pages per call); False frees every tensor after each call (lowest resident memory).
        ``cpu_graphs``: onnxruntime on a CPU runs each graph's CPU twin where the engine has one
        (attention fused into ``MultiHeadAttention``: same outputs to ~1e-6, a fraction of the
        memory at SD v1.5 size); False runs the portable graphs TensorRT builds from.
        ``session_config``: onnxruntime session settings (``SessionOptions.add_session_config_entry``),
        e.g. ``{"session.intra_op.allow_spinning": "0"}`` where other work shares the cores.
        ``trt_cache`` (onnxruntime on ``device="tensorrt"``): where TensorRT's built engines and
        timing cache are kept between processes — None: ``ENGINE/trt-cache`` (or the user's cache
        folder where the engine folder is read-only); a path: there; False: build anew each time.
        ``self_max_queries``: self-attention layers with at most this many queries are controlled
        (PRISM 32², the original prompt-to-prompt code 16²); larger ones keep fused attention. It is
        compiled into an exported UNet: None = 32² for torch, the engine's own value for onnxruntime."""
        from .tokenizer import ClipTokenizer

        kind = BackendKind(backend)
        if kind is BackendKind.TORCH:
            for module in ("torch", "diffusers", "transformers", "safetensors"):
                try:
                    __import__(module)
                except ImportError:
                    raise MissingExtraError("torch", module, "The PyTorch backend") from None
            from .torch_backend.backend import load_torch_backend

            if precision not in ("fp32", "fp16"):
                raise BackendError(f"the torch backend runs fp32 or fp16, not {precision!r}; int8 variants live in "
                                   "engine folders: export one with `prism-export export … --precision fp32,int8-cpu` "
                                   "and run it with --backend onnxruntime")
            if session_config or trt_cache not in (None, False):
                raise BackendError("session_config and trt_cache are onnxruntime settings; the torch backend takes none")
            impl = load_torch_backend(path, unet_weights=unet_weights, allow_pickle=allow_pickle, config=config,
                                      device=device, self_max_queries=self_max_queries or 32 * 32, precision=precision)
        elif kind is BackendKind.ONNXRUNTIME:
            # ``path`` is an engine folder from `prism-export export`; its manifest is checked here
            from .ort_backend import load_ort_backend

            if unet_weights is not None or config is not None:
                raise BackendError("--unet-weights and --config apply when exporting; an engine folder already holds its "
                                   "weights: re-export with `prism-export export --model … --unet-weights … --out ENGINE`")
            impl = load_ort_backend(path, device=device, self_max_queries=self_max_queries, precision=precision,
                                    threads=threads, cpu_arena=cpu_arena, cpu_graphs=cpu_graphs,
                                    session_config=session_config, trt_cache=trt_cache)
        else:
            raise BackendError(f"backend {kind.value!r} is not available in this version; use --backend torch or onnxruntime")
        return cls(impl, ClipTokenizer.from_folder(impl.info.tokenizer_dir), str(path))

    # -- settings ------------------------------------------------------------------------------
    def sampler(self, steps: int = 50, guidance: float = 7.5) -> SamplerConfig:
        """DDIM with the model's own beta schedule (SD v1.x: scaled_linear 0.00085…0.012)."""
        cfg = self.backend.info.scheduler_config
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset")
        return SamplerConfig(steps=steps, guidance=guidance, **{k: cfg[k] for k in keys if k in cfg})

    # -- inversion -----------------------------------------------------------------------------
    def invert(self, image, prompt: str, *, method: InversionMethod | str = InversionMethod.NULL_TEXT,
               sampler: SamplerConfig | None = None, inversion: InversionConfig | None = None,
               fit: Fit | str = Fit.RESIZE, progress: bool = False) -> Inversion:
        from .imageio import SourceImage, fit_to_model, load_image

        method = InversionMethod(method)
        sampler = sampler or self.sampler()
        inversion = replace(inversion or InversionConfig(), method=method)
        if method is InversionMethod.NULL_TEXT and not self.backend.supports_autograd:
            raise BackendError(f"null-text inversion needs gradients, which the {self.backend.kind.value} backend "
                               "does not have; use --backend torch, or --inversion direct / negative-prompt")
        self.tokenizer.encode_batch_padded([prompt])  # prompt errors before any work
        source = image if isinstance(image, SourceImage) else load_image(image) if isinstance(image, (str, Path)) else None
        pixels01 = source.pixels if source is not None else _as_gray01(image)
        fitted, fit_info = fit_to_model(pixels01, self.backend.info.image_size, Fit(fit))
        schedule = DDIMSchedule.from_config(sampler)
        counter, timings = Counter(), {}
        bar = _progress(progress, len(schedule.timesteps) * (2 if method is InversionMethod.NULL_TEXT else 1), "invert")

        start = time.perf_counter()
        z0 = encode_image(self.backend, fitted)
        source_embedding = encode_prompts(self.backend, self.tokenizer, [prompt])
        timings["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        trajectory = ddim_inversion(self.backend, schedule, z0, source_embedding, counter, bar.update_one)
        timings["ddim_inversion_s"] = time.perf_counter() - start
        nulls = None
        if method is InversionMethod.NULL_TEXT:
            from .torch_backend.nulltext import null_text_inversion

            start = time.perf_counter()
            null0 = encode_prompts(self.backend, self.tokenizer, [""], allow_empty=True)
            found = null_text_inversion(self.backend, schedule, trajectory, source_embedding, null0, sampler.guidance,
                                        inversion, counter, bar.update_one)
            nulls = np.stack([self.backend.to_numpy(n) for n in found])
            timings["null_text_s"] = time.perf_counter() - start
        bar.close()
        traj = np.stack([self.backend.to_numpy(z) for z in trajectory]).astype(np.float32)
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
             limits: RunLimits | None = None, progress: bool = False) -> EditResult:
        control = control or ControlConfig()
        limits = limits or RunLimits()
        targets = list(targets)
        backend, xp = self.backend, self.backend.xp
        sampler = inversion.sampler
        self._check_inversion(inversion)
        schedule = DDIMSchedule.from_config(sampler)
        plan = self.plan(inversion.source_prompt, targets, control, sampler.steps)
        counter, timings = Counter(), {}

        start = time.perf_counter()
        embeddings = encode_prompts(backend, self.tokenizer, [inversion.source_prompt, "", *targets], allow_empty=True)
        source_embedding, null_embedding = embeddings[0:1], embeddings[1:2]
        target_rows = {t: embeddings[2 + i: 3 + i] for i, t in enumerate(targets)}
        trajectory = [backend.asarray(z) for z in inversion.trajectory]
        nulls = (xp.stack([backend.asarray(n) for n in inversion.null_embeddings])
                 if inversion.null_embeddings is not None else None)
        timings["encode_s"] = time.perf_counter() - start

        per_chunk = self._items_per_chunk(inversion.method, limits)
        chunks = [list(range(i, min(i + per_chunk, len(plan.items)))) for i in range(0, len(plan.items), per_chunk)]
        start = time.perf_counter()
        noise_masks = self._noise_masks(trajectory[0], source_embedding, null_embedding, target_rows, control,
                                        limits, schedule, sampler.guidance, counter)
        if noise_masks is not None:
            timings["noise_blend_s"] = time.perf_counter() - start
        bar = _progress(progress, len(chunks) * sampler.steps, "edit")
        start = time.perf_counter()
        source_latent, edit_latents, masks = None, [], []
        for chunk in chunks:
            sub = plan.subset(chunk)
            inputs = EditInputs(
                method=inversion.method, latents_T=trajectory[-1], source_embedding=source_embedding,
                target_embeddings=xp.concat([target_rows[item.target] for item in sub.items], axis=0),
                null_embedding=null_embedding, null_embeddings=nulls, trajectory=trajectory,
                guidance=sampler.guidance, blend_threshold=control.blend_threshold, blend_start=control.blend_start,
                fixed_masks=None if noise_masks is None else self._fixed_masks(noise_masks, sub.items))
            outcome = edit_loop(backend, schedule, sub, inputs, counter, bar.update_one)
            if source_latent is None:
                source_latent = outcome.latents[:1]
                masks.append(outcome.masks[0] if outcome.masks is not None else None)
            edit_latents.append(outcome.latents[1:])
            masks.extend(list(outcome.masks[1:]) if outcome.masks is not None else [None] * len(chunk))
        bar.close()
        timings["edit_loop_s"] = time.perf_counter() - start

        start = time.perf_counter()
        final = xp.concat([source_latent, *edit_latents], axis=0)
        z0 = trajectory[0]
        recon_error = float(xp.linalg.vector_norm(final[:1] - z0) / xp.linalg.vector_norm(z0))
        images = np.concatenate([decode_latents(backend, final[i:i + 1]) for i in range(final.shape[0])], axis=0)
        timings["decode_s"] = time.perf_counter() - start
        size = images.shape[-1]
        image_masks = [None if m is None else backend.to_numpy(nearest_resize(xp, m[0], (size, size))) for m in masks]
        return composite_result(EditResult(
            items=plan.items, reconstruction=images[0], edits=list(images[1:]), masks=image_masks[1:],
            reconstruction_error=recon_error, counts=counter.to_json(), timings=timings, plan_words=plan.edit_words,
            settings={"chunks": len(chunks), "items_per_chunk": per_chunk, "mode": control.mode,
                      "blend_downsample": backend.info.blend_downsample, "backend": backend.kind.value},
        ), () if control.legacy else control.composite)

    def edit_many(self, inversions: Sequence[Inversion], targets, control: ControlConfig | None = None,
                  limits: RunLimits | None = None, progress: bool = False) -> list[EditResult]:
        """Edits of several images, their groups batched into one UNet call per step (the
        controlled UNet's G axis): throughput for batch jobs. ``targets``: the edited captions of
        every image, or one list per image (each with as many captions). All inversions need the
        same method and sampler. Images are grouped so that a step's batch stays ≤ ``max_batch``;
        an image whose own edits exceed it is edited alone (its items chunked) by :meth:`edit`."""
        control = control or ControlConfig()
        limits = limits or RunLimits()
        inversions = list(inversions)
        if not inversions:
            return []
        targets = list(targets)
        per_image = ([list(t) for t in targets] if targets and not isinstance(targets[0], str)
                     else [targets] * len(inversions))
        if len(per_image) != len(inversions) or len({len(t) for t in per_image}) != 1:
            raise BackendError("edit_many needs one target list for all images, or one per image, all of one length")
        first = inversions[0]
        for inv in inversions:
            self._check_inversion(inv)
            if inv.method != first.method or inv.sampler != first.sampler:
                raise BackendError("edit_many needs inversions made with one method and sampler; edit the others apart")
        plans = [self.plan(inv.source_prompt, t, control, first.sampler.steps) for inv, t in zip(inversions, per_image)]
        items = 1 + len(plans[0].items)
        both_halves = first.method in (InversionMethod.DDIM, InversionMethod.NULL_TEXT)
        per_batch = limits.max_batch // (items + (items if both_halves else items - 1))
        if per_batch < 2:
            return [self.edit(inv, t, control, limits, progress) for inv, t in zip(inversions, per_image)]
        backend, xp = self.backend, self.backend.xp
        schedule = DDIMSchedule.from_config(first.sampler)
        results = []
        for start_index in range(0, len(inversions), per_batch):
            chunk = list(range(start_index, min(start_index + per_batch, len(inversions))))
            counter, timings = Counter(), {}
            start = time.perf_counter()
            inputs = []
            for k in chunk:
                inv, image_targets = inversions[k], per_image[k]
                emb = encode_prompts(backend, self.tokenizer, [inv.source_prompt, "", *image_targets], allow_empty=True)
                trajectory = [backend.asarray(z) for z in inv.trajectory]
                nulls = (xp.stack([backend.asarray(n) for n in inv.null_embeddings])
                         if inv.null_embeddings is not None else None)
                rows = {t: emb[2 + i: 3 + i] for i, t in enumerate(image_targets)}
                noise_masks = self._noise_masks(trajectory[0], emb[0:1], emb[1:2], rows, control, limits, schedule,
                                                first.sampler.guidance, counter)
                inputs.append(EditInputs(
                    method=inv.method, latents_T=trajectory[-1], source_embedding=emb[0:1],
                    target_embeddings=xp.concat([rows[item.target] for item in plans[k].items], axis=0),
                    null_embedding=emb[1:2], null_embeddings=nulls, trajectory=trajectory,
                    guidance=first.sampler.guidance, blend_threshold=control.blend_threshold,
                    blend_start=control.blend_start,
                    fixed_masks=None if noise_masks is None else self._fixed_masks(noise_masks, plans[k].items)))
            timings["encode_s"] = time.perf_counter() - start
            bar = _progress(progress, first.sampler.steps, f"edit {len(chunk)} images")
            start = time.perf_counter()
            outcomes = edit_loop_groups(backend, schedule, [plans[k] for k in chunk], inputs, counter, bar.update_one)
            bar.close()
            timings["edit_loop_s"] = time.perf_counter() - start
            for k, x, outcome in zip(chunk, inputs, outcomes):
                start = time.perf_counter()
                final, z0 = outcome.latents, x.trajectory[0]
                recon_error = float(xp.linalg.vector_norm(final[:1] - z0) / xp.linalg.vector_norm(z0))
                images = np.concatenate([decode_latents(backend, final[i:i + 1]) for i in range(final.shape[0])], axis=0)
                size = images.shape[-1]
                masks = ([None] * items if outcome.masks is None else
                         [backend.to_numpy(nearest_resize(xp, m[0], (size, size))) for m in outcome.masks])
                results.append(composite_result(EditResult(
                    items=plans[k].items, reconstruction=images[0], edits=list(images[1:]), masks=masks[1:],
                    reconstruction_error=recon_error, counts=dict(counter.to_json(), images_in_batch=len(chunk)),
                    timings=dict(timings, decode_s=time.perf_counter() - start), plan_words=plans[k].edit_words,
                    settings={"chunks": 1, "images_in_batch": len(chunk), "mode": control.mode,
                              "blend_downsample": backend.info.blend_downsample, "backend": backend.kind.value}),
                    () if control.legacy else control.composite))
        return results

    def _noise_masks(self, z0, source_embedding, null_embedding, target_rows: dict, control: ControlConfig,
                     limits: RunLimits, schedule, guidance: float, counter) -> dict | None:
        """noise_blend's relative prediction difference of each distinct target caption, [1,1,h,w]
        each (thresholded per item by :meth:`_fixed_masks`); None when the edit has no noise blend
        (legacy never blends)."""
        if not control.noise_blend or control.legacy:
            return None
        xp = self.backend.xp
        names = list(target_rows)
        stacked = noise_difference_maps(
            self.backend, schedule, z0, source_embedding, null_embedding, xp.concat([target_rows[t] for t in names], axis=0),
            guidance, counter, samples=control.noise_blend_samples, strength=control.noise_blend_strength,
            max_batch=limits.max_batch)
        return {t: stacked[i:i + 1] for i, t in enumerate(names)}

    def _fixed_masks(self, noise_maps: dict, items):
        """[1+K,1,h,w]: the source row (never blended) then each item's mask: its target's map
        above the item's threshold."""
        xp = self.backend.xp
        rows = [xp.astype(noise_maps[item.target] > item.blend_threshold, noise_maps[item.target].dtype) for item in items]
        return xp.concat([xp.zeros_like(rows[0]), *rows], axis=0)

    def _items_per_chunk(self, method: InversionMethod, limits: RunLimits) -> int:
        """Edit items per chunk so that the UNet batch stays ≤ max_batch (each chunk repeats the
        source: 2 batch items for ddim/null-text, 1 for direct/negative-prompt)."""
        both_halves = method in (InversionMethod.DDIM, InversionMethod.NULL_TEXT)
        per = (limits.max_batch // 2 - 1) if both_halves else (limits.max_batch - 1) // 2
        if per < 1:
            raise BackendError(f"max_batch {limits.max_batch} is too small for one edit item; use at least 4")
        return per

    def _check_inversion(self, inversion: Inversion):
        latent = self.backend.info.latent_size
        shape = inversion.trajectory.shape
        if shape[-1] != latent or shape[-2] != latent or shape[2] != self.backend.info.latent_channels:
            raise InversionFileError(f"the inversion's latents are {shape[2]}×{shape[3]}×{shape[4]}, this model's are "
                                     f"{self.backend.info.latent_channels}×{latent}×{latent}: invert the image with this model")
        if inversion.null_embeddings is not None and inversion.null_embeddings.shape[-1] != self.backend.info.text_width:
            raise InversionFileError("the inversion's null embeddings do not fit this model's text encoder: invert the image with this model")


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


class _progress:
    """A tqdm bar over steps when asked (shown on a terminal only), else nothing."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=None)  # off when not a terminal

    def update_one(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
