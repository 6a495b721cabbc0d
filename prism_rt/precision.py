"""The precisions an engine folder can hold, defined once: their folders, whether they are
quantized, and which ones TensorRT or ONNX Runtime on a CPU is meant for."""
from __future__ import annotations

import enum

from .errors import SettingsError


class Precision(str, enum.Enum):
    """One precision of an engine's graphs.

    fp32: the reference every other precision is measured against.
    fp16: UNet / text encoder / VAE in half precision (which graphs: a setting of the export).
    int8: the UNet with symmetric int8 Q/DQ (TensorRT's explicit quantization).
    int8-cpu: the UNet with u8 (asymmetric) activations and s8 per-channel weights, fastest in
    ONNX Runtime on x86.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_CPU = "int8-cpu"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: "Precision | str") -> "Precision":
        """A precision from its name; a typed error naming the choices otherwise."""
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise SettingsError(f"unknown precision {value!r}; use one of {', '.join(CHOICES)}") from None

    @property
    def folder(self) -> str:
        """The engine folder's sub-folder holding this precision's graphs."""
        return "onnx" if self is Precision.FP32 else f"onnx-{self.value}"

    @property
    def is_reference(self) -> bool:
        return self is Precision.FP32

    @property
    def quantized(self) -> bool:
        return self in (Precision.INT8, Precision.INT8_CPU)

    @property
    def symmetric(self) -> bool:
        """Zero points 0 on activations and weights (TensorRT's int8); int8-cpu has u8 activations."""
        return self is Precision.INT8

    @property
    def half(self) -> bool:
        return self is Precision.FP16


CHOICES = tuple(p.value for p in Precision)
"""The precision names, the reference first: the CLI's choices."""

TORCH_PRECISIONS = (Precision.FP32, Precision.FP16)
"""What the torch backend runs (graphs in that dtype, the loops in fp32)."""
