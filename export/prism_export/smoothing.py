"""Per-channel rescaling of the UNet for the int8-cpu variant, folded into its Q/DQ nodes.

ONNX Runtime's fast int8 kernels (``QLinearConv``, ``MatMulIntegerToFloat``) take one u8 scale per
activation tensor, and a tensor's widest channel sets it for all. Two exact rewrites of the float
graph even the channels out before calibration:

* **input smoothing** (SmoothQuant, Xiao et al. 2023), convolutions and MatMuls: the input's channel
  ``c`` is divided by ``t_c = max|X_c|^α / max|W_c|^(1-α)`` and the weights' input channel ``c``
  multiplied by it;
* **output equalization** (cross-layer equalization, Nagel et al. 2019), convolutions: output
  channel ``c``'s weights and bias are multiplied by ``s_c = max_k r_k / r_c`` (``r`` the channels'
  absolute maxima, ``s`` capped), and the output multiplied by ``1 / s_c`` afterwards.

:func:`rescale_unet` writes the float graph with those rescalings as explicit ``Mul`` nodes (one
per convolution input and output); for MatMuls the division goes into the weights of what feeds
them where that is linear per channel — a ``LayerNormalization``'s scale and bias (one factor
shared by every MatMul it feeds) or the value half of a GEGLU (``value · gelu(gate)``, split by
:func:`prism_export.cpu_rewrites.split_geglu`). After quantization :func:`fold_rescaling` moves each
convolution's ``Mul`` into the neighbouring QuantizeLinear / DequantizeLinear as a per-channel
(axis 1, NCHW) scale, so the rescaling costs no extra pass over those activations; only the MatMul
inputs nothing linear produces (attention outputs, the text embeddings) keep a ``Mul``.

What the rescaling is worth on the trained phantom UNet: benchmarks/RESULTS.md."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .cpu_attention import fuse_attention
from .onnx_graph import drop_unused_initializers, graph_maps, set_nodes

SMOOTH_SUFFIX = "/prism_smooth"
EQUALIZE_SUFFIX = "/prism_equalize"
DEFAULT_ALPHA = 0.7
DEFAULT_CAP = 64.0  # largest output-equalization factor: a channel that is ~always 0 must not blow up


def _channel_absmax(src: Path, feeds: Sequence[dict], tensors: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """max |x| per channel of each tensor over the feeds; ``tensors``: name → (channel axis,
    channels), axis 1 for NCHW, -1 for [..., C]. ``Abs`` + ``ReduceMax`` nodes are added so only the
    per-channel maxima leave the graph (at SD v1.5 size the tensors themselves are gigabytes per feed)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    reductions = {}
    for i, (name, (axis, channels)) in enumerate(sorted(tensors.items())):
        base = f"prism_stat_{i}"
        if axis == 1:
            nodes = [helper.make_node("Abs", [name], [base + "_abs"]),
                     helper.make_node("ReduceMax", [base + "_abs", base + "_axes"], [base], keepdims=0)]
            consts = {base + "_axes": np.array([0, 2, 3], np.int64)}
        else:
            nodes = [helper.make_node("Abs", [name], [base + "_abs"]),
                     helper.make_node("Reshape", [base + "_abs", base + "_shape"], [base + "_rows"]),
                     helper.make_node("ReduceMax", [base + "_rows", base + "_axes"], [base], keepdims=0)]
            consts = {base + "_axes": np.array([0], np.int64), base + "_shape": np.array([-1, channels], np.int64)}
        reductions[base] = (name, nodes, consts, np.maximum)
    return reduce_over_feeds(src, model, reductions, feeds, "channels")


