"""Exact rewrites of the UNet graph for ONNX Runtime's CPU provider (int8-cpu and the CPU twins).

* :func:`split_geglu`: the feed-forward's GEGLU projection ``MatMul → Add(bias) → Split`` becomes
  two MatMuls (value half, gate half), so the [batch, tokens, 2·4·C] product is never written and
  copied apart, and the value half can absorb the next layer's SmoothQuant factors
  (:mod:`prism_export.smoothing`).
* :func:`fuse_gelu`: ``x · ½ · (1 + erf(x / √2))``, which the dynamo exporter writes as five
  elementwise nodes and ONNX Runtime's own GELU fusion does not match in that order, becomes one
  ``com.microsoft.Gelu`` (the same erf formula, one pass).
* :func:`fuse_quantized_matmul_bias`: a quantized linear layer's ``DQ · DQ → MatMul → Add(bias)``
  becomes one ``com.microsoft.MatMulIntegerToFloat`` with the bias (ONNX Runtime's own fusion
  leaves the ``Add``, and the GEGLU gate's bias with it a ``BiasGelu`` in place of a ``Gelu``):
  outputs bitwise equal, one pass over the output less.

The first runs before quantization, the others after it; ``com.microsoft`` operators exist in ONNX
Runtime only, so none touches the graphs TensorRT builds from. :mod:`prism_export.cpu_graph` applies
them, with the attention fusion and the latent-prefix deduplication, to a graph file. What each is
worth: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import numpy as np

from .onnx_graph import MS_DOMAIN, drop_unused_initializers, graph_maps, node_attr, remove_dead, set_nodes, use_ms_domain

def split_geglu(model) -> int:
    """Rewrite every ``MatMul(x, W) → Add(·, b) → Split(axis=-1, 2 equal halves)`` with constant
    ``W`` / ``b`` into two ``MatMul → Add`` pairs writing the halves (in place, weights loaded);
    returns how many were split."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer, consumers = graph_maps(graph)
    replace, drop, new_inits, count = {}, set(), [], 0
    for split in graph.node:
        if split.op_type != "Split" or len(split.output) != 2:
            continue
        add = producer.get(split.input[0])
        if add is None or add.op_type != "Add" or len(consumers[add.output[0]]) != 1:
            continue
        bias_name = next((i for i in add.input if i in inits), None)
        mm = next((producer.get(i) for i in add.input if i != bias_name and producer.get(i) is not None), None)
        if bias_name is None or mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits \
                or len(consumers[mm.output[0]]) != 1:
            continue
        w, b = numpy_helper.to_array(inits[mm.input[1]]), numpy_helper.to_array(inits[bias_name])
        width = w.shape[-1]
        if w.ndim != 2 or b.shape != (width,) or width % 2 or node_attr(split, "axis", 0) not in (-1, 2):
            continue  # [batch, tokens, 2·inner] split on its last axis
        sizes = numpy_helper.to_array(inits[split.input[1]]).tolist() if len(split.input) > 1 and split.input[1] in inits \
            else [width // 2] * 2
        if sizes != [width // 2] * 2:
            continue
        nodes = []
        for k, (out, part) in enumerate(zip(split.output, ("value", "gate"))):
            cols = slice(k * width // 2, (k + 1) * width // 2)
            w_name, b_name, mm_out = f"{mm.input[1]}/{part}", f"{bias_name}/{part}", f"{mm.output[0]}/{part}"
            new_inits += [numpy_helper.from_array(np.ascontiguousarray(w[:, cols]), w_name),
                          numpy_helper.from_array(np.ascontiguousarray(b[cols]), b_name)]
            m = helper.make_node("MatMul", [mm.input[0], w_name], [mm_out], name=f"{mm.name}/{part}")
            a = helper.make_node("Add", [mm_out, b_name], [out], name=f"{add.name}/{part}")
            for n, src in ((m, mm), (a, add)):
                n.metadata_props.extend(src.metadata_props)  # same module path: float scopes see it
            nodes += [m, a]
        replace[id(split)] = nodes
        drop |= {id(mm), id(add)}
        count += 1
    if count:
        rewritten = []
        for n in graph.node:
            if id(n) not in drop:
                rewritten.extend(replace.get(id(n), [n]))
        set_nodes(graph, rewritten)
        graph.initializer.extend(new_inits)
        drop_unused_initializers(graph)
    return count


def _scalar(inits, name, base_dir=None):
    from onnx import numpy_helper

    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name], base_dir=base_dir) if base_dir else numpy_helper.to_array(inits[name])
    return float(value.reshape(())) if value.size == 1 else None


def fuse_gelu(model, base_dir: str | None = None) -> int:
    """Replace ``Div(x, √2) → Erf → Add(·, 1) → Mul(·, ½) → Mul(·, x)`` (either Mul first) by
    ``com.microsoft.Gelu(x)`` in place; returns how many were fused."""
    from onnx import helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer, consumers = graph_maps(graph)

    def only(name, op):
        users = consumers[name]
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def other(node, name):
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    replace, drop, count = {}, set(), 0
    for div in graph.node:
        if div.op_type != "Div" or not np.isclose(_scalar(inits, div.input[1], base_dir) or 0.0, np.sqrt(2.0), rtol=1e-4):
            continue
        x = div.input[0]
        erf = only(div.output[0], "Erf")
        add = erf and only(erf.output[0], "Add")
        if not add or not np.isclose(_scalar(inits, other(add, erf.output[0]), base_dir) or 0.0, 1.0):
            continue
        m1 = only(add.output[0], "Mul")
        m2 = m1 and only(m1.output[0], "Mul")
        if not m2:
            continue
        f1, f2 = other(m1, add.output[0]), other(m2, m1.output[0])
        half = lambda n: n is not None and np.isclose(_scalar(inits, n, base_dir) or 0.0, 0.5)  # noqa: E731
        if not ((half(f1) and f2 == x) or (f1 == x and half(f2))):
            continue
        gelu = helper.make_node("Gelu", [x], [m2.output[0]], name=f"{div.name}/gelu", domain=MS_DOMAIN)
        gelu.metadata_props.extend(div.metadata_props)
        replace[id(m2)] = gelu
        drop |= {id(div), id(erf), id(add), id(m1)}
        count += 1
    if count:
        rewritten = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
        set_nodes(graph, rewritten)
        drop_unused_initializers(graph)  # the constants √2, 1, ½ go with their nodes
        use_ms_domain(model)
    return count


def fuse_quantized_matmul_bias(model) -> int:
    """``DequantizeLinear(a) · DequantizeLinear(w) → Add(bias)`` — a quantized linear layer with
    its bias, as ``quantize_static`` writes it with float outputs — becomes one
    ``com.microsoft.MatMulIntegerToFloat(a_q, w_q, a_scale, w_scale, a_zp, w_zp, bias)``: the
    integer product, its scaling and the bias in one pass over the output. ONNX Runtime fuses the
    product itself into that operator anyway but leaves the bias ``Add`` as another pass over the
    output. Only a per-tensor activation (scalar scale and zero point) and 2-D
    weights quantized per tensor or per output column match; the dequantized tensors stay for any
    other reader. Returns how many were fused."""
    from onnx import TensorProto, helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer, consumers = graph_maps(graph)
    outputs = {o.name for o in graph.output}

    def dims(name):
        return list(inits[name].dims) if name in inits else None

    replace, drop, count = {}, set(), 0
    for mm in graph.node:
        if mm.op_type != "MatMul" or mm.output[0] in outputs:
            continue
        a_dq, w_dq = producer.get(mm.input[0]), producer.get(mm.input[1])
        users = consumers[mm.output[0]]
        if not (a_dq and w_dq and a_dq.op_type == w_dq.op_type == "DequantizeLinear"
                and len(users) == 1 and users[0].op_type == "Add"):
            continue
        add = users[0]
        bias = [i for i in add.input if i != mm.output[0]]
        w, w_scale = w_dq.input[0], w_dq.input[1]
        w_dims = dims(w)
        if (len(bias) != 1 or w_dims is None or len(w_dims) != 2 or inits[w].data_type != TensorProto.INT8
                or dims(bias[0]) != [w_dims[1]] or inits[bias[0]].data_type != TensorProto.FLOAT
                or len(a_dq.input) < 3 or dims(a_dq.input[1]) != [] or dims(a_dq.input[2]) != []
                or dims(w_scale) not in ([], [w_dims[1]])):
            continue
        if dims(w_scale) == [w_dims[1]] and node_attr(w_dq, "axis", 1) not in (1, -1):
            continue
        fused = helper.make_node("MatMulIntegerToFloat",
                                 [a_dq.input[0], w, a_dq.input[1], w_scale, a_dq.input[2],
                                  w_dq.input[2] if len(w_dq.input) > 2 else "", bias[0]],
                                 [add.output[0]], name=f"{mm.name}/int_bias", domain=MS_DOMAIN)
        fused.metadata_props.extend(mm.metadata_props)
        replace[id(mm)] = fused
        drop.add(id(add))
        count += 1
    if count:
        rewritten = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
        set_nodes(graph, rewritten)
        remove_dead(graph)  # the dequantized weights (and activations no other node reads)
        drop_unused_initializers(graph)
        use_ms_domain(model)
    return count
