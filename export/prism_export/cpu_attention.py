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
and the fp32 graphs' CPU twins (:func:`prism_export.cpu_rewrites.write_cpu_graph`), never for the
graphs TensorRT builds from.
"""
from __future__ import annotations

from .cpu_rewrites import MS_DOMAIN


def _static_dims(value_info) -> list | None:
    if value_info is None:
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def fuse_attention(model) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``, weights may stay external) in place; returns the
    number of attention products (Q·Kᵀ → softmax → ·V) fused."""
    from onnx import helper, numpy_helper
    import numpy as np

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    shapes = {v.name: v for v in list(graph.value_info) + list(graph.input)}

    fused = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        scores, probs = softmax.input[0], softmax.output[0]
        qk, users = producer.get(scores), consumers.get(probs, [])
        if (axis not in (-1, 3) or qk is None or qk.op_type != "MatMul" or len(users) != 1
                or users[0].op_type != "MatMul" or users[0].input[0] != probs
                or len(consumers.get(scores, [])) != 1 or {scores, probs} & graph_outputs):
            continue
        pv = users[0]
        q4, kt4, v4, out4 = qk.input[0], qk.input[1], pv.input[1], pv.output[0]
        dims = _static_dims(shapes.get(q4))
        if not dims or len(dims) != 4 or dims[1] is None or dims[3] is None:
            continue  # heads and head size must be known to reshape to [batch, sequence, hidden]
        heads, head = dims[1], dims[3]
        tag = f"prism_mha_{fused}"
        to_bsd = numpy_helper.from_array(np.array([0, 0, heads * head], np.int64), f"{tag}_bsd")
        to_bsnh = numpy_helper.from_array(np.array([0, 0, heads, head], np.int64), f"{tag}_bsnh")
        graph.initializer.extend([to_bsd, to_bsnh])
        new = [
            helper.make_node("Transpose", [q4], [f"{tag}_q_bsnh"], perm=[0, 2, 1, 3], name=f"{tag}/q_transpose"),
            helper.make_node("Reshape", [f"{tag}_q_bsnh", to_bsd.name], [f"{tag}_q"], name=f"{tag}/q_reshape"),
            helper.make_node("Transpose", [kt4], [f"{tag}_k_bsnh"], perm=[0, 3, 1, 2], name=f"{tag}/k_transpose"),
            helper.make_node("Reshape", [f"{tag}_k_bsnh", to_bsd.name], [f"{tag}_k"], name=f"{tag}/k_reshape"),
            helper.make_node("Transpose", [v4], [f"{tag}_v_bsnh"], perm=[0, 2, 1, 3], name=f"{tag}/v_transpose"),
            helper.make_node("Reshape", [f"{tag}_v_bsnh", to_bsd.name], [f"{tag}_v"], name=f"{tag}/v_reshape"),
            # q and k arrive scaled by √scale each: the product is already scaled
            helper.make_node("MultiHeadAttention", [f"{tag}_q", f"{tag}_k", f"{tag}_v"], [f"{tag}_o"],
                             domain=MS_DOMAIN, num_heads=heads, scale=1.0, name=f"{tag}/attention"),
            helper.make_node("Reshape", [f"{tag}_o", to_bsnh.name], [f"{tag}_o_bsnh"], name=f"{tag}/o_reshape"),
            helper.make_node("Transpose", [f"{tag}_o_bsnh"], [out4], perm=[0, 2, 1, 3], name=f"{tag}/o_transpose"),
        ]
        index = list(graph.node).index(pv)
        for node in (qk, softmax, pv):
            graph.node.remove(node)
        index -= 2  # qk and softmax came before pv
        for offset, node in enumerate(new):
            graph.node.insert(index + offset, node)
        fused += 1
    if fused and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused
