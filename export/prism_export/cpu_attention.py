"""Fuse the UNet's attention products into ONNX Runtime's ``MultiHeadAttention``
(com.microsoft) for CPU graphs.

The exporter writes each attention layer as ``MatMul(q', k'ᵀ) → Softmax → MatMul(·, v)`` with q'
and k' already scaled by √scale. At SD v1.5's 64×64 layers that materialises a
[batch, 8, 4096, 4096] float matrix (1 GiB at batch 2) three times per layer; profiled on the
int8-cpu UNet at batch 2 these three nodes of the five 64×64 layers were about half of the step.
ONNX Runtime's CPU ``MultiHeadAttention`` computes the same thing tiled (flash attention) when
query, key and value come as [batch, sequence, hidden], without the big matrix.

Only layers whose softmax output feeds nothing but the ``P·V`` product are fused. The controlled
layers are written as such products too (``ControlledAttnProcessor._controlled``: the control is
linear in the probabilities, so it moves onto the values) and fuse as well, the second of each
pair over the K edit items only, empty for K = 0; LocalBlend's explicit maps (the conditional
half's cross-attention at the blend resolution) feed a mean and stay as they are.
``com.microsoft`` operators exist in ONNX Runtime only, so this is for the ``int8-cpu`` variant
and the fp32 graphs' CPU twins (:func:`prism_export.cpu_graph.write_cpu_graph`), never for the
graphs TensorRT builds from.

``MultiHeadAttention`` takes and gives [batch, sequence, hidden]; the exporter's products take
[batch, heads, sequence, head] (and Kᵀ), reached from the projections' [batch, sequence, hidden]
outputs through Reshape / Transpose chains and a scalar ``Mul`` by √scale on q and k. Where such a
chain is checked to be exactly that relayout (times a scalar: run once on a probe tensor, see
:func:`_probe_chain`), the attention reads the projection's output directly and the scalars go
into its ``scale``; the output is written straight into the [batch, sequence, hidden] tensor the
chain after ``P·V`` rebuilds. Otherwise a Transpose + Reshape converts, as before. Nodes left
without consumers are removed.
"""
from __future__ import annotations

from .onnx_graph import MS_DOMAIN, drop_unused_initializers, graph_maps, remove_dead, static_dims, use_ms_domain


_RELAYOUT = ("Reshape", "Transpose", "Mul", "Squeeze", "Unsqueeze")
_SHAPE_OPS = ("Shape", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Cast", "Constant", "Reshape", "Mul",
              "Div", "Add", "Sub", "ConstantOfShape", "Expand", "Range")


class _Graph:
    """Producer / consumer maps, small constants and static shapes of a graph being rewritten."""

    def __init__(self, model):
        graph = self.graph = model.graph
        self.producer, self.consumers = graph_maps(graph)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.shapes = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
        self.opsets, self.ir_version = list(model.opset_import), model.ir_version

    def dims(self, name):
        return static_dims(self.shapes.get(name))

    def small_init(self, name):
        t = self.inits.get(name)
        if t is None or any(e.key == "location" for e in t.external_data):
            return None
        from onnx import numpy_helper

        return numpy_helper.to_array(t)


def _chain_source(g: _Graph, name: str, stop_hidden: int, max_nodes: int = 40):
    """Walk up from ``name`` through data relayouts (Reshape / Transpose / (Un)Squeeze / scalar Mul)
    to the first tensor whose producer is something else; returns (source, nodes) when the source is
    [batch, sequence, ``stop_hidden``], else None. ``nodes`` are the chain's
    nodes and the shape computations its Reshapes read, all derived from the source or constants."""
    nodes, data, cur = [], set(), name
    while True:
        node = g.producer.get(cur)
        if node is None or node.op_type not in _RELAYOUT:
            break
        if node.op_type == "Mul":
            const = [i for i in node.input if (value := g.small_init(i)) is not None and value.size == 1]
            rest = [i for i in node.input if i not in const]
            if len(const) != 1 or len(rest) != 1:
                break
            nxt = rest[0]
        else:
            nxt = node.input[0]
        nodes.append(node)
        data.add(cur)
        cur = nxt
        if len(nodes) > max_nodes:
            return None
    dims = g.dims(cur)
    if not nodes or not dims or len(dims) != 3 or dims[2] != stop_hidden:
        return None
    # the shape inputs of the chain's nodes: computed from the source (or constants) only
    todo = [i for n in nodes for i in n.input[1:] if i and i not in g.inits]
    seen = {cur} | data
    while todo:
        t = todo.pop()
        if t in seen or t in g.inits:
            continue
        seen.add(t)
        node = g.producer.get(t)
        if node is None or node.op_type not in _SHAPE_OPS or len(nodes) > max_nodes:
            return None  # a graph input or something heavier: not a plain relayout
        nodes.append(node)
        todo += [i for i in node.input if i]
    if any(i in g.inits and g.small_init(i) is None for n in nodes for i in n.input):
        return None
    return cur, nodes


