"""The engine folder's contract: ``manifest.json``, read and checked before anything runs.

An engine folder is made by ``prism-export export`` (STYLE §1: stages talk through artefacts) and
is the runtime's only view of the model. Loading refuses a folder whose manifest is missing, of
another format version, lists a file that is absent or whose SHA-256 differs (a truncated copy,
a re-exported graph next to an old manifest, a flipped byte), or whose graph files declare other
inputs/outputs than the manifest. Each refusal is an :class:`EngineMismatchError` naming the file
and the command that rebuilds the engine. Hashes are streamed: an SD v1.5 UNet is 3.4 GB.

Precisions: ``graphs`` is the fp32 reference; ``variants`` (optional) maps a precision name
(``fp16``, ``int8``, ``int8-cpu``) to the graphs it replaces (the others are the fp32 ones), its
per-graph precision, how it was made (quantization settings) and its measured quality against
fp32. Only the graphs of the precision being loaded are hashed and checked.

A graph may have a CPU twin (``graphs.<name>.cpu``: ``onnx/<name>.cpu.onnx``): the same graph with
its attention fused into onnxruntime's ``MultiHeadAttention``, reading the same weights file; the
onnxruntime backend runs it on the CPU provider. It is checked like the graph itself (hash, inputs
and outputs).

torch-free and onnx-free: graph signatures are read by :mod:`prism_rt.onnx_io`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .backend import GRAPHS, ModelInfo
from .errors import ModelError
from .precision import CHOICES, Precision
from .onnx_io import OnnxFormatError, read_signature

FORMAT = "prism-rt-engine"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
REFERENCE_PRECISION = Precision.FP32.value
PRECISIONS = CHOICES  # see prism_rt.precision.Precision


class EngineMismatchError(ModelError):
    """An engine folder does not match its manifest (or has none): it must be re-exported."""


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, d: dict) -> "TensorInfo":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


@dataclass(frozen=True)
class DimInfo:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class GraphEntry:
    name: str
    file: Path
    data_file: Path | None
    precision: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    dims: dict[str, DimInfo]
    profile: dict
    parity: dict
    fixed_spatial: bool = False
    notes: tuple[str, ...] = ()
    sha256: str | None = None
    cpu_file: Path | None = None  # the graph's CPU twin (attention fused for onnxruntime's CPU provider), if any
    data_sha256: str | None = None  # of data_file, the graph's weights


@dataclass(frozen=True)
class Manifest:
    root: Path
    format_version: int
    prism_rt_version: str
    opset: int
    precision: dict
    exporter: dict
    source: dict
    model: dict
    control: dict
    graphs: dict[str, GraphEntry]  # the graphs of the loaded precision
    raw: dict = field(repr=False, default_factory=dict)
    loaded_precision: str = REFERENCE_PRECISION

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this engine folder holds, the fp32 reference first."""
        return (REFERENCE_PRECISION, *self.raw.get("variants", {}))

    def quality(self, precision: str | None = None) -> dict | None:
        """The quality measured at export for a precision against fp32 (None for fp32 itself)."""
        variant = self.raw.get("variants", {}).get(precision or self.loaded_precision)
        return None if variant is None else variant.get("quality")

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.raw.get("tokenizer", "tokenizer")

    def model_info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(
            image_size=int(m["image_size"]), latent_channels=int(m["latent_channels"]),
            latent_downsample=int(m["latent_downsample"]), text_width=int(m["text_width"]),
            max_tokens=int(m["max_tokens"]), tokenizer_dir=self.tokenizer_dir,
            scheduler_config=dict(m.get("scheduler_config", {})),
            provenance={"engine": str(self.root), "engine_created_utc": self.raw.get("created_utc"),
                        "engine_sha256": {g.name: g.sha256 for g in self.graphs.values()},
                        "precision": self.loaded_precision,
                        "source": self.source},
            self_max_queries=int(self.control["self_max_queries"]),
            blend_downsample=self.control.get("blend_downsample"),
            # engines exported before the choice was recorded return each item's own maps
            blend_maps=self.control.get("blend_maps", "before-control"))

    def summary(self) -> dict:
        """What ``prism-rt info ENGINE`` shows."""
        return {
            "engine": str(self.root), "format_version": self.format_version, "created_utc": self.raw.get("created_utc"),
            "prism_rt_version": self.prism_rt_version, "opset": self.opset, "exporter": self.exporter,
            "model": {k: v for k, v in self.model.items() if k != "scheduler_config"},
            "control": {k: v for k, v in self.control.items() if k not in ("layers",)},
            "precision": self.loaded_precision, "precisions": list(self.precisions),
            "variants": {name: {"graphs": {g: v.get("precision") for g, v in variant.get("graphs", {}).items()},
                                "quality": variant.get("quality"), "quantization": variant.get("quantization")}
                         for name, variant in self.raw.get("variants", {}).items()},
            "graphs": {g.name: {"precision": g.precision, "file": g.file.relative_to(self.root).as_posix(),
                                "cpu_file": g.cpu_file.relative_to(self.root).as_posix() if g.cpu_file else None,
                                "inputs": {t.name: [t.dtype, list(t.shape)] for t in g.inputs},
                                "outputs": {t.name: [t.dtype, list(t.shape)] for t in g.outputs},
                                "dims": {k: [d.min, d.opt, d.max] for k, d in g.dims.items()},
                                "parity_max_abs": g.parity.get("max_abs"), "parity_max_rel": g.parity.get("max_rel"),
                                "parity_runtime": g.parity.get("runtime")}
                       for g in self.graphs.values()},
            "source": self.source,
        }


