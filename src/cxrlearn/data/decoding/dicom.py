"""DICOM radiographs to 8-bit grayscale, as a radiologist's display would show them.

Hospital X-rays are DICOM, not NIH's 8-bit PNGs: 10–16-bit pixels, a rescale
(modality LUT), a window or VOI LUT chosen by the modality, and sometimes
MONOCHROME1 (0 = white). The steps, in the order of the DICOM standard's
grayscale pipeline (PS3.3 C.11):

1. decode the pixels (pydicom; compressed transfer syntaxes through the
   pylibjpeg plugins installed with cxrlearn);
2. modality LUT: ``Rescale Slope``/``Rescale Intercept`` or a Modality LUT
   (``pydicom.pixels.apply_modality_lut``);
3. VOI: a VOI LUT sequence (``pydicom.pixels.apply_voi``), else the first
   window (``Window Center``/``Window Width``, with ``VOI LUT Function`` LINEAR,
   LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2), else the full range of the
   image's values;
4. MONOCHROME1 is inverted, so that bone is bright, as in NIH's images;
5. scaled to 0–255.

A compressed frame is judged by its own codestream before it is decoded (:func:`codestream_size`: the JPEG or
JPEG-LS SOF marker, the JPEG 2000 SIZ marker): a frame of 20,000 pixels behind a header that says 256 is refused
there, not after the decoder has taken gigabytes.

Windowing is written out here rather than taken from pydicom's
``apply_windowing``: that returns values in the stored bit depth's range,
which would need rescaling again, while the standard's formulas give the
display range [0, 1] directly.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from cxrlearn.errors import DataError, ImageTooLarge

DICOM_MAGIC_OFFSET = 128


def is_dicom(head: bytes, name: str = "") -> bool:
    """True for a DICOM file's first bytes ('DICM' after the 128-byte preamble) or a .dcm name."""
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


#: JPEG start-of-frame markers (ITU T.81 B.1.1.3; 0xF7 is JPEG-LS's SOF55): height and width follow them.
_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) as a compressed frame's own codestream states them (JPEG/JPEG-LS SOF, JPEG 2000 SIZ), read
    from its first bytes; None for a codestream that states none (RLE) or that cannot be parsed here."""
    head = bytes(frame[:65536])
    at = head.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ (also inside a JP2 box)
    if at >= 0 and len(head) >= at + 24:
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[at + 8:at + 24])
        return max(0, xsiz - xosiz), max(0, ysiz - yosiz)
    if not head.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 9 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            height, width = struct.unpack(">HH", head[i + 5:i + 9])
            return width, height
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        i += 2 + struct.unpack(">H", head[i + 2:i + 4])[0]
    return None


def _check_codestream(ds, name: str, columns: int, rows: int, bytes_per_pixel: int, check_dimensions) -> None:
    """Refuses a compressed frame whose codestream is not the size the header says, or too large, before it is
    decoded."""
    from pydicom.encaps import generate_frames

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        first = next(generate_frames(ds.PixelData, number_of_frames=1), b"")
    except Exception as err:  # noqa: BLE001 - damaged encapsulation raises many types
        raise DataError(f"{name}: the compressed DICOM pixel data cannot be read ({type(err).__name__}: {err})") from None
    size = codestream_size(first)
    if size is None:
        return
    width, height = size
    if check_dimensions is not None:
        check_dimensions(name, width, height, bytes_per_pixel)
    if (width, height) != (columns, rows):
        raise DataError(f"{name}: the compressed frame is {width}×{height} pixels but the DICOM header says "
                        f"{columns}×{rows}: refused before decoding")


def _first(value) -> float:
    """The first of a possibly multi-valued attribute (windows may come in several presets)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(values: np.ndarray, ds) -> np.ndarray:
    centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width {width} must be positive")
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width {width} must be positive")
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"Window Width {width} must be at least 1 for LINEAR")
    return np.clip((values - (centre - 0.5)) / max(width - 1.0, 1e-9) + 0.5, 0.0, 1.0)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values) if high <= low else (values - low) / (high - low)


def read_dicom(data: bytes, name: str, check_dimensions=None) -> np.ndarray:
    """A DICOM file's bytes as a 2-D uint8 image; :class:`DataError` naming ``name`` when it cannot be.

    ``check_dimensions(name, width, height, bytes_per_pixel)``, when given, judges the header's size
    before the pixel data is decoded (:func:`cxrlearn.data.decoding.images.check_dimensions`)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{name}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise DataError(f"{name}: the DICOM file has no pixel data (is it a report or a structured document?)")

    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > Image.MAX_IMAGE_PIXELS:  # the same bound Pillow puts on PNGs, checked before decoding
        raise ImageTooLarge(f"{name}: image is implausibly large ({columns}×{rows} pixels, over Pillow's limit of "
                            f"{Image.MAX_IMAGE_PIXELS:,})")
    bits = int(ds.get("BitsAllocated", 16) or 16)
    bytes_per_pixel = max(1, (bits + 7) // 8) * int(ds.get("SamplesPerPixel", 1) or 1)
    if check_dimensions is not None:
        check_dimensions(name, columns, rows, bytes_per_pixel)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{name}: a DICOM of {frames} frames; a radiograph has one")
    _check_codestream(ds, name, columns, rows, bytes_per_pixel, check_dimensions)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for missing decoders and bad data
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        raise DataError(f"{name}: cannot decode the DICOM pixel data (transfer syntax {getattr(syntax, 'name', syntax)}): "
                        f"{err}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if pixels.ndim == 3:  # colour (pydicom gives RGB): luminance, ITU-R 601-2 as Pillow's "L"
            if pixels.shape[-1] != 3:
                raise ValueError(f"pixel array of shape {pixels.shape}")
            gray = pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114
            display = _stretch(gray.astype(np.float64)) if pixels.dtype != np.uint8 else gray / 255.0
        else:
            modality = np.asarray(apply_modality_lut(pixels, ds))
            values = modality.astype(np.float64)
            if "VOILUTSequence" in ds:
                item = ds.VOILUTSequence[0]
                out_bits = int(item.LUTDescriptor[2])
                # A LUT is indexed by whole numbers: a rescaled (float) input is rounded first.
                indices = modality if modality.dtype.kind in "iu" else np.rint(modality).astype(np.int64)
                display = np.asarray(apply_voi(indices, ds), dtype=np.float64) / float(2**out_bits - 1)
            elif "WindowCenter" in ds and "WindowWidth" in ds:
                display = _window(values, ds)
            else:
                display = _stretch(values)
            if photometric == "MONOCHROME1":
                display = 1.0 - display
    except (ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"{name}: DICOM grayscale conversion failed: {err}") from None
    if display.ndim != 2 or min(display.shape) < 1:
        raise DataError(f"{name}: DICOM pixel data of shape {display.shape} is not a 2-D image")
    return np.rint(np.clip(display, 0.0, 1.0) * 255.0).astype(np.uint8)
