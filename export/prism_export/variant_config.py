"""How the precision variants are made: the settings of ``prism-export … --precision`` and the
variants' error type, shared by calibration, quantization and the driver (:mod:`prism_export.variants`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from prism_rt.backend import GRAPHS
from prism_rt.errors import PrismError

from .smoothing import DEFAULT_ALPHA

FP16_GRAPHS_DEFAULT = ("text_encoder", "vae_encoder", "vae_decoder", "unet")
# Module scopes (torch module paths, matched on whole dotted components) whose Conv/MatMul/Gemm stay
# float in the int8 variants: the time embedding; conv_in / conv_out; conv_shortcut, the 1×1
# convolutions where a ResNet changes width, which read the raw residual stream (no norm in front,
# the widest range in the UNet); proj_in / proj_out, the 1×1 convolutions into and out of each
# transformer, which remove the most error per FLOP kept float. Measurements behind the list:
# benchmarks/RESULTS.md, "int8-cpu accuracy on the trained phantom".
UNET_FLOAT_SCOPES = ("time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut", "proj_in", "proj_out")
# Ops an fp16 graph may keep in float32 (Casts around them) — where the measured activations entering
# them come near fp16's range (prism_export.fp16_policy): a normalisation sums squares and a softmax
# exponentials, the first values to pass 65504. On the trained phantom the VAE keeps them, the UNet and
# text encoder do not (docs/jetson.md; benchmarks/fp16_norms.py measures the error either way).
FP16_FP32_OPS_DEFAULT = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax")
DEFAULT_SMOOTHING_ALPHA = DEFAULT_ALPHA  # int8-cpu's SmoothQuant α (prism_export.smoothing)


class VariantError(PrismError):
    """A precision variant cannot be built or fails its checks."""


@dataclass(frozen=True)
class VariantSettings:
    """How variants are calibrated and measured (``prism-export … --precision``'s options).

    More calibration images, steps and samples give int8 better ranges and the quality figures
    more support, at the cost of one fp32 and one variant run of every image; more
    ``int8_float_scopes`` less int8 error for less speed; ``int8_cpu_smoothing`` None: more error,
    the same speed; ``fp16_fp32_ops`` empty: every op fp16, a little faster, and the normalisations
    free to overflow where activations are large."""

    fp16_graphs: tuple[str, ...] = FP16_GRAPHS_DEFAULT
    fp16_fp32_ops: tuple[str, ...] = FP16_FP32_OPS_DEFAULT  # op types the fp16 graphs keep in float32
    calibration_images: Path | None = None  # None: the built-in set (prism_export.calibration.default_calibration_items)
    calibration_count: int = 4
    calibration_steps: int = 50
    calibration_samples: int = 64  # UNet calls kept for calibration, evenly spread over the trajectories
    self_replace: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    threads: int | None = None
    int8_float_scopes: tuple[str, ...] = UNET_FLOAT_SCOPES  # UNet module scopes kept in float in int8 / int8-cpu
    int8_cpu_smoothing: float | None = DEFAULT_SMOOTHING_ALPHA  # SmoothQuant α of int8-cpu; None: no rescaling

    def __post_init__(self):
        if self.int8_cpu_smoothing is not None and not 0.0 <= self.int8_cpu_smoothing <= 1.0:
            raise VariantError(f"--int8-cpu-smoothing {self.int8_cpu_smoothing} is not in [0, 1]; give the "
                               "SmoothQuant migration strength α (default 0.7), or 'off'")
        if any(not s.strip(". ") for s in self.int8_float_scopes):
            raise VariantError(f"--int8-float-scopes {','.join(self.int8_float_scopes)!r} holds an empty scope; "
                               "give module paths such as proj_in,up_blocks.3.resnets.0.conv1")
        from .trt_ops import SUPPORTED_OPS

        bad_ops = sorted(set(self.fp16_fp32_ops) - set(SUPPORTED_OPS))
        if bad_ops:
            raise VariantError(f"--fp16-fp32-ops names {bad_ops}, which are not ONNX operators of the graphs; give op "
                               f"types such as {','.join(FP16_FP32_OPS_DEFAULT)}, or 'none'")
        unknown = sorted(set(self.fp16_graphs) - set(GRAPHS))
        if unknown:
            raise VariantError(f"--fp16-graphs names unknown graph(s) {unknown}; graphs are {', '.join(GRAPHS)}")
        if self.calibration_count < 1 or self.calibration_steps < 2 or self.calibration_samples < 1:
            raise VariantError("--calibration-count and --calibration-samples must be ≥ 1 and --calibration-steps ≥ 2")

    def to_json(self) -> dict:
        d = asdict(self)
        d["calibration_images"] = str(self.calibration_images) if self.calibration_images else "built-in"
        return d
