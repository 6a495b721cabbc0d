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
  outputs left float (``MatMulIntegerToFloat``: no requantization error, one pass less); its uncontrolled
  attention layers (SD v1.5's 64×64 self-attention) fused into ONNX Runtime's
  ``MultiHeadAttention`` (flash attention on CPU, :mod:`prism_export.cpu_attention`); its latent-only
  prefix run once per distinct latent (:mod:`prism_export.cpu_dedupe`).

Both int8 variants come from ``onnxruntime.quantization.quantize_static`` calibrated on the UNet
inputs recorded while the fp32 engine inverts and edits the calibration images (latents,
timesteps, text embeddings and control tensors of real trajectories, not random tensors). Only
Conv / MatMul / Gemm nodes with a constant weight are quantized, except the sensitive ones: the
time embedding and the ResNets' time projections, ``conv_in``, ``conv_out``, the ResNets'
``conv_shortcut`` (fed by the un-normalised residual stream) and the transformers' ``proj_in`` /
``proj_out`` (the 1×1 convolutions into and out of each transformer; ``int8_float_scopes``, a setting,
holds the list). Normalisations,
softmax, the attention-probability products (MatMul / Einsum of two activations) and the
prompt-to-prompt control math are never quantized. Nodes are chosen by the torch module scope the
dynamo exporter records on each node (``pkg.torch.onnx.name_scopes``).

Quality: the fp32 engine and each variant invert (direct inversion: ONNX Runtime has no autograd)
and edit the same calibration images; the manifest records the PSNR and SSIM (scikit-image) of
each variant's counterfactuals and reconstructions against fp32's, and the error of its UNet's
noise prediction on the recorded inputs. These are in-sample figures: the images are the
calibration images, as the export has no others.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from prism_rt.backend import GRAPHS
from prism_rt.errors import PrismError
from prism_rt.manifest import MANIFEST_NAME, PRECISIONS, REFERENCE_PRECISION, load_manifest, sha256_file
from . import smoothing as smooth
from .cpu_rewrites import MS_DOMAIN, fuse_for_cpu_file, split_geglu

VARIANT_DIRS = {"fp16": "onnx-fp16", "int8": "onnx-int8", "int8-cpu": "onnx-int8-cpu"}
FP16_GRAPHS_DEFAULT = ("text_encoder", "vae_encoder", "vae_decoder", "unet")
# Module scopes (torch module paths, matched on whole dotted components) whose Conv/MatMul/Gemm
# stay float in the int8 variants.
# conv_shortcut: the 1×1 convolutions where a ResNet changes width take the raw residual stream
# (no norm in front, the widest range in the UNet); quantized, they alone gave 6 % of the tiny
# model's 8 % noise error (of Conv-only quantization) at 13 of 95 convolutions. With the rescaling,
# on the trained phantom UNet (benchmarks/int8_scopes.py; 48 held-apart calls / 96 calls of 4
# held-out patients): all float 1.39 / 1.66 %, all quantized 2.02 / 2.34 %, all but the last output
# block's (`up_blocks.3.resnets.*.conv_shortcut` kept float) 1.43 / 1.73 %. That last set is no
# faster at SD v1.5 size (int8-cpu step 7.40 → 7.30 s, 1.009× interleaved: float Conv −0.2 s, but the
# int8 shortcuts' QLinearConv, QuantizeLinear and DequantizeLinear over the wide concatenated
# inputs +0.18 s), so every shortcut stays float.
# proj_in / proj_out: measured on the trained phantom UNet (int8-cpu, 48 recorded calls held apart
# from calibration), floating one layer at a time, these 1×1 convolutions removed the most error per
# FLOP; all 32 of them in float: rms noise error 3.04 % → 2.26 % (4 other held-out patients:
# 3.55 % → 2.69 %), for 3.8 % of SD v1.5's convolution + linear FLOPs. Measured again with the
# rescaling (α 0.7; benchmarks/int8_scopes.py, 96 calls of 4 held-out patients): 1.66 % float,
# 2.00 % with proj_in quantized, 2.03 % with proj_out, 2.3 % with both.
UNET_FLOAT_SCOPES = ("time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut", "proj_in", "proj_out")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# int8-cpu's SmoothQuant α, fixed from earlier experiments on the trained phantom UNet; measured since
# (48 held-apart calls / 96 calls of 4 other held-out patients): 0.7 1.54 / 1.98 %, 0.5 1.60 / 2.01 %,
# 0.9 1.51 / 2.08 % rms noise error (without rescaling 2.18 / 2.59 %)
DEFAULT_SMOOTHING_ALPHA = smooth.DEFAULT_ALPHA
DEFAULT_SOURCE_PROMPT = "Chest X-ray showing No Finding"
DEFAULT_TARGETS = ("Chest X-ray showing Support Devices", "Chest X-ray showing Pleural Effusion")
CALIBRATION_SEED0 = 2_000_000  # phantom patients for calibration: apart from training (0…) and evaluation (1e6…)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


class VariantError(PrismError):
    """A precision variant cannot be built or fails its checks."""


@dataclass(frozen=True)
class CalibrationItem:
    """One calibration image (gray, [0,1], any size) with its caption and edited captions."""

    name: str
    pixels: np.ndarray = field(repr=False)
    prompt: str = DEFAULT_SOURCE_PROMPT
    targets: tuple[str, ...] = DEFAULT_TARGETS


@dataclass(frozen=True)
class VariantSettings:
    """How variants are calibrated and measured (``prism-export … --precision``'s options)."""

    fp16_graphs: tuple[str, ...] = FP16_GRAPHS_DEFAULT
    calibration_images: Path | None = None  # None: the built-in set (see default_calibration_items)
    calibration_count: int = 4
    calibration_steps: int = 50
    calibration_samples: int = 64  # UNet calls kept for calibration, evenly spread over the trajectories
    self_replace: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    threads: int | None = None
    int8_float_scopes: tuple[str, ...] = UNET_FLOAT_SCOPES  # UNet module scopes kept in float in int8 / int8-cpu
    int8_cpu_smoothing: float | None = DEFAULT_SMOOTHING_ALPHA  # SmoothQuant α of int8-cpu; None: no rescaling

    def __post_init__(self):
        if self.int8_cpu_smoothing is not None and not 0.0 <= self.int8_cpu_smoothing <= 1.0:
            raise VariantError(f"--int8-cpu-smoothing {self.int8_cpu_smoothing} is not in [0, 1]; give the "
                               "SmoothQuant migration strength α (default 0.7), or 'off'")
        if any(not s.strip(". ") for s in self.int8_float_scopes):
            raise VariantError(f"--int8-float-scopes {','.join(self.int8_float_scopes)!r} holds an empty scope; "
                               "give module paths such as proj_in,up_blocks.3.resnets.0.conv1")
        unknown = sorted(set(self.fp16_graphs) - set(GRAPHS))
        if unknown:
            raise VariantError(f"--fp16-graphs names unknown graph(s) {unknown}; graphs are {', '.join(GRAPHS)}")
        if self.calibration_count < 1 or self.calibration_steps < 2 or self.calibration_samples < 1:
            raise VariantError("--calibration-count and --calibration-samples must be ≥ 1 and --calibration-steps ≥ 2")

    def to_json(self) -> dict:
        d = asdict(self)
        d["calibration_images"] = str(self.calibration_images) if self.calibration_images else "built-in"
        return d


# -- calibration images ---------------------------------------------------------------------------
def load_calibration_items(folder: Path, count: int) -> list[CalibrationItem]:
    """Images of ``folder`` (PNG, JPEG, DICOM), sorted by name, the first ``count``. Captions come
    from ``folder/captions.json`` (``{"file.png": {"prompt": "...", "targets": ["...", ...]}}``) when
    present, otherwise a normal caption with a support-device and an effusion edit."""
    from prism_rt.imageio import load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise VariantError(f"--calibration-images {folder} is not a folder; give a folder of PNG/JPEG/DICOM radiographs")
    captions = {}
    if (folder / "captions.json").is_file():
        try:
            captions = json.loads((folder / "captions.json").read_text())
        except ValueError as exc:
            raise VariantError(f"{folder / 'captions.json'} is not valid JSON ({exc}); see `prism-export export --help`") from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise VariantError(f"--calibration-images {folder} holds no PNG, JPEG or DICOM image")
    items = []
    for path in files:
        entry = captions.get(path.name, {})
        items.append(CalibrationItem(path.name, load_image(path).pixels, entry.get("prompt", DEFAULT_SOURCE_PROMPT),
                                     tuple(entry.get("targets", DEFAULT_TARGETS))))
    return items


def default_calibration_items(count: int, size: int) -> list[CalibrationItem]:
    """The built-in set: the real CR radiograph of pydicom-data (when installed), then phantom
    patients (``prism_export.phantom``) with their captions and the edit that toggles devices."""
    items = []
    try:
        import data_store

        from prism_rt.imageio import load_image

        dicom = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
        if dicom.is_file():
            items.append(CalibrationItem("RG1_UNCR.dcm", load_image(dicom).pixels))
    except ImportError:
        pass
    seed = CALIBRATION_SEED0
    while len(items) < count:
        items.append(phantom_item(seed, size))
        seed += 1
    return items[:count]


def phantom_item(seed: int, size: int) -> CalibrationItem:
    """Phantom patient ``seed`` (``prism_export.phantom``) with its caption and the edit that toggles
    its support devices."""
    from . import phantom

    patient, attributes = phantom.sample_patient(seed), phantom.sample_attributes(seed)
    sample = phantom.render(patient, attributes, size=size)
    toggled = phantom.counterfactuals(patient, attributes, size=size)["devices"]
    return CalibrationItem(f"phantom-{seed}", sample.image, sample.caption,
                           (toggled.caption,) if toggled.caption != sample.caption else DEFAULT_TARGETS)


# -- recording the fp32 trajectories ----------------------------------------------------------------
class _RecordingBackend:
    """Wraps a backend; keeps a copy of every UNet call's inputs and noise output."""

    def __init__(self, backend):
        self._backend = backend
        self.unet_calls: list[tuple[dict, np.ndarray]] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def run(self, graph: str, **inputs):
        outputs = self._backend.run(graph, **inputs)
        if graph == "unet":
            self.unet_calls.append(({k: np.array(v, copy=True) for k, v in inputs.items()},
                                    np.array(outputs["noise"], copy=True)))
        return outputs


@dataclass
class _Run:
    images: list[np.ndarray]  # per item: [1 + edits, S, S] in [0,1] (reconstruction first)
    unet_calls: list
    seconds: float


def _invert_and_edit(engine, items: Sequence[CalibrationItem], settings: VariantSettings, record: bool) -> _Run:
    from prism_rt.config import ControlConfig
    from prism_rt.engine import Engine

    runner = engine
    if record:
        runner = Engine(_RecordingBackend(engine.backend), engine.tokenizer, engine.model_path)
    sampler = engine.sampler(steps=settings.calibration_steps)
    control = ControlConfig(self_replace=tuple(settings.self_replace))
    images, start = [], time.perf_counter()
    for item in items:
        inversion = runner.invert(item.pixels, item.prompt, method="direct", sampler=sampler)
        result = runner.edit(inversion, list(item.targets), control)
        stack = np.stack([result.reconstruction, *result.edits]).mean(1)  # gray
        images.append(np.clip((stack + 1) / 2, 0, 1))
    calls = runner.backend.unet_calls if record else []
    return _Run(images, calls, time.perf_counter() - start)


def spread_index(total: int, count: int) -> list[int]:
    """At most ``count`` indices into ``total`` items, evenly spread (all of them when fewer)."""
    if total <= count:
        return list(range(total))
    return np.unique(np.linspace(0, total - 1, count).round().astype(int)).tolist()


def _spread(calls: list, count: int) -> list:
    return [calls[i] for i in spread_index(len(calls), count)]


# -- building the variant graphs --------------------------------------------------------------------
def module_paths(node) -> list[str]:
    """The torch module paths the dynamo exporter recorded on ``node`` (outermost first)."""
    import ast

    raw = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    try:
        paths = ast.literal_eval(raw) if raw else []
    except (ValueError, SyntaxError):
        return [raw]
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else [raw]


def in_scope(paths: Sequence[str], scope: str) -> bool:
    """Whether ``scope`` (``proj_in``, ``up_blocks.3``, ``down_blocks.0.resnets.0.conv2``) names a
    module on ``paths``, matched on whole dotted components (``up_blocks.1`` is not ``up_blocks.10``);
    a component ``*`` stands for any one component (``up_blocks.3.resnets.*.conv_shortcut``)."""
    pattern = _scope_pattern(scope)
    return any(pattern.search(p) for p in paths)


@functools.lru_cache(maxsize=None)
def _scope_pattern(scope: str) -> re.Pattern:
    """``scope`` as a pattern over a dotted module path (compiled once: it is tried on every node)."""
    parts = scope.strip(". ").split(".")
    return re.compile(r"(?:^|\.)" + r"\.".join("[^.]+" if p == "*" else re.escape(p) for p in parts) + r"(?:\.|$)")


def unet_nodes_to_quantize(model, float_scopes: Sequence[str] = UNET_FLOAT_SCOPES) -> tuple[list[str], dict]:
    """Names of the UNet nodes to quantize, and a summary of what was kept in float and why."""
    initializers = {t.name for t in model.graph.initializer}
    chosen, kept = [], {"sensitive_scope": 0, "activation_product": 0}
    matched = dict.fromkeys(float_scopes, 0)
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if len(node.input) < 2 or node.input[1] not in initializers:
            kept["activation_product"] += 1  # attention scores / probabilities × values, control products
            continue
        paths = module_paths(node)
        hits = [s for s in float_scopes if in_scope(paths, s)]
        for s in hits:
            matched[s] += 1
        if hits:
            kept["sensitive_scope"] += 1
            continue
        chosen.append(node.name)
    unmatched = [s for s, n in matched.items() if not n]
    if unmatched:
        raise VariantError(f"--int8-float-scopes {unmatched} match no Conv/MatMul/Gemm of the UNet graph; scopes are "
                           "torch module paths or their parts, e.g. proj_in, up_blocks.3, down_blocks.0.resnets.0.conv2")
    if not chosen:
        raise VariantError("found no Conv/MatMul/Gemm node with constant weights to quantize in the UNet graph; "
                           "was it exported by `prism-export export` (or does --int8-float-scopes cover it all)?")
    return chosen, {"quantized_nodes": len(chosen), "kept_float": kept,
                    "kept_float_scopes": list(float_scopes), "quantized_ops": list(QUANTIZED_OPS)}


def calibrate_ranges(src: Path, feeds: Sequence[dict], nodes: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Min / max of the activation input and the output of each node to quantize, over the feeds.

    Done here rather than by ``quantize_static``'s calibrator, which records every float tensor
    of the calibrated op types, attention probabilities included: at SD v1.5 size that is
    gigabytes per feed and was killed at 23 GB on a 24 GB machine. The graph gets a ``ReduceMin``
    and a ``ReduceMax`` per calibrated tensor, so only two scalars each leave it and onnxruntime
    frees the activations as it goes (making the tensors themselves outputs, about 600 of them at
    SD v1.5 size, holds them all at once: the int8-cpu build was killed at 24.3 GB that way)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    wanted = set(nodes)
    tensors = sorted({t for n in model.graph.node if n.name in wanted for t in (n.input[0], n.output[0])})
    reductions = {}
    for i, name in enumerate(tensors):  # no axes: over every element
        reductions[f"prism_min_{i}"] = ((name, 0), [helper.make_node("ReduceMin", [name], [f"prism_min_{i}"], keepdims=0)],
                                        {}, np.minimum)
        reductions[f"prism_max_{i}"] = ((name, 1), [helper.make_node("ReduceMax", [name], [f"prism_max_{i}"], keepdims=0)],
                                        {}, np.maximum)
    bounds = smooth.reduce_over_feeds(src, model, reductions, feeds, "calibrate")
    # a tensor empty in every feed reduces to ±inf: nothing to calibrate it on
    return {name: (min(float(bounds[name, 0]), 0.0), max(float(bounds[name, 1]), 0.0))
            for name in tensors if np.isfinite(bounds[name, 0]) and np.isfinite(bounds[name, 1])}


class _DropPreprocessAdvice(logging.Filter):
    """quantize_static advises shape-inference pre-processing, twice per call; its symbolic shape
    inference cannot follow the UNet's batch arithmetic (N = U + G·(1+K)) and is not needed."""

    def filter(self, record):
        return "pre-processing before quantization" not in record.getMessage()


def quantize_unet(src: Path, dst: Path, feeds: Sequence[dict], precision: str,
                  float_scopes: Sequence[str] = UNET_FLOAT_SCOPES, smoothing: float | None = None) -> dict:
    """Static Q/DQ quantization of the UNet graph ``src`` into ``dst`` (+ ``dst.data``), with
    MinMax ranges from :func:`calibrate_ranges` handed to ``quantize_static`` as its calibration
    cache. int8-cpu: with ``smoothing`` (SmoothQuant's α) the channels are rescaled first and the
    rescaling folded into the Q/DQ scales afterwards (:mod:`prism_export.smoothing`); its MatMuls'
    outputs stay float."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    symmetric = precision == "int8"
    activation = QuantType.QInt8 if symmetric else QuantType.QUInt8
    options = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if precision == "int8-cpu":
        # DQ -> MatMul with no Q after it runs as MatMulIntegerToFloat: exact float output, and the
        # MatMuls' consumers (bias, GEGLU, attention, residual) are float anyway. Phantom UNet:
        # 2.26 -> 2.18 % rms noise error (held-out patients 2.69 -> 2.59 %)
        options["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    rescale = precision == "int8-cpu" and smoothing is not None
    dst.parent.mkdir(parents=True, exist_ok=True)
    # the rewritten float graph beside dst: onnxruntime wants external data in the graph's own folder
    prepared = dst.with_name(f".{dst.stem}.prepared-{os.getpid()}.onnx")
    rewrites = {}
    try:
        if precision == "int8-cpu":  # one load and one save of the weights for both rewrites
            model = onnx.load(str(src))
            rewrites["split_geglu"] = split_geglu(model)
            nodes, summary = unet_nodes_to_quantize(model, float_scopes)
            if rescale:  # channel maxima from src: the split keeps every tensor the rescaled nodes read
                summary["rescaling"] = smooth.rescale_model(model, src, feeds, nodes, alpha=smoothing)
            if rewrites["split_geglu"] or rescale:
                onnx.save_model(model, str(prepared), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=prepared.name + ".data")
                src = prepared
            del model
        else:
            nodes, summary = unet_nodes_to_quantize(onnx.load(str(src), load_external_data=False), float_scopes)
        ranges = calibrate_ranges(src, feeds, nodes)
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "ranges.json"
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
                k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items()}), cache)
            quiet = _DropPreprocessAdvice()
            logging.getLogger().addFilter(quiet)
            try:
                quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, activation_type=activation,
                                weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes,
                                op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CalibrationMethod.MinMax,
                                calibration_cache_path=str(cache), use_external_data_format=True, extra_options=options)
            except Exception as exc:  # onnxruntime's own exception types
                raise VariantError(f"onnxruntime could not quantize the UNet to {precision}: {type(exc).__name__}: {exc}") from exc
            finally:
                logging.getLogger().removeFilter(quiet)
    finally:
        prepared.unlink(missing_ok=True)
        prepared.with_name(prepared.name + ".data").unlink(missing_ok=True)
    if rewrites:
        summary["rewrites"] = rewrites
    if rescale:
        summary["rescaling"]["folded"] = smooth.fold_rescaling(dst)
    _one_data_file(dst)
    return {**summary, "format": "QDQ", "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
            "weights": "int8 symmetric per-channel", "calibration": "min/max of each quantized input over the feeds",
            "matmul_outputs": "float" if precision == "int8-cpu" else "quantized",
            "calibrated_tensors": len(ranges), "calibration_feeds": len(feeds),
            "tool": "onnxruntime.quantization.quantize_static (ranges from prism_export.variants.calibrate_ranges)"}


def convert_fp16(src: Path, dst: Path) -> dict:
    """One graph to float16 with float32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    large = sum(t.ByteSize() for t in model.graph.initializer) > 1.8 * 2**30
    try:  # onnx shape inference cannot take a > 2 GB proto: the exporter's value_info is used then
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
    except Exception as exc:
        raise VariantError(f"could not convert {src.name} to float16: {type(exc).__name__}: {exc}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)  # small constants (shapes) stay inline
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


def _one_data_file(path: Path) -> None:
    from .onnx_export import _one_data_file as one

    one(path)


# -- quality --------------------------------------------------------------------------------------
def image_quality(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """PSNR and SSIM (scikit-image, data range 1) of each counterfactual and reconstruction."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    edits, recons = [], []
    for ref, got in zip(reference, candidate):
        for i, (r, g) in enumerate(zip(ref, got)):
            with np.errstate(divide="ignore"):  # identical images: PSNR = inf, reported as 99
                psnr = float(peak_signal_noise_ratio(r, g, data_range=1.0))
            ssim = float(structural_similarity(r, g, data_range=1.0))
            (recons if i == 0 else edits).append((min(psnr, 99.0), ssim))

    def summary(rows):
        if not rows:
            return None
        psnr, ssim = np.array(rows).T
        return {"psnr_db_min": round(float(psnr.min()), 2), "psnr_db_mean": round(float(psnr.mean()), 2),
                "ssim_min": round(float(ssim.min()), 4), "ssim_mean": round(float(ssim.mean()), 4), "count": len(rows)}

    return {"counterfactuals": summary(edits), "reconstructions": summary(recons)}


def noise_error(backend, calls: Sequence[tuple[dict, np.ndarray]]) -> dict:
    """The variant UNet's noise prediction against fp32's on the recorded inputs."""
    max_abs = max_rel = 0.0
    sq_err = sq_ref = 0.0
    for feeds, reference in calls:
        got = np.asarray(backend.run("unet", **feeds)["noise"], dtype=np.float64)
        diff = np.abs(got - reference)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(diff.max() / max(np.abs(reference).max(), 1e-12)))
        sq_err += float((diff ** 2).sum())
        sq_ref += float((reference.astype(np.float64) ** 2).sum())
    return {"max_abs": max_abs, "max_rel": max_rel, "rms_rel": float(np.sqrt(sq_err / max(sq_ref, 1e-24))),
            "calls": len(calls),
            "metric": "max_rel = max|Δ| / max|fp32| per call; rms_rel = ‖Δ‖ / ‖fp32‖ over all calls"}


# -- the whole step ---------------------------------------------------------------------------------
def add_variants(engine_dir, precisions: Sequence[str], settings: VariantSettings = VariantSettings(),
                 progress: Callable[[str], None] = print) -> dict:
    """Build ``precisions`` (any of fp16, int8, int8-cpu) into the engine folder, measure each
    against fp32 and record it in the manifest. Replaces variants of the same name. Returns the
    manifest's ``variants`` section."""
    from prism_rt.engine import Engine

    root = Path(engine_dir).expanduser()
    wanted = [p for p in dict.fromkeys(precisions) if p != REFERENCE_PRECISION]
    unknown = [p for p in wanted if p not in PRECISIONS]
    if unknown:
        raise VariantError(f"unknown precision(s) {unknown}; use any of {', '.join(PRECISIONS)}")
    if not wanted:
        return json.loads((root / MANIFEST_NAME).read_text()).get("variants", {})
    manifest = load_manifest(root)  # checks the fp32 reference before anything is derived from it
    if any(p != "fp16" for p in wanted):  # bad --int8-float-scopes fail before the (long) reference run
        import onnx

        unet_nodes_to_quantize(onnx.load(str(manifest.graphs["unet"].file), load_external_data=False),
                               settings.int8_float_scopes)
    # no arena: recording at SD v1.5 size runs many shapes in one process (20 GB peak measured without one)
    reference_engine = Engine.load(root, backend="onnxruntime", threads=settings.threads, cpu_arena=False)
    size = reference_engine.backend.info.image_size
    items = (load_calibration_items(settings.calibration_images, settings.calibration_count)
             if settings.calibration_images else default_calibration_items(settings.calibration_count, size))
    progress(f"fp32 reference: direct inversion + edit of {len(items)} calibration image(s) at "
             f"{settings.calibration_steps} steps, recording the UNet's inputs …")
    reference = _invert_and_edit(reference_engine, items, settings, record=True)
    calibration = _spread(reference.unet_calls, settings.calibration_samples)
    checks = _spread(reference.unet_calls, min(16, settings.calibration_samples))
    progress(f"fp32 reference: {reference.seconds:.1f} s, {len(reference.unet_calls)} UNet calls recorded, "
             f"{len(calibration)} kept for calibration")
    del reference_engine

    raw = json.loads((root / MANIFEST_NAME).read_text())
    variants = dict(raw.get("variants") or {})
    staged: dict[str, Path] = {}
    try:
        for precision in wanted:
            start = time.perf_counter()
            staging = root / f".{VARIANT_DIRS[precision]}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staged[precision] = staging
            graphs = {}
            if precision == "fp16":
                for name in settings.fp16_graphs:
                    made = convert_fp16(manifest.graphs[name].file, staging / f"{name}.onnx")
                    graphs[name] = made
            else:
                made = quantize_unet(manifest.graphs["unet"].file, staging / "unet.onnx",
                                     [feeds for feeds, _ in calibration], precision, settings.int8_float_scopes,
                                     smoothing=settings.int8_cpu_smoothing)
                if precision == "int8-cpu":  # an ONNX Runtime-only graph: its contrib operators may be used
                    fused = fuse_for_cpu_file(staging / "unet.onnx")
                    made["cpu_attention"] = {"fused_attentions": fused["fused_attentions"],
                                             "direct_io": fused["attention_direct_io"],
                                             "op": f"{MS_DOMAIN}.MultiHeadAttention (flash attention on CPU)"}
                    made["cpu_gelu"] = {"fused_gelu": fused["fused_gelu"], "op": f"{MS_DOMAIN}.Gelu"}
                    made["cpu_latent_prefix"] = {**fused["latent_prefix"], "op": "Unique + Gather (prism_export.cpu_dedupe)"}
                    made["cpu_matmul_bias"] = {"fused": fused["fused_matmul_bias"],
                                               "op": f"{MS_DOMAIN}.MatMulIntegerToFloat (integer product, scales and "
                                                     "bias in one pass)"}
                graphs["unet"] = made
            build_s = time.perf_counter() - start
            entry = {"graphs": {}, "built_utc": _now(), "build_s": round(build_s, 1), "settings": settings.to_json()}
            for name, how in graphs.items():
                entry["graphs"][name] = _variant_graph_entry(root, raw["graphs"][name], staging, VARIANT_DIRS[precision],
                                                            name, "fp16" if precision == "fp16" else precision, how)
            if precision != "fp16":
                entry["quantization"] = graphs["unet"]
            # measure: the staged files are read in place through a temporary manifest entry
            entry["quality"] = _measure(root, raw, precision, entry, staging, items, reference, checks, settings)
            variants[precision] = entry
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _variant_graph_entry(root: Path, fp32_entry: dict, staging: Path, folder: str, name: str, precision: str,
                         how: dict) -> dict:
    from prism_rt.onnx_io import read_signature

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
        "precision": precision, **{k: fp32_entry[k] for k in keys if k in fp32_entry}, "made_by": how,
    }


def _measure(root: Path, raw: dict, precision: str, entry: dict, staging: Path, items, reference: _Run, checks,
             settings: VariantSettings) -> dict:
    """Invert + edit with the staged variant and compare with the fp32 run."""
    import tempfile

    from prism_rt.engine import Engine

    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        view = Path(tmp) / "engine"  # the fp32 engine's files linked, the staged variant's beside them
        view.mkdir()
        for child in root.iterdir():
            if child.name not in (MANIFEST_NAME, VARIANT_DIRS[precision]) and not child.name.startswith("."):
                (view / child.name).symlink_to(child.resolve(), target_is_directory=child.is_dir())
        (view / VARIANT_DIRS[precision]).symlink_to(staging.resolve(), target_is_directory=True)
        trial = dict(raw, variants={precision: entry})
        (view / MANIFEST_NAME).write_text(json.dumps(trial, indent=2, default=str))
        engine = Engine.load(view, backend="onnxruntime", precision=precision, threads=settings.threads, cpu_arena=False)
        run = _invert_and_edit(engine, items, settings, record=False)
        noise = noise_error(engine.backend, checks)
        del engine
    return {"reference": "fp32 engine, same images, direct inversion, same settings",
            "images": image_quality(reference.images, run.images), "noise": noise,
            "calibration_images": [i.name for i in items], "steps": settings.calibration_steps,
            "seconds": {"fp32": round(reference.seconds, 1), precision: round(run.seconds, 1)},
            "note": "in-sample: measured on the calibration images"}


def _commit(root: Path, raw: dict, variants: dict, staged: dict[str, Path]) -> None:
    """Move the staged folders into place and write the manifest; the old folder of a replaced
    variant is removed only after the new manifest is written."""
    trash = []
    for precision, staging in staged.items():
        final = root / VARIANT_DIRS[precision]
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
