"""Compute the UNet's latent-only prefix once per distinct latent (CPU graphs).

In a guided step every item's latent goes into the UNet twice, once with the unconditional and
once with the conditional text (the edit loop's layout: ``prism_rt.loop.edit_loop_groups``; the
noise-blend masks even feed one latent 2 + K times). Everything the UNet computes before text
first enters — ``conv_in``, the first ResNet, the first transformer's norm, ``proj_in`` and its
self-attention, at SD v1.5 the first of the five 64×64 attention layers, which prompt-to-prompt
never controls — is then computed twice on the same values.

:func:`dedupe_prefix` rewrites the graph so that ``Unique(latents, axis=0, sorted=0)`` picks the
distinct latents, that prefix runs on them only, and a ``Gather`` by ``Unique``'s inverse index
puts its results back in the batch's order where the rest of the graph reads them. The prefix is
found from the graph, not from names: the nodes whose values depend on ``latents`` and on no input
other than ``latents`` and ``timestep`` (through values or shapes); the shape computations and the
timestep embedding those nodes read are cloned to follow the distinct batch. Each tensor handed
back must have the batch as its leading dimension (the exporter's symbolic ``batch``); where one
does not, the prefix is cut before the node that writes it. Operators that mix batch rows
(dynamic quantization, reductions over the batch) end the prefix too.

Exact: every prefix operator works row by row, so the distinct rows give the same values (a batch
without repeats runs the same prefix in the same order, plus a ``Unique`` and a few row copies).
For the ONNX Runtime CPU graphs only (the twins, int8-cpu): TensorRT has no ``Unique``.
"""
from __future__ import annotations

from collections import Counter

from .onnx_graph import drop_unused_initializers, graph_maps, remove_dead, set_nodes, topological

LATENTS, TIMESTEP = "latents", "timestep"
PREFIX = "prism_dedupe"
# operators whose output rows depend on more than the same input row
_ROW_MIXING = {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "Loop", "If", "Scan",
               "Unique", "NonZero", "TopK"}
_REDUCES = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}


def _mixes_rows(node, inits: dict) -> bool:
    if node.op_type in _ROW_MIXING:
        return True
    if node.op_type in _REDUCES:
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            from onnx import numpy_helper

            axes = numpy_helper.to_array(inits[node.input[1]]).reshape(-1).tolist()
        return axes is None or 0 in axes  # unknown axes or all axes: assume the batch is reduced
    return False


def _batch_symbol(model):
    for v in model.graph.input:
        if v.name == LATENTS:
            d = v.type.tensor_type.shape.dim
            return d[0].dim_param if d and d[0].HasField("dim_param") else None
    return None


def dedupe_prefix(model) -> dict:
    """Rewrite ``model`` (weights may stay external) in place, see the module docstring. Returns
    ``{"nodes": n, "ops": {op: count}}`` of the prefix that now runs on distinct latents
    (``nodes`` 0: nothing changed)."""
    from onnx import helper

    graph = model.graph
    none = {"nodes": 0, "ops": {}}
    names = [i.name for i in graph.input]
    symbol = _batch_symbol(model)
    if LATENTS not in names or not symbol or not set(names) - {LATENTS, TIMESTEP}:
        return none  # no latents, or nothing but them (a VAE decoder): no prefix shared by several rows
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return none  # control flow: not handled
    inits = {t.name: t for t in graph.initializer}
    producer, consumers = graph_maps(graph)
    outputs = {o.name for o in graph.output}
    shapes = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}

    values, anyhow, other = {LATENTS}, {LATENTS}, set(names) - {LATENTS, TIMESTEP}
    for n in graph.node:  # graph order is topological
        ins = [i for i in n.input if i]
        if any(i in other for i in ins):
            other.update(n.output)
        if any(i in anyhow for i in ins):
            anyhow.update(n.output)
        if n.op_type not in ("Shape", "Size") and any(i in values for i in ins):
            values.update(n.output)
    prefix = {id(n): n for n in graph.node
              if any(o in values for o in n.output) and not any(o in other for o in n.output)}

    def drop(node):  # cut the prefix before ``node``: it and everything after it in the prefix leave
        stack = [node]
        while stack:
            n = stack.pop()
            if prefix.pop(id(n), None) is None:
                continue
            stack += [c for o in n.output for c in consumers.get(o, []) if id(c) in prefix]

    for n in list(prefix.values()):
        if id(n) in prefix and _mixes_rows(n, inits):
            drop(n)

    def leading_is_batch(name):
        v = shapes.get(name)
        d = v.type.tensor_type.shape.dim if v is not None else ()
        return bool(d) and d[0].HasField("dim_param") and d[0].dim_param == symbol

    while True:  # every tensor handed back to the rest of the graph must be [batch, …]
        cuts = {o: n for n in prefix.values() for o in n.output
                if o in values and (o in outputs or any(id(c) not in prefix for c in consumers.get(o, [])))}
        bad = [n for o, n in cuts.items() if not leading_is_batch(o)]
        if not bad:
            break
        for n in bad:
            drop(n)
    heavy = {"Conv", "QLinearConv", "MatMul", "MatMulInteger", "MatMulIntegerToFloat", "MultiHeadAttention", "Gemm"}
    if not any(n.op_type in heavy for n in prefix.values()):
        return none

    # the prefix and the latent-dependent computations it reads (shapes, the broadcast timestep embedding)
    cloned, stack = {}, list(prefix.values())
    while stack:
        n = stack.pop()
        if id(n) in cloned:
            continue
        cloned[id(n)] = n
        stack += [producer[i] for i in n.input if i in anyhow and i in producer]

    distinct, first, inverse = f"{PREFIX}/latents", f"{PREFIX}/first", f"{PREFIX}/inverse"
    new = [helper.make_node("Unique", [LATENTS], [distinct, first, inverse], axis=0, sorted=0, name=f"{PREFIX}/unique")]
    rename = {LATENTS: distinct}
    for n in graph.node:
        if id(n) not in cloned:
            continue
        copy = type(n)()
        copy.CopyFrom(n)
        copy.name = f"{PREFIX}/{n.name or n.output[0]}"
        del copy.input[:]
        copy.input.extend(rename.get(i, i) for i in n.input)
        del copy.output[:]
        for o in n.output:
            rename[o] = f"{PREFIX}/{o}" if o else o
            copy.output.append(rename[o])
        new.append(copy)
    for name, n in cuts.items():  # the original writer's tensor is now the gathered one
        n.output[list(n.output).index(name)] = f"{PREFIX}/unused/{name}"
        new.append(helper.make_node("Gather", [rename[name], inverse], [name], axis=0, name=f"{PREFIX}/gather/{name}"))
    set_nodes(graph, topological(list(graph.node) + new))
    remove_dead(graph)
    drop_unused_initializers(graph)
    ops = Counter(n.op_type for n in prefix.values())
    return {"nodes": len(prefix), "ops": dict(sorted(ops.items())), "handed_back": len(cuts)}
