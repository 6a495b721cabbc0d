"""Reading radiographs, fitting them to the model's square, and mapping results back (PRISM_METHOD §3).

Torch-free on purpose: the lean runtime reads images with numpy and Pillow only; pydicom is an
optional extra, imported only when a DICOM file is actually read.
"""
from __future__ import annotations

import hashlib
import io
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from prism_rt.config import Fit
from prism_rt.errors import InputImageError, MissingExtraError

__all__ = ["SourceImage", "FitInfo", "load_image", "fit_to_model", "unfit", "to_uint",
           "save_png", "diff_heatmap"]

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


def _fail(path: str, what: str, todo: str) -> InputImageError:
    return InputImageError(f"{path}: {what}; {todo}")


def load_image(path: str | os.PathLike) -> SourceImage:
    """Read a PNG/JPEG (8- or 16-bit, grey or colour) or a single-frame grayscale DICOM.

    The file is read once into memory so the hash and the pixels come from the same bytes.
    Every failure is an :class:`InputImageError` naming the path: a raw PIL or pydicom
    exception would tell a clinician user nothing.
    """
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise _fail(name, "no such file", "check the path")
    if p.is_dir():
        raise _fail(name, "is a directory, not an image file", "pass the path of one image")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise _fail(name, f"cannot be read ({e.strerror or e})", "check its permissions") from e
    if not data:
        raise _fail(name, "the file is empty", f"pass a real image ({_EXPECTED})")
    digest = hashlib.sha256(data).hexdigest()
    if data[128:132] == b"DICM" or p.suffix.lower() in (".dcm", ".dicom"):
        pixels, bits, meta = _read_dicom(name, data)
        kind = "dicom"
    else:
        pixels, bits, meta, kind = _read_pillow(name, data)
    if pixels.size == 0:
        raise _fail(name, f"the image has zero size {pixels.shape}", "pass a non-empty image")
    pixels = np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)
    return SourceImage(pixels=pixels, path=name, kind=kind, sha256=digest, bit_depth=bits, meta=meta)


def _read_pillow(name: str, data: bytes) -> tuple[np.ndarray, int, dict, str]:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # Image.open is lazy: truncation only shows when the pixels are decoded
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        why = "cannot identify image file" if isinstance(e, UnidentifiedImageError) else str(e)
        raise _fail(name, f"not a readable image ({_EXPECTED}): {why}",
                    "check that the file is complete and really an image") from e
    mode, kind = img.mode, (img.format or "unknown").lower()
    meta = {"format": kind, "mode": mode, "photometric_interpretation": "MONOCHROME2",
            "frames": int(getattr(img, "n_frames", 1))}
    try:
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            # Full range, not per-image min/max: a 16-bit file's grey levels are absolute.
            bits, scale, gray = 16, 65535.0, np.asarray(img).astype(np.float64)
        elif mode in ("L", "LA", "1"):
            bits, scale, gray = 8, 255.0, np.asarray(img.convert("L"), dtype=np.float64)
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
            # ITU-R BT.601 luma, computed in float so no precision is lost to uint8 rounding.
            bits, scale, gray = 8, 255.0, rgb @ np.array([0.299, 0.587, 0.114])
            meta["converted_to_luminance"] = "ITU-R BT.601"
    except Exception as e:  # noqa: BLE001
        raise _fail(name, f"cannot convert Pillow mode {mode!r} to grayscale: {e}",
                    f"save it as 8- or 16-bit grayscale ({_EXPECTED})") from e
    if gray.size and (gray.min() < 0 or gray.max() > scale):
        raise _fail(name, f"pixel values [{gray.min():g}, {gray.max():g}] exceed the 16-bit range",
                    "save the image as 8- or 16-bit grayscale")
    meta["scale"] = scale
    meta["original_range"] = _range(gray)
    return gray / scale, bits, meta, kind


