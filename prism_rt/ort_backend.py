"""The ONNX Runtime backend: runs an engine folder's graphs with one ``InferenceSession`` each.

torch-free; arrays are numpy and ``xp`` is ``array_api_compat.numpy``, so the loops of
``prism_rt.loop`` run unchanged. ``device`` picks the execution provider: ``cpu`` (CPU EP),
``cuda[:N]`` (CUDA EP) or ``tensorrt[:N]`` (TensorRT EP, with the manifest's min/opt/max shapes as
its optimisation profile). No autograd: null-text inversion needs the torch backend.

K = 0 (inversion calls the UNet with no edit items): the exported graph runs it directly (the
export checks it and records ``edits.min = 0``). Should an engine declare ``edits.min = 1`` (an
exporter or builder that cannot make empty tensors), :meth:`OrtBackend.run` pads such a call with
one neutral edit item per group (``prism_rt.unet_batch.pad_empty_edits``) and drops its outputs.
"""
from __future__ import annotations

import enum
import functools
import os
from pathlib import Path

import numpy as np

from .backend import BackendKind
from .deployment import Deployment
from .errors import BackendError
from .manifest import Manifest, load_manifest
from .precision import Precision
from .unet_batch import pad_empty_edits, unpad_outputs

class OrtDevice(str, enum.Enum):
    """``--device`` of the onnxruntime backend, and the execution provider each one needs."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"

    @property
    def provider(self) -> str:
        return {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                "tensorrt": "TensorrtExecutionProvider"}[self.value]


INSTALL_HINT = {  # `prism-rt check-install --device …` says what this environment has
    OrtDevice.CUDA: "install onnxruntime-gpu in place of onnxruntime: pip install 'prism-rt[gpu]', then keep only "
                    "onnxruntime-gpu (prism-rt check-install names the conflict); PyPI's onnxruntime-gpu needs CUDA 12.x "
                    "and cuDNN 9, CUDA 13 takes the CUDA 13 build from onnxruntime's own package index",
    OrtDevice.TENSORRT: "install onnxruntime-gpu (pip install 'prism-rt[gpu]', keeping only onnxruntime-gpu: prism-rt "
                        "check-install) and the TensorRT major it was built against — TensorRT 10.x: pip install "
                        "tensorrt-cu12 (CUDA 12) or tensorrt-cu13 (CUDA 13); an onnxruntime-gpu built for TensorRT 11 "
                        "needs TensorRT 11 — with TensorRT's libraries on the library path",
}


def _parse_device(device: str) -> tuple[OrtDevice, int]:
    kind, _, index = str(device).lower().partition(":")
    if kind not in {d.value for d in OrtDevice} or (index and not index.isdigit()):
        raise BackendError(f"device {device!r} is not one the onnxruntime backend knows; use cpu, cuda[:N] or tensorrt[:N]")
    return OrtDevice(kind), int(index or 0)


def _providers(kind: OrtDevice, index: int, manifest: Manifest, graph: str, trt_cache: Path | None = None,
               deployment: Deployment | None = None) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if kind.provider not in available:
        from .install_check import conflict, installed_distributions

        fix = conflict(installed_distributions()) or INSTALL_HINT[kind]
        raise BackendError(f"--device {kind.value} needs onnxruntime's {kind.provider}, which this onnxruntime "
                           f"{ort.__version__} does not have (it has {', '.join(available)}); {fix}; or use --device cpu")
    if kind is OrtDevice.CPU:
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": index})
    if kind is OrtDevice.CUDA:
        return [cuda, "CPUExecutionProvider"]
    return [("TensorrtExecutionProvider", tensorrt_options(manifest, graph, index, trt_cache, deployment)), cuda,
            "CPUExecutionProvider"]


@functools.lru_cache(maxsize=None)
def tensorrt_version() -> str:
    """The installed TensorRT's version (its pip distribution; ``unknown`` without one, e.g. a
    system install), read without importing TensorRT (once per process: it is asked per graph)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu13", "tensorrt-cu13-libs",
                 "tensorrt-libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def deployment_of(manifest: Manifest, deployment: Deployment | None = None) -> Deployment:
    """``deployment`` if given (a load's override), else what the export recorded in the manifest."""
    return deployment if deployment is not None else Deployment.from_json(manifest.raw.get("deployment"))


