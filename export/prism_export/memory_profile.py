"""How much activation memory each graph needs, recorded in the manifest for
``prism-rt info ENGINE --memory`` (the runtime cannot read ONNX graphs: it reads this record).

The dynamo exporter writes every intermediate tensor's shape into the graph (``value_info``), its
symbolic dims as expressions over the graph's named dims (``batch``, ``groups*(edits + 1)``,
``8*latent_height``). With the dims set, each tensor's bytes follow; walking the nodes in graph
order, a tensor is live from the node that makes it (graph inputs: from the start) to the last
node that reads it (graph outputs: to the end), and the peak of the live bytes is what a runtime
that frees each tensor after its last use needs. TensorRT fuses layers and reuses buffers, so on a
GPU this is an upper bound of the activations; cuDNN / TensorRT workspaces come on top (see
``docs/jetson.md``). The peak grows linearly with the batch (attention probabilities, feature
maps); the record keeps two points of each graph and the line through them.
"""
from __future__ import annotations

import ast
import json
import operator
import os
from pathlib import Path

from prism_rt.deployment import Deployment
from prism_rt.manifest import MANIFEST_NAME

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.USub: operator.neg}


def eval_expr(text: str, values: dict[str, int]) -> int | None:
    """A dim expression of the exporter (``-groups*edits + groups*(edits + 1)``) with ``values``;
    None if it names an unknown dim or uses anything but + - * // %."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise KeyError(node.id)
            return int(values[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(ast.dump(node))

    try:
        return int(ev(ast.parse(text, mode="eval")))
    except (KeyError, ValueError, SyntaxError, ZeroDivisionError):
        return None


def _tensor_bytes(value, values: dict[str, int]) -> int | None:
    from onnx import helper

    t = value.type.tensor_type
    if not t.elem_type or not t.HasField("shape"):
        return None
    n = 1
    for d in t.shape.dim:
        size = d.dim_value if d.HasField("dim_value") else eval_expr(d.dim_param, values) if d.dim_param else None
        if size is None:
            return None
        n *= size
    return n * helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize


def _concrete_infos(model, values: dict[str, int]) -> dict:
    """value_info of every tensor ONNX shape inference can size once the inputs' dims are set
    (with data propagation, the Shape → Gather → Concat → Reshape chains of the exporter resolve)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for value in probe.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                size = eval_expr(d.dim_param, values)
                if size is not None:
                    d.dim_value = size
    try:
        probe = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:  # onnx's own errors: fall back to the exporter's symbolic shapes
        return {}
    return {v.name: v for v in probe.graph.value_info}


def peak_activation_bytes(model, values: dict[str, int]) -> tuple[int, float]:
    """The largest sum of live intermediate, input and output tensors over ``model``'s nodes in
    graph order, with the graph's dims set to ``values``; and the share of tensors whose size was
    known (the others count 0)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    symbolic = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    concrete = _concrete_infos(model, values)
    infos = {name: concrete[name] if name in concrete and _tensor_bytes(concrete[name], values) is not None else v
             for name, v in symbolic.items()}
    infos.update({name: v for name, v in concrete.items() if name not in infos})
    last_use = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                last_use[name] = i
    end = len(graph.node)
    for out in graph.output:
        last_use[out.name] = end
    sizes, known, total = {}, 0, 0

    def size(name):
        nonlocal known, total
        if name not in sizes:
            b = _tensor_bytes(infos[name], values) if name in infos else None
            total += 1
            known += b is not None
            sizes[name] = b or 0
        return sizes[name]

    live = {v.name: size(v.name) for v in graph.input if v.name not in constants}
    current = peak = sum(live.values())
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant":
            continue  # folded into the engine's weights
        for name in node.output:
            if name and name not in live:
                live[name] = size(name)
                current += live[name]
        peak = max(peak, current)
        for name in {*node.input, *node.output}:
            if name in live and last_use.get(name, -1) <= i:
                current -= live.pop(name)
    return peak, (known / total if total else 1.0)


def _points(graph: str, side: int) -> list[dict[str, int]]:
    """Two dim settings per graph, at the model's latent size ``side``: a small and the deployed call."""
    spatial = {"latent_height": side, "latent_width": side}
    if graph == "unet":
        return [{"batch": 2 * g * (1 + k), "groups": g, "edits": k} for g, k in ((1, 1), (1, 5))]
    return [{"batch": b, **spatial} for b in (1, 4)]


def graph_memory(path: Path, graph: str, latent_size: int) -> dict:
    """The manifest record of one graph file: peak activation bytes at two batches and the line
    ``fixed + per_item · batch`` through them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    points, coverage = [], 1.0
    for values in _points(graph, int(latent_size)):
        peak, share = peak_activation_bytes(model, values)
        points.append({"dims": values, "bytes": int(peak)})
        coverage = min(coverage, share)
    (a, pa), (b, pb) = ((p["dims"]["batch"], p["bytes"]) for p in points)
    per_item = (pb - pa) / (b - a)
    return {"activation_points": points, "activation_fixed_bytes": int(round(pa - per_item * a)),
            "activation_per_item_bytes": int(round(per_item)), "shape_coverage": round(coverage, 4),
            "method": "peak live tensor bytes in graph order (prism_export.memory_profile)"}


def add_memory_records(engine_dir, progress=print) -> dict:
    """Record every graph's (and every variant graph's) activation memory in the engine's manifest,
    rewritten in one replace; returns ``{precision: {graph: record}}``."""
    root = Path(engine_dir)
    raw = json.loads((root / MANIFEST_NAME).read_text())
    made, side = {"fp32": {}}, int(raw["model"]["latent_size"])
    for name, entry in raw["graphs"].items():
        entry["memory"] = made["fp32"][name] = graph_memory(root / entry["file"], name, side)
    for precision, variant in (raw.get("variants") or {}).items():
        made[precision] = {}
        for name, entry in (variant.get("graphs") or {}).items():
            entry["memory"] = made[precision][name] = graph_memory(root / entry["file"], name, side)
    raw.setdefault("deployment", Deployment().to_json())
    tmp = root / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)
    for precision, graphs in made.items():
        progress(f"{precision}: " + ", ".join(f"{g} {r['activation_fixed_bytes'] / 2**20:.1f} MiB + "
                                               f"{r['activation_per_item_bytes'] / 2**20:.2f} MiB/item"
                                               for g, r in graphs.items()))
    return made
