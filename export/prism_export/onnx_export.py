"""Checkpoint → ONNX engine folder: the four graph modules of ``prism_rt.torch_backend.graphs``
exported with the dynamo exporter, checked against torch, and described by a manifest.

The exported modules are the very modules the torch backend runs, so parity here is parity with
the behaviour's definition. Why the export goes the way it does:

* ``torch.export`` first, with every dynamic axis ``Dim.DYNAMIC`` and deferred runtime asserts,
  then ``torch.onnx.export`` of the ExportedProgram. Handing ``torch.onnx.export`` a module with
  named, ranged ``Dim``s made it trace the controlled UNet twice (a constraint violation on
  N ≥ G·(1+K), then a retry) under ``backed_size_oblivious``, about three times slower. The ranges
  the engine supports live in :mod:`prism_export.specs` and the parity cases run at their edges,
  including K = 0 and N = 1 which the trace (at N=11, G=2, K=3) never saw.
* The exporter names dims ``s48``…; they are renamed to the spec's names afterwards, on the graph
  proto only (weights are not reloaded).
* onnxscript's optimizer runs without its ``SlicesSplit`` rule (:func:`_without_slow_rules`).
* One ``<graph>.onnx.data`` per graph; re-saved into one file if the exporter wrote another layout.
* Everything is written into a staging folder that is renamed at the very end: a failed or
  interrupted export leaves no half engine.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from prism_rt.backend import GRAPHS
from prism_rt.errors import PrismError
from prism_rt.manifest import MANIFEST_NAME
from prism_rt.publish import staged_dir

from .cpu_graph import write_cpu_graph
from .onnx_graph import one_data_file
from .specs import GraphSpec, ModelDims, UNetSpec, graph_specs

OPSET = 18
# node metadata the dynamo exporter writes: the module scope is kept; the stack trace (the exporting
# machine's file paths), class hierarchy, fx node and namespace strings are 75 % of a graph file
KEPT_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)
DEFAULT_PARITY_TOLERANCE = 1e-3  # max |onnx − torch| / max |torch| above which an export fails


class ExportError(PrismError):
    """The export cannot be done or its result does not match the reference."""


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new folder or delete it")


def export_engine(model, out, *, unet_weights=None, config=None, allow_pickle: bool = False,
                  self_max_queries: int = 32 * 32, opset: int = OPSET, blend_maps: str = "after-control",
                  parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
                  progress: Callable[[str], None] = print, precisions=(), variant_settings=None,
                  deployment=None, blend_downsample: int | None = None) -> Path:
    """Export ``model`` (anything ``load_checkpoint`` reads) into the engine folder ``out``;
    ``precisions`` (fp16, int8, int8-cpu) are then derived from the fp32 graphs, in the staging
    folder, so the engine appears complete or not at all."""
    import torch

    from prism_rt.torch_backend.checkpoint import load_checkpoint
    from prism_rt.torch_backend.graphs import build_graphs

    from .engine_manifest import build_manifest, copy_tokenizer, write_manifest

    out = Path(out).expanduser()
    _check_out(out)
    components = load_checkpoint(model, unet_weights=unet_weights, allow_pickle=allow_pickle, config=config,
                                 device="cpu", dtype=torch.float32)
    graphs = build_graphs(components, self_max_queries, blend_maps, blend_downsample)
    dims = ModelDims.from_components(components, graphs["unet"])
    specs = graph_specs(dims, self_max_queries)
    # staged beside out and renamed onto it whole (prism_rt.publish): a failure or a kill never
    # leaves a partial engine folder, and the next export sweeps a killed one's staging folder
    with staged_dir(out, marker=MANIFEST_NAME, flag="--out") as staging:
        (staging / "onnx").mkdir(parents=True)
        records = {}
        for name in GRAPHS:
            start = time.perf_counter()
            path = staging / "onnx" / f"{name}.onnx"
            export_graph(graphs[name], specs[name], path, opset)
            gc.collect()  # the traced program holds graph-sized structures; an SD UNet export peaks near 20 GB
            cpu = write_cpu_graph(path)  # attention / GELU fused for onnxruntime's CPU provider
            parity = measure_parity(graphs[name], specs[name], path, cpu_graph=cpu["path"] if cpu else None)
            gc.collect()
            export_s = time.perf_counter() - start
            records[name] = {"parity": parity, "export_s": round(export_s, 1), "cpu": cpu}
            data_mb = path.with_name(path.name + ".data").stat().st_size / 2**20
            cpu_line = (f"; CPU twin onnx/{cpu['path'].name} ({cpu['fused_attentions']} attention, {cpu['fused_gelu']} "
                        f"GELU fused{_prefix_words(cpu)}) max rel {parity['cpu_graph']['max_rel']:.2e}" if cpu else "")
            progress(f"{name}: onnx/{path.name} (+ .data, {data_mb:.1f} MiB) in {export_s:.1f} s; parity vs torch: "
                     f"max abs {parity['max_abs']:.2e}, max rel {parity['max_rel']:.2e} "
                     f"over {len(parity['cases'])} shapes (onnxruntime CPU){cpu_line}")
            if parity["max_rel"] > parity_tolerance:
                raise ExportError(f"the exported {name} graph differs from torch by {parity['max_rel']:.2e} (relative), "
                                  f"more than the tolerance {parity_tolerance:g}; see the cases: {parity['cases']}")
            if cpu and parity["cpu_graph"]["max_rel"] > parity_tolerance:
                raise ExportError(f"the CPU twin of the {name} graph (onnx/{cpu['path'].name}) differs from torch by "
                                  f"{parity['cpu_graph']['max_rel']:.2e} (relative), more than the tolerance "
                                  f"{parity_tolerance:g}: a fusion in prism_export.cpu_graph is wrong for this model")
        copy_tokenizer(components.tokenizer_dir, staging / "tokenizer")
        manifest = build_manifest(staging, components, graphs["unet"], dims, specs, records, opset, deployment)
        write_manifest(staging, manifest)
        del graphs, components
        gc.collect()
        if precisions:
            from .variants import VariantSettings, add_variants

            add_variants(staging, precisions, variant_settings or VariantSettings(), progress=progress)
    return out


SLOW_REWRITE_RULES = ("SlicesSplit",)


@contextlib.contextmanager
def _without_slow_rules():
    """onnxscript's default rewrite rules minus ``SLOW_REWRITE_RULES`` while ``torch.onnx.export``
    optimizes. SlicesSplit (Slices of one tensor that partition it → Split) runs a generic
    multi-output matcher over every node: on the controlled UNet 80 % of the whole export (46 s of
    the tiny model's 60), for no rewrite; none of these graphs slices a tensor into parts. Where
    onnxscript's internals differ, the defaults stay."""
    try:
        from onnxscript import rewriter
    except ImportError:
        yield
        return
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in SLOW_REWRITE_RULES)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def export_graph(module, spec: GraphSpec, path: Path, opset: int = OPSET) -> None:
    """Trace ``module`` with the spec's trace shapes and write ``path`` + ``path.data``."""
    import torch

    sample = spec.sample_inputs(np.random.default_rng(0), **spec.trace_values())
    kwargs = {k: torch.from_numpy(v) for k, v in sample.items()}
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" ×4 per graph
    try:
        with torch.no_grad(), warnings.catch_warnings(), _without_slow_rules():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation chatter
            program = torch.export.export(module, (), kwargs=kwargs, dynamic_shapes=spec.torch_dynamic_shapes(),
                                          strict=False, prefer_deferred_runtime_asserts_over_guards=True)
            onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, input_names=spec.input_names,
                                             output_names=spec.output_names, optimize=True, verbose=False)
    except Exception as exc:
        raise ExportError(f"torch could not export the {spec.name} graph: {type(exc).__name__}: {exc}") from exc
    finally:
        registry_log.setLevel(level)
    onnx_program.save(str(path), external_data=True)
    _name_dims(path, spec)
    one_data_file(path)


