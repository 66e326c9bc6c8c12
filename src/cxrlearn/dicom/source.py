"""What a DICOM instance must be for cxrlearn to answer it, and what of it a result may copy.

Modalities send what they send: a PatientSex of ``X``, no StudyDate, a name of 80 characters, a character set
nobody knows. A result copies the patient and study of its source, so every copied value is checked here, once,
for the node, the poller and ``predict --dicom-out`` alike (:func:`reference`):

- a **Type 2** attribute that is missing or whose value is not valid for its VR (a date that is no date, a sex
  other than M, F or O, an accession number over 16 characters) is copied **empty**, as DICOM allows;
- a person's name keeps its characters but loses control characters, and each of its groups is cut at 64;
- values are copied as the text they decode to and written in UTF-8 (``ISO_IR 192``) when they are not ASCII, so an
  unknown ``SpecificCharacterSet`` costs at most the characters it could not decode;
- an instance is **refused** (:class:`~cxrlearn.errors.DataError` naming it and the reason) when no result could
  truthfully belong to it: a SOP class that is not a radiograph (a secondary capture unless asked for), a missing
  or malformed SOP Instance, Study or Series Instance UID, a PatientID that is not a valid LO (over 64 characters,
  control characters: cutting it could make it another patient's), or an instance cxrlearn made itself
  (:func:`made_by_cxrlearn`: a forwarding rule that sends every stored instance back must not make a loop).
"""

from __future__ import annotations

import datetime
import io
import re
import warnings

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cxrlearn.data.decoding.images import decode_grayscale
from cxrlearn.defaults import whole_number
from cxrlearn.dicom.routing import Accept, refusal
from cxrlearn.errors import DataError

#: Who made cxrlearn's own results (their Manufacturer), and the series numbers they are written in.
MANUFACTURER = "cxrlearn"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SEG_SERIES_NUMBER = 9903
#: The image classes a result is made for: radiographs, and (when asked) secondary captures of them.
RADIOGRAPH_CLASSES = {
    pydicom.uid.ComputedRadiographyImageStorage: "CR",
    pydicom.uid.DigitalXRayImageStorageForPresentation: "DX",
    pydicom.uid.DigitalXRayImageStorageForProcessing: "DX",
}
SOURCE_CLASSES = {**RADIOGRAPH_CLASSES, pydicom.uid.SecondaryCaptureImageStorage: "OT"}
#: A UID (PS3.5 9.1): dot-separated numbers without leading zeros, at most 64 characters.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ORIENTATION = re.compile(r"[APRLHF]{1,3}")
#: The longest SH and LO values (PS3.5 6.2).
_SH, _LO = 16, 64