def _reexport_hint(root: Path, raw: dict | None = None) -> str:
    source = ((raw or {}).get("source") or {}).get("path") or "CHECKPOINT"
    return f"re-export the engine with `prism-export export --model {source} --out NEW_ENGINE_DIR`"


def _inside(root: Path, relative: str, raw: dict) -> Path:
    rel = PurePosixPath(str(relative))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise EngineMismatchError(f"{root / MANIFEST_NAME} names the file {relative!r} outside the engine folder; "
                                  + _reexport_hint(root, raw))
    return root.joinpath(*rel.parts)


def _check_file(root: Path, relative: str, sha256: str | None, raw: dict, verify_hashes: bool) -> Path:
    path = _inside(root, relative, raw)
    if not path.is_file():
        raise EngineMismatchError(f"the engine file {path} listed in its manifest is missing; " + _reexport_hint(root, raw))
    if verify_hashes and sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise EngineMismatchError(f"the engine file {path} has SHA-256 {actual[:16]}…, its manifest says "
                                      f"{str(sha256)[:16]}…: the file was changed or truncated; " + _reexport_hint(root, raw))
    return path


def _check_signature(entry: GraphEntry, raw: dict) -> None:
    for file in (entry.file, entry.cpu_file):
        if file is None:
            continue
        try:
            signature = read_signature(file)
        except (OnnxFormatError, OSError, UnicodeDecodeError) as exc:
            raise EngineMismatchError(f"the graph file {file} cannot be read as ONNX ({exc}); "
                                      + _reexport_hint(file.parent.parent, raw)) from None
        for kind, declared, actual in (("inputs", entry.inputs, signature.inputs),
                                       ("outputs", entry.outputs, signature.outputs)):
            want = [(t.name, t.dtype, tuple(t.shape)) for t in declared]
            have = [(t.name, t.dtype, tuple(t.shape)) for t in actual]
            if want != have:
                raise EngineMismatchError(f"the graph file {file} has {kind} {have}, its manifest says {want}; "
                                          + _reexport_hint(file.parent.parent, raw))


def _graph_entry(root: Path, name: str, g: dict, raw: dict, verify_hashes: bool) -> GraphEntry:
    onnx_path = _check_file(root, g["file"], g.get("sha256"), raw, verify_hashes)
    data_path = _check_file(root, g["data_file"], g.get("data_sha256"), raw, verify_hashes) if g.get("data_file") else None
    cpu = g.get("cpu") or {}
    cpu_path = _check_file(root, cpu["file"], cpu.get("sha256"), raw, verify_hashes) if cpu.get("file") else None
    return GraphEntry(
        name=name, file=onnx_path, data_file=data_path, precision=str(g.get("precision", REFERENCE_PRECISION)),
        inputs=tuple(TensorInfo.from_json(t) for t in g["inputs"]),
        outputs=tuple(TensorInfo.from_json(t) for t in g["outputs"]),
        dims={k: DimInfo(int(d["min"]), int(d["opt"]), int(d["max"])) for k, d in g.get("dims", {}).items()},
        profile=dict(g.get("profile", {})), parity=dict(g.get("parity", {})),
        fixed_spatial=bool(g.get("fixed_spatial", False)), notes=tuple(g.get("notes", ())), sha256=g.get("sha256"),
        cpu_file=cpu_path, data_sha256=g.get("data_sha256"))


class PrecisionNotInEngineError(ModelError):
    """The engine folder holds no graphs of the asked precision."""