def dim_limits(manifest: Manifest, deployment: Deployment | None) -> dict[str, dict[str, int]]:
    """Per graph, the largest value of each symbolic dim a call may have: the deployment's (what
    TensorRT's profiles cover) where given, else the exported range's."""
    return {name: ({d: hi for d, (_, _, hi) in deployment.dims(name, entry.dims).items()} if deployment is not None
                   else {d: r.max for d, r in entry.dims.items()}) for name, entry in manifest.graphs.items()}


def _trt_build_options(manifest: Manifest, graph: str, index: int, deployment: Deployment | None = None) -> dict:
    entry = manifest.graphs[graph]
    profile = deployment_of(manifest, deployment).profile(entry) if entry.dims else entry.profile

    def shapes(level):
        return ",".join(f"{name}:{'x'.join(str(d) for d in p[level])}" for name, p in profile.items())

    # fp16 graphs already hold half weights. The int8 UNet is explicitly quantized (Q/DQ), which
    # TensorRT builds without a calibration table once int8 is enabled (a Q/DQ network with int8
    # off fails to build: "Int8 precision has been set ... but int8 is not configured"); fp16 is
    # enabled with it, or every layer outside the Q/DQ pairs (norms, attention, GEGLU) runs in
    # fp32. TensorRT >= 10 also has strongly typed networks, where the ONNX types alone decide
    # each layer's precision and these flags are ignored: the graph itself would then have to be
    # fp16 outside the Q/DQ pairs (an fp16 UNet quantized on top); onnxruntime's TensorRT EP builds
    # weakly typed networks, so the flags are what decides here.
    precision = Precision.parse(entry.precision)
    int8 = precision is Precision.INT8
    options = {"device_id": index, "trt_fp16_enable": precision.half or int8, "trt_int8_enable": int8}
    if profile:
        options.update(trt_profile_min_shapes=shapes("min"), trt_profile_opt_shapes=shapes("opt"),
                       trt_profile_max_shapes=shapes("max"))
    return options


def trt_cache_folder(manifest: Manifest, graph: str, index: int, root: Path, *, ort_version: str | None = None,
                     trt_version: str | None = None, deployment: Deployment | None = None) -> Path:
    """Where the TensorRT EP keeps the engine it built for one graph: one folder per graph file
    and weights file (their SHA-256s, from the manifest), precision, build settings (profile
    shapes, flags) and onnxruntime / TensorRT versions, because onnxruntime names its cache files
    by the graph's path and the GPU's compute capability only — a changed graph, weights, setting
    or version must never load a stale engine (a re-export with new weights keeps the graph file
    byte for byte)."""
    import hashlib
    import json

    import onnxruntime as ort

    entry = manifest.graphs[graph]
    settings = {k: v for k, v in _trt_build_options(manifest, graph, index, deployment).items() if k != "device_id"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    files = f"{entry.sha256 or 'unhashed'}:{entry.data_sha256 or 'no-data'}"
    graph_sha = hashlib.sha256(files.encode()).hexdigest()[:12]
    ort_version = ort_version or ort.__version__
    trt_version = trt_version or tensorrt_version()
    return Path(root) / f"{graph}-{entry.precision}-{graph_sha}-{digest}-ort{ort_version}-trt{trt_version}"


def default_trt_cache_root(manifest: Manifest) -> Path:
    """``ENGINE/trt-cache`` where the engine folder is writable, else the user's cache folder
    (``$XDG_CACHE_HOME`` or ``~/.cache``)``/prism_rt/trt/<engine name>``."""
    root = Path(manifest.root).absolute()  # onnxruntime is given absolute cache paths
    if os.access(root, os.W_OK):
        return root / "trt-cache"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").absolute()
    return base / "prism_rt" / "trt" / root.resolve().name


def tensorrt_options(manifest: Manifest, graph: str, index: int, cache_root: Path | None,
                     deployment: Deployment | None = None) -> dict:
    """The TensorRT EP's options for one graph: the deployment's min/opt/max shapes as its
    optimisation profile (:mod:`prism_rt.deployment`), fp16 / int8 by the graph's precision, and
    (``cache_root`` not None) the
    built engine and the kernel timing cache kept on disk, so only the first session on a machine
    pays TensorRT's build (minutes for an SD v1.5 UNet)."""
    options = _trt_build_options(manifest, graph, index, deployment)
    # the TensorRT subgraphs of one session share one execution-context memory (the largest); the
    # EP shares nothing between sessions, so each graph keeps its own (prism_rt.memory counts them)
    options["trt_context_memory_sharing_enable"] = True
    options["trt_engine_cache_enable"] = cache_root is not None
    if cache_root is not None:
        options.update(trt_engine_cache_path=str(trt_cache_folder(manifest, graph, index, cache_root,
                                                                  deployment=deployment)),
                       trt_timing_cache_enable=True,
                       trt_timing_cache_path=str(Path(cache_root) / f"timing-trt{tensorrt_version()}"))
    return options


def _trt_cache_root(manifest: Manifest, trt_cache) -> Path | None:
    """``trt_cache``: None or True: the default place; False: no cache; a path: that folder."""
    if trt_cache is None or trt_cache is True:
        return default_trt_cache_root(manifest)
    if trt_cache is False:
        return None
    return Path(trt_cache).expanduser().absolute()


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"cannot create the TensorRT cache folder {folder} ({exc.strerror}); pass a writable "
                           "--trt-cache DIR, or --trt-cache off to build TensorRT's engines anew in each process") from None


