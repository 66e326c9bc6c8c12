"""Files the tests build from real sample pixels: DICOM (pydicom writes them) and a decompression bomb's header."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np


def dicom_bytes(
    pixels: np.ndarray,
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    compress: str | None = None,
    without_pixels: bool = False,
) -> bytes:
    """A DX-like single-frame grayscale DICOM file holding ``pixels`` as stored values."""
    import pydicom.uid as uids
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uids.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uids.generate_uid()
    meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"  # a chest radiograph: the DICOM commands route by these
    ds.PatientID = "test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]  # 16-bit entries (8-bit ones are read as bytes)
        item.LUTData = np.asarray(voi_lut, dtype="<u2").tobytes()
        ds.VOILUTSequence = Sequence([item])
    if not without_pixels:
        stored = pixels.astype(np.uint8 if bits <= 8 else np.uint16)
        ds.PixelData = stored.tobytes()
        if compress:
            ds.compress(getattr(uids, compress), stored)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bomb_png(width: int, height: int, bits: int = 8) -> bytes:
    """A grayscale PNG whose header claims width × height pixels (8 or 16 bits), with almost no data: a
    decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def chest_dx(pixels: np.ndarray, patient_id: str = "CXR-TEST-1", study_uid: str | None = None,
             accession: str = "ACC0001", modality: str = "DX"):
    """A DX (for presentation) or CR dataset as a modality sends it: patient, study, series, equipment, view and
    display attributes, holding ``pixels`` (2-D uint8, a real sample image's) as 8-bit MONOCHROME2."""
    import pydicom.uid as uids
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence

    sop_class = uids.ComputedRadiographyImageStorage if modality == "CR" else uids.DigitalXRayImageStorageForPresentation
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uids.generate_uid()
    ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or uids.generate_uid()
    ds.SeriesInstanceUID = uids.generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", patient_id, "19600101", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261201", "101500", "1", accession
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer = "cxrlearn tests"
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
        ds.ContentDate, ds.ContentTime = "20261201", "101500"
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.WindowCenter, ds.WindowWidth = 128, 256
        ds.LossyImageCompression, ds.BurnedInAnnotation = "00", "NO"
        ds.ImagerPixelSpacing = ds.PixelSpacing = [0.143, 0.143]
        ds.DetectorType, ds.ImageLaterality, ds.PresentationLUTShape = "SCINTILLATOR", "U", "IDENTITY"
        ds.PositionerType, ds.AcquisitionContextSequence = "NONE", Sequence([])
        ds.AnatomicRegionSequence = Sequence([Dataset()])
        region = ds.AnatomicRegionSequence[0]
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "43799004", "SCT", "Chest"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds
