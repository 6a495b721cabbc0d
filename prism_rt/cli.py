"""``prism-rt``: edit, invert, info. Errors print one ``error: …`` line and exit non-zero."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import COMPOSITE_THRESHOLDS, NOISE_BLEND_THRESHOLDS, ControlConfig, Fit, InversionConfig, InversionMethod, RunLimits
from .config import SamplerConfig
from .errors import InversionFileError, OutputError, PrismError, PromptError, SettingsError

EXIT_INTERNAL = 70


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


def _model_args(p: argparse.ArgumentParser, model_required: bool = True):
    p.add_argument("--model", required=model_required,
                   help="diffusers SD v1.x folder or single-file .safetensors checkpoint (--backend torch), "
                        "or an engine folder from `prism-export export` (--backend onnxruntime)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--device", default="cpu",
                   help="torch: cpu or cuda[:N]; onnxruntime: cpu, cuda[:N] or tensorrt[:N] (execution provider)")
    p.add_argument("--unet-weights", type=Path, help="fine-tuned UNet state dict (e.g. PRISM's model.safetensors)")
    p.add_argument("--config", type=Path, help="diffusers SD folder giving configs and tokenizer for a single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickle weights (they can execute code)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int8-cpu"],
                   help="an engine folder's variant (`prism-rt info ENGINE` lists them with their measured quality); "
                        "torch: fp32 or fp16 graphs (loops stay fp32)")
    p.add_argument("--no-cpu-arena", action="store_true",
                   help="onnxruntime on a CPU: free every tensor after each call instead of keeping one memory arena "
                        "(lower resident memory between calls, slower)")
    p.add_argument("--portable-graphs", action="store_true",
                   help="onnxruntime on a CPU: run the portable graphs (the ones TensorRT builds from) instead of the "
                        "engine's CPU twins with fused attention (same outputs to ~1e-6, far less memory at SD v1.5 size)")
    p.add_argument("--trt-cache", type=_trt_cache, default=None, metavar="DIR|off",
                   help="onnxruntime on --device tensorrt: keep TensorRT's built engines and timing cache in DIR "
                        "(default ENGINE/trt-cache, or ~/.cache/prism_rt/trt where the engine folder is read-only), "
                        "so only the first run on a machine builds them; off: build anew in each process")
    p.add_argument("--self-max-queries", type=int, default=None,
                   help="self-attention layers with at most this many queries are controlled (PRISM 1024, the "
                        "default for torch; p2p 256); an engine folder uses the value it was exported with")


def _invert_args(p: argparse.ArgumentParser, required_prompt: bool):
    p.add_argument("--image", type=Path, required=required_prompt, help="PNG, JPEG (8/16 bit) or DICOM radiograph")
    p.add_argument("--prompt", required=required_prompt, help="the source caption")
    p.add_argument("--inversion", default="null-text", choices=[m.value for m in InversionMethod])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--fit", default="resize", choices=[f.value for f in Fit])
    p.add_argument("--null-inner-steps", type=int, default=10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-rt", description="PRISM counterfactual chest X-ray engine")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="invert an image and write its counterfactuals")
    _model_args(edit)
    _invert_args(edit, required_prompt=False)
    edit.add_argument("--inversion-file", type=Path, help="reuse an inversion written by `prism-rt invert --save`")
    edit.add_argument("--target", action="append", required=True, help="an edited caption; repeat for several edits")
    edit.add_argument("--out", type=Path, required=True)
    edit.add_argument("--mode", default="refine", choices=["refine", "replace"], help="refine (PRISM) or word swap")
    edit.add_argument("--cross-replace", type=float, default=0.8)
    edit.add_argument("--self-replace", type=_floats, default=(0.4, 0.5, 0.6, 0.7, 0.8))
    edit.add_argument("--edit-weight", type=float, default=2.0)
    edit.add_argument("--edit-words", type=lambda s: tuple(w for w in s.split(",") if w), help="words to reweight (default: new words of the target)")
    edit.add_argument("--blend-words", type=_pair, help="SRC_WORD,EDIT_WORD: turn LocalBlend on")
    edit.add_argument("--blend-threshold", type=float, default=0.3)
    edit.add_argument("--noise-blend", action="store_true",
                      help="LocalBlend with a mask from the noise predictions under the source vs the target caption "
                           "(DiffEdit) instead of the cross-attention maps: for models whose attention does not "
                           "localise words; needs no --blend-words")
    edit.add_argument("--noise-blend-threshold", type=_floats, default=NOISE_BLEND_THRESHOLDS,
                      help="noise-blend mask: where the prediction difference exceeds this × its image mean; "
                           "comma-separated values run as extra items, like --self-replace (--select picks one) "
                           f"(default {','.join(map(str, NOISE_BLEND_THRESHOLDS))})")
    edit.add_argument("--composite", type=_floats, default=(), metavar="T[,T…]",
                      help="difference composite: keep each counterfactual's change only where it exceeds T (a "
                           "fraction of the intensity range, after a 1.5-pixel blur) and take the reconstruction "
                           "elsewhere, so an edit changes little but itself; 0 = the plain counterfactual. Several "
                           "values are extra candidates (no extra UNet work; --select picks one); "
                           f"{','.join(f'{t:g}' for t in COMPOSITE_THRESHOLDS)} measured on phantoms. Default: off")
    edit.add_argument("--legacy", action="store_true", help="the published code's behaviour: no attention control, no blend")
    edit.add_argument("--max-batch", type=int, default=32, help="largest UNet batch; more edit items are chunked")
    edit.add_argument("--seed", type=int, default=0, help="recorded; every step is deterministic (η = 0)")
    edit.add_argument("--select", type=Path, metavar="CLASSIFIER.onnx",
                      help="pick, per edit, the candidate (self-window value, noise-blend threshold) whose counterfactual "
                           "flips the attribute with the best identity to the reconstruction (PRISM's filter); writes "
                           "selected-K.png and the scores to result.json")
    edit.add_argument("--figure", action="store_true", help="also write figure.png (source | reconstruction | "
                                                             "counterfactual | change)")
    edit.add_argument("--no-progress", action="store_true")

    inv = sub.add_parser("invert", help="invert an image once and save it for many edits")
    _model_args(inv)
    _invert_args(inv, required_prompt=True)
    inv.add_argument("--save", type=Path, required=True, help="the .npz file to write")
    inv.add_argument("--no-progress", action="store_true")

    demo = sub.add_parser("demo", help="the bundled demo: remove the support devices from a phantom radiograph")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--engine", type=Path, help="default: the bundled engines/phantom-demo")
    demo.add_argument("--image", type=Path, help="default: the engine's demo image")
    demo.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int8-cpu"])
    demo.add_argument("--inversion", default="direct", choices=["direct", "negative-prompt"],
                      help="onnxruntime has no autograd, so no null-text here (default direct)")
    demo.add_argument("--no-progress", action="store_true")

    _add_plugin_commands(sub)

    info = sub.add_parser("info", help="describe a model or an engine folder")
    info.add_argument("engine", nargs="?", type=Path, help="an engine folder: print its manifest summary")
    _model_args(info, model_required=False)
    return parser


def _check_out(out: Path, flag: str = "--out", folder: bool = True):
    """Fail before any work when the output path cannot be written."""
    if folder and out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a folder; choose another {flag}")
    if not folder and out.is_dir():
        raise OutputError(f"{flag} {out} is a folder; give a file name such as {out / 'inversion.npz'}")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out} lies below {parent}, which is a file; choose another {flag}")


def _check_sampler(args):
    try:
        SamplerConfig(steps=args.steps, guidance=args.guidance)
    except ValueError as exc:
        raise SettingsError(f"{exc}; PRISM uses --steps 50 --guidance 7.5") from None


def _control(args) -> ControlConfig:
    try:
        return ControlConfig(cross_replace=args.cross_replace, self_replace=tuple(args.self_replace),
                             edit_weight=args.edit_weight,
                             edit_words=args.edit_words, blend_words=args.blend_words,
                             blend_threshold=args.blend_threshold, noise_blend=args.noise_blend,
                             noise_blend_threshold=args.noise_blend_threshold, composite=tuple(args.composite),
                             mode=args.mode, legacy=args.legacy)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _load(args):
    from .engine import Engine

    return Engine.load(args.model, backend=args.backend, device=args.device, unet_weights=args.unet_weights,
                       allow_pickle=args.allow_pickle, config=args.config, self_max_queries=args.self_max_queries,
                       precision=args.precision, cpu_arena=not args.no_cpu_arena,
                       cpu_graphs=not args.portable_graphs, trt_cache=args.trt_cache)


def _invert(engine, args, source):
    sampler = engine.sampler(steps=args.steps, guidance=args.guidance)
    return engine.invert(source, args.prompt, method=args.inversion, sampler=sampler,
                         inversion=InversionConfig(null_inner_steps=args.null_inner_steps), fit=args.fit,
                         progress=not args.no_progress)


def cmd_edit(args) -> int:
    from .imageio import load_image
    from .inversion import Inversion
    from .outputs import write_edit_outputs

    _check_out(args.out)
    _check_sampler(args)
    control = _control(args)
    if args.inversion_file is None and (args.image is None or args.prompt is None):
        raise PromptError("give --image and --prompt (or --inversion-file from `prism-rt invert --save`)")
    saved = Inversion.load(args.inversion_file) if args.inversion_file else None
    source = load_image(args.image) if saved is None else None  # bad images fail before the model loads
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
    inversion = saved or _invert(engine, args, source)
    result = engine.edit(inversion, args.target, control, RunLimits(max_batch=args.max_batch), progress=not args.no_progress)
    result.timings["load_s"] = load_s
    parameters = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func",)}
    selection = None
    if classifier is not None:
        from .evaluate import select_edits

        selection = select_edits(classifier, inversion.source_prompt, result, inversion.fitted_pixels)
    write_edit_outputs(args.out, result, inversion, parameters, selection=selection, figure=args.figure)
    print(f"wrote {len(result.edits)} counterfactual(s) to {args.out} "
          f"(reconstruction error {result.reconstruction_error:.2e}, {result.counts['unet_items']} UNet items)")
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
    from .imageio import load_image

    _check_out(args.save, "--save", folder=False)
    if args.save.suffix != ".npz":
        raise InversionFileError(f"inversion files are .npz; got {args.save.name!r}, name it e.g. {args.save.stem}.npz")
    _check_sampler(args)
    source = load_image(args.image)
    engine = _load(args)
    engine.tokenizer.encode_batch_padded([args.prompt])
    inversion = _invert(engine, args, source)
    path = inversion.save(args.save)
    print(f"wrote the {inversion.method.value} inversion of {args.image} to {path}")
    return 0


def cmd_info(args) -> int:
    from .errors import ModelError

    target = args.engine or args.model
    if target is None:
        raise ModelError("give an engine folder (prism-rt info ENGINE_DIR) or --model MODEL")
    if (Path(target) / "manifest.json").is_file() or args.engine is not None:
        from .manifest import load_manifest  # an engine folder: checked, summarised, nothing loaded

        print(json.dumps(load_manifest(target, precision=args.precision).summary(), indent=2, default=str))
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
    argv = ["edit", "--model", str(engine), "--backend", "onnxruntime", "--precision", args.precision,
            "--inversion", args.inversion, "--image", str(args.image or engine / spec["image"]),
            "--prompt", spec["prompt"], "--out", str(args.out), "--figure"]
    for target in spec["targets"]:
        argv += ["--target", target]
    if spec.get("classifier"):
        argv += ["--select", str(engine / spec["classifier"])]
    argv += [str(x) for x in spec.get("edit_args", [])]
    if args.no_progress:
        argv.append("--no-progress")
    edit_args = build_parser().parse_args(argv)
    print(f"demo: {spec['prompt']!r} → {spec['targets'][0]!r} on {edit_args.image.name} "
          f"({args.inversion} inversion, onnxruntime {args.precision})")
    code = cmd_edit(edit_args)
    if code == 0:
        print(f"see {args.out / 'figure.png'} (source | reconstruction | counterfactual | change); every "
              f"candidate's counterfactual and result.json are in {args.out}")
    return code


PLUGIN_GROUP = "prism_rt.commands"
"""Entry-point group of the commands other distributions' floors add to ``prism-rt`` (``bench`` and
``evaluate`` from prism_bench): each entry point is ``register(subparsers)``, which adds one
sub-parser and sets its ``func``. The runtime never imports them itself (floors point down only)."""


def _add_plugin_commands(sub) -> None:
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError:  # that floor's optional dependencies are not installed
            continue
        register(sub)


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
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