def _name_dims(path: Path, spec: GraphSpec) -> None:
    """Rename the exporter's symbols (s48, …) to the spec's dims; fail on a specialised axis; keep
    only the module-scope metadata of each node."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    wanted = {t.name: t for t in (*spec.inputs(), *spec.outputs())}
    symbols: dict[str, str] = {}
    names = [v.name for v in graph.input]
    if names != spec.input_names or [v.name for v in graph.output] != spec.output_names:
        raise ExportError(f"the exported {spec.name} graph has inputs {names} and outputs "
                          f"{[v.name for v in graph.output]}; the spec wants {spec.input_names} → {spec.output_names}")
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, (dim, expected) in enumerate(zip(dims, wanted[value.name].shape)):
            if isinstance(expected, str):
                if not dim.HasField("dim_param"):
                    raise ExportError(f"torch.export fixed axis {axis} of {spec.name}.{value.name} to {dim.dim_value}; "
                                      f"it must stay dynamic ({expected})")
                symbols.setdefault(dim.dim_param, expected)
            elif dim.HasField("dim_param") or dim.dim_value != expected:
                raise ExportError(f"axis {axis} of {spec.name}.{value.name} is {dim.dim_param or dim.dim_value}, "
                                  f"the spec says {expected}")

    def rename(text: str) -> str:
        def sub(m):
            new = symbols.get(m.group(0))
            return m.group(0) if new is None else new if re.fullmatch(r"[a-z_]+", new) else f"({new})"
        return re.sub(r"\b[su]\d+\b", sub, text)

    for node in graph.node:  # keep the module scopes (int8 picks nodes by them); drop stack traces & co.
        keep = [(p.key, p.value) for p in node.metadata_props if p.key in KEPT_NODE_METADATA]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
    for value in graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = rename(dim.dim_param)
    for value in (*graph.input, *graph.output):  # declared exactly as the spec says
        declared = wanted[value.name].shape
        shape = value.type.tensor_type.shape
        if len(shape.dim) != len(declared):
            raise ExportError(f"{spec.name}.{value.name} has rank {len(shape.dim)}, the spec says {len(declared)}")
        for dim, expected in zip(shape.dim, declared):
            if isinstance(expected, str):
                dim.dim_param = expected
            else:
                dim.dim_value = expected
    onnx.save_model(model, str(path))


def _relative_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    if ref.size == 0:
        return 0.0, 0.0
    max_abs = float(np.abs(got.astype(np.float64) - ref).max())
    peak = float(np.abs(ref).max())
    return max_abs, (max_abs / peak if peak > 0 else max_abs)


def _cpu_session(path: Path):
    """A CPU session without a memory arena: parity runs are one-offs at growing batch sizes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _prefix_words(twin: dict) -> str:
    nodes = twin.get("latent_prefix", {}).get("nodes", 0)
    return f", {nodes}-node latent prefix once per distinct latent" if nodes else ""


