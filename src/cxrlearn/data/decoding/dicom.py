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

Windowing is written out here rather than taken from pydicom's
``apply_windowing``: that returns values in the stored bit depth's range,
which would need rescaling again, while the standard's formulas give the
display range [0, 1] directly.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cxrlearn.errors import DataError, ImageTooLarge

DICOM_MAGIC_OFFSET = 128


def is_dicom(head: bytes, name: str = "") -> bool:
    """True for a DICOM file's first bytes ('DICM' after the 128-byte preamble) or a .dcm name."""
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


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
    if check_dimensions is not None:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        check_dimensions(name, columns, rows, max(1, (bits + 7) // 8) * samples)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{name}: a DICOM of {frames} frames; a radiograph has one")
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
