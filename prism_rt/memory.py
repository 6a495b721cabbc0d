"""``prism-rt info ENGINE --memory``: the device memory an engine needs, estimated from its manifest.

Per graph: its weights (the graph's file bytes for the loaded precision, what TensorRT keeps
on the device, fp16 halving and int8 quartering the quantized layers) and its activations (the
export's record, ``graphs.<name>.memory``, written by ``prism_export.memory_profile``: the peak of
live tensors at two batches and the line ``fixed + per_item · batch`` through them), at the batch
the deployment builds each graph for (:mod:`prism_rt.deployment`; the UNet at ``--batch N``).

onnxruntime's TensorRT execution provider keeps one execution context per graph, each with the
activation memory of its profile's largest shapes, and all four graphs are loaded at once: the
peak is the sum of weights and activations over the graphs (``peak``). A runtime that shares one
context memory between graphs run one after another needs the weights plus the largest graph's
activations only (``shared_context``). The CUDA context, cuDNN / TensorRT workspaces and the host
side come on top; TensorRT's fused kernels need less than the unfused graph counted here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .deployment import Deployment
from .errors import ModelError


@dataclass(frozen=True)
class GraphMemory:
    graph: str
    precision: str
    batch: int
    weight_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.activation_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    graphs: tuple[GraphMemory, ...]
    deployment: Deployment

    @property
    def weight_bytes(self) -> int:
        return sum(g.weight_bytes for g in self.graphs)

    @property
    def peak(self) -> int:
        """Every graph's weights and its own context's activations (onnxruntime's TensorRT EP)."""
        return sum(g.total for g in self.graphs)

    @property
    def shared_context(self) -> int:
        """Every graph's weights and the largest activations (one context memory for all graphs)."""
        return self.weight_bytes + max(g.activation_bytes for g in self.graphs)

    def to_json(self) -> dict:
        return {"deployment": self.deployment.to_json(), "peak_bytes": self.peak,
                "shared_context_bytes": self.shared_context, "weight_bytes": self.weight_bytes,
                "graphs": {g.graph: {"precision": g.precision, "batch": g.batch, "weight_bytes": g.weight_bytes,
                                     "activation_bytes": g.activation_bytes} for g in self.graphs}}


def graph_batches(deployment: Deployment) -> dict[str, int]:
    """The batch each graph's profile goes up to (what its context memory is sized for)."""
    return {name: deployment.calls(name)["batch"][2] for name in ("text_encoder", "vae_encoder", "vae_decoder", "unet")}


def _variant_graph(raw: dict, precision: str, graph: str) -> dict:
    variant = ((raw.get("variants") or {}).get(precision) or {}).get("graphs") or {}
    return variant.get(graph) or raw["graphs"][graph]


def estimate_memory(manifest, deployment: Deployment | None = None, batch: int | None = None) -> MemoryEstimate:
    """Device memory of ``manifest``'s loaded precision at ``deployment`` (default: the manifest's),
    the UNet at ``batch`` items if given."""
    raw = manifest.raw
    deployment = deployment or Deployment.from_json(raw.get("deployment"))
    if batch is not None:
        if int(batch) < 1:
            raise ModelError(f"--batch must be ≥ 1 (UNet items per call), got {batch}")
        deployment = Deployment(deployment.max_edits, deployment.max_groups, max(3, int(batch)))
    batches = graph_batches(deployment)
    if batch is not None:
        batches["unet"] = int(batch)
    rows = []
    for name, entry in manifest.graphs.items():
        record = _variant_graph(raw, manifest.loaded_precision, name)
        memory = record.get("memory")
        if not memory:
            raise ModelError(f"the engine {manifest.root} records no activation memory for its {entry.precision} "
                             f"{name} graph (exported before prism-rt recorded it); add it with `prism-export memory "
                             f"--engine {manifest.root}`, or re-export")
        n = batches[name]
        activations = max(0, int(memory["activation_fixed_bytes"]) + int(memory["activation_per_item_bytes"]) * n)
        rows.append(GraphMemory(name, entry.precision, n, int(record["bytes"]), activations))
    return MemoryEstimate(tuple(rows), deployment)


def memory_text(estimate: MemoryEstimate) -> str:
    mib = 2 ** 20
    d = estimate.deployment
    lines = [f"device memory estimate (deployment: {d.max_edits} edit items × {d.max_groups} image(s) per call, UNet "
             f"batch {dict((g.graph, g.batch) for g in estimate.graphs)['unet']}):",
             f"  {'graph':<13} {'precision':<9} {'batch':>5} {'weights MiB':>12} {'activations MiB':>16}"]
    for g in estimate.graphs:
        lines.append(f"  {g.graph:<13} {g.precision:<9} {g.batch:>5} {g.weight_bytes / mib:>12.1f} "
                     f"{g.activation_bytes / mib:>16.1f}")
    lines += [f"  peak, onnxruntime TensorRT EP (a context per graph): {estimate.peak / mib:.1f} MiB",
              f"  with one context memory shared between graphs:      {estimate.shared_context / mib:.1f} MiB",
              "  (+ the CUDA context and TensorRT/cuDNN workspace; TensorRT's fused kernels need less activation "
              "memory than the unfused graph counted here)"]
    return "\n".join(lines)
