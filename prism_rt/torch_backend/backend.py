"""The PyTorch reference backend: eager execution of the graph modules; the only backend with
autograd, so the only one that runs null-text inversion."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from ..backend import BackendKind, ModelInfo
from ..config import BlendMaps
from ..errors import BackendError
from ..precision import TORCH_PRECISIONS, Precision
from ..nvtx import nvtx_range
from .cuda_graphs import GraphedCall
from .graphs import build_graphs


class TorchBackend:
    """Thread safety: the controlled UNet keeps one call's controls and attention maps on the
    module (its attention processors share them), so graph calls are serialised by ``_lock``;
    torch's intra-op threads still parallelise each call. Tensors and autograd stay per call."""

    kind = BackendKind.TORCH
    supports_autograd = True

    def __init__(self, components, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 self_max_queries: int = 32 * 32, blend_maps: BlendMaps | str = BlendMaps.AFTER_CONTROL,
                 cuda_graphs: bool | None = None, blend_downsample: int | None = None, channels_last: bool = False):
        """``dtype``: the graphs' precision. The loops (DDIM steps, CFG, blend, null-text's Adam)
        stay in float32: ``run`` casts a graph's float inputs to ``dtype`` and its outputs back.
        ``cuda_graphs``: replay the controlled UNet call from a CUDA graph per call shape
        (``cuda_graphs.GraphedCall``; default: on for CUDA devices). Saves the launch overhead
        of every kernel of every step; costs one capture (and its static buffers) per shape.
        ``True`` on the CPU runs the same static buffers without capture (tests).
        ``channels_last``: the UNet's and VAE's convolutions in NHWC memory layout (tensor-core
        convolutions on CUDA take NHWC; whether it pays is measured by benchmarks/gpu_check.sh)."""
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
        self.device, self.dtype = torch.device(device), dtype
        self._lock = threading.Lock()
        self.components = components
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self._graphed_unet = None
        self.graphs = {name: module.to(self.device, dtype) for name, module in build_graphs(components, self_max_queries, blend_maps, blend_downsample).items()}
        self.channels_last = False
        self.use_channels_last(channels_last)
        unet_cfg = components.unet.config
        te_cfg = components.text_encoder.config
        self.info = ModelInfo(
            image_size=int(components.image_size),
            latent_channels=int(unet_cfg.in_channels),
            latent_downsample=2 ** (len(components.vae.config.block_out_channels) - 1),
            text_width=int(te_cfg.hidden_size),
            max_tokens=int(te_cfg.max_position_embeddings),
            tokenizer_dir=Path(components.tokenizer_dir),
            scheduler_config=dict(components.scheduler_config),
            provenance=dict(components.provenance),
            self_max_queries=self_max_queries,
            blend_downsample=int(self.graphs["unet"].blend_downsample),
            blend_maps=self.graphs["unet"].blend_maps.value,
        )

    @property
    def xp(self):
        import array_api_compat.torch as xp

        return xp

    def asarray(self, array):
        if isinstance(array, torch.Tensor):
            return array.to(self.device)
        array = np.asarray(array)
        dtype = torch.float32 if array.dtype.kind == "f" else None
        return torch.as_tensor(array, device=self.device, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            return array.detach().to("cpu", torch.float32 if array.is_floating_point() else array.dtype).numpy()
        return np.asarray(array)

    def _in(self, x):
        return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def _out(self, x):
        return x.float() if x.is_floating_point() else x

    def use_channels_last(self, on: bool) -> None:
        """Put the convolutional graphs' weights in NHWC (``on``) or NCHW memory layout; their 4-D
        inputs follow at each call. Outputs are the same values either way."""
        layout = torch.channels_last if on else torch.contiguous_format
        for name in ("unet", "vae_encoder", "vae_decoder"):
            self.graphs[name].to(memory_format=layout)
        self.channels_last = bool(on)
        self._graphed_unet = None  # captured buffers hold the old layout

    @torch.no_grad()
    def run(self, graph: str, **inputs):
        if self.dtype != torch.float32:
            inputs = {k: self._in(v) for k, v in inputs.items()}
        if self.channels_last and graph != "text_encoder":
            inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in inputs.items()}
        with self._lock, nvtx_range(f"prism_rt.{graph}"):
            outputs = self._run(graph, **inputs)
        return {k: self._out(v) for k, v in outputs.items()} if self.dtype != torch.float32 else outputs

    def _run(self, graph: str, **inputs):
        if graph == "text_encoder":
            return {"hidden": self.graphs[graph](inputs["input_ids"])}
        if graph == "vae_encoder":
            return {"latent_mean": self.graphs[graph](inputs["pixels"])}
        if graph == "vae_decoder":
            return {"pixels": self.graphs[graph](inputs["latents"])}
        if graph == "unet":
            noise, blend_maps = (self._unet_graphs()(**inputs) if self.cuda_graphs else self.graphs[graph](**inputs))
            return {"noise": noise, "blend_maps": blend_maps}
        raise BackendError(f"unknown graph {graph!r}; graphs are text_encoder, vae_encoder, vae_decoder, unet")

    def _unet_graphs(self) -> GraphedCall:
        if self._graphed_unet is None:
            self._graphed_unet = GraphedCall(self.graphs["unet"], capture=self.device.type == "cuda")
        return self._graphed_unet

    def unet_plain(self, latents, timestep, text):
        """The stock UNet with autograd available (null-text inversion). Locked too: its attention
        processors read the shared control state, which a concurrent controlled call switches on;
        the backward pass, outside the lock, touches no shared state."""
        with self._lock:
            if self.dtype != torch.float32:
                return self._out(self.graphs["unet"].plain(self._in(latents), timestep, self._in(text)))
            return self.graphs["unet"].plain(latents, timestep, text)

    def describe(self) -> dict:
        import diffusers
        import transformers

        return {
            "backend": self.kind.value, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "precision": {torch.float32: "fp32", torch.float16: "fp16"}.get(self.dtype, str(self.dtype)),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cuda_graphs": self.cuda_graphs, "channels_last": self.channels_last,
        }


def load_torch_backend(model, *, unet_weights=None, allow_pickle=False, config=None, device="cpu",
                       self_max_queries: int = 32 * 32, precision: Precision | str = Precision.FP32,
                       blend_maps: BlendMaps | str = BlendMaps.AFTER_CONTROL, cuda_graphs: bool | None = None,
                       blend_downsample: int | None = None, channels_last: bool = False) -> TorchBackend:
    from .checkpoint import load_checkpoint

    precision = Precision.parse(precision)
    if precision not in TORCH_PRECISIONS:
        raise BackendError(f"the torch backend runs fp32 or fp16, not {precision.value!r}; int8 variants live in engine "
                           "folders: export one with `prism-export export … --precision fp32,int8-cpu` and pass that "
                           "folder as --model")

    components = load_checkpoint(model, unet_weights=unet_weights, allow_pickle=allow_pickle, config=config,
                                 device="cpu", dtype=torch.float32)
    dtype = torch.float16 if precision.half else torch.float32
    return TorchBackend(components, device=device, dtype=dtype, self_max_queries=self_max_queries, blend_maps=blend_maps,
                        cuda_graphs=cuda_graphs, blend_downsample=blend_downsample, channels_last=channels_last)
