"""DICOM twins of the counterfactuals: marked-synthetic Secondary Capture objects (highdicom).

SOP class: Secondary Capture Image Storage, Conversion Type SYN (synthetic image). The input's
own class (CR, DX) is not used on purpose: those IODs describe an acquisition (exposure,
detector, the Acquisition Context) that this image never had, and a CR/DX object in a PACS
reads as a radiograph of the patient. SC is the IOD for an image made by software, and a SC
viewer shows it as such.

Each object files beside the source (its Study Instance UID and patient) in a series of its own
(one per result folder), is marked synthetic in Series Description, Image Type
``DERIVED\\SECONDARY``, Derivation Description and, unless turned off, a burned-in label, and
references the source in the Source Image Sequence. Pixels are the counterfactual at the
input's geometry, bit depth and photometric interpretation.

``anonymize``: PS3.15 Basic Application Confidentiality Profile: patient and study identity
and dates left empty or removed, new Study Instance UID, the source's SOP Instance UID
replaced by one made for this series (so the object no longer files beside the original nor
can be linked to it by UID), Patient Identity Removed YES.

Every failure is a one-line :class:`~prism_rt.errors.InputImageError` (the source) or
:class:`~prism_rt.errors.OutputError` (the writing), never a library's own exception.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputImageError, MissingExtraError, OutputError, PrismError
from .image_limits import one_line
from .version import __version__

__all__ = ["SYNTHETIC", "LABEL", "DicomOptions", "DicomSeries", "label_box", "burn_label", "write_dicom",
           "derivation_description"]

SYNTHETIC = "SYNTHETIC – NOT FOR DIAGNOSTIC USE"
LABEL = "SYNTHETIC"
_SOFTWARE = f"prism_rt {__version__}"
# PS3.16 CID 7203 / DCM: the codes of the Source Image Sequence and the de-identification method.
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
_BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")


@dataclass(frozen=True)
class DicomOptions:
    """How the DICOM twins are written.

    ``label``: burn ``SYNTHETIC`` into the top-left corner (Burned In Annotation YES); off
    leaves the pixels exactly the counterfactual's, so a viewer must be trusted to show the
    header's warning. ``anonymize``: the PS3.15 basic profile (see the module docstring); the
    object then no longer files beside the original, which is what a research export wants.
    """

    label: bool = True
    anonymize: bool = False


def _modules():
    try:
        import highdicom
        import pydicom
    except ImportError as e:
        raise MissingExtraError("dicom", e.name or "highdicom", "Writing DICOM outputs") from e
    return highdicom, pydicom


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size), 1
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: a ~11 px bitmap font, scaled
        return ImageFont.load_default(), max(1, round(size / 11))


def _label_tile(rows: int) -> np.ndarray:
    """float [h, w]: the label as it is burned, white box (1) with black text (0)."""
    from PIL import Image, ImageDraw

    size = max(8, round(0.04 * rows))  # cap height ≈ 0.7 em: the letters ~3 % of the image height
    font, scale = _font(size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), LABEL, font=font)
    pad = max(1, (bottom - top) // 3)
    tile = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 255)
    draw = ImageDraw.Draw(tile)
    draw.fontmode = "1"  # no antialiasing: pure black on white, legible at any window
    draw.text((pad - left, pad - top), LABEL, fill=0, font=font)
    if scale > 1:
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
    return np.asarray(tile, dtype=np.float64) / 255.0


def label_box(rows: int, columns: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the burned-in label in an image of rows × columns."""
    h, w = _label_tile(rows).shape
    margin = max(1, rows // 100)
    return margin, margin, min(rows, margin + h), min(columns, margin + w)


def burn_label(pixels01: np.ndarray) -> np.ndarray:
    """A copy of a [0, 1] bright-is-dense image with the label in its top-left corner."""
    out = np.array(pixels01, dtype=np.float64)
    top, left, bottom, right = label_box(*out.shape)
    out[top:bottom, left:right] = _label_tile(out.shape[0])[:bottom - top, :right - left]
    return out


def derivation_description(provenance: dict) -> str:
    """One line naming the edit, for Derivation Description (ST, at most 1024 characters)."""
    parts = [f"{SYNTHETIC}. Counterfactual by {_SOFTWARE} (PRISM prompt-to-prompt edit)",
             f"{provenance.get('source_prompt')!r} -> {provenance.get('target')!r}",
             f"inversion {provenance.get('inversion')}", f"self-window {provenance.get('self_replace')}"]
    for key in ("blend_threshold", "composite"):
        if provenance.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {provenance[key]}")
    if provenance.get("engine_hash"):
        parts.append(f"engine hash {provenance['engine_hash']}")
    parts.append(f"model {provenance.get('model_path')}")
    text = "; ".join(parts)
    return text if len(text) <= 1024 else text[:1021] + "..."


class DicomSeries:
    """The DICOM twins of one result folder: one new series, one new SOP instance per image.

    ``source``: the input DICOM (a path, re-read header only, or a pydicom Dataset);
    ``sha256``: the input's hash when it was read, to refuse a file changed since.
    """

    def __init__(self, source, options: DicomOptions = DicomOptions(), *, sha256: str | None = None):
        _, pydicom = _modules()
        from pydicom.uid import generate_uid

        self.options = options
        self.source = source if isinstance(source, pydicom.Dataset) else _read_source(source, sha256)
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
            if not str(self.source.get(keyword, "") or ""):
                raise InputImageError(f"the source DICOM has no {keyword}: it cannot be referenced by a derived "
                                      "object; pass --dicom-out off")
        self.series_uid = generate_uid()
        self.study_uid = generate_uid() if options.anonymize else str(self.source.StudyInstanceUID)
        # Basic profile: a UID is replaced by one consistent within the export, not linkable to the original.
        self.source_uid = generate_uid() if options.anonymize else str(self.source.SOPInstanceUID)
        try:
            self.series_number = int(self.source.get("SeriesNumber", 0) or 0) + 1000
        except (TypeError, ValueError):  # a malformed IS: any positive number will do
            self.series_number = 1000

    def write(self, path, pixels01: np.ndarray, provenance: dict, instance_number: int = 1) -> Path:
        """Write one twin of ``pixels01`` (float [H, W] in [0, 1], bright = dense, the input's
        geometry) to ``path``."""
        try:
            with warnings.catch_warnings():  # pydicom/highdicom warn in several lines per oddity
                warnings.simplefilter("ignore")
                dataset = self._dataset(np.asarray(pixels01), provenance, int(instance_number))
                dataset.save_as(Path(path), enforce_file_format=True)
        except PrismError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write the DICOM twin {path}: {e.strerror or one_line(e)}; "
                              "check the output folder, or pass --dicom-out off") from e
        except Exception as e:  # noqa: BLE001 - highdicom validates on construction and raises anything
            raise OutputError(f"cannot build the DICOM twin {Path(path).name} of {self._name()}: "
                              f"{type(e).__name__}: {one_line(e)}; pass --dicom-out off to write the PNGs only") from e
        return Path(path)

    def _name(self) -> str:
        return str(self.source.get("SOPInstanceUID", "the source"))

    def _stored(self, pixels01: np.ndarray) -> tuple[np.ndarray, int, str]:
        if pixels01.ndim != 2 or pixels01.size == 0 or not np.isfinite(pixels01).all():
            raise OutputError(f"the counterfactual for the DICOM twin must be a finite [H, W] image, got shape "
                              f"{pixels01.shape}")
        # The reader mapped the input's VOI output to [0, 1]; the twin stores that scale over the
        # input's bit depth (16 at most), so its full-range window shows what the model saw.
        bits = min(max(int(self.source.get("BitsStored", 16) or 16), 1), 16)
        photometric = str(self.source.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        display = np.clip(pixels01.astype(np.float64), 0.0, 1.0)
        if self.options.label:
            display = burn_label(display)
        if photometric == "MONOCHROME1":  # the reader flipped it to bright = dense; flip back
            display = 1.0 - display
        else:
            photometric = "MONOCHROME2"
        top = 2**bits - 1
        return np.rint(display * top).astype(np.uint16), bits, photometric

    def _dataset(self, pixels01: np.ndarray, provenance: dict, instance_number: int):
        hd, pydicom = _modules()
        from pydicom.dataset import Dataset
        from pydicom.sr.codedict import codes
        from pydicom.uid import generate_uid

        src, anonymize = self.source, self.options.anonymize
        stored, bits, photometric = self._stored(pixels01)
        orientation = [str(v) for v in (src.get("PatientOrientation") or [])]
        biped = {v.value for v in hd.enum.PatientOrientationValuesBiped}
        known_orientation = len(orientation) == 2 and all(v in biped for v in orientation)
        laterality = str(src.get("Laterality") or "")
        equipment = hd.ContributingEquipment(
            manufacturer="prism_rt", purpose_of_reference=codes.DCM.SynthesizingEquipment,
            manufacturer_model_name="prism_rt", software_versions=__version__,
            contribution_description=f"{SYNTHETIC}: counterfactual image generated by {_SOFTWARE}")
        common = dict(pixel_array=stored, photometric_interpretation=photometric, bits_allocated=16,
                      coordinate_system="PATIENT", series_instance_uid=self.series_uid,
                      series_number=self.series_number, sop_instance_uid=generate_uid(),
                      instance_number=instance_number, manufacturer="prism_rt",
                      # highdicom requires an orientation for PATIENT; an unknown (or composite) one is emptied below
                      patient_orientation=tuple(orientation) if known_orientation else ("L", "F"),
                      laterality=laterality if laterality in ("L", "R") else None,  # PS3.15 keeps it
                      transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian, contributing_equipment=[equipment],
                      series_description=f"{SYNTHETIC} (prism_rt)", manufacturer_model_name="prism_rt",
                      software_versions=__version__,
                      specific_character_set="ISO_IR 192")  # UTF-8: the en dash and any patient name
        if anonymize:
            image = hd.sc.SCImage(study_instance_uid=self.study_uid, **common)
        else:
            image = hd.sc.SCImage.from_ref_dataset(src, **common)
        if not known_orientation:
            image.PatientOrientation = ""  # type 2: unknown is empty, never guessed
        # What highdicom's constructor has no parameter for (it validated the rest):
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.ConversionType = "SYN"
        image.BitsStored, image.HighBit = bits, bits - 1  # values fit: stored ≤ 2**bits − 1
        image.WindowCenter, image.WindowWidth = 2 ** (bits - 1), 2**bits  # LINEAR over [0, 2**bits − 1]
        image.WindowCenterWidthExplanation = "FULL RANGE (stored as displayed)"
        image.BurnedInAnnotation = "YES" if self.options.label else "NO"
        image.LossyImageCompression = "00"
        image.DerivationDescription = derivation_description(provenance)
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            if _positive_pair(src.get(keyword)):  # a zero spacing (RG1_UNCR has one) is invalid: unknown
                setattr(image, keyword, src[keyword].value)
        if src.get("BodyPartExamined"):  # not identity, and a viewer's hanging protocols use it
            image.BodyPartExamined = src.BodyPartExamined
        elif "Laterality" not in image:
            image.Laterality = ""  # type 2C when the body part may be paired: unknown, never guessed
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_PURPOSE
        reference = Dataset()
        reference.ReferencedSOPClassUID = str(src.SOPClassUID)
        reference.ReferencedSOPInstanceUID = self.source_uid
        reference.PurposeOfReferenceCodeSequence = [purpose]
        image.SourceImageSequence = [reference]
        if anonymize:
            self._deidentify(image)
        return image

    @staticmethod
    def _deidentify(image) -> None:
        """PS3.15 Annex E basic profile on what highdicom filled: Z (empty) for type 2, X (remove)
        for the rest. Identity was never copied (no reference dataset)."""
        from pydicom.dataset import Dataset

        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                        "ReferringPhysicianName", "StudyDate", "StudyTime", "ContentDate", "ContentTime"):
            if keyword in image:
                setattr(image, keyword, "")
        for keyword in ("InstanceCreationDate", "InstanceCreationTime", "DateOfSecondaryCapture",
                        "TimeOfSecondaryCapture", "SeriesDate", "SeriesTime", "InstitutionName",
                        "InstitutionalDepartmentName", "OtherPatientIDs", "OtherPatientIDsSequence"):
            if keyword in image:
                delattr(image, keyword)
        for item in image.get("ContributingEquipmentSequence", []):  # highdicom stamps its own contribution time
            if "ContributionDateTime" in item:
                del item.ContributionDateTime
        image.PatientIdentityRemoved = "YES"
        image.LongitudinalTemporalInformationModified = "REMOVED"
        image.DeidentificationMethod = f"PS3.15 Basic Profile ({_SOFTWARE})"  # LO: 64 characters at most
        method = Dataset()
        method.CodeValue, method.CodingSchemeDesignator, method.CodeMeaning = _BASIC_PROFILE
        image.DeidentificationMethodCodeSequence = [method]


def _positive_pair(value) -> bool:
    try:
        return value is not None and len(value) == 2 and all(float(v) > 0 for v in value)
    except (TypeError, ValueError):
        return False


def _read_source(path, sha256: str | None):
    """The source DICOM's header, refused in one line if it is gone or changed since it was read."""
    _, pydicom = _modules()
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputImageError(f"{name}: the source DICOM cannot be read again to write the DICOM twins "
                              f"({e.strerror or one_line(e)}); restore it, or pass --dicom-out off") from e
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise InputImageError(f"{name}: the source DICOM changed since it was edited (sha256 differs); "
                              "rerun the edit on it, or pass --dicom-out off")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=data[128:132] != b"DICM")
    except Exception as e:  # noqa: BLE001 - hostile bytes make pydicom raise anything
        raise InputImageError(f"{name}: the source DICOM header cannot be read: {one_line(e)}") from e


def write_dicom(path: str | os.PathLike, source, pixels01: np.ndarray, provenance: dict,
                options: DicomOptions = DicomOptions(), *, sha256: str | None = None) -> Path:
    """One DICOM twin in a series of its own (:class:`DicomSeries` for several in one series)."""
    return DicomSeries(source, options, sha256=sha256).write(path, pixels01, provenance)
