"""DICOM twins of the counterfactuals (prism_rt.dicom_out): tags, pixels, label, anonymization,
errors, and one end-to-end `prism-rt edit` on the bundled phantom engine."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from prism_rt.dicom_out import SYNTHETIC, DicomOptions, DicomSeries, label_box, write_dicom  # noqa: E402
from prism_rt.errors import InputImageError, OutputError  # noqa: E402
from prism_rt.imageio import load_image  # noqa: E402
from prism_rt.version import __version__  # noqa: E402

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
PROVENANCE = {"source_prompt": "Chest X-ray showing No Finding, Support Devices",
              "target": "Chest X-ray showing No Finding", "inversion": "direct", "self_replace": 0.5,
              "model_path": "engines/phantom-demo", "engine_hash": "ab" * 32}
IDENTITY = {"PatientName": "Doe^Jane", "PatientID": "MRN-4711", "PatientBirthDate": "19400305", "PatientSex": "F",
            "AccessionNumber": "ACC-99", "InstitutionName": "General Hospital", "ReferringPhysicianName": "Who^Dr",
            "StudyID": "S-17", "StudyDate": "20240102", "StudyTime": "101500", "OtherPatientIDs": "OTHER-1"}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_dicom(path, stored: np.ndarray, photometric: str, bits: int, **attrs):
    """A single-frame DX object as a modality would write it, with identity and spacing."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), generate_uid(), 3
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelSpacing, ds.ImagerPixelSpacing = [0.148, 0.148], [0.139, 0.139]
    for key, value in {**IDENTITY, **attrs}.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(rows=120, columns=96, top=65535) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns]
    return np.rint((0.5 + 0.45 * np.sin(x / 9.0) * np.cos(y / 13.0)) * top).astype(np.uint16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, request):
    """name → path: the real CR chest (MONOCHROME1, 15 bits, window), a 16-bit MONOCHROME2 with a
    window, a 12-bit MONOCHROME1 with neither window nor patient orientation."""
    from conftest import rg1_uncr_path

    folder = tmp_path_factory.mktemp("dicom-sources")
    return {
        "rg1-cr-monochrome1": rg1_uncr_path(),
        "dx-monochrome2-16bit": _make_dicom(folder / "m2.dcm", _ramp(), "MONOCHROME2", 16, WindowCenter=30000,
                                            WindowWidth=50000, PatientOrientation=["L", "F"]),
        "dx-monochrome1-12bit": _make_dicom(folder / "m1.dcm", _ramp(top=4095), "MONOCHROME1", 12),
    }


