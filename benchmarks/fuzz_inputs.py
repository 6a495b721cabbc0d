"""Fuzz prism_rt.imageio.load_image with mutated PNG, JPEG and DICOM files (run by hand).

Small valid files are made here (and a 32×32 DICOM carrying the header of pydicom-data's real CR
radiograph RG1_UNCR.dcm, when installed), then mutated: bytes flipped, overwritten, inserted,
duplicated or cut off; PNG header fields rewritten with valid CRCs (so the decoder gets past the
checksum); DICOM header fields rewritten (transfer syntax UID, VRs, BitsAllocated/BitsStored,
Rows/Columns, frames, photometric interpretation, window, rescale, pixel data removed).

The contract checked: ``load_image`` loads the file or raises a ``PrismError`` subclass with one
line naming the file; any other exception is a bug and is counted as ``UNTYPED``.

    python benchmarks/fuzz_inputs.py --count 5000 --seed 1

prints the count per outcome and the slowest files, and exits 1 if anything was untyped.
tests/test_fuzz.py runs a few hundred of the same mutants.
"""
from __future__ import annotations

import argparse
import io
import random
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

_VRS = [b"US", b"UI", b"DS", b"CS", b"IS", b"OW", b"OB", b"LO", b"SH", b"DA", b"TM", b"PN", b"UL", b"SQ"]
_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
             "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
             "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "", "not-a-uid", "1." + "9" * 60]


def _dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _synthetic_dicom(stored: np.ndarray, syntax: str, photometric: str = "MONOCHROME2", **attrs):
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, attrs.pop("BitsStored", bits), attrs.pop("HighBit", bits - 1)
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    return ds


def seed_files() -> dict[str, bytes]:
    """Small valid inputs of every kind load_image reads, by name."""
    from PIL import Image

    yy, xx = np.mgrid[0:40, 0:32]
    gray = ((yy * 5 + xx * 3) % 256).astype(np.uint8)
    seeds = {}
    for name, array, fmt in [("gray8.png", gray, "PNG"), ("gray16.png", gray.astype(np.uint16) * 257, "PNG"),
                             ("rgb.png", np.stack([gray, gray[::-1], 255 - gray], -1), "PNG"),
                             ("gray.jpg", gray, "JPEG"), ("rgb.jpg", np.stack([gray, 255 - gray, gray], -1), "JPEG")]:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        seeds[name] = buffer.getvalue()
    stored = (gray.astype(np.uint16) * 16)
    seeds["dx.dcm"] = _dicom_bytes(_synthetic_dicom(stored, "1.2.840.10008.1.2.1", BitsStored=12, HighBit=11,
                                                    WindowCenter=2048, WindowWidth=4096, RescaleSlope=1,
                                                    RescaleIntercept=0))
    seeds["m1-implicit.dcm"] = _dicom_bytes(_synthetic_dicom(stored, "1.2.840.10008.1.2", "MONOCHROME1"))
    seeds["signed8.dcm"] = _dicom_bytes(_synthetic_dicom(gray.astype(np.int8), "1.2.840.10008.1.2.1",
                                                         RescaleSlope=2, RescaleIntercept=-100))
    real = _rg1_uncr()
    if real is not None:
        import pydicom

        ds = pydicom.dcmread(real)
        crop = ds.pixel_array[1000:1032, 900:932].astype(ds.pixel_array.dtype)
        ds.Rows, ds.Columns = crop.shape
        ds.PixelData = crop.tobytes()
        seeds["rg1-header.dcm"] = _dicom_bytes(ds)
    return seeds


def _rg1_uncr() -> Path | None:
    try:
        from pydicom_data import data_store
    except ImportError:
        return None
    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    return path if path.is_file() else None


# ---------------------------------------------------------------- mutations


def _bytes_mutation(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.choice(["flip", "overwrite", "insert", "duplicate", "truncate", "zero"])
    at = rng.randrange(len(b))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        n = rng.randint(1, 16)
        b[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
    elif kind == "insert":
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "duplicate":
        n = rng.randint(1, 256)
        b[at:at] = b[at:at + n]
    elif kind == "truncate":
        del b[at:]
    else:
        b[at:at + rng.randint(1, 64)] = bytes(min(64, len(b) - at))
    return bytes(b)


def _png_header_mutation(data: bytes, rng: random.Random) -> bytes:
    """Rewrite IHDR fields (size, bit depth, colour type, interlace) and fix the CRC."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return _bytes_mutation(data, rng)
    ihdr = bytearray(data[16:29])
    field = rng.choice(["width", "height", "both", "depth", "colour", "interlace", "byte"])
    big = [0, 1, 7, 255, 7071, 12000, 65535, 2**31 - 1, rng.randrange(2**32)]
    if field in ("width", "both"):
        ihdr[0:4] = struct.pack(">I", rng.choice(big))
    if field in ("height", "both"):
        ihdr[4:8] = struct.pack(">I", rng.choice(big))
    if field == "depth":
        ihdr[8] = rng.choice([0, 1, 2, 4, 8, 16, 32, 255])
    elif field == "colour":
        ihdr[9] = rng.choice([0, 1, 2, 3, 4, 6, 7, 255])
    elif field == "interlace":
        ihdr[12] = rng.choice([0, 1, 2])
    elif field == "byte":
        ihdr[rng.randrange(13)] = rng.randrange(256)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


def _set_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Rewrite (0002,0010) in the explicit-VR file meta and its group length, bytes only: pydicom
    will not write a compressed syntax over native pixel data."""
    at = data.find(b"\x02\x00\x10\x00UI", 132)
    if at < 0:
        return data
    old_len = struct.unpack("<H", data[at + 6:at + 8])[0]
    value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
    out = data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + old_len:]
    group = out.find(b"\x02\x00\x00\x00UL", 132)
    if group >= 0:
        length = struct.unpack("<I", out[group + 8:group + 12])[0] + len(value) - old_len
        out = out[:group + 8] + struct.pack("<I", max(length, 0)) + out[group + 12:]
    return out


def _dicom_header_mutation(data: bytes, rng: random.Random) -> bytes:
    import pydicom

    kind = rng.choice(["syntax", "vr", "field", "field", "field", "drop-pixels"])
    if kind == "syntax":
        return _set_transfer_syntax(data, rng.choice(_SYNTAXES))
    if kind == "vr":
        spots = [i for vr in _VRS for i in _find_all(data, vr) if i >= 132]
        if not spots:
            return _bytes_mutation(data, rng)
        at = rng.choice(spots)
        new = rng.choice(_VRS + [bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))])
        return data[:at] + new + data[at + 2:]
    try:  # an earlier mutation may have left nothing pydicom can read or write back
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            if kind == "drop-pixels":
                del ds.PixelData
            else:
                name, values = rng.choice(_FIELDS)
                setattr(ds, name, rng.choice(values))
            return _dicom_bytes(ds)
    except Exception:  # noqa: BLE001 - mutate the bytes instead
        return _bytes_mutation(data, rng)


