"""Reduced-precision graphs of an engine: the UNet statically quantized to int8 Q/DQ (symmetric for
TensorRT, u8 activations for ONNX Runtime on x86), and any graph converted to float16.

Only Conv / MatMul / Gemm nodes with a constant weight are quantized, except the sensitive ones kept
float (``int8_float_scopes``, default :data:`prism_export.variant_config.UNET_FLOAT_SCOPES`).
Normalisations, softmax, the attention-probability products (MatMul / Einsum of two activations)
and the prompt-to-prompt control math are never quantized. Nodes are chosen by the torch module
scope the dynamo exporter records on each node (``pkg.torch.onnx.name_scopes``). The ranges are the
min / max of each quantized tensor over the recorded calibration feeds
(:mod:`prism_export.calibration`), computed inside the graph (:func:`calibrate_ranges`).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from prism_rt.precision import Precision

from . import smoothing as smooth
from .cpu_rewrites import split_geglu
from .onnx_graph import graph_maps, one_data_file, rewrite_file
from .variant_config import UNET_FLOAT_SCOPES, VariantError

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


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
    gigabytes per feed, more than a 24 GB machine holds. The graph gets a ``ReduceMin`` and a
    ``ReduceMax`` per calibrated tensor, so only two scalars each leave it and onnxruntime frees the
    activations as it goes (making the tensors themselves outputs, about 600 of them at SD v1.5
    size, would hold them all at once)."""
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


def quantize_unet(src: Path, dst: Path, feeds: Sequence[dict], precision: Precision | str,
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

    precision = Precision.parse(precision)
    if not precision.quantized:
        raise VariantError(f"quantize_unet makes int8 or int8-cpu, not {precision}")
    symmetric, cpu = precision.symmetric, precision is Precision.INT8_CPU
    activation = QuantType.QInt8 if symmetric else QuantType.QUInt8
    options = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if cpu:
        # DQ -> MatMul with no Q after it runs as MatMulIntegerToFloat: exact float output (less error
        # than requantizing), and the MatMuls' consumers (bias, GEGLU, attention, residual) are float anyway
        options["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    else:
        # TensorRT's explicit quantization: Q/DQ on the activation and weight inputs of Conv / MatMul /
        # Gemm only. Biases stay float (its parser refuses a DequantizeLinear of an int32 tensor,
        # onnx-tensorrt #850; it fuses a float bias into the int8 kernel itself), and no Q/DQ on the
        # outputs: every consumer in the UNet (GroupNorm, bias Add, GEGLU, softmax, residual) is float
        options["QuantizeBias"] = False
        options["OpTypesToExcludeOutputQuantization"] = list(QUANTIZED_OPS)
    rescale = cpu and smoothing is not None
    dst.parent.mkdir(parents=True, exist_ok=True)
    # the rewritten float graph beside dst: onnxruntime wants external data in the graph's own folder
    prepared = dst.with_name(f".{dst.stem}.prepared-{os.getpid()}.onnx")
    rewrites = {}
    try:
        if cpu:  # one load and one save of the weights for both rewrites
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
    one_data_file(dst)
    if not cpu:
        summary["float_consumers_rewired"] = rewrite_file(dst, lambda model, _: float_consumers_read_float(model))
    return {**summary, "format": "QDQ", "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
            "weights": "int8 symmetric per-channel", "calibration": "min/max of each quantized input over the feeds",
            "matmul_outputs": "float", "conv_gemm_outputs": "quantized" if cpu else "float",
            "biases": "int32 (input scale × weight scale)" if cpu else "float",
            "calibrated_tensors": len(ranges), "calibration_feeds": len(feeds),
            # the manifest's wording, kept as engines already record it
            "tool": "onnxruntime.quantization.quantize_static (ranges from prism_export.variants.calibrate_ranges)"}


def float_consumers_read_float(model) -> int:
    """Give the float consumers of a quantized activation the float tensor back.

    ``quantize_static`` points every consumer of an activation it quantizes at the DequantizeLinear
    output: a tensor read by a quantized Conv and by a float op (a down block's output feeds the
    downsampler's Conv and the skip connection's Concat) would carry int8 error into the float op
    and a Q/DQ pair where TensorRT's explicit-quantization pattern has none. Only inputs 0 and 1 of
    Conv / MatMul / Gemm keep reading DQ outputs. Returns the number of inputs rewired."""
    producer, consumers = graph_maps(model.graph)

    def dequantized(name: str) -> bool:
        return name in producer and producer[name].op_type == "DequantizeLinear"

    rewired = 0
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DQ (its input is an initializer)
        for node in consumers[dq.output[0]]:
            quantized = node.op_type in QUANTIZED_OPS and len(node.input) > 1 and all(map(dequantized, node.input[:2]))
            for i, name in enumerate(node.input):
                if name == dq.output[0] and not (quantized and i in (0, 1)):
                    node.input[i] = q.input[0]
                    rewired += 1
    return rewired


def convert_fp16(src: Path, dst: Path, fp32_ops=()) -> dict:
    """One graph to float16 with float32 inputs and outputs; nodes of the op types ``fp32_ops``
    stay float32 with Casts around them (:data:`prism_export.variant_config.FP16_FP32_OPS_DEFAULT`)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    kept = sum(1 for n in model.graph.node if n.op_type in set(fp32_ops))
    large = sum(t.ByteSize() for t in model.graph.initializer) > 1.8 * 2**30
    try:  # onnx shape inference cannot take a > 2 GB proto: the exporter's value_info is used then
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large,
                                         op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(fp32_ops))
    except Exception as exc:
        raise VariantError(f"could not convert {src.name} to float16: {type(exc).__name__}: {exc}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)  # small constants (shapes) stay inline
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "fp32_ops": list(fp32_ops), "fp32_nodes": kept}