def _probe_chain(g: _Graph, source: str, target: str, nodes: list, dims: list, heads: int, perm: tuple):
    """Run ``nodes`` (source → target) with ONNX Runtime on random probes [B, S, hidden] (B = 3 and
    1; S: the source's static sequence length, or 5 where it is dynamic); returns c when target ==
    c · source.reshape(B, S, heads, head).transpose(perm) for both (to 1e-6), else None."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    seq, hidden = dims[1] or 5, dims[2]
    order = {id(n): k for k, n in enumerate(g.graph.node)}
    body = sorted(nodes, key=lambda n: order[id(n)])
    used = {i for n in body for i in n.input}
    inits = [g.inits[i] for i in sorted(used) if i in g.inits]
    graph = helper.make_graph(body, "probe", [helper.make_tensor_value_info(source, TensorProto.FLOAT, [None, None, hidden])],
                              [helper.make_tensor_value_info(target, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=g.opsets, ir_version=g.ir_version)
    rng, found = np.random.default_rng(0), set()
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for batch in (3, 1):  # an odd batch: a relayout that mixes batch and heads shows
            probe = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
            out = session.run([target], {source: probe})[0].astype(np.float64)
            want = probe.astype(np.float64).reshape(batch, seq, heads, hidden // heads).transpose(perm)
            if out.shape != want.shape:
                return None
            c = float((out * want).sum() / (want * want).sum())
            if c == 0.0 or not np.allclose(out, c * want, rtol=1e-6, atol=1e-6 * np.abs(c * want).max()):
                return None
            found.add(round(c, 6))
    except Exception:  # onnxruntime's own exception types: not a chain it can run alone
        return None
    return c if len(found) == 1 else None


def _output_target(g: _Graph, out4: str, heads: int, head: int):
    """The [batch, sequence, hidden] tensor ``P·V`` (``out4``, [batch, heads, sequence, head]) is
    rebuilt into by ``Transpose(0, 2, 1, 3) → Reshape``, with those two nodes; or None."""
    users = g.consumers.get(out4, [])
    if len(users) != 1 or users[0].op_type != "Transpose" or out4 in g.outputs:
        return None
    t = users[0]
    perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
    if perm != [0, 2, 1, 3] or t.output[0] in g.outputs:
        return None
    users = g.consumers.get(t.output[0], [])
    if len(users) != 1 or users[0].op_type != "Reshape":
        return None
    r, mid, dims = users[0], g.dims(t.output[0]), g.dims(users[0].output[0])
    if not mid or mid[2:] != [heads, head] or not dims or len(dims) != 3 or dims[1:] != [mid[1], heads * head] \
            or mid[1] is None:
        return None  # [b, s, n, h] → [b, s, n·h]: the only reshape with those dimensions
    return r.output[0], (t, r)


def fuse_attention(model, direct: bool = True) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``, weights may stay external) in place; returns the
    number of attention products (Q·Kᵀ → softmax → ·V) fused. ``direct``: read / write the
    [batch, sequence, hidden] tensors directly where the relayout chain is checked exact (see the
    module docstring)."""
    from onnx import helper, numpy_helper
    import numpy as np

    g = _Graph(model)
    graph = g.graph

    fused = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        scores, probs = softmax.input[0], softmax.output[0]
        qk, users = g.producer.get(scores), g.consumers.get(probs, [])
        if (axis not in (-1, 3) or qk is None or qk.op_type != "MatMul" or len(users) != 1
                or users[0].op_type != "MatMul" or users[0].input[0] != probs
                or len(g.consumers.get(scores, [])) != 1 or {scores, probs} & g.outputs):
            continue
        pv = users[0]
        q4, kt4, v4, out4 = qk.input[0], qk.input[1], pv.input[1], pv.output[0]
        dims = g.dims(q4)
        if not dims or len(dims) != 4 or dims[1] is None or dims[3] is None:
            continue  # heads and head size must be known to reshape to [batch, sequence, hidden]
        heads, head = dims[1], dims[3]
        tag = f"prism_mha_{fused}"
        to_bsd = numpy_helper.from_array(np.array([0, 0, heads * head], np.int64), f"{tag}_bsd")
        to_bsnh = numpy_helper.from_array(np.array([0, 0, heads, head], np.int64), f"{tag}_bsnh")
        new, scale, inputs = [], 1.0, []
        for name, letter, perm in ((q4, "q", (0, 2, 1, 3)), (kt4, "k", (0, 2, 3, 1)), (v4, "v", (0, 2, 1, 3))):
            found = _chain_source(g, name, heads * head) if direct else None
            c = found and _probe_chain(g, found[0], name, found[1], g.dims(found[0]), heads, perm)
            if c and (letter != "v" or abs(c - 1.0) < 1e-6):
                inputs.append(found[0])  # the projection's output as it is
                scale *= c  # q and k arrive scaled by √scale each: the product's scale
                continue
            # otherwise relayout here: [b, n, s, h] (k: [b, n, h, s]) → [b, s, n, h] → [b, s, n·h]
            new += [helper.make_node("Transpose", [name], [f"{tag}_{letter}_bsnh"],
                                     perm=[0, 3, 1, 2] if letter == "k" else [0, 2, 1, 3], name=f"{tag}/{letter}_transpose"),
                    helper.make_node("Reshape", [f"{tag}_{letter}_bsnh", to_bsd.name], [f"{tag}_{letter}"],
                                     name=f"{tag}/{letter}_reshape")]
            inputs.append(f"{tag}_{letter}")
        target = _output_target(g, out4, heads, head) if direct else None
        attention_out = target[0] if target else f"{tag}_o"
        new.append(helper.make_node("MultiHeadAttention", inputs, [attention_out], domain=MS_DOMAIN, num_heads=heads,
                                    scale=float(scale), name=f"{tag}/attention"))
        if target is None:
            new += [helper.make_node("Reshape", [f"{tag}_o", to_bsnh.name], [f"{tag}_o_bsnh"], name=f"{tag}/o_reshape"),
                    helper.make_node("Transpose", [f"{tag}_o_bsnh"], [out4], perm=[0, 2, 1, 3], name=f"{tag}/o_transpose")]
        if any(n.input[1] == to_bsd.name for n in new if n.op_type == "Reshape"):
            graph.initializer.append(to_bsd)
        if target is None:
            graph.initializer.append(to_bsnh)
        index = list(graph.node).index(pv)
        for node in (qk, softmax, pv, *(target[1] if target else ())):
            graph.node.remove(node)
        index = min(index - 2, len(graph.node))  # qk and softmax came before pv
        for offset, node in enumerate(new):
            graph.node.insert(index + offset, node)
            g.producer.update({o: node for o in node.output})
        fused += 1
    if fused:
        remove_dead(graph)
        drop_unused_initializers(graph)
        use_ms_domain(model)
    return fused


def direct_io(model) -> int:
    """How many of the graph's MultiHeadAttention inputs and outputs are the [batch, sequence,
    hidden] tensors themselves (no relayout added by :func:`fuse_attention`)."""
    return sum(not name.startswith("prism_mha_") for n in model.graph.node if n.op_type == "MultiHeadAttention"
               for name in (*n.input, *n.output))