def _twin_parity(twin_path: Path, spec: GraphSpec, cases: list[tuple[dict, list[np.ndarray]]]) -> dict:
    """Run the CPU twin on each case's inputs and compare with that case's reference outputs. Its
    session opens after the portable graph's closed: at SD v1.5 size each holds 3.4 GB of weights."""
    session = _cpu_session(twin_path)
    errors = []
    for inputs, ref in cases:
        try:
            got = session.run(spec.output_names, inputs)
        except Exception as exc:  # onnxruntime's own exception types
            raise ExportError(f"onnxruntime cannot run the CPU twin {twin_path.name} of the {spec.name} graph on "
                              f"inputs the portable graph runs: {exc}") from exc
        errors += [_relative_error(g, r) for g, r in zip(got, ref)]
    return {"max_abs": max(e[0] for e in errors), "max_rel": max(e[1] for e in errors)}


def measure_parity(module, spec: GraphSpec, path: Path, seed: int = 0, cpu_graph: Path | None = None) -> dict:
    """Compare onnxruntime (CPU) with the torch module on random inputs at the spec's parity
    shapes. ``max_rel`` is max |onnx − torch| / max |torch| per output: an element-wise ratio
    would explode where the reference crosses zero. ``cpu_graph`` (the graph's CPU twin) is
    compared with torch on the same inputs: ``result["cpu_graph"]``."""
    import onnxruntime as ort
    import torch

    session = _cpu_session(path)
    rows, notes, ran = [], [], []
    for i, case in enumerate(spec.parity_cases()):
        inputs = spec.sample_inputs(np.random.default_rng(seed + i), **case)
        with torch.no_grad():
            ref = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        try:
            got = session.run(spec.output_names, inputs)
        except Exception as exc:  # onnxruntime raises its own exception types
            if isinstance(spec, UNetSpec) and case.get("edits") == 0:
                notes.append(f"K=0 does not run ({type(exc).__name__}: {exc}); the runtime pads K=0 calls")
                continue
            raise ExportError(f"onnxruntime cannot run the exported {spec.name} graph at {case}: {exc}") from exc
        ran.append((inputs, ref))
        outputs = {}
        for name, g, r in zip(spec.output_names, got, ref):
            if g.shape != r.shape:
                raise ExportError(f"{spec.name}.{name} has shape {g.shape} in ONNX and {r.shape} in torch at {case}")
            max_abs, max_rel = _relative_error(g, r)
            outputs[name] = {"max_abs": max_abs, "max_rel": max_rel}
        dims = spec.case_dims(case) if isinstance(spec, UNetSpec) else dict(case)
        rows.append({"dims": dims, **({"case": case} if isinstance(spec, UNetSpec) else {}), "outputs": outputs,
                     "max_abs": max(o["max_abs"] for o in outputs.values()),
                     "max_rel": max(o["max_rel"] for o in outputs.values())})
    del session
    if not rows:
        raise ExportError(f"no parity case of the {spec.name} graph ran: {notes}")
    result = {
        "reference": f"torch {torch.__version__} eager, float32, CPU",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "metric": "max_abs = max |onnx - torch|; max_rel = max_abs / max |torch|, per output",
        "cases": rows, "notes": notes,
        "max_abs": max(r["max_abs"] for r in rows), "max_rel": max(r["max_rel"] for r in rows),
    }
    if isinstance(spec, UNetSpec):  # the smallest K the graph runs with; the runtime pads below it
        result["edits_min"] = 1 if notes else 0
    if cpu_graph is not None:
        gc.collect()
        result["cpu_graph"] = _twin_parity(Path(cpu_graph), spec, ran)
    return result


