"""Reading radiographs, fitting them to the model's square, and mapping results back (PRISM_METHOD §3).

Torch-free on purpose: the lean runtime reads images with numpy and Pillow only; pydicom is an
optional extra, imported only when a DICOM file is actually read (``prism_rt.dicomio``).

Hostile input is refused before pixels are decoded: the size comes from the header and is
checked against ``max_pixels`` (:data:`DEFAULT_MAX_PIXELS`), so a 140 KB PNG declaring
12000×12000 pixels costs milliseconds, not gigabytes. Whatever the file holds, reading it
raises nothing but :class:`~prism_rt.errors.PrismError` subclasses, each one line naming the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from prism_rt.config import Fit
from prism_rt.errors import InputImageError, PrismError
from prism_rt.image_limits import DEFAULT_MAX_PIXELS, check_size, fail as _fail, one_line as _one_line

__all__ = ["SourceImage", "ImageHeader", "DEFAULT_MAX_PIXELS", "probe_image", "load_image", "FitInfo",
           "fit_to_model", "unfit", "to_uint", "save_png", "diff_heatmap"]

_EXPECTED = "PNG, JPEG or DICOM expected"

@dataclass(frozen=True)
class SourceImage:
    """A radiograph as the model should see it, plus what is needed to map results back.

    ``pixels`` is float32 [H, W] in [0, 1], MONOCHROME2 (bright = dense) whatever the file
    stored, so that every later stage has one convention. ``meta`` is JSON-serialisable.
    """

    pixels: np.ndarray
    path: str
    kind: str
    sha256: str
    bit_depth: int
    meta: dict


@dataclass(frozen=True)
class ImageHeader:
    """What :func:`probe_image` learns from a file's header without decoding its pixels."""

    path: str
    kind: str
    height: int
    width: int
    frames: int


@contextmanager
def _typed(name: str, max_pixels: int):
    """Any exception a decoder raises on hostile bytes → one-line InputImageError naming the file;
    library warnings (pydicom prints several lines per oddity) are silenced while reading."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        except PrismError:
            raise
        except Image.DecompressionBombError as e:
            raise _fail(name, f"Pillow refuses it as a decompression bomb ({_one_line(e)})",
                        f"downscale the image; the limit asked for was {max_pixels:,} pixels") from e
        except MemoryError as e:
            raise _fail(name, "too large to decode in the available memory",
                        "downscale the image or lower --max-pixels") from e
        except Exception as e:  # noqa: BLE001 - hostile bytes make decoders raise anything
            raise _fail(name, f"not a readable image ({_EXPECTED}): {_one_line(e)}",
                        "check that the file is complete and really an image") from e


def _existing_file(path) -> tuple[str, Path]:
    name, p = str(path), Path(path)
    if not p.exists():
        raise _fail(name, "no such file", "check the path")
    if p.is_dir():
        raise _fail(name, "is a directory, not an image file", "pass the path of one image")
    return name, p


def _is_dicom(p: Path, head: bytes) -> bool:
    return head[128:132] == b"DICM" or p.suffix.lower() in (".dcm", ".dicom")


def probe_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Read only the header and raise what :func:`load_image` would raise about the file's
    existence, format and size: cheap enough to run before any model loads."""
    name, p = _existing_file(path)
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise _fail(name, f"cannot be read ({e.strerror or e})", "check its permissions") from e
    if not head:
        raise _fail(name, "the file is empty", f"pass a real image ({_EXPECTED})")
    with _typed(name, max_pixels):
        if _is_dicom(p, head):
            from .dicomio import probe_dicom

            height, width, frames = probe_dicom(name, p, head[128:132] != b"DICM", max_pixels)
            kind = "dicom"
        else:
            try:
                with Image.open(p) as img:
                    (width, height), kind = img.size, (img.format or "unknown").lower()
                    frames = int(getattr(img, "n_frames", 1))
            except UnidentifiedImageError as e:
                raise _fail(name, f"not a readable image ({_EXPECTED}): cannot identify image file",
                            "check that the file is complete and really an image") from e
            check_size(name, height, width, 1, max_pixels)
    return ImageHeader(name, kind, int(height), int(width), int(frames))


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> SourceImage:
    """Read a PNG/JPEG (8- or 16-bit, grey or colour) or a single-frame grayscale DICOM.

    The file is read once into memory so the hash and the pixels come from the same bytes.
    Its size is checked from the header (``max_pixels``) before any pixel is decoded, and
    pixels are converted straight to float32 (no full-size float64 copy). Every failure is an
    :class:`InputImageError` (or :class:`MissingExtraError`) naming the path: a raw PIL or
    pydicom exception would tell a clinician user nothing.
    """
    name, p = _existing_file(path)
    try:
        size = p.stat().st_size
        # No radiograph within max_pixels needs more than 8 bytes a pixel (float64 DICOM).
        if size > 8 * max_pixels + (16 << 20):
            raise _fail(name, f"the file is {size:,} bytes, more than any image of {max_pixels:,} pixels needs",
                        "pass a single radiograph, or raise the limit (--max-pixels / max_pixels=)")
        data = p.read_bytes()
    except OSError as e:
        raise _fail(name, f"cannot be read ({e.strerror or e})", "check its permissions") from e
    if not data:
        raise _fail(name, "the file is empty", f"pass a real image ({_EXPECTED})")
    digest = hashlib.sha256(data).hexdigest()
    with _typed(name, max_pixels):
        if _is_dicom(p, data):
            from .dicomio import read_dicom

            pixels, bits, meta = read_dicom(name, data, max_pixels)
            kind = "dicom"
        else:
            pixels, bits, meta, kind = _read_pillow(name, data, max_pixels)
        if pixels.size == 0:
            raise _fail(name, f"the image has zero size {pixels.shape}", "pass a non-empty image")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        np.clip(pixels, 0.0, 1.0, out=pixels)
    return SourceImage(pixels=pixels, path=name, kind=kind, sha256=digest, bit_depth=bits, meta=meta)