def _counterfactual(pixels: np.ndarray) -> np.ndarray:
    """A fabricated edit: a visible, smooth change of the source."""
    y, x = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]]
    bump = 0.2 * np.exp(-(((y - pixels.shape[0] / 2) / (pixels.shape[0] / 6)) ** 2
                          + ((x - pixels.shape[1] / 2) / (pixels.shape[1] / 6)) ** 2))
    return np.clip(pixels * 0.9 + bump, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def twins(sources, tmp_path_factory):
    """name → (source path, counterfactual, {variant: twin path}), written once per module."""
    folder = tmp_path_factory.mktemp("twins")
    out = {}
    for name, path in sources.items():
        before = _sha(path)
        source = load_image(path)
        edited = _counterfactual(source.pixels)
        written = {}
        for variant, options in {"label": DicomOptions(), "plain": DicomOptions(label=False),
                                 "anonymous": DicomOptions(anonymize=True)}.items():
            written[variant] = write_dicom(folder / f"{name}-{variant}.dcm", path, edited, PROVENANCE, options,
                                           sha256=source.sha256)
        assert _sha(path) == before, "writing the twins changed the source file"
        out[name] = (path, edited, written)
    return out


NAMES = ["rg1-cr-monochrome1", "dx-monochrome2-16bit", "dx-monochrome1-12bit"]


@pytest.mark.parametrize("name", NAMES)
def test_twin_is_a_marked_synthetic_secondary_capture_beside_the_source(twins, name):
    path, edited, written = twins[name]
    src = pydicom.dcmread(path, stop_before_pixels=True)
    ds = pydicom.dcmread(written["label"])
    assert ds.SOPClassUID == SC and ds.file_meta.MediaStorageSOPClassUID == SC
    assert ds.SOPInstanceUID != src.SOPInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert ds.SeriesDescription.startswith(SYNTHETIC) and SYNTHETIC == "SYNTHETIC – NOT FOR DIAGNOSTIC USE"
    for part in (PROVENANCE["source_prompt"], PROVENANCE["target"], "inversion direct", "self-window 0.5",
                 PROVENANCE["engine_hash"], PROVENANCE["model_path"]):
        assert part in ds.DerivationDescription
    (ref,) = ds.SourceImageSequence
    assert ref.ReferencedSOPClassUID == src.SOPClassUID and ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    (purpose,) = ref.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "121322", "DCM", "Source image for image processing operation")
    ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "prism_rt"]
    assert len(ours) == 1 and ours[0].SoftwareVersions == __version__
    assert ds.BurnedInAnnotation == "YES"
    # geometry and photometry of the input
    assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns) == edited.shape
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):  # copied where valid; RG1_UNCR's is 0\0
        valid = keyword in src and all(float(v) > 0 for v in src.get(keyword))
        assert ds.get(keyword) == (src.get(keyword) if valid else None)
    if name == "dx-monochrome2-16bit":
        assert [float(v) for v in ds.ImagerPixelSpacing] == [0.139, 0.139]
    assert ds.BitsAllocated == 16 and ds.BitsStored == src.BitsStored and ds.HighBit == src.BitsStored - 1
    assert ds.PhotometricInterpretation == src.PhotometricInterpretation
    assert float(ds.WindowWidth) == 2**src.BitsStored and float(ds.WindowCenter) == 2 ** (src.BitsStored - 1)
    assert ds.pixel_array.max() <= 2**src.BitsStored - 1
    # the object belongs to that patient
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert str(ds.get(keyword)) == str(src.get(keyword))
    assert "PatientIdentityRemoved" not in ds


@pytest.mark.parametrize("name", NAMES)
def test_pixels_round_trip_within_one_step_outside_the_label(twins, name):
    path, edited, written = twins[name]
    step = 1.0 / (2 ** int(pydicom.dcmread(path, stop_before_pixels=True).BitsStored) - 1)
    back = load_image(written["label"]).pixels  # through the reader: MONOCHROME1 flipped, window applied
    top, left, bottom, right = label_box(*edited.shape)
    outside = np.ones(edited.shape, bool)
    outside[top:bottom, left:right] = False
    assert np.abs(back - edited)[outside].max() <= step + 1e-6
    box = back[top:bottom, left:right]
    assert (box > 0.99).mean() > 0.5 and (box < 0.01).mean() > 0.05, "a white box with black text"
    assert (bottom - top) >= 0.03 * edited.shape[0], "the label is large enough to read"


@pytest.mark.parametrize("name", NAMES)
def test_label_off_leaves_pixels_untouched(twins, name):
    path, edited, written = twins[name]
    step = 1.0 / (2 ** int(pydicom.dcmread(path, stop_before_pixels=True).BitsStored) - 1)
    ds = pydicom.dcmread(written["plain"])
    assert ds.BurnedInAnnotation == "NO"
    assert np.abs(load_image(written["plain"]).pixels - edited).max() <= step + 1e-6


def _strings(ds):
    for element in ds.iterall():
        if element.VR == "SQ":
            continue
        values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
        yield from (str(v) for v in values)