def _plain(value):
    """pydicom values (DS, IS, MultiValue, UID) → JSON types, so meta survives json.dumps."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Number):
        return float(value)
    if isinstance(value, (str, bytes)):
        return str(value)
    try:
        return [_plain(v) for v in value]
    except TypeError:
        return str(value)


def _range(a: np.ndarray) -> list[float] | None:
    return [float(a.min()), float(a.max())] if a.size else None


def _read_dicom(name: str, data: bytes) -> tuple[np.ndarray, int, dict]:
    try:
        import pydicom
    except ImportError as e:
        raise MissingExtraError("dicom", "pydicom", "Reading DICOM") from e
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception as e:  # noqa: BLE001
        raise _fail(name, f"not a readable DICOM file: {e}", "check that the file is complete") from e
    if "PixelData" not in ds:
        raise _fail(name, "the DICOM file has no pixel data", "pass an image object, not a report")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1))
    if frames > 1 or samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _fail(name, f"{frames} frame(s), {samples} sample(s) per pixel, "
                    f"PhotometricInterpretation {photometric or 'missing'}",
                    "only single-frame grayscale radiographs are supported")
    try:
        stored = ds.pixel_array
        values = apply_modality_lut(stored, ds).astype(np.float64)
    except Exception as e:  # noqa: BLE001 - missing codec, bad length, ...
        syntax = ds.file_meta.get("TransferSyntaxUID")
        todo = ("install a decoder (pip install pylibjpeg pylibjpeg-libjpeg) or convert the file"
                if getattr(syntax, "is_compressed", False) else "the file may be truncated or corrupt")
        raise _fail(name, f"cannot decode the DICOM pixel data (transfer syntax {syntax}): {e}",
                    todo) from e
    bits = int(ds.get("BitsStored", 16))
    meta = {"photometric_interpretation": photometric, "modality": _plain(ds.get("Modality")),
            "view_position": _plain(ds.get("ViewPosition")), "bits_stored": bits,
            "pixel_representation": int(ds.get("PixelRepresentation", 0)),
            "stored_range": _range(stored), "sop_instance_uid": _plain(ds.get("SOPInstanceUID")),
            "pixel_spacing": _plain(ds.get("ImagerPixelSpacing", ds.get("PixelSpacing")))}
    if "ModalityLUTSequence" in ds:
        meta["modality_lut"] = "ModalityLUTSequence"
    else:
        meta["modality_lut"] = {"slope": float(ds.get("RescaleSlope", 1.0)),
                                "intercept": float(ds.get("RescaleIntercept", 0.0))}
    meta["modality_range"] = _range(values)
    try:
        if "VOILUTSequence" in ds:
            lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
            lo, hi = float(lut.min()), float(lut.max())  # declared LUT bits often exceed its use
            out = apply_voi_lut(values, ds).astype(np.float64)
            meta["voi"] = {"kind": "lut", "output_range": [lo, hi]}
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            # Ask pydicom for its own output range (it depends on bits, sign, rescale and the
            # VOI LUT function) by windowing two values far outside the window.
            wc, ww = (float(_plain(v)[0] if isinstance(_plain(v), list) else v)
                      for v in (ds.WindowCenter, ds.WindowWidth))
            with np.errstate(over="ignore"):
                probe = np.array([wc - 64 * ww, wc + 64 * ww])
                lo, hi = apply_voi_lut(probe, ds).astype(np.float64)
            out = apply_voi_lut(values, ds).astype(np.float64)
            meta["voi"] = {"kind": "window", "center": wc, "width": ww, "output_range": [lo, hi],
                           "function": str(ds.get("VOILUTFunction", "LINEAR"))}
        else:
            out, (lo, hi) = values, _range(values)
            meta["voi"] = {"kind": "minmax", "output_range": [lo, hi]}
    except Exception as e:  # noqa: BLE001
        raise _fail(name, f"cannot apply the DICOM VOI LUT / window: {e}",
                    "check the file's VOI LUT / window attributes") from e
    pixels = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if photometric == "MONOCHROME1":  # stored bright = air; the model expects bright = dense
        pixels = 1.0 - pixels
        meta["flipped"] = True
    return pixels, bits, meta


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


def save_png(path: str | os.PathLike, pixels01: np.ndarray, bits: int = 8) -> None:
    """Grayscale PNG; 16 bits keeps the precision of a DICOM source for a radiologist's viewer."""
    arr = to_uint(pixels01, bits)
    if arr.ndim != 2:
        raise ValueError(f"save_png expects an [H, W] grayscale image, got shape {arr.shape}")
    Image.fromarray(arr).save(Path(path), format="PNG")


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