def _text(ds: Dataset, keyword: str) -> str | None:
    """An attribute's value as the text it decodes to (None when missing); a value pydicom cannot even read counts
    as missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unknown character set: pydicom falls back, and says so
            value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element is a missing one
        return None
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip().rstrip("\x00")


def valid_uid(value: str | None) -> bool:
    return bool(value) and len(value) <= 64 and _UID.fullmatch(value) is not None


def _date(value: str | None) -> str:
    if not value or not re.fullmatch(r"\d{8}", value):
        return ""
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return ""
    return value


def _time(value: str | None) -> str:
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", value or "")
    if not match:
        return ""
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups()[:3])
    return str(value) if hours < 24 and minutes < 60 and seconds < 61 else ""


def _short(value: str | None, most: int) -> str:
    """An SH or LO value as it is, or empty when it is not a valid one (too long, control characters, a
    backslash): left out rather than cut, since a cut accession number could name another order."""
    if not value or len(value) > most or _CONTROL.search(value) or "\\" in value:
        return ""
    return value


def _name(value: str | None) -> str:
    """A PN value with control characters removed and each component group cut at 64 characters."""
    if not value:
        return ""
    groups = _CONTROL.sub("", value).replace("\\", " ").split("=")[:3]
    return "=".join(group[:64] for group in groups).strip()


def made_by_cxrlearn(ds: Dataset) -> bool:
    """True for a result cxrlearn made (its manufacturer and series, or a Grad-CAM derivation), whoever sends it."""
    manufacturer = (_text(ds, "Manufacturer") or "").lower()
    description = (_text(ds, "SeriesDescription") or "").lower()
    derivation = (_text(ds, "DerivationDescription") or "").lower()
    series = _text(ds, "SeriesNumber")
    ours = {str(number) for number in (SR_SERIES_NUMBER, SC_SERIES_NUMBER, SEG_SERIES_NUMBER)}
    return (manufacturer == MANUFACTURER and (series in ours or description.startswith(MANUFACTURER))
            or derivation.startswith("grad-cam"))


class NotForModel(DataError):
    """A radiograph the routing rule refuses (:func:`cxrlearn.dicom.routing.refusal`): its reason, and the header
    it was read from (a "not analysed" report may still be made for it)."""

    def __init__(self, message: str, header: Dataset):
        super().__init__(message)
        self.header = header


def check_source(ds: Dataset, name: str, secondary_captures: bool = True, accept: Accept | None = None) -> None:
    """Refuses (DataError naming ``name``) an instance cxrlearn should not answer (see the module's description),
    and with ``accept`` a radiograph the model is not for (:func:`cxrlearn.dicom.routing.refusal`)."""
    sop_class = _text(ds, "SOPClassUID") or ""
    classes = SOURCE_CLASSES if secondary_captures else RADIOGRAPH_CLASSES
    if made_by_cxrlearn(ds):
        raise DataError(f"{name}: a result cxrlearn made itself (manufacturer {MANUFACTURER}, series "
                        f"{_text(ds, 'SeriesNumber') or 'none'}): it is never answered")
    if sop_class not in classes:
        what = "a radiograph (CR, DX)" + (" or a secondary capture" if secondary_captures else "")
        raise DataError(f"{name}: SOP class {sop_class or 'missing'} is not {what}: no result is made for it")
    routed = refusal(ds, accept) if accept is not None and sop_class in RADIOGRAPH_CLASSES else None
    if routed:
        raise NotForModel(f"{name}: {routed}", ds)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(ds, keyword)
        if not value:
            raise DataError(f"{name}: the DICOM file has no {keyword}, which its results must refer to")
        if not valid_uid(value):
            raise DataError(f"{name}: {keyword} {value[:80]!r} is not a valid UID, so no result can refer to it")
    patient = _text(ds, "PatientID") or ""
    if len(patient) > _LO or _CONTROL.search(patient) or "\\" in patient:
        raise DataError(f"{name}: PatientID {patient[:80]!r} is not a valid DICOM value (at most 64 characters, no "
                        "control characters or backslash); a result cannot copy it without changing the patient")


def reference(ds: Dataset, name: str, secondary_captures: bool = True, accept: Accept | None = None) -> Dataset:
    """The source as its results may copy it: checked (:func:`check_source`), then only the attributes a result
    reads, each valid for its VR or empty (see the module's description)."""
    check_source(ds, name, secondary_captures, accept)
    ref = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ref, keyword, _text(ds, keyword))
    ref.PatientID = _text(ds, "PatientID") or ""
    ref.PatientName = _name(_text(ds, "PatientName"))
    ref.ReferringPhysicianName = _name(_text(ds, "ReferringPhysicianName"))
    ref.PatientBirthDate = _date(_text(ds, "PatientBirthDate"))
    ref.StudyDate = _date(_text(ds, "StudyDate"))
    ref.StudyTime = _time(_text(ds, "StudyTime")) if ref.StudyDate else ""
    sex = (_text(ds, "PatientSex") or "").upper()
    ref.PatientSex = sex if sex in ("M", "F", "O") else ""
    ref.AccessionNumber = _short(_text(ds, "AccessionNumber"), _SH)
    ref.StudyID = _short(_text(ds, "StudyID"), _SH)
    modality = _text(ds, "Modality") or ""
    ref.Modality = modality if re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality) else SOURCE_CLASSES[ref.SOPClassUID]
    orientation = (_text(ds, "PatientOrientation") or "").split("\\")
    if len(orientation) == 2 and all(_ORIENTATION.fullmatch(part) for part in orientation):
        ref.PatientOrientation = orientation
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PixelRepresentation"):  # says it is an image
        number = whole_number(_text(ds, keyword))
        if number is not None:
            setattr(ref, keyword, number)
    laterality = _text(ds, "Laterality") or ""
    ref.Laterality = laterality if laterality in ("R", "L") else ""
    texts = [str(ref.PatientID), str(ref.PatientName), str(ref.ReferringPhysicianName), ref.AccessionNumber,
             ref.StudyID]
    if not all(text.isascii() for text in texts):
        ref.SpecificCharacterSet = "ISO_IR 192"
    return ref


def patient_key(ds: Dataset) -> str:
    """What tells one patient's image from another's that carries the same SOP Instance UID: results' UIDs and the
    outbox's file names include it, so two such instances never share a result."""
    return "|".join(str(ds.get(k, "")) for k in ("SOPInstanceUID", "StudyInstanceUID", "PatientID"))


def study_key(ds: Dataset) -> str:
    """A study as its patient's (results' series UIDs derive from it)."""
    return "|".join(str(ds.get(k, "")) for k in ("StudyInstanceUID", "PatientID"))


def read_source(data: bytes, name: str, secondary_captures: bool = True, accept: Accept | None = None
                ) -> tuple[Dataset, np.ndarray]:
    """A received or read DICOM instance as its results' :func:`reference`, and its decoded grayscale pixels;
    :class:`DataError` naming ``name`` otherwise (routed by ``accept`` before any pixel is decoded)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on damaged data
        raise DataError(f"{name}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    ref = reference(ds, name, secondary_captures, accept)
    return ref, decode_grayscale(data, name)