def add_cpu_graphs(engine_dir, parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
                   progress: Callable[[str], None] = print, replace: bool = False) -> dict[str, dict]:
    """Give an engine folder exported before CPU twins existed its ``onnx/<graph>.cpu.onnx`` files
    (``prism-export cpu-graphs``; ``replace``: rewrite the twins it has too, with this version's
    fusion), each checked against the folder's own portable graph in onnxruntime at the export's
    parity shapes. Twins are written beside under a staging name and moved into place only when
    all passed, then the manifest is rewritten in one replace, so a failure leaves the folder as it
    was. Returns the new manifest entries by graph."""
    import json

    import onnxruntime as ort

    from prism_rt.manifest import load_manifest

    from .engine_manifest import cpu_twin_entry

    root = Path(engine_dir).expanduser()
    manifest = load_manifest(root)  # checks every fp32 file against its hash first
    raw = manifest.raw
    specs = graph_specs(ModelDims.from_manifest(raw), int(raw["control"]["self_max_queries"]))
    written, staged, entries = [], {}, {}
    try:
        for name in GRAPHS:
            entry = manifest.graphs[name]
            if entry.cpu_file is not None and not replace:
                continue
            twin = write_cpu_graph(entry.file, staging=True)
            if twin is None:
                continue
            written.append(twin["path"])
            spec, session, cases = specs[name], _cpu_session(entry.file), []
            for i, case in enumerate(spec.parity_cases()):
                inputs = spec.sample_inputs(np.random.default_rng(i), **case)
                try:
                    cases.append((inputs, session.run(spec.output_names, inputs)))
                except Exception as exc:  # onnxruntime's own exception types
                    if isinstance(spec, UNetSpec) and case.get("edits") == 0:
                        continue  # an engine whose UNet cannot run K = 0 (edits.min = 1): the runtime pads
                    raise ExportError(f"onnxruntime cannot run the engine's own {name} graph at {case}: {exc}; "
                                      + "re-export the engine") from exc
            del session
            gc.collect()
            if not cases:
                raise ExportError(f"no parity case of the {name} graph ran in onnxruntime")
            parity = {"reference": f"the portable graph {entry.file.name}, onnxruntime {ort.__version__} CPU",
                      **_twin_parity(twin["path"], spec, cases)}
            if parity["max_rel"] > parity_tolerance:
                raise ExportError(f"the CPU twin of the {name} graph differs from the portable graph by "
                                  f"{parity['max_rel']:.2e} (relative), more than {parity_tolerance:g}")
            staged[name] = (twin, parity)
            progress(f"{name}: onnx/{twin['final'].name} ({twin['fused_attentions']} attention, {twin['fused_gelu']} "
                     f"GELU fused, {twin['attention_direct_io']} attention inputs / outputs without relayout"
                     f"{_prefix_words(twin)}); max rel {parity['max_rel']:.2e} vs the portable graph")
        for name, (twin, parity) in staged.items():  # all passed: into place, then the manifest
            twin["path"].replace(twin["final"])
            twin["path"] = twin["final"]
            entries[name] = cpu_twin_entry(root, twin, raw["graphs"][name]["data_file"], parity)
        if entries:
            for name, cpu in entries.items():
                raw["graphs"][name]["cpu"] = cpu
            tmp = root / (MANIFEST_NAME + ".tmp")
            tmp.write_text(json.dumps(raw, indent=2, sort_keys=False, default=str) + "\n")
            tmp.replace(root / MANIFEST_NAME)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return entries
