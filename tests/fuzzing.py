"""Seeded byte-level fuzzing of the image decoders: used by tests/test_fuzz.py (seconds) and
benchmarks/fuzz_decoders.py (minutes)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from xray_files import dicom_bytes

from cxrlearn.data.decoding.images import decode_grayscale
from cxrlearn.errors import DataError


def seed_files(image: Path) -> dict[str, bytes]:
    """One real radiograph (a sample PNG) written in every format cxrlearn reads."""
    pixels = np.asarray(Image.open(image).convert("L"))

    def encode(array, fmt, **options):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    wide = pixels.astype(np.uint16) * 257
    return {
        "png-8": encode(pixels, "PNG"),
        "png-16": encode(wide, "PNG"),
        "tiff-16": encode(wide, "TIFF"),
        "tiff-deflate": encode(pixels, "TIFF", compression="tiff_adobe_deflate"),
        "jpeg": encode(pixels, "JPEG", quality=90),
        "dicom-12": dicom_bytes(4080 - pixels.astype(np.uint16) * 16, bits=12, photometric="MONOCHROME1",
                                window=(2040.5, 4081)),
        "dicom-8": dicom_bytes(pixels, bits=8),
    }


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip bytes, overwrite runs, cut, or insert: the damage real files suffer, and hostile ones."""
    raw = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # a few random bytes, often in the header where parsers decide
        for _ in range(int(rng.integers(1, 9))):
            at = int(rng.integers(min(len(raw), 512))) if rng.random() < 0.7 else int(rng.integers(len(raw)))
            raw[at] = int(rng.integers(256))
    elif kind == 1:  # a run overwritten with a plausible-looking value (lengths, sizes)
        at = int(rng.integers(len(raw)))
        run = int(rng.integers(1, 9))
        raw[at:at + run] = bytes([int(rng.choice([0, 0xFF, 0x7F, 0x80]))]) * run
    elif kind == 2:  # truncated
        raw = raw[: int(rng.integers(1, len(raw)))]
    else:  # bytes inserted
        at = int(rng.integers(len(raw)))
        raw[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return bytes(raw)


def fuzz(files: dict[str, bytes], seed: int, per_format: int | None = None, seconds: float | None = None) -> dict:
    """Decode mutants of each file; return counts per outcome. Any exception other than DataError is raised
    with the format, seed and case number that reproduce it."""
    rng = np.random.default_rng(seed)
    counts = {"decoded": 0, "refused": 0}
    deadline = time.time() + seconds if seconds else None
    case = 0
    while True:
        for fmt, data in files.items():
            mutant = mutate(data, rng)
            try:
                pixels = decode_grayscale(mutant, f"{fmt}-{case}")
            except DataError:
                counts["refused"] += 1
            except Exception as err:  # the failure this fuzzing looks for
                raise AssertionError(f"{fmt}, seed {seed}, case {case}: {type(err).__name__} escaped the decoder: "
                                     f"{err}") from err
            else:
                assert pixels.dtype == np.uint8 and pixels.ndim == 2, (fmt, case, pixels.dtype, pixels.shape)
                counts["decoded"] += 1
        case += 1
        if per_format is not None and case >= per_format:
            break
        if deadline is not None and time.time() > deadline:
            break
    counts["cases"] = case * len(files)
    return counts
