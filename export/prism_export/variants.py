"""fp16 and int8 variants of an exported engine, each with its quality measured against fp32.

An engine folder's ``onnx/`` graphs are the fp32 reference. This module derives, side by side in
the same folder (ARCHITECTURE.md, "Engine folder"):

* ``onnx-fp16/<graph>.onnx``: the graphs chosen by ``fp16_graphs`` converted with ONNX Runtime's
  own float16 converter (``onnxruntime.transformers.float16``, the one its SD tools use); inputs
  and outputs stay float32, so the runtime feeds every precision the same arrays.
* ``onnx-int8/unet.onnx``: the UNet with **symmetric** int8 Q/DQ (zero points 0, per-channel
  weights), which is what TensorRT's explicit quantization accepts; the same file runs in ONNX
  Runtime.
* ``onnx-int8-cpu/unet.onnx``: the UNet with u8 (asymmetric) activations and s8 per-channel
  weights, the layout ONNX Runtime's x86 int8 kernels (VNNI) are fastest with; its channels
  rescaled before calibration (SmoothQuant input smoothing + output equalization, folded into
  per-channel Q/DQ scales: :mod:`prism_export.smoothing`, ``int8_cpu_smoothing``), its MatMuls'
  outputs left float (``MatMulIntegerToFloat``: no requantization error, one pass less); its
  attention fused into ONNX Runtime's ``MultiHeadAttention`` and its latent-only prefix run once
  per distinct latent (:mod:`prism_export.cpu_graph`).

The steps, each in its own module: the fp32 engine inverts and edits the calibration images with
every UNet call recorded (:mod:`prism_export.calibration`); the graphs are converted or quantized on
those calls (:mod:`prism_export.quantization`); each variant, staged beside the engine, inverts and
edits the same images and is compared with fp32 (:mod:`prism_export.quality`). This module drives
them and commits: the staged folders move into place and the manifest is rewritten in one replace,
so a failure leaves the engine as it was.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from prism_rt.manifest import MANIFEST_NAME, load_manifest, sha256_file
from prism_rt.precision import CHOICES, Precision

from .calibration import default_calibration_items, invert_and_edit, load_calibration_items, spread
from .cpu_graph import fuse_for_cpu_file
from .fp16_policy import fp32_ops_for, sample_feeds
from .memory_profile import graph_memory
from .onnx_graph import MS_DOMAIN
from .quality import measure_variant
from .quantization import convert_fp16, quantize_unet, unet_nodes_to_quantize
from .variant_config import VariantError, VariantSettings

# Names code outside prism_export still imports from here (benchmarks/int8_scopes.py,
# benchmarks/int8_conv_floor.py); their homes are the modules named.
from .calibration import phantom_item, spread_index  # noqa: E402,F401
from .quality import noise_error  # noqa: E402,F401
from .quantization import in_scope  # noqa: E402,F401
from .variant_config import DEFAULT_SMOOTHING_ALPHA, UNET_FLOAT_SCOPES  # noqa: E402,F401

_invert_and_edit, _spread = invert_and_edit, spread


def add_variants(engine_dir, precisions: Sequence[Precision | str], settings: VariantSettings = VariantSettings(),
                 progress: Callable[[str], None] = print) -> dict:
    """Build ``precisions`` (any of fp16, int8, int8-cpu) into the engine folder, measure each
    against fp32 and record it in the manifest. Replaces variants of the same name. Returns the
    manifest's ``variants`` section."""
    from prism_rt.engine import Engine

    root = Path(engine_dir).expanduser()
    wanted = _wanted(precisions)
    if not wanted:
        return json.loads((root / MANIFEST_NAME).read_text()).get("variants", {})
    manifest = load_manifest(root)  # checks the fp32 reference before anything is derived from it
    if any(p.quantized for p in wanted):  # bad --int8-float-scopes fail before the (long) reference run
        import onnx

        unet_nodes_to_quantize(onnx.load(str(manifest.graphs["unet"].file), load_external_data=False),
                               settings.int8_float_scopes)
    # no arena: recording at SD v1.5 size runs many shapes in one process (it would keep the largest of each)
    reference_engine = Engine.load(root, backend="onnxruntime", threads=settings.threads, cpu_arena=False)
    size = reference_engine.backend.info.image_size
    items = (load_calibration_items(settings.calibration_images, settings.calibration_count)
             if settings.calibration_images else default_calibration_items(settings.calibration_count, size))
    progress(f"fp32 reference: direct inversion + edit of {len(items)} calibration image(s) at "
             f"{settings.calibration_steps} steps, recording the UNet's inputs …")
    reference = invert_and_edit(reference_engine, items, settings, record=True)
    calibration = spread(reference.unet_calls, settings.calibration_samples)
    checks = spread(reference.unet_calls, min(16, settings.calibration_samples))
    progress(f"fp32 reference: {reference.seconds:.1f} s, {len(reference.unet_calls)} UNet calls recorded, "
             f"{len(calibration)} kept for calibration")
    del reference_engine

    raw = json.loads((root / MANIFEST_NAME).read_text())
    variants = dict(raw.get("variants") or {})
    staged: dict[Precision, Path] = {}
    try:
        for precision in wanted:
            start = time.perf_counter()
            staging = root / f".{precision.folder}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staged[precision] = staging
            graphs = _build(precision, manifest, staging, [feeds for feeds, _ in calibration], settings)
            build_s = time.perf_counter() - start
            entry = {"graphs": {}, "built_utc": _now(), "build_s": round(build_s, 1), "settings": settings.to_json()}
            for name, how in graphs.items():
                entry["graphs"][name] = _variant_graph_entry(raw["graphs"][name], staging, precision, name, how)
                entry["graphs"][name]["memory"] = graph_memory(staging / f"{name}.onnx", name,
                                                               int(raw["model"]["latent_size"]))
            if precision.quantized:
                entry["quantization"] = graphs["unet"]
            entry["quality"] = measure_variant(root, raw, precision, entry, staging, items, reference, checks, settings)
            variants[precision.value] = entry
            q = entry["quality"]
            cf = q["images"]["counterfactuals"] or q["images"]["reconstructions"]
            progress(f"{precision}: built in {build_s:.1f} s; vs fp32: counterfactual PSNR min {cf['psnr_db_min']} dB "
                     f"(mean {cf['psnr_db_mean']}), SSIM min {cf['ssim_min']}; UNet noise max rel error "
                     f"{q['noise']['max_rel']:.2e}, rms rel {q['noise']['rms_rel']:.2e}")
        _commit(root, raw, variants, staged)
    except BaseException:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return variants


