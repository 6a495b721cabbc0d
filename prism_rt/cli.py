"""``prism-rt``: edit, invert, demo, info (+ bench and evaluate from prism_bench, by entry point).

The CLI only parses: every setting is checked by the config dataclasses and the Engine, and
everything that does not need the model (the output folder, the image's header, the settings) is
checked before the model loads. Errors print one ``error: …`` line and exit non-zero.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .config import (COMPOSITE_THRESHOLDS, NOISE_BLEND_THRESHOLDS, ControlConfig, Fit, InversionConfig, InversionMethod,
                     OrtOptions, RunLimits, SamplerConfig)
from .errors import PrismError, PromptError
from .precision import CHOICES as PRECISIONS

EXIT_INTERNAL = 70
PLUGIN_GROUP = "prism_rt.commands"
"""Entry-point group of the commands other floors add to ``prism-rt`` (``bench`` and ``evaluate``
from prism_bench): each entry point is ``register(subparsers)``, which adds one sub-parser and
sets its ``func``. The runtime never imports them itself (floors point down only)."""


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


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.4,0.6; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _pair(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected SRC_WORD,EDIT_WORD such as devices,devices; got {text!r}")
    return parts[0], parts[1]


def _trt_cache(text: str):
    if text.strip().lower() in ("off", "none", "no", "false", "0"):
        return False
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, or off")
    return Path(text)


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _model_args(p: argparse.ArgumentParser, model_required: bool = True):
    g = p.add_argument_group("model")
    g.add_argument("--model", type=_path, required=model_required,
                   help="an engine folder from `prism-export export` (runs on onnxruntime), or a diffusers SD v1.x "
                        "folder / single-file .safetensors checkpoint (runs on torch)")
    g.add_argument("--backend", choices=["onnxruntime", "torch"],
                   help="default: what --model is (engine folder: onnxruntime; checkpoint: torch)")
    g.add_argument("--device", default="cpu",
                   help="torch: cpu or cuda[:N]; onnxruntime: cpu, cuda[:N] or tensorrt[:N] (execution provider)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="an engine folder's variant (`prism-rt info ENGINE` lists them with their measured quality); "
                        "torch: fp32 or fp16 graphs (loops stay fp32)")
    g.add_argument("--threads", type=_positive,
                   help="CPU threads of onnxruntime / torch (default: every core; on a shared machine 1–2 is often "
                        "much faster)")
    g.add_argument("--unet-weights", type=_path, help="checkpoint: a fine-tuned UNet state dict (PRISM's model.safetensors)")
    g.add_argument("--config", type=_path, help="checkpoint: a diffusers SD folder giving configs and tokenizer for a "
                                                 "single-file checkpoint")
    g.add_argument("--allow-pickle", action="store_true", help="checkpoint: allow .ckpt/.bin pickle weights (they can "
                                                               "execute code)")
    g.add_argument("--self-max-queries", type=_positive,
                   help="self-attention layers with at most this many queries are controlled (PRISM 1024, the torch "
                        "default; p2p 256); an engine folder has the value it was exported with")
    g.add_argument("--no-cpu-arena", action="store_true",
                   help="onnxruntime on a CPU: free every tensor after each call (lower resident memory, slower)")
    g.add_argument("--portable-graphs", action="store_true",
                   help="onnxruntime on a CPU: run the portable graphs TensorRT builds from instead of the CPU twins "
                        "with fused attention (same outputs to ~1e-6, far more memory at SD v1.5 size)")
    g.add_argument("--trt-cache", type=_trt_cache, metavar="DIR|off",
                   help="onnxruntime on --device tensorrt: keep TensorRT's built engines and timing cache in DIR "
                        "(default ENGINE/trt-cache, or ~/.cache/prism_rt/trt where the engine folder is read-only); "
                        "off: build anew in each process")


def _invert_args(p: argparse.ArgumentParser, required_prompt: bool):
    from .imageio import DEFAULT_MAX_PIXELS

    g = p.add_argument_group("image and inversion")
    g.add_argument("--image", type=_path, required=required_prompt, help="PNG, JPEG (8/16 bit) or DICOM radiograph")
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
    g.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (checked from the header, before decoding)")


def _common(p: argparse.ArgumentParser):
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks of internal errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def _edit_args(edit: argparse.ArgumentParser):
    g = edit.add_argument_group("edit (prompt-to-prompt control; defaults are PRISM's)")
    g.add_argument("--target", action="append", required=True, help="an edited caption; repeat for several edits")
    g.add_argument("--inversion-file", type=_path, help="reuse an inversion written by `prism-rt invert --save`")
    g.add_argument("--mode", default=default(ControlConfig, "mode"), choices=["refine", "replace"],
                   help="refine (PRISM) or word swap")
    g.add_argument("--cross-replace", type=float, default=default(ControlConfig, "cross_replace"),
                   help="fraction of steps whose cross-attention is the source's")
    g.add_argument("--self-replace", type=_floats, default=default(ControlConfig, "self_replace"),
                   help="self-attention window(s), comma-separated: each value is one candidate")
    g.add_argument("--edit-weight", type=float, default=default(ControlConfig, "edit_weight"),
                   help="reweighting of the edit words, in [0, 10]")
    g.add_argument("--edit-words", type=_csv, help="words to reweight (default: the new words of each target)")
    g.add_argument("--blend-words", type=_pair, help="SRC_WORD,EDIT_WORD: LocalBlend from the attention maps")
    g.add_argument("--blend-threshold", type=float, default=default(ControlConfig, "blend_threshold"),
                   help="LocalBlend mask threshold, in (0, 1]")
    g.add_argument("--noise-blend", action="store_true",
                   help="LocalBlend with a mask from the noise predictions under the source vs the target caption "
                        "(DiffEdit) instead of the attention maps; needs no --blend-words")
    g.add_argument("--noise-blend-threshold", type=_floats, default=NOISE_BLEND_THRESHOLDS,
                   help="noise-blend mask: where the prediction difference exceeds this × its image mean; several "
                        "values are candidates")
    g.add_argument("--composite", type=_floats, default=(), metavar="T[,T…]",
                   help="difference composite: keep each counterfactual's change only where it exceeds T (a fraction "
                        "of the intensity range) and the reconstruction elsewhere; 0 = plain; several values are "
                        f"candidates ({','.join(f'{t:g}' for t in COMPOSITE_THRESHOLDS)} measured on phantoms; default off)")
    g.add_argument("--legacy", action="store_true", help="the published code's behaviour: no attention control, no blend")
    g.add_argument("--max-batch", type=_positive, default=default(RunLimits, "max_batch"),
                   help="largest UNet batch; more edit items are split into chunks")
    g.add_argument("--seed", type=int, default=0, help="recorded; every step is deterministic (η = 0)")
    g.add_argument("--select", type=_path, metavar="CLASSIFIER.onnx",
                   help="pick, per edit, the candidate that flips the attribute with the best identity (PRISM's "
                        "filter): selected-K.png and the scores in result.json")
    o = edit.add_argument_group("output")
    o.add_argument("--out", type=_path, required=True, help="the result folder (replaced as a whole if it exists)")
    o.add_argument("--no-figure", dest="figure", action="store_false",
                   help="no figure.png (source | reconstruction | counterfactual | change)")
    o.add_argument("--figure", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    o.add_argument("--extras", action="store_true", help="also the reconstruction and the difference maps")
    o.add_argument("--dicom-out", default="on", choices=["on", "off"],
                   help="a DICOM input: a marked-synthetic Secondary Capture twin (.dcm) of each counterfactual PNG, "
                        "in a new series of the input's study")
    o.add_argument("--dicom-label", default="on", choices=["on", "off"],
                   help="burn a SYNTHETIC label into the DICOM twins' top-left corner (off: pixels untouched)")
    o.add_argument("--anonymize", action="store_true",
                   help="DICOM twins without patient/study identity (PS3.15 basic profile, new study UID): for "
                        "research exports; they then no longer file beside the original")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prism-rt", description="PRISM counterfactual chest X-ray engine", formatter_class=Formatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    edit = sub.add_parser("edit", help="invert an image and write its counterfactuals", formatter_class=Formatter)
    _model_args(edit)
    _invert_args(edit, required_prompt=False)
    _edit_args(edit)
    _common(edit)

    inv = sub.add_parser("invert", help="invert an image once and save it for many edits", formatter_class=Formatter)
    _model_args(inv)
    _invert_args(inv, required_prompt=True)
    inv.add_argument("--save", type=_path, required=True, help="the .npz file to write")
    _common(inv)

    demo = sub.add_parser("demo", help="the bundled demo: remove the support devices from a phantom radiograph",
                          formatter_class=Formatter)
    demo.add_argument("--out", type=_path, required=True)
    demo.add_argument("--engine", type=_path, help="default: the bundled engines/phantom-demo")
    demo.add_argument("--image", type=_path, help="default: the engine's demo image")
    demo.add_argument("--precision", default="fp32", choices=PRECISIONS)
    demo.add_argument("--inversion", default="direct", choices=["direct", "negative-prompt"],
                      help="onnxruntime has no autograd, so no null-text here")
    demo.add_argument("--threads", type=_positive, help="CPU threads (default: every core)")
    demo.add_argument("--extras", action="store_true", help="also the reconstruction and the difference maps")
    _common(demo)

    info = sub.add_parser("info", help="summarise an engine folder (or a checkpoint)", formatter_class=Formatter)
    info.add_argument("engine", nargs="?", type=_path, help="an engine folder")
    info.add_argument("--json", action="store_true", help="the whole manifest summary as JSON")
    _model_args(info, model_required=False)
    _common(info)
    from .batch_cli import add_batch_parser
    from .serve import add_serve_parser
    from .triton_repo import add_triton_repo_parser

    add_batch_parser(sub, model_args=_model_args, common=_common, load=_load, control=_control, formatter=Formatter)
    add_serve_parser(sub, model_args=_model_args, common=_common, load=_load, formatter=Formatter)
    add_triton_repo_parser(sub, common=_common, formatter=Formatter)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError:  # that floor's optional dependencies are not installed
            continue
        register(sub)


# -- settings from the arguments (checked by the dataclasses themselves) ---------------------------
def _control(args) -> ControlConfig:
    return ControlConfig(cross_replace=args.cross_replace, self_replace=tuple(args.self_replace),
                         edit_weight=args.edit_weight, edit_words=args.edit_words, blend_words=args.blend_words,
                         blend_threshold=args.blend_threshold, noise_blend=args.noise_blend,
                         noise_blend_threshold=args.noise_blend_threshold, composite=tuple(args.composite),
                         mode=args.mode, legacy=args.legacy)


def _load(args):
    from .engine import Engine

    options = OrtOptions(threads=args.threads, cpu_arena=not args.no_cpu_arena, cpu_graphs=not args.portable_graphs,
                         trt_cache=args.trt_cache)
    return Engine.load(args.model, backend=args.backend, device=args.device, precision=args.precision,
                       self_max_queries=args.self_max_queries, unet_weights=args.unet_weights, config=args.config,
                       allow_pickle=args.allow_pickle, threads=args.threads,
                       **({"options": options} if _is_engine(args) else {}))


def _is_engine(args) -> bool:
    from .engine import is_engine_dir

    return args.backend == "onnxruntime" or (args.backend is None and is_engine_dir(args.model))


def _invert(engine, args, source):
    sampler = engine.sampler(steps=args.steps, guidance=args.guidance)
    return engine.invert(source, args.prompt, method=args.inversion, sampler=sampler,
                         inversion=InversionConfig(null_inner_steps=args.null_inner_steps), fit=args.fit,
                         progress=not args.no_progress)


def _warn(messages) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def cmd_edit(args) -> int:
    from .imageio import load_image, probe_image
    from .inversion import Inversion
    from .outputs import write_edit_outputs
    from .publish import check_writable

    # everything that needs no model, before the model loads
    check_writable(args.out)
    control = _control(args)
    SamplerConfig(steps=args.steps, guidance=args.guidance)
    RunLimits(max_batch=args.max_batch)
    if args.inversion_file is None and (args.image is None or args.prompt is None):
        raise PromptError("give --image and --prompt (or --inversion-file from `prism-rt invert --save`)")
    saved = Inversion.load(args.inversion_file, max_pixels=args.max_pixels) if args.inversion_file else None
    if saved is None:
        probe_image(args.image, max_pixels=args.max_pixels)
    classifier = None
    if args.select is not None:
        from .evaluate import Classifier, edit_direction

        classifier = Classifier.load(args.select)
        for target in args.target:  # which attribute each edit changes: known before any model work
            edit_direction(saved.source_prompt if saved else args.prompt, target, classifier.labels)
    start = time.perf_counter()
    engine = _load(args)
    load_s = time.perf_counter() - start
    steps = saved.sampler.steps if saved else args.steps
    engine.plan(saved.source_prompt if saved else args.prompt, args.target, control, steps)  # prompt errors before work
    if saved is None:
        engine.check_inversion_method(args.inversion)
    inversion = saved or _invert(engine, args, load_image(args.image, max_pixels=args.max_pixels))
    result = engine.edit(inversion, args.target, control, RunLimits(max_batch=args.max_batch), progress=not args.no_progress)
    result.timings["load_s"] = load_s
    parameters = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    parameters["inversion"] = inversion.method.value
    selection = None
    if classifier is not None:
        from .evaluate import select_edits

        selection = select_edits(classifier, inversion.source_prompt, result, inversion.fitted_pixels)
    from .dicom_out import DicomOptions

    write_edit_outputs(args.out, result, inversion, parameters, selection=selection, figure=args.figure,
                       extras=args.extras, dicom=DicomOptions(label=args.dicom_label == "on", anonymize=args.anonymize)
                       if args.dicom_out == "on" else None)
    _warn(result.warnings)
    print(f"wrote {len(result.edits)} counterfactual(s) to {args.out} ({inversion.method.value} inversion, "
          f"reconstruction error {result.reconstruction_error:.2e}, {result.counts['unet_items']} UNet items)")
    for k, choice in enumerate(selection or []):
        if choice["selected_item"] is None:
            print(f"  edit {k} ({choice['direction']} {choice['attribute']}): no candidate flips the classifier")
        else:
            scores = next(c for c in choice["candidates"] if c["item"] == choice["selected_item"])
            print(f"  edit {k} ({choice['direction']} {choice['attribute']}): selected {choice['selected_item']} → "
                  f"{args.out / choice['file']} (p {scores['classifier']['p_source']:.2f} → "
                  f"{scores['classifier']['p_counterfactual']:.2f})")
    return 0


def cmd_invert(args) -> int:
    from .imageio import load_image, probe_image
    from .inversion import Inversion
    from .publish import check_writable

    Inversion.check_path(args.save)
    check_writable(args.save, folder=False, marker=None, flag="--save")
    SamplerConfig(steps=args.steps, guidance=args.guidance)
    probe_image(args.image, max_pixels=args.max_pixels)
    engine = _load(args)
    engine.tokenizer.encode_batch_padded([args.prompt])
    engine.check_inversion_method(args.inversion)
    inversion = _invert(engine, args, load_image(args.image, max_pixels=args.max_pixels))
    path = inversion.save(args.save)
    print(f"wrote the {inversion.method.value} inversion of {args.image} to {path}")
    return 0


def cmd_info(args) -> int:
    from .errors import ModelError

    target = args.engine or args.model
    if target is None:
        raise ModelError("give an engine folder (prism-rt info ENGINE_DIR) or --model MODEL")
    if (Path(target) / "manifest.json").is_file() or args.engine is not None:
        from .manifest import load_manifest, summary_text  # an engine folder: checked, summarised, nothing loaded

        summary = load_manifest(target, precision=args.precision).summary()
        print(json.dumps(summary, indent=2, default=str) if args.json else summary_text(summary))
        return 0
    engine = _load(args)
    info = engine.backend.info
    print(json.dumps({"model": str(args.model), "image_size": info.image_size, "latent_size": info.latent_size,
                      "text_width": info.text_width, "backend": engine.backend.describe(),
                      "provenance": info.provenance}, indent=2, default=str))
    return 0


DEMO_ENGINE = Path(__file__).resolve().parent.parent / "engines" / "phantom-demo"


def cmd_demo(args) -> int:
    """`prism-rt edit` on the bundled engine with the demo's own settings (engine/demo.json)."""
    from .errors import ModelError

    engine = (args.engine or DEMO_ENGINE).expanduser()
    spec_path = engine / "demo.json"
    if not spec_path.is_file():
        raise ModelError(f"{engine} is not a demo engine (no demo.json); the bundled one lives in the repository's "
                         "engines/phantom-demo: run from a checkout, or pass --engine")
    spec = json.loads(spec_path.read_text())
    argv = ["edit", "--model", str(engine), "--precision", args.precision, "--inversion", args.inversion,
            "--image", str(args.image or engine / spec["image"]), "--prompt", spec["prompt"], "--out", str(args.out)]
    for target in spec["targets"]:
        argv += ["--target", target]
    if spec.get("classifier"):
        argv += ["--select", str(engine / spec["classifier"])]
    argv += [str(x) for x in spec.get("edit_args", [])]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.no_progress:
        argv.append("--no-progress")
    if args.extras:
        argv.append("--extras")
    edit_args = build_parser().parse_args(argv)
    print(f"demo: {spec['prompt']!r} → {spec['targets'][0]!r} on {edit_args.image.name} "
          f"({args.inversion} inversion, onnxruntime {args.precision})")
    code = cmd_edit(edit_args)
    if code == 0:
        print(f"see {args.out / 'figure.png'} (source | reconstruction | counterfactual | change); the "
              f"counterfactuals and result.json are in {args.out}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "func", None) or {"edit": cmd_edit, "invert": cmd_invert, "info": cmd_info,
                                              "demo": cmd_demo}[args.command]
    try:
        return handler(args)
    except PrismError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so plainly
        if getattr(args, "debug", False):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
