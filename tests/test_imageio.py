"""prism_rt.imageio against hand-computed references (PRISM_METHOD §3)."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from prism_rt.config import Fit
from prism_rt.errors import InputImageError, MissingExtraError
from prism_rt.imageio import FitInfo, diff_heatmap, fit_to_model, load_image, save_png, to_uint, unfit

H, W = 300, 200  # portrait, like a PA chest film


def smooth_image() -> np.ndarray:
    """A gradient plus one slow wave: smooth at the scale of one model pixel (300/64 ≈ 4.7 px)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img = 0.1 + 0.4 * yy / (H - 1) + 0.2 * xx / (W - 1) + 0.1 * np.sin(2 * np.pi * yy / H)
    return img.astype(np.float32)


# ---------------------------------------------------------------- PNG / JPEG / Pillow formats


def test_png_8bit_round_trip_exact(tmp_path):
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "gray8.png"
    Image.fromarray(levels).save(path)
    src = load_image(path)
    assert (src.kind, src.bit_depth, src.path) == ("png", 8, str(path))
    assert src.pixels.dtype == np.float32 and src.pixels.shape == (16, 16)
    np.testing.assert_array_equal(src.pixels, (levels / 255.0).astype(np.float32))
    assert len(src.sha256) == 64 and src.meta["photometric_interpretation"] == "MONOCHROME2"
    json.dumps(src.meta)