def reduce_over_feeds(src: Path, model, reductions: dict, feeds: Sequence[dict], tag: str) -> dict:
    """Statistics of ``model``'s tensors computed inside the graph, so only they leave it.

    ``reductions``: output name → (key, nodes computing that output, their constants, how two
    feeds' values combine: ``np.minimum`` / ``np.maximum``). The nodes are added to ``model`` (a
    graph of ``src``, weights in ``src``'s data file), which runs on every feed
    (:func:`run_beside`); returns key → combined value, as float64."""
    from onnx import helper, numpy_helper

    for out, (_, nodes, consts, _) in reductions.items():
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        model.graph.node.extend(nodes)
        model.graph.output.append(helper.make_empty_tensor_value_info(out))
    combined: dict[str, np.ndarray] = {}
    for values in run_beside(src, model, list(reductions), feeds, tag):
        for out, value in values.items():
            value = np.asarray(value, np.float64)
            combined[out] = reductions[out][3](combined[out], value) if out in combined else value
    return {reductions[out][0]: value for out, value in combined.items()}


def run_beside(src: Path, model, names: Sequence[str], feeds: Sequence[dict], tag: str):
    """Run ``model`` (``src``'s graph with extra outputs, weights still in ``src``'s data file) on
    each feed, yielding ``{name: value}``; it is saved beside ``src`` for the run (onnxruntime
    refuses external data outside the model's folder, links included) and removed afterwards.

    ``model``'s attention is fused first (:func:`prism_export.cpu_attention.fuse_attention`, exact;
    products whose tensors are asked for stay as they are): at SD v1.5 size the unfused 64×64
    attention's probability matrices would add gigabytes to the run and double its time."""
    import onnx
    import onnxruntime as ort

    fuse_attention(model)
    path = src.with_name(f".{src.stem}.{tag}-{os.getpid()}.onnx")
    try:
        onnx.save_model(model, str(path))
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        for feed in feeds:
            yield dict(zip(names, session.run(list(names), feed)))
        del session
    finally:
        path.unlink(missing_ok=True)


