"""``prism-rt evaluate``: edits with known ground truth on held-out phantom patients.

For each patient (seeds from ``prism_export.phantom.HELDOUT_SEED0``, never trained on) and each
edit (remove / add support devices, remove / add pleural effusion), the patient is rendered with
the attribute as the edit's source and, toggled, as its true counterfactual; the attribute's mask
is where the two differ. Each configuration (inversion method, LocalBlend on/off, legacy) inverts
and edits with the self-window sweep (× the noise-blend thresholds); PRISM's filter (``--select``
logic: flips, then the best whole-image identity) picks one candidate per edit; the chosen
counterfactual is scored: success (the classifier flips), CPG, identity outside the mask against
the reconstruction, the VAE's own loss, and the error to the true counterfactual inside and
outside the mask. Writes ``evaluation.json`` (every edit) and
``evaluation.md`` (the table per edit × configuration).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from prism_rt.config import (COMPOSITE_THRESHOLDS, EDIT_NEGATIVES, NOISE_BLEND_THRESHOLDS, SELF_REPLACE_SWEEP,
                             ControlConfig, RunLimits)
from prism_rt.errors import MissingExtraError, SettingsError
from prism_rt.precision import CHOICES as PRECISIONS

EDITS = ("devices-remove", "devices-add", "effusion-remove", "effusion-add")
BASE_CONFIGS = ("null-text", "null-text+blend", "null-text+noise-blend", "direct", "direct+blend", "direct+noise-blend",
                "negative-prompt", "negative-prompt+blend", "negative-prompt+noise-blend", "legacy", "ddim")
COMPOSITE = "+composite"
"""A configuration's suffix: its counterfactuals composited onto the reconstruction
(``prism_rt.composite``); scored from the same edit as the configuration without it."""
CONFIGS = BASE_CONFIGS + tuple(c + COMPOSITE for c in BASE_CONFIGS if c not in ("legacy", "ddim"))
WORD = {"devices": "Devices", "effusion": "Effusion"}


@dataclass(frozen=True)
class EditCase:
    patient: int
    edit: str
    source01: np.ndarray
    truth01: np.ndarray
    mask: np.ndarray
    prompt: str
    target: str
    attribute: str
    direction: str


def phantom_cases(patients: int, edits, size: int, seed0: int | None = None) -> list[EditCase]:
    try:
        from prism_export import phantom
    except ImportError:
        raise MissingExtraError("export", "prism_export", "prism-rt evaluate (phantom patients)") from None
    seed0 = phantom.HELDOUT_SEED0 if seed0 is None else seed0
    cases = []
    for seed in range(seed0, seed0 + patients):
        patient, sampled = phantom.sample_patient(seed), phantom.sample_attributes(seed)
        for edit in edits:
            name, direction = edit.split("-")
            on = direction == "remove"
            if name == "devices":
                source_attrs = replace(sampled, devices=on)
            else:
                source_attrs = replace(sampled, effusion=(patient.effusion_side if on else None))
            source = phantom.render(patient, source_attrs, size)
            truth = phantom.counterfactuals(patient, source_attrs, size)[name]
            cases.append(EditCase(seed, edit, source.image, truth.image, source.masks[name], source.caption,
                                  truth.caption, phantom.LABEL_OF[name], direction))
    return cases


def _control(config: str, case: EditCase, sweep, noise_threshold=NOISE_BLEND_THRESHOLDS,
             blend: dict | None = None, edit_negative: str = "empty") -> ControlConfig:
    """The configuration's control settings; ``blend``: the attention LocalBlend's settings
    (``blend_threshold``, ``blend_dilation``) for ``…+blend``; ``edit_negative``: every
    configuration's but legacy (the published code's)."""
    if config == "legacy":
        return ControlConfig(legacy=True, self_replace=(0.0,))
    common = {"self_replace": tuple(sweep), "edit_negative": edit_negative}
    if config.endswith("+noise-blend"):
        return ControlConfig(noise_blend=True, noise_blend_threshold=noise_threshold, **common)
    if not config.endswith("+blend"):
        return ControlConfig(**common)
    word = WORD[case.edit.split("-")[0]]
    # the attribute's word in the prompt that names it; the other prompt adds nothing to the mask
    words = (word, "") if case.direction == "remove" else ("", word)
    return ControlConfig(blend_words=words, **common, **(blend or {}))


def same_weights(engine, inverter) -> None:
    """Raise ``SettingsError`` unless ``inverter`` (a torch checkpoint) holds the very weights
    ``engine`` was built from: the SHA-256 of its UNet, VAE and text-encoder files, as each
    records them (an engine folder in its manifest's ``source``)."""
    def digests(provenance: dict):
        source = provenance.get("source", provenance) or {}  # engine folder: the checkpoint it was exported from
        return sorted(w["sha256"] for w in source.get("weights") or []), (source.get("unet_weights") or {}).get("sha256")

    mine, theirs = digests(engine.backend.info.provenance), digests(inverter.backend.info.provenance)
    if not mine[0] or mine != theirs:
        raise SettingsError(f"--invert-model {inverter.model_path} does not hold the weights {engine.model_path} was "
                            "built from (their SHA-256 differ, or the engine does not record them); give the "
                            "checkpoint the engine was exported from")


def evaluate(engine, classifier, cases: list[EditCase], configs, steps: int, sweep, group: int = 4,
             progress=print, noise_threshold=NOISE_BLEND_THRESHOLDS, composite=COMPOSITE_THRESHOLDS,
             inverter=None, guidance: float = 7.5, blend: dict | None = None,
             edit_negative: str = "empty") -> list[dict]:
    """Every case under every configuration; cases of one edit kind are inverted one by one and
    edited ``group`` at a time in one batch (``Engine.edit_many``). A ``…+composite``
    configuration composites the counterfactuals of the same edit without it at ``composite``
    (several thresholds: more candidates of the filter), so both cost one edit. ``inverter``: an
    engine on the same weights with gradients (torch) that makes the null-text inversions, which
    ``engine`` (e.g. ONNX Runtime) then edits — as ``prism-rt invert --save`` + ``edit --inversion``.
    ``guidance``: the sampler's; ``blend``: the attention LocalBlend's settings (``blend_threshold``,
    ``blend_dilation``) for the ``…+blend`` configurations; ``edit_negative``:
    ``ControlConfig.edit_negative`` of every configuration but legacy."""
    from prism_rt.composite import composite_result
    from prism_rt.evaluate import blend_mask_overlap, edit_metrics, select, to01

    if inverter is not None:
        same_weights(engine, inverter)
    rows = []
    started = time.perf_counter()
    done = 0
    kinds = list(dict.fromkeys(c.edit for c in cases))
    methods = list(dict.fromkeys("direct" if c in ("legacy",) else c.split("+")[0] for c in configs))
    for kind in kinds:
        same = [c for c in cases if c.edit == kind]
        for start_index in range(0, len(same), group):
            chunk = same[start_index:start_index + group]
            for method in methods:
                by = inverter if inverter is not None and method == "null-text" else engine
                sampler = engine.sampler(steps=steps, guidance=guidance)
                inversions = [by.invert(c.source01, c.prompt, method=method, sampler=sampler) for c in chunk]
                edited: dict[str, tuple] = {}
                for config in configs:
                    if ("direct" if config == "legacy" else config.split("+")[0]) != method:
                        continue
                    base = config.removesuffix(COMPOSITE)
                    if base not in edited:
                        t0 = time.perf_counter()
                        edited[base] = (engine.edit_many(inversions, [[c.target] for c in chunk],
                                                         _control(base, chunk[0], sweep, noise_threshold, blend, edit_negative),
                                                         RunLimits(max_batch=63)),
                                        (time.perf_counter() - t0) / len(chunk))
                    results, seconds = edited[base]
                    if config != base:
                        results = [composite_result(r, composite) for r in results]
                    for case, inversion, result in zip(chunk, inversions, results):
                        source01, recon01 = to01(inversion.fitted_pixels), to01(result.reconstruction)
                        candidates = [edit_metrics(classifier, case.attribute, case.direction, source01, recon01,
                                                   to01(image), case.mask, case.truth01) for image in result.edits]
                        chosen = select(candidates)
                        index = chosen["selected"] if chosen["selected"] is not None else chosen["best_cpg_index"]
                        blend_mask = result.masks[index]
                        overlap = None if blend_mask is None else blend_mask_overlap(
                            blend_mask.reshape(case.mask.shape), case.mask, engine.backend.info.latent_downsample)
                        rows.append({"patient": case.patient, "edit": case.edit, "config": config, "prompt": case.prompt,
                                     "target": case.target, "self_replace": result.items[index].self_replace,
                                     "blend_threshold": result.items[index].blend_threshold,
                                     "composite": result.items[index].composite,
                                     "success": chosen["flipped"], "reconstruction_error": result.reconstruction_error,
                                     "mask_fraction": float(case.mask.mean()), "seconds": seconds,
                                     "blend_mask": overlap,
                                     **candidates[index]})
            done += len(chunk)
            if progress:
                progress(f"  {done}/{len(cases)} edits, {time.perf_counter() - started:.0f} s")
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    keys = list(dict.fromkeys((r["edit"], r["config"]) for r in rows))
    for edit, config in keys:
        sel = [r for r in rows if r["edit"] == edit and r["config"] == config]
        def mean(f):  # over the edits that have the measure (None: none has, e.g. no blend mask)
            values = [v for v in map(f, sel) if v is not None]
            return float(np.mean(values)) if values else None
        table.append({
            "edit": edit, "config": config, "n": len(sel),
            "success_rate": mean(lambda r: float(r["success"])),
            "cpg": mean(lambda r: r["classifier"]["cpg"]),
            "l1_outside_mask": mean(lambda r: r["identity_outside_mask"]["l1"]),
            "psnr_outside_mask_db": mean(lambda r: r["identity_outside_mask"]["psnr_db"]),
            "ssim_outside_mask": mean(lambda r: r["identity_outside_mask"]["ssim"]),
            "psnr30_rate": mean(lambda r: float((r["identity_outside_mask"]["psnr_db"] or 0) >= 30)),
            "success_psnr30_rate": mean(lambda r: float(r["success"] and (r["identity_outside_mask"]["psnr_db"] or 0) >= 30)),
            "truth_l1_inside": mean(lambda r: r["truth"]["l1_inside"]),
            "truth_l1_outside": mean(lambda r: r["truth"]["l1_outside"]),
            "truth_success_rate": mean(lambda r: None if r["truth"]["success"] is None else float(r["truth"]["success"])),
            "both_success_rate": mean(lambda r: None if r["truth"]["success"] is None
                                      else float(r["truth"]["success"] and r["success"])),
            "attribute_left": mean(lambda r: r["truth"]["left"]),
            "change_iou": mean(lambda r: r["truth"]["change_iou"]),
            "mask_iou_latent": mean(lambda r: r["blend_mask"] and r["blend_mask"]["iou_latent"]),
            "mask_recall": mean(lambda r: r["blend_mask"] and r["blend_mask"]["recall"]),
            "mask_cover": mean(lambda r: r["blend_mask"] and r["blend_mask"]["cover"]),
            "vae_psnr_db": mean(lambda r: r["vae"]["psnr_db"]),
            "reconstruction_error": mean(lambda r: r["reconstruction_error"]),
        })
    return table


def markdown(table: list[dict], meta: dict) -> str:
    lines = [f"# Phantom evaluation ({meta['patients']} held-out patients, {meta['steps']} steps, sweep {meta['sweep']})",
             "", f"engine {meta['model']} ({meta['backend']}, {meta['precision']}); classifier {meta['classifier']}; "
             f"{meta['seconds']:.0f} s. Guidance {meta.get('guidance')}; LocalBlend threshold "
             f"{meta.get('blend_threshold')}, dilation {meta.get('blend_dilation')}; edit negative "
             f"{meta.get('edit_negative', 'empty')}."
             + (f" Null-text inversions: {meta['invert_model']} on torch (the same weights)." if meta.get("invert_model") else ""),
             "", "success: the classifier flips the attribute (PRISM's filter picks one candidate — self-window value, "
             "noise-blend threshold — by flip, then whole-image identity to the reconstruction); CPG: gain in "
             "the attribute's probability in the edit's direction; identity: the chosen counterfactual against the "
             "source's reconstruction, outside the attribute's mask; truth: L1 to the true counterfactual; "
             "left: of the attribute's pixels, the share still as in the source (truth success: ≤ 10 %); change "
             "IoU: the pixels the edit changed against the attribute's mask; mask IoU: the blend mask's latent "
             "cells against the cells that hold the attribute; mask recall / cover: the share of the attribute's "
             "pixels / of the image the blend mask leaves editable (– without a blend mask). "
             f"+composite: the same edit's counterfactuals, composited onto the reconstruction where they change "
             f"by more than each of {meta.get('composite')} of the intensity range (0: not composited), are the "
             "candidates.", "",
             "| edit | configuration | n | success | truth success | both | left | change IoU | mask IoU | mask recall | "
             "mask cover | CPG | L1 outside | "
             "PSNR outside dB | PSNR≥30 | success & PSNR≥30 | SSIM outside | truth L1 in | truth L1 out | "
             "latent recon. error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, s="{:.3f}": "–" if v is None else s.format(v)  # noqa: E731
    for r in table:
        lines.append(f"| {r['edit']} | {r['config']} | {r['n']} | {f(r['success_rate'], '{:.0%}')} | "
                     f"{f(r['truth_success_rate'], '{:.0%}')} | {f(r['both_success_rate'], '{:.0%}')} | "
                     f"{f(r['attribute_left'], '{:.0%}')} | {f(r['change_iou'], '{:.2f}')} | {f(r['mask_iou_latent'], '{:.2f}')} | "
                     f"{f(r['mask_recall'], '{:.0%}')} | {f(r['mask_cover'], '{:.0%}')} | {f(r['cpg'])} | "
                     f"{f(r['l1_outside_mask'], '{:.4f}')} | {f(r['psnr_outside_mask_db'], '{:.1f}')} | "
                     f"{f(r['psnr30_rate'], '{:.0%}')} | {f(r['success_psnr30_rate'], '{:.0%}')} | {f(r['ssim_outside_mask'])} | {f(r['truth_l1_inside'], '{:.4f}')} | "
                     f"{f(r['truth_l1_outside'], '{:.4f}')} | {f(r['reconstruction_error'], '{:.2e}')} |")
    return "\n".join(lines)


def add_evaluate_parser(sub):
    p = sub.add_parser("evaluate", help="edit held-out phantom patients with known true counterfactuals and score them")
    p.add_argument("--model", type=Path, required=True, help="a phantom model (checkpoint folder or engine folder)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], help="default: what --model is (engine folder: onnxruntime)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--classifier", type=Path, required=True, help="ONNX attribute classifier (e.g. the model's classifier.onnx)")
    p.add_argument("--patients", type=int, default=50)
    p.add_argument("--seed0", type=int, help="first patient seed (default: the held-out range)")
    p.add_argument("--edits", default=",".join(EDITS), help=f"comma-separated subset of {','.join(EDITS)}")
    p.add_argument("--configs", default="direct,direct+blend,negative-prompt,negative-prompt+blend,legacy",
                   help=f"comma-separated subset of {','.join(CONFIGS)} (null-text needs --backend torch "
                        "or --invert-model)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance (default %(default)s, PRISM's)")
    p.add_argument("--blend-threshold", type=float, default=0.3, help="the +blend configurations' LocalBlend threshold")
    p.add_argument("--blend-dilation", type=int, default=1,
                   help="the +blend configurations' max-pool radius in map cells (published 1 = 3×3; 0 = none)")
    p.add_argument("--edit-negative", default="empty", choices=EDIT_NEGATIVES,
                   help="what the edits' guidance steers away from, in every configuration but legacy: empty "
                        "(published) or source (the source caption; not with null-text)")
    p.add_argument("--self-replace", default=",".join(map(str, SELF_REPLACE_SWEEP)))
    p.add_argument("--noise-blend-threshold", default=",".join(map(str, NOISE_BLEND_THRESHOLDS)),
                   help="the +noise-blend configurations' mask threshold(s) (× the mean prediction difference), "
                        "comma-separated; several are candidates of the filter like the self-window values")
    p.add_argument("--composite", default=",".join(f"{t:g}" for t in COMPOSITE_THRESHOLDS),
                   help="the +composite configurations' difference-composite threshold(s) (a fraction of the "
                        "intensity range), comma-separated; several are candidates of the filter")
    p.add_argument("--invert-model", type=Path,
                   help="the checkpoint --model was exported from (diffusers layout), run on torch for the inversions "
                        "that need gradients (null-text); --model then edits them (e.g. on onnxruntime, far faster)")
    p.add_argument("--threads", type=int, help="onnxruntime / torch threads (default: all cores)")
    p.add_argument("--blend-downsample", type=int, choices=(1, 2, 4, 8),
                   help="a checkpoint on torch: LocalBlend's maps at 1/N of the latent side (default 4)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_evaluate)
    return p


register = add_evaluate_parser  # the ``prism_rt.commands`` entry point


def run_evaluate(args) -> int:
    from prism_rt.engine import Engine
    from prism_rt.evaluate import Classifier
    from prism_rt.outputs import library_versions

    edits = [e for e in args.edits.split(",") if e]
    configs = [c for c in args.configs.split(",") if c]
    bad = [e for e in edits if e not in EDITS] + [c for c in configs if c not in CONFIGS]
    if bad or not edits or not configs or args.patients < 1:
        raise SettingsError(f"unknown edit(s)/configuration(s) {bad}; edits: {', '.join(EDITS)}; "
                            f"configurations: {', '.join(CONFIGS)}; --patients ≥ 1")
    try:
        sweep = tuple(float(v) for v in args.self_replace.split(","))
        thresholds = tuple(float(v) for v in args.noise_blend_threshold.split(","))
        composite = ControlConfig(composite=tuple(float(v) for v in args.composite.split(","))).composite
    except ValueError as exc:
        raise SettingsError(f"--self-replace, --noise-blend-threshold and --composite take numbers such as 0.4,0.6 "
                            f"(--composite: distinct, in [0, 1)); got {args.self_replace!r}, "
                            f"{args.noise_blend_threshold!r}, {args.composite!r} ({exc})") from None
    blend = {"blend_threshold": args.blend_threshold, "blend_dilation": args.blend_dilation}
    checked = ControlConfig(edit_negative=args.edit_negative, **blend)  # before any work
    for config in configs:
        if config != "legacy":
            checked.check_inversion(config.split("+")[0])
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise MissingExtraError("bench", "scikit-image", "prism-rt evaluate") from None
    if args.out.exists() and not args.out.is_dir():
        raise SettingsError(f"--out {args.out} is a file; give a folder")
    classifier = Classifier.load(args.classifier)
    engine = Engine.load(args.model, backend=args.backend, precision=args.precision, threads=args.threads,
                         blend_downsample=args.blend_downsample)
    inverter = None
    if args.invert_model is not None:  # its weights are checked by evaluate()
        inverter = Engine.from_checkpoint(args.invert_model, threads=args.threads)
    cases = phantom_cases(args.patients, edits, engine.backend.info.image_size, args.seed0)
    print(f"evaluating {len(cases)} edits × {len(configs)} configurations …", flush=True)
    start = time.perf_counter()
    rows = evaluate(engine, classifier, cases, configs, args.steps, sweep, noise_threshold=thresholds, composite=composite,
                    inverter=inverter, guidance=args.guidance, blend=blend, edit_negative=args.edit_negative)
    table = summarize(rows)
    meta = {"patients": args.patients, "steps": args.steps, "sweep": list(sweep), "model": str(args.model),
            "backend": engine.backend.kind.value, "precision": args.precision, "classifier": str(args.classifier),
            "seed0": args.seed0, "invert_model": str(args.invert_model) if inverter else None,
            "noise_blend_threshold": list(thresholds), "composite": list(composite), "guidance": args.guidance,
            **blend, "edit_negative": args.edit_negative,
            "seconds": time.perf_counter() - start, "libraries": library_versions()}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".evaluation.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "summary": table, "edits": rows}, indent=1, default=float))
    tmp.replace(args.out / "evaluation.json")
    (args.out / "evaluation.md").write_text(markdown(table, meta) + "\n")
    print(markdown(table, meta))
    return 0