def _wanted(precisions: Sequence[Precision | str]) -> list[Precision]:
    """The variants asked for, in order, without repeats and without the fp32 reference."""
    names = [n for n in dict.fromkeys(str(p) for p in precisions) if n != Precision.FP32.value]
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise VariantError(f"unknown precision(s) {unknown}; use any of {', '.join(CHOICES)}")
    return [Precision(n) for n in names]


def _build(precision: Precision, manifest, staging: Path, feeds: list[dict], settings: VariantSettings) -> dict:
    """Write ``precision``'s graphs into ``staging``; returns how each was made, by graph."""
    if precision.half:
        made = {}
        for name in settings.fp16_graphs:  # which ops stay fp32: measured on each fp32 graph (prism_export.fp16_policy)
            policy = fp32_ops_for(manifest.graphs[name].file, sample_feeds(manifest.raw, name), settings.fp16_fp32_ops)
            made[name] = {**convert_fp16(manifest.graphs[name].file, staging / f"{name}.onnx", policy["fp32_ops"]),
                          "fp32_policy": policy}
        return made
    made = quantize_unet(manifest.graphs["unet"].file, staging / "unet.onnx", feeds, precision,
                         settings.int8_float_scopes, smoothing=settings.int8_cpu_smoothing)
    if precision is Precision.INT8_CPU:  # an ONNX Runtime-only graph: its contrib operators may be used
        fused = fuse_for_cpu_file(staging / "unet.onnx")
        made["cpu_attention"] = {"fused_attentions": fused["fused_attentions"], "direct_io": fused["attention_direct_io"],
                                 "op": f"{MS_DOMAIN}.MultiHeadAttention (flash attention on CPU)"}
        made["cpu_gelu"] = {"fused_gelu": fused["fused_gelu"], "op": f"{MS_DOMAIN}.Gelu"}
        made["cpu_latent_prefix"] = {**fused["latent_prefix"], "op": "Unique + Gather (prism_export.cpu_dedupe)"}
        made["cpu_matmul_bias"] = {"fused": fused["fused_matmul_bias"],
                                   "op": f"{MS_DOMAIN}.MatMulIntegerToFloat (integer product, scales and bias in one pass)"}
    return {"unet": made}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _variant_graph_entry(fp32_entry: dict, staging: Path, precision: Precision, name: str, how: dict) -> dict:
    from prism_rt.onnx_io import read_signature

    folder = precision.folder
    onnx_path, data_path = staging / f"{name}.onnx", staging / f"{name}.onnx.data"
    signature = read_signature(onnx_path)
    io = [(t.name, t.dtype, list(t.shape)) for t in (*signature.inputs, *signature.outputs)]
    want = [(t["name"], t["dtype"], list(t["shape"])) for t in (*fp32_entry["inputs"], *fp32_entry["outputs"])]
    if io != want:
        raise VariantError(f"the {precision} {name} graph has inputs/outputs {io}, the fp32 one {want}: the runtime "
                           "feeds every precision the same arrays; this is a bug in the variant builder")
    keys = ("inputs", "outputs", "dims", "profile", "fixed_spatial")
    data = ({"data_file": f"{folder}/{name}.onnx.data", "data_sha256": sha256_file(data_path)}
            if data_path.exists() else {})
    return {
        "file": f"{folder}/{name}.onnx", "sha256": sha256_file(onnx_path), **data,
        "bytes": onnx_path.stat().st_size + (data_path.stat().st_size if data_path.exists() else 0),
        "precision": precision.value, **{k: fp32_entry[k] for k in keys if k in fp32_entry}, "made_by": how,
    }


def _commit(root: Path, raw: dict, variants: dict, staged: dict[Precision, Path]) -> None:
    """Move the staged folders into place and write the manifest; the old folder of a replaced
    variant is removed only after the new manifest is written."""
    trash = []
    for precision, staging in staged.items():
        final = root / precision.folder
        if final.exists():
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            trash.append(old)
        os.replace(staging, final)
    updated = dict(raw, variants=variants)
    tmp = root / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(updated, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)
    for old in trash:
        shutil.rmtree(old, ignore_errors=True)