def _unit_lut(levels: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels → float32 [0, 1] through a table computed in float64: the same values as
    ``levels / (2**bits - 1)`` in float64, without a full-size float64 copy."""
    table = (np.arange(2**bits, dtype=np.float64) / (2**bits - 1)).astype(np.float32)
    return table[levels]


def _read_pillow(name: str, data: bytes, max_pixels: int) -> tuple[np.ndarray, int, dict, str]:
    try:
        img = Image.open(io.BytesIO(data))  # lazy: only the header is parsed here
    except UnidentifiedImageError as e:
        raise _fail(name, f"not a readable image ({_EXPECTED}): cannot identify image file",
                    "check that the file is complete and really an image") from e
    check_size(name, img.size[1], img.size[0], 1, max_pixels)
    try:
        img.load()  # truncation only shows when the pixels are decoded
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise _fail(name, f"not a readable image ({_EXPECTED}): {_one_line(e)}",
                    "check that the file is complete and really an image") from e
    mode, kind = img.mode, (img.format or "unknown").lower()
    meta = {"format": kind, "mode": mode, "photometric_interpretation": "MONOCHROME2",
            "frames": int(getattr(img, "n_frames", 1))}
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Full range, not per-image min/max: a 16-bit file's grey levels are absolute.
        levels = np.asarray(img)
        del img  # Pillow's own copy of the pixels: free it before the float32 one is made
        lo, hi = (int(levels.min()), int(levels.max())) if levels.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise _fail(name, f"pixel values [{lo:g}, {hi:g}] exceed the 16-bit range",
                        "save the image as 8- or 16-bit grayscale")
        bits, scale, gray = 16, 65535.0, _unit_lut(levels.astype(np.uint16, copy=False), 16)
    elif mode in ("L", "LA", "1"):
        levels = np.asarray(img.convert("L"))
        del img
        bits, scale, gray = 8, 255.0, _unit_lut(levels, 8)
    else:
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        del img
        # ITU-R BT.601 luma in float64, row block by row block: no uint8 rounding, no full float64 copy.
        gray = np.empty(rgb.shape[:2], np.float32)
        luma = np.array([0.299, 0.587, 0.114]) / 255.0
        for top in range(0, rgb.shape[0], 512):
            gray[top:top + 512] = rgb[top:top + 512].astype(np.float64) @ luma
        bits, scale, levels = 8, 255.0, None
        meta["converted_to_luminance"] = "ITU-R BT.601"
    meta["scale"] = scale
    meta["original_range"] = _range(levels) if levels is not None else _range(gray * np.float32(scale))
    return gray, bits, meta, kind


def _range(a: np.ndarray) -> list[float] | None:
    return [float(a.min()), float(a.max())] if a.size else None


@dataclass(frozen=True)
class FitInfo:
    """How an image was fitted to the model square, so the result can be put back.

    ``box`` is (top, left, height, width): for crop, the region of the original image the model
    saw; for pad, where the image sits inside the padded square; for resize, the whole image.
    """

    mode: str
    orig_height: int
    orig_width: int
    size: int
    box: tuple[int, int, int, int]
    pad_value: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["box"] = list(self.box)
        return d


def _resize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic on a float ("F") image: no 8-bit quantisation on the way in or out."""
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def fit_to_model(
    pixels: np.ndarray, size: int, mode: Fit | str = Fit.RESIZE
) -> tuple[np.ndarray, FitInfo]:
    """[H, W] in [0, 1] → float32 [3, size, size] in [-1, 1], the VAE's input.

    Resize is the default because PRISM trained on stretched, uncropped images; crop (the
    published inference code) cuts off the costophrenic angles, where effusion shows.
    """
    try:
        fit = Fit(mode.value if isinstance(mode, Fit) else str(mode).lower())
    except ValueError:
        raise ValueError(f"fit mode {mode!r} is not one of {[f.value for f in Fit]}") from None
    gray = np.asarray(pixels, dtype=np.float32)
    if gray.ndim != 2 or gray.size == 0:
        raise InputImageError(f"expected a non-empty [H, W] grayscale image, got shape {gray.shape}")
    if int(size) < 1:
        raise ValueError(f"model size must be a positive number of pixels, got {size}")
    h, w = gray.shape
    pad_value = 0.0
    if fit is Fit.CROP:
        s = min(h, w)
        box = ((h - s) // 2, (w - s) // 2, s, s)
        square = gray[box[0]:box[0] + s, box[1]:box[1] + s]
    elif fit is Fit.PAD:
        s = max(h, w)
        # The border mean makes the padding continue the image's own background (air or collimator).
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        pad_value = float(border.mean())
        box = ((s - h) // 2, (s - w) // 2, h, w)
        square = np.full((s, s), pad_value, dtype=np.float32)
        square[box[0]:box[0] + h, box[1]:box[1] + w] = gray
    else:
        box, square = (0, 0, h, w), gray
    out = np.clip(_resize(square, size, size), 0.0, 1.0) * 2.0 - 1.0
    info = FitInfo(fit.value, int(h), int(w), int(size), tuple(int(v) for v in box), pad_value)
    return np.repeat(out[None], 3, axis=0).astype(np.float32), info


def unfit(pixels: np.ndarray, info: FitInfo) -> np.ndarray:
    """Model output ([3, S, S] or [S, S] in [-1, 1]) → float32 [0, 1] in the input's geometry.

    resize and pad give [orig_height, orig_width]. crop gives only the crop box's size
    ([box height, box width]): the model never saw the rest, so nothing is invented for it.
    """
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim == 3:
        x = x.mean(axis=0)
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"expected a square [3, S, S] or [S, S] model output, got shape {np.shape(pixels)}")
    x = (x + 1.0) / 2.0
    top, left, bh, bw = info.box
    if info.mode == Fit.PAD.value:
        s = max(info.orig_height, info.orig_width)
        out = _resize(x, s, s)[top:top + bh, left:left + bw]
    elif info.mode == Fit.CROP.value:
        out = _resize(x, bh, bw)
    else:
        out = _resize(x, info.orig_height, info.orig_width)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_uint(pixels01: np.ndarray, bits: int = 8) -> np.ndarray:
    """[0, 1] float → uint8/uint16 by rounding (not truncation, which darkens by half a level)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    x = np.asarray(pixels01, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("image contains NaN values; cannot convert to integers")
    top = 2**bits - 1
    return np.clip(np.rint(x * top), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def save_png(path: str | os.PathLike, pixels01: np.ndarray, bits: int = 8, text: dict | None = None) -> None:
    """Grayscale PNG; 16 bits keeps the precision of a DICOM source for a radiologist's viewer.
    ``text``: keyword → value text chunks (iTXt where a value is not Latin-1), e.g. provenance."""
    from PIL.PngImagePlugin import PngInfo

    arr = to_uint(pixels01, bits)
    if arr.ndim != 2:
        raise ValueError(f"save_png expects an [H, W] grayscale image, got shape {arr.shape}")
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
    # compress_level 1: faster than Pillow's default 6 for a few per cent more bytes
    Image.fromarray(arr).save(Path(path), format="PNG", compress_level=1, pnginfo=info)


# Diverging blue-white-red (ColorBrewer RdBu, centre made pure white): white means "unchanged".
_CMAP_T = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_RGB = np.array([[5, 48, 97], [67, 147, 195], [255, 255, 255], [214, 96, 77], [103, 0, 31]],
                     dtype=np.float64)


def _colormap(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return np.stack([np.interp(t, _CMAP_T, _CMAP_RGB[:, c]) for c in range(3)], axis=-1)


def _as_unit(x: np.ndarray) -> np.ndarray:
    """Integer images → [0, 1] floats, so Δ is never computed in (wrapping) uint8 arithmetic."""
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float64) / np.iinfo(a.dtype).max
    return a.astype(np.float64)


def diff_heatmap(
    edited: np.ndarray, reference: np.ndarray, *, limit: float | None = None
) -> np.ndarray:
    """RGB uint8 [H, W + bar, 3]: the signed change edited − reference, with a labelled scale.

    The sign is the finding (added vs removed opacity), so it is kept: the published code
    subtracted in uint8, where 0 − 255 wraps to +1 and a darkening reads as a brightening.
    The range is symmetric so white always means zero; the default limit (99.5th percentile
    of |Δ|) keeps a few extreme pixels from washing the rest out.
    """
    e, r = _as_unit(edited), _as_unit(reference)
    if e.shape != r.shape or e.ndim != 2 or e.size == 0:
        raise ValueError(f"diff_heatmap needs two [H, W] images of one shape, got {e.shape} and {r.shape}")
    delta = e - r
    if not np.isfinite(delta).all():
        raise ValueError("diff_heatmap inputs contain NaN or Inf")
    if limit is None:
        limit = max(float(np.percentile(np.abs(delta), 99.5)), 1.0 / 255.0)
    if not limit > 0:
        raise ValueError(f"limit must be positive, got {limit}")
    h, w = delta.shape
    image = _colormap(0.5 + delta / (2.0 * limit))

    try:
        font = ImageFont.load_default(size=max(10, h // 40))
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: bitmap font
        font = ImageFont.load_default()
    labels = [(limit, f"+{limit:.3g}"), (0.0, "0"), (-limit, f"-{limit:.3g}")]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(np.ceil(probe.textlength(s, font=font))) for _, s in labels)
    text_h = font.getbbox("+0.9")[3]
    gap, bar_w, tick = 6, max(10, w // 30), 4
    panel = Image.new("RGB", (gap + bar_w + tick + 3 + text_w + 4, h), "white")
    y0, y1 = min(text_h // 2 + 2, h // 2), max(h - 1 - (text_h // 2 + 2), h // 2)
    ys = np.arange(y0, y1 + 1)
    col = _colormap(1.0 - (ys - y0) / max(y1 - y0, 1))  # top = +limit (red), bottom = −limit (blue)
    arr = np.asarray(panel).copy()
    arr[y0:y1 + 1, gap:gap + bar_w] = np.rint(col[:, None, :]).astype(np.uint8)
    panel = Image.fromarray(arr)
    draw = ImageDraw.Draw(panel)
    draw.rectangle([gap, y0, gap + bar_w - 1, y1], outline="black")
    for value, text in labels:
        y = y0 + (1.0 - (value + limit) / (2 * limit)) * (y1 - y0)
        draw.line([gap + bar_w, y, gap + bar_w + tick, y], fill="black")
        top = draw.textbbox((0, 0), text, font=font)
        draw.text((gap + bar_w + tick + 3, y - (top[1] + top[3]) / 2), text, fill="black", font=font)
    out = np.concatenate([np.rint(image).astype(np.uint8), np.asarray(panel)], axis=1)
    return np.ascontiguousarray(out)
