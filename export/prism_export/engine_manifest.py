"""The manifest an export writes: what is in the engine folder and how it was made (STYLE §2).

Its reader and the format version live in the runtime (``prism_rt.manifest``); this module only
writes what that reader checks, so the two cannot drift apart silently: the writer imports the
reader's constants.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
from dataclasses import replace
from pathlib import Path

from prism_rt import __version__ as PRISM_RT_VERSION
from prism_rt.deployment import Deployment
from prism_rt.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, sha256_file
from prism_rt.precision import Precision

from .memory_profile import graph_memory
from .specs import GraphSpec, ModelDims, UNetSpec

PRECISION = Precision.FP32.value  # what the export writes; variants are derived from it
UNET_FIXED_SPATIAL = ("the UNet's spatial dims are fixed at the model's latent size: the graph bakes in which "
                      "self-attention layers are controlled (self_max_queries) and which layers feed the blend maps, "
                      "both decided by layer resolution")


def copy_tokenizer(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for f in sorted(Path(source).iterdir()):
        if f.is_file():
            shutil.copy2(f, dest / f.name)


def _file_record(root: Path, path: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _control(unet_graph, dims: ModelDims) -> dict:
    """The attention-layer layout the host's control tensors are built for."""
    def side(downsample: int) -> int:
        s = dims.latent_size
        for _ in range(downsample.bit_length() - 1):
            s = (s + 1) // 2
        return s

    layers = [{"name": l.name, "is_cross": l.is_cross, "place": l.place, "downsample": l.downsample}
              for l in unet_graph.layers]
    controlled_self = [l.name for l in unet_graph.layers
                       if not l.is_cross and side(l.downsample) ** 2 <= unet_graph.self_max_queries]
    return {"layers": layers, "blend_layers": list(unet_graph.blend_layers),
            "blend_downsample": int(unet_graph.blend_downsample), "blend_size": dims.blend_size,
            "self_max_queries": int(unet_graph.self_max_queries), "controlled_self_layers": controlled_self,
            "blend_maps": unet_graph.blend_maps.value}


def cpu_twin_entry(root: Path, twin: dict, data_file: str, parity: dict) -> dict:
    """The manifest's ``graphs.<name>.cpu``: the graph's CPU twin (``write_cpu_graph``), which
    onnxruntime's CPU provider runs instead of ``file``, and how far its outputs are from the reference."""
    rec = _file_record(root, twin["path"])
    return {"file": rec["path"], "sha256": rec["sha256"], "bytes": rec["bytes"], "reads": data_file,
            "fused_attentions": twin["fused_attentions"], "fused_gelu": twin["fused_gelu"],
            "attention_direct_io": twin.get("attention_direct_io", 0),
            "latent_prefix": twin.get("latent_prefix", {"nodes": 0, "ops": {}}), "ops": twin["ops"],
            "parity": parity, "use": "onnxruntime CPUExecutionProvider only; CUDA / TensorRT run the portable graph"}


def build_manifest(root: Path, components, unet_graph, dims: ModelDims, specs: dict[str, GraphSpec],
                   records: dict[str, dict], opset: int, deployment: Deployment | None = None) -> dict:
    graphs = {}
    for name, spec in specs.items():
        parity = records[name]["parity"]
        if isinstance(spec, UNetSpec):  # K=0 failed in onnxruntime: the runtime pads, profiles start at 1
            spec = replace(spec, min_edits=parity.get("edits_min", 0))
        onnx_rec = _file_record(root, root / "onnx" / f"{name}.onnx")
        data_rec = _file_record(root, root / "onnx" / f"{name}.onnx.data")
        graphs[name] = {
            "file": onnx_rec["path"], "sha256": onnx_rec["sha256"],
            "data_file": data_rec["path"], "data_sha256": data_rec["sha256"],
            "bytes": onnx_rec["bytes"] + data_rec["bytes"],
            "precision": PRECISION, **spec.to_json(),
            "fixed_spatial": isinstance(spec, UNetSpec),
            "notes": ([UNET_FIXED_SPATIAL] if isinstance(spec, UNetSpec) else []) + parity.get("notes", []),
            "parity": parity, "export_s": records[name]["export_s"],
            "memory": graph_memory(root / "onnx" / f"{name}.onnx", name, dims.latent_size),  # prism-rt info --memory
        }
        cpu = records[name].get("cpu")
        if cpu:
            graphs[name]["cpu"] = cpu_twin_entry(root, cpu, data_rec["path"], {
                "reference": parity["reference"], **parity["cpu_graph"]})
    tokenizer_files = sorted(p for p in (root / "tokenizer").iterdir() if p.is_file())
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "prism_rt_version": PRISM_RT_VERSION,
        "precision": {name: PRECISION for name in specs},
        "opset": opset,
        "exporter": {"tool": "prism-export export (torch.export + torch.onnx dynamo)", **_versions()},
        "source": components.provenance,
        "model": {
            "image_size": dims.image_size, "latent_channels": dims.latent_channels,
            "latent_downsample": dims.latent_downsample, "latent_size": dims.latent_size,
            "text_width": dims.text_width, "max_tokens": dims.max_tokens, "vocab_size": dims.vocab_size,
            "scaling_factor": float(components.scaling_factor),
            "scheduler_config": dict(components.scheduler_config),
        },
        "control": _control(unet_graph, dims),
        # the largest calls TensorRT's profiles are built for (prism_rt.deployment); a load may override it
        "deployment": (deployment or Deployment()).to_json(),
        "tokenizer": "tokenizer",
        "graphs": graphs,
        "files": [_file_record(root, p) for p in tokenizer_files],
    }


def write_manifest(root: Path, manifest: dict) -> Path:
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return path
