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
    ds.Modality = "DX"
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