_SHARED_ARENA: list = []


def _register_shared_cpu_arena(ort) -> None:
    """Register (once per process) a CPU arena in onnxruntime's environment, extended by exactly
    the requested size (``kSameAsRequested``) instead of doubling."""
    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    _SHARED_ARENA.append(info)


class OrtBackend:
    kind = BackendKind.ONNXRUNTIME
    supports_autograd = False

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None, cpu_arena: bool = True,
                 cpu_graphs: bool = True, session_config: dict[str, str] | None = None,
                 trt_cache: str | Path | bool | None = None, deployment: Deployment | None = None,
                 io_binding: bool | None = None):
        """``io_binding``: keep the loops' arrays on the device as torch tensors and hand them to
        onnxruntime by pointer (``IOBinding``; outputs come back through DLPack), so no step copies
        through host numpy arrays. Default: on for cuda/tensorrt where torch is installed; ``True``
        on the CPU runs the same path there (tests)."""
        import onnxruntime as ort

        self.manifest, self.device = manifest, str(device)
        kind, index = _parse_device(device)
        self.trt_cache = _trt_cache_root(manifest, trt_cache) if kind is OrtDevice.TENSORRT else None
        # TensorRT runs only what its profiles cover: the deployment's ranges; other providers the exported ones
        self.deployment = deployment_of(manifest, deployment) if kind is OrtDevice.TENSORRT else None
        self.limits = dim_limits(manifest, self.deployment)
        self.info = manifest.model_info()
        self._bound = _BoundArrays.make(kind, index, io_binding)  # refused before any session is built
        options = ort.SessionOptions()
        self.cpu_arena = bool(cpu_arena) and kind is OrtDevice.CPU
        if kind is OrtDevice.CPU:
            if self.cpu_arena:
                # one arena for all graphs (they never run at once), grown by exactly what is asked: the
                # per-session default doubles its chunks and keeps each graph's peak apart. Without any
                # arena every large tensor is a fresh mmap and its page faults (benchmarks/RESULTS.md)
                _register_shared_cpu_arena(ort)
                options.add_session_config_entry("session.use_env_allocators", "1")
            else:  # nothing kept between calls: the lowest resident memory, for long-lived services
                options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = int(threads)
        for key, value in (session_config or {}).items():  # e.g. session.intra_op.allow_spinning = 0
            try:
                options.add_session_config_entry(str(key), str(value))
            except Exception as exc:  # onnxruntime's own exception types
                raise BackendError(f"onnxruntime refuses the session setting {key}={value}: {exc}") from None
        self.sessions, self.files = {}, {}
        for name, entry in manifest.graphs.items():
            providers = _providers(kind, index, manifest, name, self.trt_cache, self.deployment)
            if self.trt_cache is not None:  # made before onnxruntime writes into it
                for folder in (providers[0][1]["trt_engine_cache_path"], providers[0][1]["trt_timing_cache_path"]):
                    _make_folder(Path(folder))
            # the CPU twin: attention fused into MultiHeadAttention (flash attention), same weights,
            # a fraction of the portable graph's memory (benchmarks/RESULTS.md)
            file = entry.cpu_file if kind is OrtDevice.CPU and cpu_graphs and entry.cpu_file else entry.file
            try:
                session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
            except Exception as exc:  # onnxruntime's own exception types
                raise BackendError(f"onnxruntime cannot load the {name} graph {file} on {device}: {exc}") from None
            self.files[name] = file
            if kind.provider not in session.get_providers():  # onnxruntime falls back silently
                raise BackendError(f"onnxruntime could not start {kind.provider} for the {name} graph (it runs on "
                                   f"{session.get_providers()}); check the CUDA/TensorRT installation, or use --device cpu")
            self.sessions[name] = session
        self.pad_empty_edits = manifest.graphs["unet"].dims.get("edits") is not None and \
            manifest.graphs["unet"].dims["edits"].min > 0

    @property
    def io_binding(self) -> bool:
        return self._bound is not None

    @property
    def xp(self):
        if self._bound is not None:
            import array_api_compat.torch as xp

            return xp
        import array_api_compat.numpy as xp

        return xp

    def asarray(self, array):
        if self._bound is not None:
            return self._bound.asarray(array)
        array = np.asarray(array)
        return array.astype(np.float32, copy=False) if array.dtype.kind == "f" else array

    def to_numpy(self, array) -> np.ndarray:
        if self._bound is not None:
            return self._bound.to_numpy(array)
        return np.asarray(array)

    def run(self, graph: str, **inputs) -> dict:
        entry = self.manifest.graphs.get(graph)
        if entry is None:
            raise BackendError(f"unknown graph {graph!r}; graphs are {', '.join(self.manifest.graphs)}")
        if self._bound is not None:
            feeds = self._feeds(entry, inputs, self._bound.convert)
            if not (graph == "unet" and self.pad_empty_edits and feeds["cross_alpha"].shape[1] == 0):
                return self._bound.run(self.sessions[graph], [t.name for t in entry.outputs], feeds)
            # the rare engine that cannot take K = 0: its padded call goes through the host
            feeds = {k: self._bound.to_numpy(v) for k, v in feeds.items()}
            return {k: self._bound.asarray(v) for k, v in self._run_unet_padded(feeds).items()}
        feeds = self._feeds(entry, inputs)
        if graph == "unet" and self.pad_empty_edits and feeds["cross_alpha"].shape[1] == 0:
            return self._run_unet_padded(feeds)
        names = [t.name for t in entry.outputs]
        return dict(zip(names, self.sessions[graph].run(names, feeds)))

    def _feeds(self, entry, inputs: dict, convert=None) -> dict:
        """Inputs in the graph's dtypes, checked against the manifest's shapes and ranges.
        ``convert(value, numpy dtype)``: to a contiguous array of that dtype (default: numpy)."""
        expected = [t.name for t in entry.inputs]
        if sorted(inputs) != sorted(expected):
            raise BackendError(f"the {entry.name} graph takes {expected}, got {sorted(inputs)}")
        feeds, bound, limits = {}, {}, self.limits[entry.name]
        for tensor in entry.inputs:
            value = inputs[tensor.name]
            array = convert(value, tensor.dtype) if convert else np.ascontiguousarray(np.asarray(value), dtype=tensor.dtype)
            if array.ndim != len(tensor.shape):
                raise BackendError(f"{entry.name}.{tensor.name} must have shape {list(tensor.shape)}, got {array.shape}")
            for size, dim in zip(array.shape, tensor.shape):
                if isinstance(dim, int) and size != dim:
                    raise BackendError(f"{entry.name}.{tensor.name} must have shape {list(tensor.shape)}, got {array.shape}; "
                                       "the engine was exported for another model size")
                most = limits.get(dim) if isinstance(dim, str) else None
                if most is not None and size > most:  # below min: K = 0 is padded, others fail in the graph
                    where = ("its TensorRT profiles (deployment: max_edits, max_groups, max_batch) take"
                             if self.deployment else "this engine takes")
                    raise BackendError(f"{entry.name}.{tensor.name} has {dim} = {size}; {where} at most {most} (lower "
                                       "--max-batch so edits are split into smaller chunks)")
                if isinstance(dim, str) and bound.setdefault(dim, size) != size:
                    raise BackendError(f"{entry.name}: {dim} is {bound[dim]} in one input and {size} in "
                                       f"{tensor.name}; inputs must agree")
            feeds[tensor.name] = array
        return feeds

    def _run_unet_padded(self, feeds: dict) -> dict[str, np.ndarray]:
        """K = 0 on an engine that needs K ≥ 1: one neutral edit item per group, outputs dropped."""
        noise, blend_maps = self.sessions["unet"].run(["noise", "blend_maps"], pad_empty_edits(feeds))
        return unpad_outputs(feeds, noise, blend_maps)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.kind.value, "device": self.device, "onnxruntime": ort.__version__,
                "io_binding": self.io_binding,
                "providers": {name: s.get_providers()[0] for name, s in self.sessions.items()},
                "graph_files": {name: f.relative_to(self.manifest.root).as_posix() for name, f in self.files.items()},
                "precision": self.manifest.loaded_precision, "graph_precisions": dict(self.manifest.precision),
                "engine": str(self.manifest.root),
                "engine_format_version": self.manifest.format_version,
                **({"trt_cache": str(self.trt_cache)} if self.trt_cache is not None else {}),
                **({"deployment": self.deployment.to_json()} if self.deployment is not None else {})}


