"""The CPU graphs: every ONNX Runtime-only rewrite applied to a graph file, in one load and save.

* :func:`write_cpu_graph`: the CPU twin of an fp32 graph, ``onnx/<graph>.cpu.onnx``, written by the
  export beside ``onnx/<graph>.onnx`` and reading the same weights file: attention fused into
  ``MultiHeadAttention`` (:mod:`prism_export.cpu_attention`) and GELU into ``Gelu``
  (:mod:`prism_export.cpu_rewrites`). ONNX Runtime's CPU provider runs it instead of the portable
  graph (``prism_rt.ort_backend``); CUDA and TensorRT keep the portable one. The UNet's twin also
  computes its latent-only prefix once per distinct latent (:mod:`prism_export.cpu_dedupe`: the
  unconditional and conditional halves of a guided step share their latents), which about halves
  its peak memory (benchmarks/RESULTS.md, "CPU twins: memory"); outputs equal to 1e-6.
* :func:`fuse_for_cpu_file`: the same rewrites plus, in a quantized graph (int8-cpu), each quantized
  linear layer's bias fused into its integer product.

This module drives the rewrites; they import only :mod:`prism_export.onnx_graph`, never this one.
"""
from __future__ import annotations

from pathlib import Path

from .cpu_attention import direct_io, fuse_attention
from .cpu_dedupe import dedupe_prefix
from .cpu_rewrites import fuse_gelu, fuse_quantized_matmul_bias
from .onnx_graph import MS_DOMAIN, rewrite_file


def fuse_for_cpu_file(path: Path, out: Path | None = None) -> dict:
    """Attention (:func:`prism_export.cpu_attention.fuse_attention`) and GELU
    (:func:`prism_export.cpu_rewrites.fuse_gelu`) fused in the graph file ``path``, then the UNet's
    latent-only prefix run once per distinct latent (:func:`prism_export.cpu_dedupe.dedupe_prefix`),
    then — in a quantized graph — each quantized linear layer's bias fused into its integer product
    (:func:`prism_export.cpu_rewrites.fuse_quantized_matmul_bias`), in one load and save
    (:func:`prism_export.onnx_graph.rewrite_file`: in place, or to ``out``); returns how many of each
    were fused, how many attention inputs / outputs need no relayout, and the deduplicated prefix
    (``latent_prefix``)."""
    counts: dict = {}

    def rewrite(model, base_dir):
        counts.update(fused_attentions=fuse_attention(model), fused_gelu=fuse_gelu(model, base_dir))
        counts["attention_direct_io"] = direct_io(model)
        counts["latent_prefix"] = dedupe_prefix(model)
        counts["fused_matmul_bias"] = fuse_quantized_matmul_bias(model)  # after: the prefix's own stay row-wise
        return (counts["fused_attentions"] + counts["fused_gelu"] + counts["latent_prefix"]["nodes"]
                + counts["fused_matmul_bias"])

    rewrite_file(path, rewrite, out)
    return counts


def write_cpu_graph(path: Path, staging: bool = False) -> dict | None:
    """Write the CPU twin of the graph file ``path`` beside it, ``<graph>.cpu.onnx`` (see the module
    docstring): the same graph with its attention products fused into ``MultiHeadAttention`` and
    its GELUs into ``Gelu``, its weights still read from ``path``'s data file (only the small
    reshape constants the fusion adds are stored in the graph). Returns where it went and what was
    fused, or None (and no file) when the graph has nothing to fuse. ``staging``: written as
    ``<graph>.cpu.onnx.next`` (``path``), to be moved to ``final`` once checked."""
    path = Path(path)
    final = path.with_name(path.name.removesuffix(".onnx") + ".cpu.onnx")
    out = final.with_name(final.name + ".next") if staging else final
    counts = fuse_for_cpu_file(path, out)
    if not (counts["fused_attentions"] or counts["fused_gelu"] or counts["latent_prefix"]["nodes"]):
        return None  # rewrite_file saved nothing
    return {"path": out, "final": final, **counts, "ops": [f"{MS_DOMAIN}.MultiHeadAttention", f"{MS_DOMAIN}.Gelu"]
            + (["Unique"] if counts["latent_prefix"]["nodes"] else [])}
