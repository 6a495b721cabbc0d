"""``prism-rt``: edit, invert, demo, info, batch, serve, triton-repo (+ commands other floors add by entry point).

The CLI only parses: every setting is checked by the config dataclasses and the Engine, and
everything that does not need the model (the output folder, the image's header, the settings) is
checked before the model loads. Errors print one ``error: …`` line and exit non-zero.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .cli_args import (Formatter, Parser, common_args, control_from_args, default, floats, invert_args, load_engine,
                       model_args, pair, path, positive, words)
from .config import (COMPOSITE_THRESHOLDS, EDIT_NEGATIVES, NOISE_BLEND_THRESHOLDS, ControlConfig, InversionConfig,
                     RunLimits, SamplerConfig)
from .errors import PrismError, PromptError
from .precision import CHOICES as PRECISIONS

EXIT_INTERNAL = 70
PLUGIN_GROUP = "prism_rt.commands"
"""Entry-point group of the commands that floors above the runtime add to ``prism-rt`` (the benchmark
suite's ``bench`` and ``evaluate``): each entry point is ``register(subparsers)``, which adds one
sub-parser and sets its ``func``. The runtime never imports them by name, and loads one only when
it is the command asked for (or for ``--help``), so ``prism-rt edit`` pays nothing for them."""


def _edit_args(edit: argparse.ArgumentParser):
    g = edit.add_argument_group("edit (prompt-to-prompt control; defaults are PRISM's)")
    g.add_argument("--target", action="append", required=True, help="an edited caption; repeat for several edits")
    g.add_argument("--inversion-file", type=path, help="reuse an inversion written by `prism-rt invert --save`")
    g.add_argument("--mode", default=default(ControlConfig, "mode"), choices=["refine", "replace"],
                   help="refine (PRISM) or word swap")
    g.add_argument("--cross-replace", type=float, default=default(ControlConfig, "cross_replace"),
                   help="fraction of steps whose cross-attention is the source's")
    g.add_argument("--self-replace", type=floats, default=default(ControlConfig, "self_replace"),
                   help="self-attention window(s), comma-separated: each value is one candidate")
    g.add_argument("--edit-weight", type=float, default=default(ControlConfig, "edit_weight"),
                   help="reweighting of the edit words, in [0, 10]")
    g.add_argument("--edit-words", type=words, help="words to reweight (default: the new words of each target)")
    g.add_argument("--blend-words", type=pair, help="SRC_WORD,EDIT_WORD: LocalBlend from the attention maps")
    g.add_argument("--blend-threshold", type=float, default=default(ControlConfig, "blend_threshold"),
                   help="LocalBlend mask threshold, in (0, 1]")
    g.add_argument("--blend-dilation", type=int, default=default(ControlConfig, "blend_dilation"),
                   help="LocalBlend: max-pool radius in map cells before the threshold (published: 1, a 3×3 pool; "
                        "0 = none, for maps as fine as the latent)")
    g.add_argument("--edit-negative", default=default(ControlConfig, "edit_negative"), choices=EDIT_NEGATIVES,
                   help="what the edits' guidance steers away from: empty (the published method) or source (the "
                        "source caption: the edit follows the difference between its caption and the source's, which "
                        "removes more of what it drops); source needs direct or negative-prompt inversion")
    g.add_argument("--noise-blend", action="store_true",
                   help="LocalBlend with a mask from the noise predictions under the source vs the target caption "
                        "(DiffEdit) instead of the attention maps; needs no --blend-words")
    g.add_argument("--noise-blend-threshold", type=floats, default=NOISE_BLEND_THRESHOLDS,
                   help="noise-blend mask: where the prediction difference exceeds this × its image mean; several "
                        "values are candidates")
    g.add_argument("--composite", type=floats, default=(), metavar="T[,T…]",
                   help="difference composite: keep each counterfactual's change only where it exceeds T (a fraction "
                        "of the intensity range) and the reconstruction elsewhere; 0 = plain; several values are "
                        f"candidates ({','.join(f'{t:g}' for t in COMPOSITE_THRESHOLDS)} measured on phantoms; default off)")
    g.add_argument("--legacy", action="store_true", help="the published code's behaviour: no attention control, no blend")
    g.add_argument("--keep-mask", type=path, metavar="FILE",
                   help="an image of the input's size, white where the image must never change (e.g. the lungs)")
    g.add_argument("--edit-mask", type=path, metavar="FILE", help="an image of the input's size, white where the edit may act")
    g.add_argument("--max-batch", type=positive, default=default(RunLimits, "max_batch"),
                   help="largest UNet batch; more edit items are split into chunks")
    g.add_argument("--seed", type=int, default=0, help="recorded; every step is deterministic (η = 0)")
    g.add_argument("--select", type=path, metavar="CLASSIFIER.onnx",
                   help="pick, per edit, the candidate that flips the attribute with the best identity (PRISM's "
                        "filter): selected-K.png and the scores in result.json")
    o = edit.add_argument_group("output")
    o.add_argument("--out", type=path, required=True, help="the result folder (replaced as a whole if it exists)")
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """``command``: the subcommand about to be parsed (None: all of them, e.g. for --help)."""
    parser = Parser(prog="prism-rt", description="PRISM counterfactual chest X-ray engine", formatter_class=Formatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    edit = sub.add_parser("edit", help="invert an image and write its counterfactuals", formatter_class=Formatter)
    model_args(edit)
    invert_args(edit, required_prompt=False)
    _edit_args(edit)
    common_args(edit)

    inv = sub.add_parser("invert", help="invert an image once and save it for many edits", formatter_class=Formatter)
    model_args(inv)
    invert_args(inv, required_prompt=True)
    inv.add_argument("--save", type=path, required=True, help="the .npz file to write")
    common_args(inv)

    demo = sub.add_parser("demo", help="the bundled demo: remove the support devices from a phantom radiograph",
                          formatter_class=Formatter)
    demo.add_argument("--out", type=path, required=True)
    demo.add_argument("--engine", type=path, help="default: the bundled engines/phantom-demo")
    demo.add_argument("--image", type=path, help="default: the engine's demo image")
    demo.add_argument("--precision", default="fp32", choices=PRECISIONS)
    demo.add_argument("--inversion", default="direct", choices=["direct", "negative-prompt"],
                      help="onnxruntime has no autograd, so no null-text here")
    demo.add_argument("--threads", type=positive, help="CPU threads (default: every core)")
    demo.add_argument("--extras", action="store_true", help="also the reconstruction and the difference maps")
    common_args(demo)

    info = sub.add_parser("info", help="summarise an engine folder (or a checkpoint)", formatter_class=Formatter)
    info.add_argument("engine", nargs="?", type=path, help="an engine folder")
    info.add_argument("--json", action="store_true", help="the whole manifest summary as JSON")
    info.add_argument("--memory", action="store_true",
                      help="estimate the device memory of the engine's --precision (weights + activations) at its "
                           "deployment (--trt-max-edits / --trt-max-groups) or at a UNet --batch")
    info.add_argument("--batch", type=positive, help="with --memory: UNet items per call (e.g. 12 = one edit × 5 "
                                                     "self values with CFG)")
    check = sub.add_parser("check-install", help="is the installed onnxruntime the one --device needs?",
                           formatter_class=Formatter)
    check.add_argument("--device", default="cpu", help="cpu, cuda or tensorrt")
    check.set_defaults(func=cmd_check_install)
    model_args(info, model_required=False)
    common_args(info)
    from .batch_cli import add_batch_parser
    from .serve import add_serve_parser
    from .triton_repo import add_triton_repo_parser

    add_batch_parser(sub)
    add_serve_parser(sub)
    add_triton_repo_parser(sub)
    _add_plugin_commands(sub, command)
    return parser


def _add_plugin_commands(sub, command: str | None) -> None:
    """Register the entry-point commands: the one asked for in full; the others as a line in the
    command list (loading their modules only when they run)."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if command not in (None, entry.name):
            sub.add_parser(entry.name, help=f"see `prism-rt {entry.name} --help`", add_help=False)
            continue
        try:
            register = entry.load()
        except ImportError:  # that floor's optional dependencies are not installed
            continue
        register(sub)


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
    control = control_from_args(args)
    SamplerConfig(steps=args.steps, guidance=args.guidance)
    RunLimits(max_batch=args.max_batch)
    if args.inversion_file is None and (args.image is None or args.prompt is None):
        raise PromptError("give --image and --prompt (or --inversion-file from `prism-rt invert --save`)")
    saved = Inversion.load(args.inversion_file, max_pixels=args.max_pixels) if args.inversion_file else None
    header = probe_image(args.image, max_pixels=args.max_pixels) if saved is None else None
    masks = None
    if args.keep_mask is not None or args.edit_mask is not None:  # read and checked before the model loads
        from .user_masks import UserMasks, fit_of

        fit = fit_of(saved) if saved else None
        masks = UserMasks.read(args.keep_mask, args.edit_mask,
                               (fit.orig_height, fit.orig_width) if fit else (header.height, header.width))
    classifier = None
    if args.select is not None:
        from .evaluate import Classifier, edit_direction

        classifier = Classifier.load(args.select)
        for target in args.target:  # which attribute each edit changes: known before any model work
            edit_direction(saved.source_prompt if saved else args.prompt, target, classifier.labels)
    start = time.perf_counter()
    engine = load_engine(args)
    load_s = time.perf_counter() - start
    steps = saved.sampler.steps if saved else args.steps
    engine.plan(saved.source_prompt if saved else args.prompt, args.target, control, steps)  # prompt errors before work
    control.check_inversion(saved.method if saved else engine.check_inversion_method(args.inversion))
    inversion = saved or _invert(engine, args, load_image(args.image, max_pixels=args.max_pixels))
    result = engine.edit(inversion, args.target, control, RunLimits(max_batch=args.max_batch), progress=not args.no_progress,
                         keep_mask=masks and masks.keep, edit_mask=masks and masks.edit)
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
    engine = load_engine(args)
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

        manifest = load_manifest(target, precision=args.precision)
        if args.memory:
            from .cli_args import deployment_from_args
            from .memory import estimate_memory, memory_text

            estimate = estimate_memory(manifest, deployment_from_args(args), batch=args.batch)
            print(json.dumps(estimate.to_json(), indent=2) if args.json else memory_text(estimate))
            return 0
        summary = manifest.summary()
        print(json.dumps(summary, indent=2, default=str) if args.json else summary_text(summary))
        return 0
    if args.memory:
        raise ModelError(f"--memory reads an engine folder's manifest; {target} is a checkpoint: export it with "
                         f"`prism-export export --model {target} --out ENGINE`, then prism-rt info ENGINE --memory")
    engine = load_engine(args)
    info = engine.backend.info
    print(json.dumps({"model": str(args.model), "image_size": info.image_size, "latent_size": info.latent_size,
                      "text_width": info.text_width, "backend": engine.backend.describe(),
                      "provenance": info.provenance}, indent=2, default=str))
    return 0


def cmd_check_install(args) -> int:
    from .install_check import check_install

    report = check_install(args.device)
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("error:") else sys.stdout)
    return 1 if report.errors else 0


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
    edit_args = build_parser("edit").parse_args(argv)
    print(f"demo: {spec['prompt']!r} → {spec['targets'][0]!r} on {edit_args.image.name} "
          f"({args.inversion} inversion, onnxruntime {args.precision})")
    code = cmd_edit(edit_args)
    if code == 0:
        print(f"see {args.out / 'figure.png'} (source | reconstruction | counterfactual | change); the "
              f"counterfactuals and result.json are in {args.out}")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
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