class _BoundArrays:
    """The IO-binding path: arrays are torch tensors on the session's device; each call binds its
    inputs by pointer and lets onnxruntime allocate the outputs on the device, which come back as
    torch tensors through DLPack (no copy). Nothing crosses to the host unless the loop asks."""

    def __init__(self, ort_device: str, index: int, torch_device):
        self.ort_device, self.index, self.device = ort_device, index, torch_device

    @classmethod
    def make(cls, kind: OrtDevice, index: int, wanted: bool | None) -> "_BoundArrays | None":
        on_cpu = kind is OrtDevice.CPU
        if wanted is False or (wanted is None and on_cpu):
            return None
        try:
            import torch
        except ImportError:
            if wanted:
                raise BackendError("io_binding keeps the loop's arrays on the device as torch tensors, and torch is not "
                                   "installed: pip install torch, or run without --io-binding") from None
            return None  # numpy arrays, copied to the device by onnxruntime at each call
        if not on_cpu and not torch.cuda.is_available():
            if wanted:
                raise BackendError("io_binding on a GPU needs a CUDA build of torch (torch.cuda.is_available() is False); "
                                   "install one, or run with --no-io-binding")
            return None
        return cls("cpu" if on_cpu else "cuda", index, torch.device("cpu") if on_cpu else torch.device("cuda", index))

    def asarray(self, array):
        import torch

        if isinstance(array, torch.Tensor):
            tensor = array.to(self.device)
        else:
            array = np.asarray(array)
            tensor = torch.as_tensor(array, device=self.device)
        return tensor.float() if tensor.is_floating_point() else tensor

    def to_numpy(self, array) -> np.ndarray:
        import torch

        if isinstance(array, torch.Tensor):
            return array.detach().to("cpu").numpy()
        return np.asarray(array)

    def convert(self, value, dtype):
        import torch

        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        torch_dtype = getattr(torch, np.dtype(dtype).name)
        return tensor.to(device=self.device, dtype=torch_dtype).contiguous()

    def run(self, session, names: list[str], feeds: dict) -> dict:
        import torch

        binding = session.io_binding()
        for name, tensor in feeds.items():
            binding.bind_input(name, self.ort_device, self.index, np.dtype(str(tensor.dtype).removeprefix("torch.")),
                               list(tensor.shape), tensor.data_ptr())
        for name in names:
            binding.bind_output(name, self.ort_device, self.index)
        if self.ort_device == "cuda":  # inputs written on torch's stream must be there before onnxruntime reads
            torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        return {name: torch.from_dlpack(value) for name, value in zip(names, binding.get_outputs())}


