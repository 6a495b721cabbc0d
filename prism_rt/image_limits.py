"""What every image reader checks before decoding pixels, and how it words a refusal.

Shared by ``prism_rt.imageio`` (Pillow formats) and ``prism_rt.dicomio`` (DICOM), which both
sit above it.
"""
from __future__ import annotations

from prism_rt.errors import InputImageError

DEFAULT_MAX_PIXELS = 50_000_000
"""The largest image read by default: above the largest CR/DR chest detectors (43×43 cm at
100 µm ≈ 18.5 M pixels; 4300×4300 at 0.1 mm pitch), far below what a forged header can declare."""


def fail(path: str, what: str, todo: str) -> InputImageError:
    """One line: the file, what is wrong with it, what to do."""
    return InputImageError(f"{path}: {what}; {todo}")


def one_line(exc: BaseException, limit: int = 240) -> str:
    """A library's message on one line (pydicom's run over several), trimmed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def check_size(name: str, height: int, width: int, frames: int, max_pixels: int) -> None:
    """Refuse, from the header, an image with no pixels or more than ``max_pixels``."""
    if height < 1 or width < 1:
        raise fail(name, f"the image has zero size ({height}×{width})", "pass a non-empty image")
    if height * width * max(frames, 1) > max_pixels:
        raise fail(name, f"{width}×{height} pixels" + (f" × {frames} frames" if frames > 1 else "")
                   + f" = {height * width * max(frames, 1):,} exceeds the limit of {max_pixels:,} pixels",
                   "downscale the image, or raise the limit (--max-pixels / max_pixels=) if it is genuine")
