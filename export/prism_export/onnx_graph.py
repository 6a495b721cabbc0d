"""Helpers over ONNX graphs shared by the export's rewrites: the ground floor of ``prism_export``.

Nothing here knows about the UNet, precisions or engine folders, and this module imports no other
module of the package; the graph rewrites (:mod:`prism_export.cpu_rewrites`,
:mod:`prism_export.cpu_attention`, :mod:`prism_export.cpu_dedupe`, :mod:`prism_export.smoothing`),
the quantization and the export build on it. ``onnx`` is imported where it is used, so the module
imports without it.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from pathlib import Path

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators: never in a graph TensorRT builds from


def graph_maps(graph) -> tuple[dict, dict]:
    """(tensor → producing node, tensor → consuming nodes) of an ONNX graph."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


def set_nodes(graph, nodes) -> None:
    """Replace the graph's node list by ``nodes`` (a rewrite's result, in order)."""
    nodes = list(nodes)  # may be computed from graph.node itself
    del graph.node[:]
    graph.node.extend(nodes)


def drop_unused_initializers(graph) -> None:
    """Remove the initializers no node reads any more (constants of rewritten-away nodes)."""
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)


def remove_dead(graph) -> int:
    """Remove nodes none of whose outputs is read (repeatedly); returns how many."""
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return removed
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)


def topological(nodes: list) -> list:
    """``nodes`` in an order where every node follows the producers of its inputs (stable: among
    the nodes ready at once, the earliest in ``nodes`` first)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    users = defaultdict(list)
    for i, n in enumerate(nodes):
        for name in {x for x in n.input if x and x in producer}:
            waiting[i] += 1
            users[producer[name]].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order


def node_attr(node, name, default=None):
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def static_dims(value_info) -> list | None:
    """The dimensions of a tensor's declared shape, None for each symbolic one; None without a shape."""
    if value_info is None:
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def use_ms_domain(model) -> None:
    """Declare the ``com.microsoft`` operator set (version 1) in ``model`` unless it is already."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def rewrite_file(path: Path, rewrite, out: Path | None = None) -> int:
    """Apply ``rewrite(model, base_dir)`` (returns a count) to the graph file ``path`` without loading
    its weights; saved — in place, or to ``out`` in the same folder (it reads the same weights
    file) — only if it changed something (the weights file is untouched)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    count = rewrite(model, str(path.parent))
    if count:
        target = Path(out or path)
        tmp = target.with_name(target.name + ".tmp")
        onnx.save_model(model, str(tmp))
        tmp.replace(target)
    return count


def one_data_file(path: Path) -> None:
    """Make every external tensor of the graph file ``path`` live in ``<graph>.onnx.data`` (and that
    file exist)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    data_name = path.name + ".data"
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            locations |= {e.value for e in tensor.external_data if e.key == "location"}
    if locations == {data_name}:
        return
    model = onnx.load(str(path), load_external_data=True)
    for stale in locations:
        (path.parent / stale).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=0 if not locations else 1024)