def load_ort_backend(path, device: str = "cpu", self_max_queries: int | None = None,
                     verify_hashes: bool = True, precision: Precision | str = Precision.FP32, threads: int | None = None,
                     cpu_arena: bool = True, cpu_graphs: bool = True,
                     session_config: dict[str, str] | None = None,
                     trt_cache: str | Path | bool | None = None, deployment: Deployment | None = None,
                     io_binding: bool | None = None) -> OrtBackend:
    """Check the engine folder's manifest (for the graphs of ``precision``), then open them on ``device``."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime") from None
    manifest = load_manifest(Path(path), precision=Precision.parse(precision).value, verify_hashes=verify_hashes)
    exported = int(manifest.control["self_max_queries"])
    if self_max_queries is not None and int(self_max_queries) != exported:
        raise BackendError(f"the engine {path} was exported with self_max_queries {exported}, not {self_max_queries}: "
                           f"the controlled layers are compiled into the graph. Pass --self-max-queries {exported}, or "
                           f"re-export with `prism-export export … --self-max-queries {self_max_queries}`")
    return OrtBackend(manifest, device=device, threads=threads, cpu_arena=cpu_arena, cpu_graphs=cpu_graphs,
                      session_config=session_config, trt_cache=trt_cache, deployment=deployment, io_binding=io_binding)