_FIELDS = [("BitsAllocated", [0, 1, 8, 12, 16, 32, 64]), ("BitsStored", [0, 1, 8, 12, 16, 17, 33]),
           ("HighBit", [0, 7, 15, 31, 40]), ("Rows", [0, 1, 3, 40, 7000, 65535]),
           ("Columns", [0, 1, 5, 32, 7000, 65535]), ("NumberOfFrames", [0, 1, 2, 1000]),
           ("PhotometricInterpretation", ["MONOCHROME1", "RGB", "PALETTE COLOR", "", "YBR_FULL"]),
           ("SamplesPerPixel", [0, 1, 3]), ("PixelRepresentation", [0, 1, 2]),
           ("WindowWidth", [0, -1, 1e-30, 1e30]), ("WindowCenter", [0, -1e30, 1e30]),
           ("RescaleSlope", [0, -1, 1e-30, 1e300]), ("RescaleIntercept", [-1e300, 0, 1e300]),
           ("VOILUTFunction", ["SIGMOID", "LINEAR_EXACT", "BOGUS"])]


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, at = [], data.find(needle)
    while at >= 0:
        out.append(at)
        at = data.find(needle, at + 1)
    return out


def mutants(seeds: dict[str, bytes], count: int, seed: int):
    """``count`` (name, bytes) pairs, reproducible from ``seed``: one to three mutations each."""
    rng = random.Random(seed)
    names = sorted(seeds)
    for k in range(count):
        name = names[k % len(names)]
        data = seeds[name]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            if not data:
                break
            if name.endswith(".dcm") and rng.random() < 0.6:
                data = _dicom_header_mutation(data, rng)
            elif name.endswith(".png") and rng.random() < 0.4:
                data = _png_header_mutation(data, rng)
            else:
                data = _bytes_mutation(data, rng)
        yield f"{k:05d}-{name}", data


def outcome(path: Path, max_pixels: int | None = None) -> tuple[str, str]:
    """(outcome, message): "loaded", the PrismError subclass's name, or "UNTYPED …" / "BAD MESSAGE …"."""
    from prism_rt.errors import PrismError
    from prism_rt.imageio import DEFAULT_MAX_PIXELS, load_image

    try:
        load_image(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    except PrismError as exc:
        message = str(exc)
        if "\n" in message or str(path) not in message:
            return f"BAD MESSAGE {type(exc).__name__}", message
        return type(exc).__name__, message
    except Exception as exc:  # noqa: BLE001 - the bug this looks for
        return f"UNTYPED {type(exc).__name__}", f"{type(exc).__name__}: {exc}"
    return "loaded", ""


def run(count: int, seed: int, folder: Path, max_pixels: int | None = None) -> tuple[Counter, list]:
    """Write and load ``count`` mutants; returns the counts per outcome and (seconds, name, outcome, message) per file."""
    counts, rows = Counter(), []
    for name, data in mutants(seed_files(), count, seed):
        path = folder / name
        path.write_bytes(data)
        start = time.perf_counter()
        result, message = outcome(path, max_pixels)
        rows.append((time.perf_counter() - start, name, result, message))
        counts[result] += 1
        if not (result.startswith("UNTYPED") or result.startswith("BAD")):
            path.unlink()  # keep only the files that show a bug
    return counts, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the failing files in")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="prism-fuzz-"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts, rows = run(args.count, args.seed, folder, args.max_pixels)
    wall = time.perf_counter() - start
    print(f"{args.count} mutants, seed {args.seed}, {wall:.1f} s ({1e3 * wall / max(args.count, 1):.1f} ms a file)")
    for result, n in counts.most_common():
        print(f"  {n:6d}  {result}")
    print("slowest:")
    for seconds, name, result, _ in sorted(rows, reverse=True)[:5]:
        print(f"  {seconds * 1e3:8.1f} ms  {name}  {result}")
    bad = [r for r in rows if r[2].startswith(("UNTYPED", "BAD"))]
    for _, name, result, message in bad[:20]:
        print(f"  {result}: {folder / name}: {message}")
    if bad:
        print(f"{len(bad)} file(s) broke the contract; kept in {folder}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
