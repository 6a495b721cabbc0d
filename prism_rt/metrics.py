"""Image quality metrics, defined once for the runtime, the export and the benchmarks.

PSNR is computed here with numpy, exactly as scikit-image's ``peak_signal_noise_ratio`` computes it
(both images promoted to one float type, the mean squared error accumulated in float64); SSIM is
scikit-image's ``structural_similarity`` (Wang et al. 2004, its default 7×7 window), imported only
when it is asked for, so this module needs numpy alone.
"""
from __future__ import annotations

import numpy as np

from .errors import MissingExtraError

PSNR_CAP_DB = 99.0
"""Identical images have an infinite PSNR; it is reported as this many dB."""


def _float_type(dtype) -> type:
    """scikit-image's promotion: float16 and float32 → float32, float64 kept, anything else → float64."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise ValueError(f"complex images ({dtype}) have no PSNR / SSIM here")
    return {np.dtype(np.float16): np.float32, np.dtype(np.float32): np.float32}.get(dtype, np.float64)


def mean_squared_error(reference: np.ndarray, image: np.ndarray) -> np.float64:
    """Mean of the squared difference, in float64, after promoting both images to one float type."""
    reference, image = np.asarray(reference), np.asarray(image)
    if reference.shape != image.shape:
        raise ValueError(f"the images differ in shape: {reference.shape} and {image.shape}")
    dtype = np.result_type(_float_type(reference.dtype), _float_type(image.dtype))
    reference, image = np.asarray(reference, dtype=dtype), np.asarray(image, dtype=dtype)
    return np.mean((reference - image) ** 2, dtype=np.float64)


def psnr_from_mse(mse: float, data_range: float = 1.0, cap: float = PSNR_CAP_DB) -> float:
    """PSNR in dB of a mean squared error: ``10·log10(data_range² / mse)``, at most ``cap`` (an MSE
    of 0 gives ``cap``)."""
    if mse == 0:
        return float(cap)
    return min(float(10 * np.log10((float(data_range) ** 2) / mse)), cap)


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0, cap: float = PSNR_CAP_DB) -> float:
    """Peak signal-to-noise ratio of ``image`` against ``reference`` in dB, at most ``cap``."""
    return psnr_from_mse(mean_squared_error(reference, image), data_range, cap)


def _structural_similarity():
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise MissingExtraError("bench", "scikit-image", "SSIM") from None
    return structural_similarity


def ssim(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of ``image`` against ``reference`` (scikit-image)."""
    return float(_structural_similarity()(reference, image, data_range=data_range))


def ssim_map(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """The per-pixel structural similarity map (scikit-image's ``full=True``), to average over a region."""
    _, full = _structural_similarity()(reference, image, data_range=data_range, full=True)
    return full