def test_png_16bit_uses_full_range_not_min_max(tmp_path):
    raw = np.array([[1000, 32768], [1, 2000]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(raw).save(path)
    src = load_image(path)
    assert src.bit_depth == 16
    # Per-image min/max would map 32768 → 1.0; the full range maps it to 32768/65535.
    np.testing.assert_array_equal(src.pixels, (raw / 65535.0).astype(np.float32))
    assert src.pixels[0, 1] == np.float32(32768 / 65535)


def test_save_png_8_and_16_bit_round_trip(tmp_path):
    x8 = (np.arange(256).reshape(16, 16) / 255.0).astype(np.float32)
    save_png(tmp_path / "a.png", x8, bits=8)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png").pixels, x8)
    x16 = (np.array([[0, 1, 32768, 65535]]) / 65535.0).astype(np.float32)
    save_png(tmp_path / "b.png", x16, bits=16)
    back = load_image(tmp_path / "b.png")
    assert back.bit_depth == 16
    np.testing.assert_array_equal(back.pixels, x16)


def test_to_uint_rounds_and_clips():
    x = np.array([0.0, 0.25, 1.0, 1.2, -0.1])
    np.testing.assert_array_equal(to_uint(x, 8), np.array([0, 64, 255, 255, 0], np.uint8))  # 63.75 → 64
    out16 = to_uint(x, 16)
    assert out16.dtype == np.uint16
    np.testing.assert_array_equal(out16, [0, 16384, 65535, 65535, 0])  # 16383.75 → 16384
    with pytest.raises(ValueError, match="8 or 16"):
        to_uint(x, 12)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_is_converted_to_bt601_luminance(tmp_path, mode):
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    arr = rgb if mode == "RGB" else np.concatenate([rgb, np.full((2, 2, 1), 77, np.uint8)], axis=-1)
    path = tmp_path / f"colour_{mode}.png"
    Image.fromarray(arr, mode).save(path)
    src = load_image(path)
    expected = np.array([[0.299, 0.587], [0.114, (0.299 * 10 + 0.587 * 20 + 0.114 * 30) / 255]])
    np.testing.assert_allclose(src.pixels, expected, atol=1e-6)
    assert src.bit_depth == 8


def test_gray_with_alpha_keeps_gray(tmp_path):
    la = np.stack([np.array([[0, 51], [102, 255]], np.uint8), np.full((2, 2), 9, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(load_image(tmp_path / "la.png").pixels, [[0, 0.2], [0.4, 1.0]], atol=1e-7)


def test_int32_mode_i_scaled_as_16bit_and_out_of_range_rejected(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], np.int32), "I").save(tmp_path / "i.tiff")
    src = load_image(tmp_path / "i.tiff")
    assert src.kind == "tiff" and src.bit_depth == 16
    np.testing.assert_array_equal(src.pixels, np.float32([[0, 32768 / 65535, 1]]))
    Image.fromarray(np.array([[0, 70000]], np.int32), "I").save(tmp_path / "big.tiff")
    with pytest.raises(InputImageError, match="16-bit range"):
        load_image(tmp_path / "big.tiff")


def test_jpeg_readable(tmp_path):
    img = (np.clip(smooth_image(), 0, 1) * 255).round().astype(np.uint8)
    path = tmp_path / "film.jpg"
    Image.fromarray(img).save(path, quality=95)
    src = load_image(path)
    assert (src.kind, src.bit_depth, src.pixels.shape) == ("jpeg", 8, (H, W))
    # JPEG is lossy; at quality 95 a smooth image comes back within a few grey levels.
    assert np.abs(src.pixels - img / 255.0).max() < 4 / 255


# ---------------------------------------------------------------- DICOM


def test_real_cr_radiograph_monochrome1_is_flipped(dicom_path):
    import pydicom

    ds = pydicom.dcmread(dicom_path)
    raw = ds.pixel_array.astype(np.float64)
    src = load_image(dicom_path)
    assert src.kind == "dicom" and src.bit_depth == 15
    assert src.pixels.shape == (ds.Rows, ds.Columns) == (1955, 1841)
    assert src.pixels.dtype == np.float32 and 0.0 <= src.pixels.min() and src.pixels.max() <= 1.0
    # MONOCHROME1 stores air bright; after the flip dense = bright, i.e. anti-correlated to raw.
    assert np.corrcoef(src.pixels.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.99
    assert src.meta["photometric_interpretation"] == "MONOCHROME1" and src.meta["flipped"]
    assert src.meta["modality"] == "CR" and src.meta["view_position"] == "PA"
    assert src.meta["voi"]["kind"] == "window" and src.meta["voi"]["center"] == 15000.0
    json.dumps(src.meta)
    # Window 15000/30000 over 15-bit output [0, 32767] (no rescale), then the flip: hand-checked pixel.
    v = raw[1000, 900]
    expected = 1 - ((v - 14999.5) / 29999 + 0.5) * 32767 / 32767
    assert src.pixels[1000, 900] == pytest.approx(expected, abs=1e-6)


def _write_dicom(path, stored: np.ndarray, photometric="MONOCHROME2", **attrs):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "AP"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if stored.size:
        ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_synthetic_dicom_rescale_and_window_hand_computed(tmp_path):
    stored = np.array([[500, 1000, 1250], [1500, 250, 4095]], np.uint16)
    path = _write_dicom(tmp_path / "dx.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                        WindowCenter=1000.5, WindowWidth=2001)
    src = load_image(path)
    # Modality: 2·s − 1000 → [[0, 1000, 1500], [2000, −500, 7190]].
    # DICOM LINEAR window (PS3.3 C.11.2.1.2.1): c' = 1000, w' = 2000; x ≤ 0 → 0, x > 2000 → 1,
    # else (x − 1000)/2000 + 0.5.
    np.testing.assert_allclose(src.pixels, [[0.0, 0.5, 0.75], [1.0, 0.0, 1.0]], atol=1e-6)
    assert src.meta["modality_lut"] == {"slope": 2.0, "intercept": -1000.0}
    assert src.meta["voi"]["kind"] == "window" and src.meta["voi"]["width"] == 2001.0
    assert src.meta["photometric_interpretation"] == "MONOCHROME2" and "flipped" not in src.meta
    assert src.bit_depth == 12


def test_synthetic_monochrome1_without_window_uses_min_max_then_flips(tmp_path):
    stored = np.array([[100, 200], [300, 500]], np.uint16)
    src = load_image(_write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(src.pixels, [[1.0, 0.75], [0.5, 0.0]], atol=1e-7)
    assert src.meta["voi"] == {"kind": "minmax", "output_range": [100.0, 500.0]}


def test_dicom_multiframe_colour_and_no_pixels_rejected(tmp_path):
    multi = _write_dicom(tmp_path / "multi.dcm", np.zeros((2, 4, 4), np.uint16), NumberOfFrames=2)
    with pytest.raises(InputImageError, match="single-frame grayscale"):
        load_image(multi)
    colour = _write_dicom(tmp_path / "rgb.dcm", np.zeros((4, 4), np.uint16), photometric="RGB")
    with pytest.raises(InputImageError, match="single-frame grayscale"):
        load_image(colour)
    empty = _write_dicom(tmp_path / "sr.dcm", np.zeros((0, 0), np.uint16))
    with pytest.raises(InputImageError, match="no pixel data"):
        load_image(empty)


def test_truncated_dicom_is_input_error(tmp_path, dicom_path):
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(dicom_path.read_bytes()[:100_000])
    with pytest.raises(InputImageError, match=re.escape(str(cut))):
        load_image(cut)


def test_missing_pydicom_names_the_extra(dicom_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(MissingExtraError, match=r"prism-rt\[dicom\]"):
        load_image(dicom_path)


# ---------------------------------------------------------------- errors


def _corrupt_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n" * 20)
    png = tmp_path / "cut.png"
    Image.fromarray((smooth_image() * 255).astype(np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return {"missing": tmp_path / "nope.png", "directory": tmp_path, "text": text, "truncated": png,
            "empty": empty}


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated", "empty"])
def test_unreadable_inputs_raise_input_error_naming_the_path(tmp_path, case):
    path = _corrupt_files(tmp_path)[case]
    with pytest.raises(InputImageError, match=re.escape(str(path))) as err:
        load_image(path)
    hint = {"missing": "no such file", "directory": "directory", "text": "cannot identify image file",
            "truncated": "truncated", "empty": "empty"}[case]
    assert hint in str(err.value)


# ---------------------------------------------------------------- fit / unfit


@pytest.mark.parametrize("mode", [Fit.RESIZE, Fit.CROP, Fit.PAD, "resize", "CROP"])
def test_fit_output_contract(mode):
    x, info = fit_to_model(smooth_image(), 64, mode)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x[0], x[1])
    np.testing.assert_array_equal(x[0], x[2])
    assert (info.orig_height, info.orig_width, info.size) == (H, W, 64)
    assert json.loads(json.dumps(info.to_json()))["box"] == list(info.box)


def test_fit_maps_0_half_1_to_minus1_0_plus1():
    for value, expected in [(0.0, -1.0), (0.5, 0.0), (1.0, 1.0)]:
        x, _ = fit_to_model(np.full((H, W), value, np.float32), 32)
        np.testing.assert_allclose(x, expected, atol=1e-6)


def test_fit_rejects_unknown_mode():
    with pytest.raises(ValueError, match="not one of"):
        fit_to_model(smooth_image(), 64, "zoom")


def test_resize_stretches_whole_image():
    img = smooth_image()
    x, info = fit_to_model(img, 64, Fit.RESIZE)
    assert info.box == (0, 0, H, W) and info.mode == "resize"
    # Nothing cropped: the first and last output rows still show the film's top and bottom.
    assert abs((x[0, 0].mean() + 1) / 2 - img[:5].mean()) < 0.01
    assert abs((x[0, -1].mean() + 1) / 2 - img[-5:].mean()) < 0.01


def test_crop_keeps_the_centre_square():
    img = smooth_image()
    x, info = fit_to_model(img, W, Fit.CROP)  # model size = crop size: no resampling, exact
    assert info.box == (50, 0, 200, 200)
    np.testing.assert_allclose((x[0] + 1) / 2, img[50:250], atol=1e-6)


def test_pad_keeps_aspect_ratio_with_border_mean():
    img = np.full((H, W), 0.8, np.float32)
    img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = 0.2  # a 1-px dark frame: border mean 0.2
    x, info = fit_to_model(img, H, Fit.PAD)  # model size = padded size: exact
    assert info.box == (0, 50, H, W) and info.pad_value == pytest.approx(0.2)
    y = (x[0] + 1) / 2
    np.testing.assert_allclose(y[:, :50], 0.2, atol=1e-6)
    np.testing.assert_allclose(y[:, 250:], 0.2, atol=1e-6)
    np.testing.assert_allclose(y[:, 50:250], img, atol=1e-6)
    # At 60 px the bright region is 60·(298/300) tall and 60·(198/300) wide: 1.5:1 kept.
    small = (fit_to_model(img, 60, Fit.PAD)[0][0] + 1) / 2
    bright = small > 0.5
    assert abs(bright.any(axis=1).sum() - 60 * 298 / 300) <= 1.5
    assert abs(bright.any(axis=0).sum() - 60 * 198 / 300) <= 1.5


# Tolerances: bicubic down to 64 px and back up reproduces a smooth image up to interpolation
# error; measured ≈ 0.002 for this image. 0.01 (2.5 grey levels of 8 bits) is the bound: a bug
# that shifts the image by one model pixel changes values by ≥ 0.03 here and fails it.
TOL = 0.01


def test_unfit_resize_round_trip():
    img = smooth_image()
    x, info = fit_to_model(img, 64, Fit.RESIZE)
    back = unfit(x, info)
    assert back.shape == (H, W) and back.dtype == np.float32
    assert np.abs(back - img).max() < TOL


def test_unfit_crop_returns_only_the_crop_box():
    img = smooth_image()
    x, info = fit_to_model(img, 64, Fit.CROP)
    back = unfit(x, info)
    top, left, h, w = info.box
    assert back.shape == (h, w) == (200, 200)
    assert np.abs(back - img[top:top + h, left:left + w]).max() < TOL


def test_unfit_pad_round_trip_and_2d_input():
    img = smooth_image()
    x, info = fit_to_model(img, 64, Fit.PAD)
    back = unfit(x[0], info)  # a single-channel [S, S] output is accepted too
    assert back.shape == (H, W)
    # Near the left/right seams the pad value blurs in over about two model pixels (2 · 300/64 ≈
    # 10 px); away from them the usual interpolation tolerance holds.
    assert np.abs(back - img)[:, 10:-10].max() < TOL
    assert np.abs(back - img).mean() < 0.005


def test_unfit_rejects_non_square():
    info = FitInfo("resize", H, W, 64, (0, 0, H, W), 0.0)
    with pytest.raises(ValueError, match="square"):
        unfit(np.zeros((3, 64, 32), np.float32), info)


# ---------------------------------------------------------------- diff heatmap

BLUE_END, RED_END = (5, 48, 97), (103, 0, 31)


def test_heatmap_zero_difference_is_white_and_has_colour_bar():
    ref = smooth_image()
    out = diff_heatmap(ref, ref.copy())
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[0] == H and out.shape[1] > W
    assert out[:, :W].min() >= 250
    bar = out[:, W:].astype(int)
    assert ((bar[..., 0] - bar[..., 2]) > 60).any() and ((bar[..., 2] - bar[..., 0]) > 60).any()
    assert (bar.max(axis=-1) < 60).sum() > 20  # dark pixels: frame, ticks and tick labels


def test_heatmap_sign_red_positive_blue_negative():
    ref = np.full((20, 30), 0.5, np.float32)
    pos = diff_heatmap(ref + 0.1, ref)[:, :30].astype(int)
    neg = diff_heatmap(ref - 0.1, ref)[:, :30].astype(int)
    assert (pos[..., 0] > pos[..., 2] + 50).all() and (pos[..., 0] > pos[..., 1] + 50).all()
    assert (neg[..., 2] > neg[..., 0] + 50).all()


def test_heatmap_difference_is_signed_even_for_uint8_inputs():
    # The published code subtracted uint8 images: 0 − 255 wrapped round to +1, a faint "brightening".
    zeros, ones = np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)
    for edited, reference in [(zeros, ones), (zeros.astype(float), ones / 255.0)]:
        out = diff_heatmap(edited, reference)
        assert out.shape[0] == 8 and out.shape[1] > 8
        np.testing.assert_array_equal(out[:, :8], np.broadcast_to(BLUE_END, (8, 8, 3)))
    np.testing.assert_array_equal(diff_heatmap(ones, zeros)[:, :8], np.broadcast_to(RED_END, (8, 8, 3)))


def test_heatmap_limit_explicit_and_default_percentile():
    ref = np.zeros((100, 100), np.float32)
    half = diff_heatmap(ref + 0.05, ref, limit=0.1)[:, :100]
    np.testing.assert_array_equal(half[0, 0], (214, 96, 77))  # Δ = limit/2 → 3/4 along the map
    edited = ref + 0.01
    edited[0, 0] = 0.9  # one outlier must not set the scale (99.5th percentile of |Δ| = 0.01)
    out = diff_heatmap(edited, ref)[:, :100]
    np.testing.assert_array_equal(out[50, 50], RED_END)
    # The floor: a Δ of half a grey level is drawn against ±1/255, not stretched to full red.
    tiny = diff_heatmap(ref + 0.5 / 255, ref)[:, :100]
    np.testing.assert_array_equal(tiny[0, 0], (214, 96, 77))


def test_heatmap_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="one shape"):
        diff_heatmap(np.zeros((4, 4)), np.zeros((4, 5)))


# ---------------------------------------------------------------- hostile input (issue 29)


def test_a_huge_png_is_refused_from_its_header_fast(tmp_path):
    import time

    from prism_rt.imageio import probe_image

    path = tmp_path / "huge.png"
    Image.new("L", (12000, 12000)).save(path)  # ~140 KB on disk, 144 M pixels
    start = time.perf_counter()
    for check in (load_image, probe_image):
        with pytest.raises(InputImageError, match=r"12000×12000 pixels = 144,000,000 exceeds the limit of "
                                                  r"50,000,000 pixels.*--max-pixels") as err:
            check(path)
        assert str(path) in str(err.value)
    assert time.perf_counter() - start < 2.0
    with pytest.raises(InputImageError, match="limit of 1,000"):
        load_image(_write_small_png(tmp_path), max_pixels=1000)
    assert load_image(_write_small_png(tmp_path), max_pixels=W * H).pixels.shape == (H, W)


def _write_small_png(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray((smooth_image() * 255).astype(np.uint8)).save(path)
    return path


def test_probe_image_reads_the_header_only(tmp_path, dicom_path):
    from prism_rt.imageio import probe_image

    header = probe_image(_write_small_png(tmp_path))
    assert (header.kind, header.height, header.width, header.frames) == ("png", H, W, 1)
    header = probe_image(dicom_path)
    assert (header.kind, header.height, header.width) == ("dicom", 1955, 1841)
    with pytest.raises(InputImageError, match="exceeds the limit"):
        probe_image(dicom_path, max_pixels=1_000_000)


def _patch_syntax(path, uid: str):
    """Rewrite the transfer syntax UID in the file's bytes (pydicom will not write a bogus one)."""
    import struct

    data = path.read_bytes()
    at = data.find(b"\x02\x00\x10\x00UI", 132)
    old = struct.unpack("<H", data[at + 6:at + 8])[0]
    value = uid.encode() + b"\0" * (len(uid) % 2)
    data = data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + old:]
    group = data.find(b"\x02\x00\x00\x00UL", 132)
    length = struct.unpack("<I", data[group + 8:group + 12])[0] + len(value) - old
    path.write_bytes(data[:group + 8] + struct.pack("<I", length) + data[group + 12:])
    return path


@pytest.mark.parametrize("case, message", [
    ("not-a-syntax", r"transfer syntax UID '1\.2\.840\.10008\.5\.1\.4\.1\.1\.1' is not a DICOM transfer syntax"),
    ("unknown-vr", r"Unknown Value Representation 'QQ'"),
    ("8-bit-header", r"pixel data holds 2,400 bytes but the header \(40×30, BitsAllocated 8\) needs 1,200"),
    ("too-large", r"30×40 pixels = 1,200 exceeds the limit of 1,000 pixels"),
    ("bits-stored", r"BitsStored 17 does not fit BitsAllocated 16"),
])
def test_hostile_dicom_headers_are_one_typed_line(tmp_path, case, message):
    stored = np.arange(1200, dtype=np.uint16).reshape(40, 30)
    path = tmp_path / f"{case}.dcm"
    if case == "8-bit-header":  # 16-bit pixels under an 8-bit header
        _write_dicom(path, stored, BitsAllocated=8, BitsStored=8, HighBit=7)
    elif case == "bits-stored":
        _write_dicom(path, stored, BitsStored=17, HighBit=16)
    else:
        _write_dicom(path, stored)
    if case == "not-a-syntax":
        _patch_syntax(path, "1.2.840.10008.5.1.4.1.1.1")  # a SOP class UID, not a transfer syntax
    elif case == "unknown-vr":
        data = path.read_bytes()
        at = data.find(b"\x28\x00\x02\x00US")  # SamplesPerPixel
        path.write_bytes(data[:at + 4] + b"QQ" + data[at + 6:])
    with pytest.raises(InputImageError, match=message) as err:
        load_image(path, max_pixels=1000 if case == "too-large" else 50_000_000)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text


def test_no_warning_or_stray_output_escapes_a_bad_dicom(tmp_path, capfd):
    import warnings

    path = _patch_syntax(_write_dicom(tmp_path / "j.dcm", np.zeros((4, 4), np.uint16)), "1.2.840.10008.1.2.4.50")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputImageError, match=r"j\.dcm: .*(decode|pixel data)"):
            load_image(path)
    out, err = capfd.readouterr()
    assert out == err == ""


def test_large_image_is_converted_without_float64_copies(tmp_path):
    """16-bit pixels go straight to float32: no full-size 8-byte copy (the old path held two)."""
    import tracemalloc

    path = tmp_path / "big16.png"
    Image.fromarray(np.full((2000, 2500), 1234, np.uint16)).save(path)
    tracemalloc.start()
    src = load_image(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert src.pixels.dtype == np.float32 and src.pixels[0, 0] == np.float32(1234 / 65535)
    assert peak < 2000 * 2500 * 9, f"peak {peak / 1e6:.0f} MB"  # uint16 + float32 + slack, no 8-byte copy
