"""Which ops of a graph stay float32 in its fp16 variant: measured, per graph.

A normalisation sums squares and a softmax exponentials; a GPU kernel that does that in fp16 passes
fp16's largest value, 65504, once |x|² does (|x| ≈ 256). SD v1.5's UNet and text encoder keep their
activations small (normalised inputs everywhere), its VAE does not (the decoder's mid block). So the
fp16 build measures, on the fp32 graph, the largest finite |x| entering each candidate op over the
graph's sample inputs, and keeps the candidates in float32 where that exceeds
:data:`OVERFLOW_MARGIN` (a 4× margin on |x|, 16× on |x|², for inputs larger than the samples). The
choice and the measurement are recorded in the manifest (``variants.fp16.graphs.<g>.made_by``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FP16_MAX = 65504.0
OVERFLOW_MARGIN = 64.0  # |x| above which the candidates stay fp32: (4 · 64)² = 65536 ≈ fp16's largest value
MASK_LIMIT = 1e30  # attention masks use float32's lowest value: a constant, never summed, not an activation


def largest_inputs(path: Path, feeds_list, ops) -> float:
    """max finite |x| (below :data:`MASK_LIMIT`) over the first inputs of ``ops`` nodes of the
    float32 graph ``path`` (weights in its data file), over ``feeds_list``; 0.0 without such nodes."""
    import onnx
    from onnx import TensorProto, helper

    from .smoothing import reduce_over_feeds

    model = onnx.load(str(path), load_external_data=False)
    targets = sorted({n.input[0] for n in model.graph.node if n.op_type in set(ops) and n.input})
    if not targets:
        return 0.0
    reductions = {}
    for i, name in enumerate(targets):
        a, keep, zero = f"prism_fp16_abs_{i}", f"prism_fp16_keep_{i}", f"prism_fp16_zero_{i}"
        f32 = [helper.make_node("Cast", [name], [f"{a}_f"], to=TensorProto.FLOAT),
               helper.make_node("Abs", [f"{a}_f"], [a]),
               helper.make_node("Less", [a, "prism_fp16_mask_limit"], [keep]),
               helper.make_node("Where", [keep, a, "prism_fp16_zero"], [zero]),
               helper.make_node("ReduceMax", [zero], [f"prism_fp16_max_{i}"], keepdims=0)]
        consts = {} if i else {"prism_fp16_mask_limit": np.array(MASK_LIMIT, np.float32),
                               "prism_fp16_zero": np.array(0.0, np.float32)}
        reductions[f"prism_fp16_max_{i}"] = ((name,), f32, consts, np.maximum)
    bounds = reduce_over_feeds(path, model, reductions, list(feeds_list), "fp16")
    return float(max(bounds.values()))


def fp32_ops_for(path: Path, feeds_list, candidates) -> dict:
    """The measurement and the choice for one graph: ``{"largest_input": v, "fp32_ops": [...]}``."""
    largest = largest_inputs(path, feeds_list, candidates) if candidates else 0.0
    keep = list(candidates) if largest > OVERFLOW_MARGIN else []
    return {"largest_input": largest, "overflow_margin": OVERFLOW_MARGIN, "fp32_ops": keep,
            "candidates": list(candidates)}


def sample_feeds(raw: dict, graph: str, count: int = 2) -> list[dict]:
    """Inputs of ``graph`` in their valid ranges (the spec's samples), at the model's size: images
    in [-1, 1], unit-variance latents, random token ids, an edit call of one image × five items."""
    from .specs import ModelDims, UNetSpec, graph_specs

    spec = graph_specs(ModelDims.from_manifest(raw), int(raw["control"]["self_max_queries"]))[graph]
    rngs = [np.random.default_rng(seed) for seed in range(count)]
    if isinstance(spec, UNetSpec):
        return [spec.sample_inputs(rng, uncond=5, groups=1, edits=5) for rng in rngs]
    return [spec.sample_inputs(rng, batch=1) for rng in rngs]