@pytest.mark.parametrize("name", NAMES)
def test_anonymize_removes_identity_and_links(twins, name):
    path, _, written = twins[name]
    src = pydicom.dcmread(path, stop_before_pixels=True)
    ds = pydicom.dcmread(written["anonymous"])
    assert ds.PatientIdentityRemoved == "YES" and "PS3.15" in ds.DeidentificationMethod
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime", "ContentDate", "ContentTime"):
        assert not str(ds.get(keyword) or ""), keyword
    for keyword in ("InstitutionName", "OtherPatientIDs", "InstanceCreationDate", "DateOfSecondaryCapture",
                    "SeriesDate"):
        assert keyword not in ds, keyword
    # a new study, and no UID that leads back to the original
    assert ds.StudyInstanceUID != src.StudyInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID != src.SOPInstanceUID
    secrets = {str(src.get(k)) for k in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                                          "InstitutionName", "OtherPatientIDs", "StudyDate", "SOPInstanceUID",
                                          "StudyInstanceUID", "SeriesInstanceUID", "StationName", "DeviceSerialNumber")
               if src.get(k)}
    assert not secrets & set(_strings(ds))
    assert ds.SeriesDescription.startswith(SYNTHETIC) and ds.BurnedInAnnotation == "YES"


def test_one_series_per_folder_one_instance_per_image(sources, tmp_path):
    path = sources["dx-monochrome2-16bit"]
    edited = _counterfactual(load_image(path).pixels)
    series = DicomSeries(path)
    a = pydicom.dcmread(series.write(tmp_path / "a.dcm", edited, PROVENANCE, 1), stop_before_pixels=True)
    b = pydicom.dcmread(series.write(tmp_path / "b.dcm", edited, PROVENANCE, 2), stop_before_pixels=True)
    c = pydicom.dcmread(DicomSeries(path).write(tmp_path / "c.dcm", edited, PROVENANCE), stop_before_pixels=True)
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != c.SeriesInstanceUID
    assert len({a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID}) == 3
    assert (a.InstanceNumber, b.InstanceNumber) == (1, 2)


def test_errors_are_typed_and_one_line(sources, tmp_path):
    path = sources["dx-monochrome2-16bit"]
    edited = _counterfactual(load_image(path).pixels)
    cases = [
        (InputImageError, lambda: DicomSeries(tmp_path / "gone.dcm")),
        (InputImageError, lambda: DicomSeries(path, sha256="0" * 64)),  # the source changed since the edit
        (OutputError, lambda: write_dicom(tmp_path / "x.dcm", path, np.full((4, 4, 3), 0.5), PROVENANCE)),
        (OutputError, lambda: write_dicom(tmp_path / "x.dcm", path, np.full(edited.shape, np.nan), PROVENANCE)),
        (OutputError, lambda: write_dicom(tmp_path / "no" / "such" / "x.dcm", path, edited, PROVENANCE)),
    ]
    no_uid = pydicom.dcmread(path)
    del no_uid.StudyInstanceUID
    cases.append((InputImageError, lambda: DicomSeries(no_uid)))
    for kind, call in cases:
        with pytest.raises(kind) as info:
            call()
        assert "\n" not in str(info.value) and str(info.value)


def test_cli_edit_writes_dicom_twins_and_png_provenance(dicom_path, tmp_path):
    from PIL import Image

    from prism_rt.cli import main

    argv = ["edit", "--model", "engines/phantom-demo", "--image", str(dicom_path), "--prompt",
            "Chest X-ray showing No Finding, Support Devices", "--target", "Chest X-ray showing No Finding",
            "--steps", "4", "--self-replace", "0.5", "--threads", "1", "--no-progress", "--no-figure"]
    before = _sha(dicom_path)
    assert main(argv + ["--out", str(tmp_path / "on")]) == 0
    out = tmp_path / "on"
    ds = pydicom.dcmread(out / "edit-1-s0.50.dcm")
    assert ds.SOPClassUID == SC and ds.SeriesDescription.startswith(SYNTHETIC)
    assert "'Chest X-ray showing No Finding'" in ds.DerivationDescription and "engines/phantom-demo" in \
        ds.DerivationDescription
    record = json.loads((out / "result.json").read_text())
    assert "edit-1-s0.50.dcm" in record["files"] and record["items"][0]["files"]["dicom"] == "edit-1-s0.50.dcm"
    with Image.open(out / "edit-1-s0.50.png") as png:
        text = dict(png.text)
    assert text["Warning"] == SYNTHETIC and text["Source"] == f"sha256:{before}"
    provenance = json.loads(text["prism_rt:provenance"])
    assert provenance["target"] == "Chest X-ray showing No Finding" and provenance["engine_hash"]
    assert provenance["settings"] == json.loads(json.dumps(record["settings"]))
    assert main(argv + ["--out", str(tmp_path / "off"), "--dicom-out", "off"]) == 0
    assert not list((tmp_path / "off").glob("*.dcm")) and (tmp_path / "off" / "edit-1-s0.50.png").is_file()
    assert _sha(dicom_path) == before