def load_manifest(engine_dir, *, precision: str = REFERENCE_PRECISION, verify_hashes: bool = True) -> Manifest:
    """Read and check ``engine_dir/manifest.json`` against the folder's files, for the graphs of
    ``precision`` (the fp32 graphs with the variant's replacements)."""
    root = Path(engine_dir).expanduser()
    if not root.is_dir():
        raise ModelError(f"engine folder {root} does not exist; export one with `prism-export export --model CHECKPOINT --out {root}`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        hint = (" It looks like a diffusers model folder: run it with --backend torch, or export it with "
                f"`prism-export export --model {root} --out ENGINE_DIR`." if (root / "model_index.json").is_file() else "")
        raise EngineMismatchError(f"{root} has no {MANIFEST_NAME}, so it is not an engine folder.{hint}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineMismatchError(f"cannot read the engine manifest {path}: {exc}; " + _reexport_hint(root)) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise EngineMismatchError(f"{path} is not a prism_rt engine manifest (format {raw.get('format') if isinstance(raw, dict) else None!r}, "
                                  f"expected {FORMAT!r}); " + _reexport_hint(root))
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise EngineMismatchError(
            f"{path} has engine format version {version!r}; this prism_rt {_runtime_version()} reads versions "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}: install the prism_rt that exported it, or " + _reexport_hint(root, raw))
    variants = raw.get("variants") or {}
    if precision not in PRECISIONS:
        raise PrecisionNotInEngineError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != REFERENCE_PRECISION and precision not in variants:
        held = ", ".join((REFERENCE_PRECISION, *variants))
        raise PrecisionNotInEngineError(
            f"the engine {root} holds the precisions {held}, not {precision!r}; add it with "
            f"`prism-export variants --engine {root} --precision {precision}` or pick one of {held}")
    try:
        graphs = {}
        for name in GRAPHS:
            if name not in raw["graphs"]:
                raise EngineMismatchError(f"the engine {root} has no {name} graph in {path}; " + _reexport_hint(root, raw))
            g = (variants.get(precision, {}).get("graphs") or {}).get(name) or raw["graphs"][name]
            graphs[name] = _graph_entry(root, name, g, raw, verify_hashes)
        for f in raw.get("files", []):
            _check_file(root, f["path"], f.get("sha256"), raw, verify_hashes)
        manifest = Manifest(
            root=root, format_version=int(version), prism_rt_version=str(raw.get("prism_rt_version")),
            opset=int(raw["opset"]), precision={name: g.precision for name, g in graphs.items()}, exporter=dict(raw.get("exporter", {})),
            source=dict(raw.get("source") or {}), model=dict(raw["model"]), control=dict(raw["control"]),
            graphs=graphs, raw=raw, loaded_precision=precision)
        manifest.model_info()  # every field the runtime needs is there
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineMismatchError(f"the engine manifest {path} lacks or has a malformed entry ({type(exc).__name__}: {exc}); "
                                  + _reexport_hint(root, raw)) from None
    for entry in graphs.values():
        _check_signature(entry, raw)
    return manifest


def _runtime_version() -> str:
    from .version import __version__

    return __version__


def summary_text(summary: dict) -> str:
    """``prism-rt info ENGINE``: what a user picks an engine and a precision by, in a few lines."""
    model, control = summary.get("model", {}), summary.get("control", {})
    lines = [f"engine     {summary['engine']} (format {summary['format_version']}, made {summary.get('created_utc')} "
             f"by prism-rt {summary.get('prism_rt_version')}, opset {summary.get('opset')})",
             f"model      {model.get('image_size')} px images, {model.get('latent_size')}² latents, text width "
             f"{model.get('text_width')}; self-attention controlled up to {control.get('self_max_queries')} queries; "
             f"LocalBlend maps {control.get('blend_maps', 'before-control')}",
             "precisions (quality against fp32 on the export's images):"]
    for name in summary.get("precisions", []):
        variant = summary.get("variants", {}).get(name, {})
        quality = ((variant.get("quality") or {}).get("images") or {}).get("counterfactuals")
        graphs = ", ".join(f"{g} {p}" for g, p in (variant.get("graphs") or {}).items())
        figure = (f"PSNR ≥ {quality['psnr_db_min']:.1f} dB (mean {quality['psnr_db_mean']:.1f}), SSIM ≥ "
                  f"{quality['ssim_min']:.4f}" if quality else "the reference")
        lines.append(f"  {name:<9} {figure}" + (f"  [{graphs}]" if graphs else ""))
    lines.append("graphs:")
    for name, g in summary.get("graphs", {}).items():
        parity = g.get("parity_max_abs")
        lines.append(f"  {name:<13} {g['file']:<28} {g['precision']:<8}" +
                     (f" parity {parity:.1e} vs torch" if isinstance(parity, (int, float)) else ""))
    lines.append("(--json for the whole manifest summary)")
    return "\n".join(lines)
