"""Reading a DICOM radiograph for ``prism_rt.imageio`` (pydicom, an optional extra).

Everything a header can get wrong is checked before pixels are decoded, each refusal one line
naming the file and the reason: no pixel data, a transfer syntax UID that is not a transfer
syntax, more than one frame or sample, a size over ``max_pixels``, a BitsAllocated that does not
match the bytes present (an 8-bit header over 16-bit data), BitsStored over BitsAllocated.
Decoders' own exceptions (unknown VR, truncation, missing codec) are turned into
:class:`~prism_rt.errors.InputImageError` by the caller (``imageio._typed``).
"""
from __future__ import annotations

import io
import numbers
from pathlib import Path

import numpy as np

from prism_rt.errors import MissingExtraError
from prism_rt.image_limits import check_size, fail as _fail, one_line

_CONVERT = "convert it to an uncompressed single-frame grayscale DICOM (explicit VR little endian)"


def _pydicom():
    try:
        import pydicom
    except ImportError as e:
        raise MissingExtraError("dicom", "pydicom", "Reading DICOM") from e
    return pydicom


def probe_dicom(name: str, path: Path, force: bool, max_pixels: int) -> tuple[int, int, int]:
    """(rows, columns, frames) from the header alone, checked as :func:`read_dicom` checks them."""
    ds = _pydicom().dcmread(path, stop_before_pixels=True, force=force)
    _syntax(name, ds)
    return _check_image(name, ds, max_pixels)


def _syntax(name: str, ds):
    """The file's transfer syntax UID (None if the file meta has none), refused if it is not one."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return None
    syntax = UID(str(syntax))
    if not syntax.is_transfer_syntax:
        raise _fail(name, f"its transfer syntax UID {str(syntax)!r} is not a DICOM transfer syntax",
                    f"the file is corrupt or privately encoded; {_CONVERT}")
    return syntax


def _check_image(name: str, ds, max_pixels: int) -> tuple[int, int, int]:
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    rows, columns, frames = _geometry(name, ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames != 1 or samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _fail(name, f"{frames} frame(s), {samples} sample(s) per pixel, "
                    f"PhotometricInterpretation {photometric or 'missing'}",
                    "only single-frame grayscale radiographs are supported")
    check_size(name, rows, columns, frames, max_pixels)
    return rows, columns, frames


def _geometry(name: str, ds) -> tuple[int, int, int]:
    if "Rows" not in ds or "Columns" not in ds:
        raise _fail(name, "the DICOM header has no Rows/Columns", "pass an image object, not a report")
    return int(ds.Rows or 0), int(ds.Columns or 0), int(ds.get("NumberOfFrames", 1) or 1)


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


def _check_header(name: str, ds, max_pixels: int) -> tuple[str | None, bool]:
    """Refuse what the header already shows is unusable; returns (transfer syntax, encapsulated)."""
    if "PixelData" not in ds:
        raise _fail(name, "the DICOM file has no pixel data", "pass an image object, not a report")
    syntax = _syntax(name, ds)
    encapsulated = syntax is not None and syntax.is_encapsulated
    rows, columns, frames = _check_image(name, ds, max_pixels)
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    if allocated not in (8, 16, 32):
        raise _fail(name, f"BitsAllocated {allocated} is not 8, 16 or 32", _CONVERT)
    if not 1 <= stored <= allocated:
        raise _fail(name, f"BitsStored {stored} does not fit BitsAllocated {allocated}", _CONVERT)
    if not encapsulated:
        expected, present = rows * columns * allocated // 8, len(ds.PixelData)
        if present < expected or present >= 2 * expected:
            raise _fail(name, f"the pixel data holds {present:,} bytes but the header ({rows}×{columns}, "
                        f"BitsAllocated {allocated}) needs {expected:,}: header and data disagree",
                        f"the file is corrupt; {_CONVERT}")
    return syntax, encapsulated


def read_dicom(name: str, data: bytes, max_pixels: int) -> tuple[np.ndarray, int, dict]:
    pydicom = _pydicom()
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    syntax, encapsulated = _check_header(name, ds, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        stored = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing codec, bad length, ...
        todo = ("install a decoder (pip install pylibjpeg pylibjpeg-libjpeg) or convert the file"
                if encapsulated else "the file may be truncated or corrupt")
        raise _fail(name, f"cannot decode the DICOM pixel data (transfer syntax {syntax}): {one_line(e)}",
                    todo) from e
    values = apply_modality_lut(stored, ds)
    values = values.astype(np.float32 if values.dtype.itemsize <= 2 else np.float64, copy=False)
    bits = int(ds.get("BitsStored", 16))
    meta = {"photometric_interpretation": photometric, "modality": _plain(ds.get("Modality")),
            "view_position": _plain(ds.get("ViewPosition")), "bits_stored": bits,
            "pixel_representation": int(ds.get("PixelRepresentation", 0)),
            "stored_range": _range(stored), "sop_instance_uid": _plain(ds.get("SOPInstanceUID")),
            "pixel_spacing": _plain(ds.get("ImagerPixelSpacing", ds.get("PixelSpacing")))}
    del stored
    if "ModalityLUTSequence" in ds:
        meta["modality_lut"] = "ModalityLUTSequence"
    else:
        meta["modality_lut"] = {"slope": float(ds.get("RescaleSlope", 1.0)),
                                "intercept": float(ds.get("RescaleIntercept", 0.0))}
    meta["modality_range"] = _range(values)
    if not np.isfinite(meta["modality_range"]).all():
        raise _fail(name, "the modality LUT / rescale gives NaN or Inf values", "check RescaleSlope/Intercept")
    if "VOILUTSequence" in ds:
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        lo, hi = float(lut.min()), float(lut.max())  # declared LUT bits often exceed its use
        out = apply_voi_lut(values, ds)
        meta["voi"] = {"kind": "lut", "output_range": [lo, hi]}
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # Ask pydicom for its own output range (it depends on bits, sign, rescale and the
        # VOI LUT function) by windowing two values far outside the window.
        wc, ww = (float(_plain(v)[0] if isinstance(_plain(v), list) else v)
                  for v in (ds.WindowCenter, ds.WindowWidth))
        with np.errstate(over="ignore"):
            probe = np.array([wc - 64 * ww, wc + 64 * ww])
            lo, hi = apply_voi_lut(probe, ds).astype(np.float64)
        out = apply_voi_lut(values, ds)
        meta["voi"] = {"kind": "window", "center": wc, "width": ww, "output_range": [lo, hi],
                       "function": str(ds.get("VOILUTFunction", "LINEAR"))}
    else:
        out, (lo, hi) = values, meta["modality_range"]
        meta["voi"] = {"kind": "minmax", "output_range": [lo, hi]}
    del values
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise _fail(name, f"the VOI LUT / window gives a non-finite output range [{lo}, {hi}]",
                    "check the file's VOI LUT / window attributes")
    out = np.asarray(out, dtype=np.float64 if hi - lo > 2**24 else np.float32)
    pixels = ((out - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros(out.shape, np.float32)
    if photometric == "MONOCHROME1":  # stored bright = air; the model expects bright = dense
        pixels = 1.0 - pixels
        meta["flipped"] = True
    return pixels, bits, meta