def test_write_edit_outputs_twins_each_png_and_its_selected_copy(dicom_path, tmp_path):
    """write_edit_outputs on a fabricated result: a twin per edit PNG, selected-K.dcm the chosen
    twin (the same SOP instance), --anonymize keeps the source's path and UID out of result.json."""
    from types import SimpleNamespace

    from prism_rt.config import InversionConfig, InversionMethod, SamplerConfig
    from prism_rt.imageio import FitInfo
    from prism_rt.inversion import Inversion
    from prism_rt.outputs import write_edit_outputs

    source = load_image(dicom_path)
    rows, columns = source.pixels.shape
    fit = FitInfo("resize", rows, columns, 16, (0, 0, rows, columns), 0.0).to_json()
    meta = {"fit": fit, "source_image": {"path": str(dicom_path), "kind": "dicom", "sha256": source.sha256,
                                          "bit_depth": source.bit_depth, **source.meta},
            "model": {"path": "engines/phantom-demo", "provenance": {"engine_sha256": {"unet": "00" * 32}}}}
    inversion = Inversion(method=InversionMethod.DIRECT, source_prompt="a chest x-ray", sampler=SamplerConfig(steps=2),
                          config=InversionConfig(method=InversionMethod.DIRECT), meta=meta,
                          trajectory=np.zeros((3, 1, 4, 2, 2), np.float32),
                          fitted_pixels=np.zeros((3, 16, 16), np.float32))
    rng = np.random.default_rng(0)
    items = [SimpleNamespace(name=f"edit-1-s0.{k}0", target="a clear chest x-ray", self_replace=k / 10,
                             blend_threshold=None, composite=None) for k in (4, 6)]
    result = SimpleNamespace(items=items, edits=[rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32) for _ in items],
                             reconstruction=np.zeros((3, 16, 16), np.float32), reconstruction_error=0.0,
                             plan_words=[["clear"]], timings={}, counts={}, settings={},
                             item_stats=lambda: [{"name": i.name} for i in items])
    out = tmp_path / "out"
    write_edit_outputs(out, result, inversion, {}, selection=[{"selected_item": "edit-1-s0.60"}],
                       dicom=DicomOptions(anonymize=True))
    record = json.loads((out / "result.json").read_text())
    assert {p.name for p in out.iterdir()} == set(record["files"]) == {
        "edit-1-s0.40.png", "edit-1-s0.40.dcm", "edit-1-s0.60.png", "edit-1-s0.60.dcm", "selected-0.png",
        "selected-0.dcm", "result.json"}
    assert (out / "selected-0.dcm").read_bytes() == (out / "edit-1-s0.60.dcm").read_bytes()
    a, b = (pydicom.dcmread(out / f"edit-1-s0.{k}0.dcm", stop_before_pixels=True) for k in (4, 6))
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert a.PatientIdentityRemoved == "YES" and "self-window 0.6" in b.DerivationDescription
    assert "path" not in record["provenance"]["source_image"]
    assert "sop_instance_uid" not in record["provenance"]["source_image"]
    write_edit_outputs(out, result, inversion, {}, dicom=None)
    assert not list(out.glob("*.dcm"))