def _smoothing(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    x = np.maximum(np.asarray(x_absmax, np.float64), 1e-6)
    w = np.maximum(np.asarray(w_absmax, np.float64), 1e-8)
    t = x ** alpha / w ** (1.0 - alpha)
    return t / np.exp(np.log(t).mean())  # geometric mean 1: the weights' overall scale is unchanged


def _gated_value(tensor: str, producer: dict, consumers: dict, inits: dict):
    """For ``tensor = Mul(value, gate)`` where ``value = Add(MatMul(x, W), b)`` (W, b constant, each
    read once — a GEGLU split by :func:`prism_export.cpu_rewrites.split_geglu`), the value's
    (MatMul, bias name); else None."""
    mul = producer.get(tensor)
    if mul is None or mul.op_type != "Mul" or len(consumers[tensor]) != 1:
        return None
    for side in mul.input:
        add = producer.get(side)
        if add is None or add.op_type != "Add" or len(consumers[side]) != 1:
            continue
        bias = next((i for i in add.input if i in inits), None)
        mm = next((producer.get(i) for i in add.input if i != bias), None)
        if bias is not None and mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits \
                and len(consumers[mm.output[0]]) == 1 and len(consumers[bias]) == 1 and len(consumers[mm.input[1]]) == 1:
            return mm, bias
    return None


def rescale_unet(src: Path, dst: Path, feeds: Sequence[dict], nodes: Sequence[str], alpha: float = DEFAULT_ALPHA,
                 cap: float = DEFAULT_CAP) -> dict:
    """Write ``src`` with the quantized ``nodes``' channels rescaled (see the module docstring) to
    ``dst`` (+ ``dst.data``); the graph computes the same function (up to float rounding)."""
    import onnx

    model = onnx.load(str(src))  # with its weights
    summary = rescale_model(model, Path(src), feeds, nodes, alpha, cap)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data")
    return summary


def rescale_model(model, stats_src: Path, feeds: Sequence[dict], nodes: Sequence[str], alpha: float = DEFAULT_ALPHA,
                  cap: float = DEFAULT_CAP) -> dict:
    """Rescale the quantized ``nodes``' channels of ``model`` (an ``onnx.ModelProto`` with its weights
    loaded) in place. The per-channel maxima are measured by running the graph file ``stats_src`` on
    ``feeds``: ``model`` itself or a graph with the same tensors feeding those nodes (the UNet
    before :func:`prism_export.cpu_rewrites.split_geglu`)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer, consumers = graph_maps(graph)
    wanted = set(nodes)
    convs = [n for n in graph.node if n.name in wanted and n.op_type == "Conv" and n.input[1] in inits
             and len(inits[n.input[1]].dims) == 4 and all(a.name != "group" or a.i == 1 for a in n.attribute)]
    matmuls = [n for n in graph.node if n.name in wanted and n.op_type == "MatMul" and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2]
    matmul_names = {n.name for n in matmuls}
    # MatMuls grouped by the LayerNormalization that feeds them (its output read by nothing else)
    norm_groups: dict[str, list] = defaultdict(list)
    for n in matmuls:
        p = producer.get(n.input[0])
        if p is not None and p.op_type == "LayerNormalization" and len(p.input) >= 3 and p.input[1] in inits \
                and p.input[2] in inits and all(c.name in matmul_names for c in consumers[n.input[0]]):
            norm_groups[n.input[0]].append(n)
    lone = [n for n in matmuls if n.input[0] not in norm_groups]
    tensors = {n.input[0]: (1, inits[n.input[1]].dims[1]) for n in convs} | \
        {n.output[0]: (1, inits[n.input[1]].dims[0]) for n in convs} | \
        {n.input[0]: (-1, inits[n.input[1]].dims[0]) for n in matmuls}
    stats = _channel_absmax(Path(stats_src), feeds, tensors)

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float64)

    def store(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    new_inits, before, after, summary = [], defaultdict(list), defaultdict(list), defaultdict(int)

    def mul(node, tensor_in: str, tensor_out: str, factor: np.ndarray, shape, suffix: str):
        const = f"{node.name}{suffix}/factor"
        new_inits.append(numpy_helper.from_array(factor.astype(np.float32).reshape(shape), const))
        m = helper.make_node("Mul", [tensor_in, const], [tensor_out], name=node.name + suffix)
        m.metadata_props.extend(node.metadata_props)  # same module path: float scopes still see it
        return m

    for n in convs:
        w = array(n.input[1])  # [Co, Ci, kh, kw]
        t = _smoothing(stats[n.input[0]], np.abs(w).max(axis=(0, 2, 3)), alpha)
        r = np.maximum(stats[n.output[0]], 1e-8)
        s = np.minimum(r.max() / r, cap)
        store(n.input[1], w * t[None, :, None, None] * s[:, None, None, None])
        if len(n.input) > 2 and n.input[2]:
            store(n.input[2], array(n.input[2]) * s)
        smoothed, raw_out = n.name + SMOOTH_SUFFIX + "/out", n.name + EQUALIZE_SUFFIX + "/in"
        before[n.name].append(mul(n, n.input[0], smoothed, 1.0 / t, (1, -1, 1, 1), SMOOTH_SUFFIX))
        after[n.name].append(mul(n, raw_out, n.output[0], 1.0 / s, (1, -1, 1, 1), EQUALIZE_SUFFIX))
        n.input[0], n.output[0] = smoothed, raw_out
        summary["convolutions"] += 1
    for tensor, group in norm_groups.items():
        norm = producer[tensor]
        w_absmax = np.max([np.abs(array(n.input[1])).max(axis=1) for n in group], axis=0)
        t = _smoothing(stats[tensor], w_absmax, alpha)
        for n in group:
            store(n.input[1], array(n.input[1]) * t[:, None])
        for k, index in ((1, "scale"), (2, "bias")):
            name = f"{norm.name}/prism_smoothed_{index}"  # a copy: the initializer may be shared
            new_inits.append(numpy_helper.from_array((array(norm.input[k]) / t).astype(np.float32), name))
            norm.input[k] = name
        summary["matmuls_folded_into_norms"] += len(group)
    for n in lone:
        w = array(n.input[1])  # [Ci, Co]
        t = _smoothing(stats[n.input[0]], np.abs(w).max(axis=1), alpha)
        store(n.input[1], w * t[:, None])
        value = _gated_value(n.input[0], producer, consumers, inits)
        if value is not None:  # GEGLU: value · gelu(gate); 1/t goes into the value half's weights and bias
            value_mm, bias = value
            store(value_mm.input[1], array(value_mm.input[1]) / t[None, :])
            store(bias, array(bias) / t)
            summary["matmuls_folded_into_gated_values"] += 1
            continue
        smoothed = n.name + SMOOTH_SUFFIX + "/out"
        before[n.name].append(mul(n, n.input[0], smoothed, 1.0 / t, (-1,), SMOOTH_SUFFIX))
        n.input[0] = smoothed
        summary["matmuls_with_mul"] += 1
    rewritten = []
    for n in graph.node:
        rewritten.extend(before.get(n.name, []) + [n] + after.get(n.name, []))
    set_nodes(graph, rewritten)
    graph.initializer.extend(new_inits)
    return {"alpha": alpha, "equalization_cap": cap, **summary}


def fold_rescaling(path: Path) -> dict:
    """Fold the convolutions' rescaling ``Mul`` nodes of the quantized graph ``path`` into per-channel
    scales of the QuantizeLinear after them (input smoothing) or the DequantizeLinear before them
    (output equalization), in place. Anything not in that shape keeps its ``Mul``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer, consumers = graph_maps(graph)

    def value(name):  # small tensors (factors, scales), in the graph or in its .data
        return numpy_helper.to_array(inits[name], base_dir=str(Path(path).parent))

    def per_channel(qdq, factor: np.ndarray, tag: str):
        if len(qdq.input) < 3 or qdq.input[1] not in inits or qdq.input[2] not in inits:
            return False
        scale, zero = value(qdq.input[1]), value(qdq.input[2])
        if scale.size != 1 or zero.size != 1:
            return False
        channels = factor.size
        s_name, z_name = f"{qdq.name}/{tag}_scale", f"{qdq.name}/{tag}_zero_point"
        graph.initializer.extend([
            numpy_helper.from_array((float(scale) * factor).astype(np.float32), s_name),
            numpy_helper.from_array(np.full(channels, zero.reshape(()), zero.dtype), z_name)])
        qdq.input[1], qdq.input[2] = s_name, z_name
        kept = [a for a in qdq.attribute if a.name != "axis"]
        del qdq.attribute[:]
        qdq.attribute.extend(kept)
        qdq.attribute.extend([helper.make_attribute("axis", 1)])
        return True

    dropped, folded = set(), defaultdict(int)
    for m in list(graph.node):
        if m.op_type != "Mul" or m.input[1] not in inits:
            continue
        factor = value(m.input[1])
        if factor.ndim != 4:
            continue  # MatMul inputs ([B, L, C]): a per-channel Q on the last axis has no fast kernel
        factor = factor.reshape(-1).astype(np.float64)
        if m.name.endswith(SMOOTH_SUFFIX):  # x -> Mul(1/t) -> Q  =>  x -> Q(scale · t)
            users = consumers[m.output[0]]
            if len(users) == 1 and users[0].op_type == "QuantizeLinear" and per_channel(users[0], 1.0 / factor, "smooth"):
                users[0].input[0] = m.input[0]
                dropped.add(m.name)
                folded["smoothing_into_quantize"] += 1
        elif m.name.endswith(EQUALIZE_SUFFIX):  # DQ -> Mul(1/s) -> y  =>  DQ(scale / s) -> y
            dq = producer.get(m.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear" and len(consumers[dq.output[0]]) == 1 \
                    and per_channel(dq, factor, "equalize"):
                dq.output[0] = m.output[0]
                dropped.add(m.name)
                folded["equalization_into_dequantize"] += 1
    kept = [n for n in graph.node if n.name not in dropped]
    set_nodes(graph, kept)
    drop_unused_initializers(graph)  # the folded Muls' factors go with them
    folded["muls_left"] = sum(1 for n in kept if n.name.endswith((SMOOTH_SUFFIX, EQUALIZE_SUFFIX)))
    onnx.save_model(model, str(path))  # external data untouched: the tensors still point at path's .data
    return dict(folded)
