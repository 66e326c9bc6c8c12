"""Finding ChestX-ray14 image files on disk and decoding them to grayscale.

Two layouts are understood, and may be mixed:

* a flat folder of PNGs (``DIR/00000001_000.png``), or ``DIR/images/…``;
* the layout NIH's twelve archives unpack to: ``DIR/images_001/images/…`` to
  ``DIR/images_012/images/…`` (and the same without the inner ``images/``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cxrlearn._files import read_bytes
from cxrlearn.data.columns import IMAGE, PATH
from cxrlearn.data.decoding.dicom import DICOM_MAGIC_OFFSET, is_dicom, read_dicom
from cxrlearn.errors import DataError, ImageTooLarge

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")

#: The most decoded pixel bytes one image may take, checked from its header before any pixel is decoded
#: (16-bit pixels count two bytes, RGB three). A chest radiograph is at most about 4,300 × 4,300 pixels
#: (a 43 cm detector at 0.1 mm): 37 MB at 16 bits. 64 MiB leaves room for that and for a 4,000 × 3,000
#: colour photograph, and refuses a 9,000 × 9,000 16-bit PNG (162 MB) that a 157 KB file can hold —
#: well below Pillow's own bomb limit (89 million pixels, which would allow 179 MB of 16-bit pixels).
MAX_DECODED_BYTES = 64 * 2**20
#: How any image file becomes 8-bit grayscale (:func:`decode_grayscale`), in words: for reports, the bundle
#: and the ONNX file's metadata.
DECODING = ("8-bit grayscale as is; 16-bit scaled over the full range, round(v / 257); RGB to ITU-R 601-2 "
            "luminance; alpha composited onto black; DICOM: modality LUT, then VOI LUT or window, "
            "MONOCHROME1 inverted")
#: No side of a radiograph is shorter than this (NIH's are 1,024 or more).
MIN_SIDE = 32
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2,
                    "I;16N": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "RGBa": 4, "CMYK": 4, "I": 4, "F": 4}


def check_dimensions(name: str, width: int, height: int, bytes_per_pixel: int) -> None:
    """Refuse, from the header alone, an image too large to decode safely or too small to be a radiograph."""
    decoded = int(width) * int(height) * int(bytes_per_pixel)
    if decoded > MAX_DECODED_BYTES:
        raise ImageTooLarge(f"{name}: image is implausibly large for a radiograph ({width}×{height} pixels, "
                            f"{decoded / 2**20:,.0f} MiB decoded; the limit is {MAX_DECODED_BYTES // 2**20} MiB)")
    if min(width, height) < MIN_SIDE:
        raise DataError(f"{name}: {width}×{height} pixels is too small to be a radiograph "
                        f"(each side needs at least {MIN_SIDE})")
_ARCHIVE_FOLDER = re.compile(r"images_\d{3}")


def _image_folders(root: Path) -> list[Path]:
    """The folders under ``root`` that may hold images, in a fixed order."""
    folders = [root, root / "images"]
    with os.scandir(root) as entries:
        archives = sorted(e.name for e in entries if _ARCHIVE_FOLDER.fullmatch(e.name) and _is_dir(e))
    for name in archives:
        folders += [root / name, root / name / "images"]
    return [f for f in folders if _is_dir(f)]


def _is_dir(entry: os.DirEntry | Path) -> bool:
    """A folder, following links; a link loop (or an unreadable link) is not one."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def regular_file(entry: os.DirEntry | Path) -> bool | None:
    """True for a regular file (following links), False for anything else that exists (a folder, a FIFO, a
    device), None for a link to nothing or a link loop: what a folder search may read, skip quietly, or name."""
    try:
        mode = entry.stat().st_mode if isinstance(entry, os.DirEntry) else os.stat(entry).st_mode
    except OSError:
        return None
    return stat.S_ISREG(mode)


def find_images(root: str | os.PathLike) -> dict[str, Path]:
    """Map every image file name found under ``root`` to its path.

    Raises :class:`DataError` when ``root`` is not a folder, or when one name is
    found in two places (which copy is right cannot be guessed).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist or is not a folder")
    found: dict[str, Path] = {}
    broken: list[str] = []
    for folder in _image_folders(root):
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                kind = regular_file(entry)
                if not kind:
                    if kind is None or not _is_dir(entry):  # a dangling link, a loop, a FIFO: named below
                        broken.append(entry.path)
                    continue
                if entry.name in found:
                    raise DataError(
                        f"image {entry.name!r} is in two places: {found[entry.name]} and "
                        f"{entry.path}; remove one copy"
                    )
                found[entry.name] = Path(entry.path)
    if broken:
        log.warning(f"{len(broken):,} image name(s) under {root} are not readable files (a link loop, a FIFO) or "
                    "point nowhere and are skipped: "
                    + ", ".join(broken[:3]) + (" …" if len(broken) > 3 else ""))
    return found


@dataclass(frozen=True)
class ImagePresence:
    """Which of a table's images were found on disk."""

    table: pd.DataFrame  # the rows whose image is present, with a ``path`` column
    n_listed: int
    n_present: int
    n_unlisted_files: int  # image files on disk that the table does not list

    def summary(self) -> str:
        share = self.n_present / self.n_listed if self.n_listed else 0.0
        text = f"{self.n_present:,} of the table's {self.n_listed:,} images are present ({share:.1%})"
        if self.n_unlisted_files:
            text += f"; {self.n_unlisted_files:,} image files are not in the table and are ignored"
        return text


def outside(path: str) -> bool:
    """Whether a table's image path could lead out of the image folder: absolute, a drive, ``..`` or a
    backslash (a Windows separator, read as part of a name elsewhere)."""
    parts = PurePosixPath(path).parts
    return path.startswith(("/", "~")) or ".." in parts or "\\" in path or (len(path) > 1 and path[1] == ":")


def refuse_paths_outside(images: pd.Series, source: str) -> None:
    """:class:`DataError` naming the first image path of ``source`` that is not inside the image folder, or that
    holds a control character (a tab or newline would break the cache's index, one name a line)."""
    bad = images.astype(str).map(outside).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: row {row + 1}: image {images.iloc[row]!r} is not a path inside the image folder "
                        "(absolute paths, '..' and backslashes are refused): give paths relative to --images")
    control = images.astype(str).str.contains(r"[\x00-\x1f\x7f]", regex=True).to_numpy()
    if control.any():
        row = int(np.flatnonzero(control)[0])
        raise DataError(f"{source}: row {row + 1}: image {images.iloc[row]!r} holds a control character (a tab or "
                        "a line break): rename the file")


def attach_images(table: pd.DataFrame, root: str | os.PathLike) -> ImagePresence:
    """Keep the rows of ``table`` whose image is under ``root``, adding a ``path`` column.

    An image is a file name (found in ``root``, ``root/images`` or ``images_NNN/images`` as NIH's archives
    unpack: :func:`find_images`) or a path relative to ``root``
    (``train/patient00001/study1/view1_frontal.jpg``, as CheXpert and MIMIC-CXR list theirs).
    Raises :class:`DataError` when none of the table's images is there, saying where it looked, so a
    wrong folder is caught before any work starts.
    """
    root = Path(root)
    refuse_paths_outside(table[IMAGE], "the label table")
    relative = table[IMAGE].str.contains("/", regex=False).to_numpy()
    files = find_images(root) if not relative.all() else {}
    paths = np.full(len(table), "", dtype=object)
    for i in np.flatnonzero(relative):
        candidate = root / table[IMAGE].iloc[i]
        if candidate.is_file():
            paths[i] = str(candidate)
    named = ~relative
    paths[named] = [str(files[name]) if name in files else "" for name in table[IMAGE].to_numpy()[named]]
    present = paths != ""
    if not present.any():
        looked = ", ".join(str(f) for f in _image_folders(root))
        raise DataError(
            f"none of the table's {len(table):,} images is in {root} "
            f"(looked in {looked}; found {len(files):,} image files with other names). "
            "Expected the table's file names (NIH's are such as 00000001_000.png, in a flat folder or in "
            "images_001/images/ … images_012/images/ as the archives unpack), or paths relative to this folder."
        )
    kept = table.loc[present].copy()
    kept[PATH] = paths[present]
    listed = set(table[IMAGE])
    unlisted = sum(1 for name in files if name not in listed)
    return ImagePresence(kept.reset_index(drop=True), len(table), int(present.sum()), unlisted)


def load_grayscale(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a 2-D uint8 grayscale array (see :func:`decode_grayscale`).

    Raises :class:`DataError` naming the file when it is missing, not an image,
    truncated, or of an unsupported mode.
    """
    return decode_grayscale(read_bytes(path, "image file", DataError), str(path))


class Decoded(NamedTuple):
    """An image file decoded for prediction: its grayscale pixels, its colour spread (:func:`colour_spread`) and
    the file's own (width, height), which a JPEG decoded reduced no longer shows."""

    pixels: np.ndarray
    colour: float
    size: tuple[int, int]


def load_grayscale_and_colour(path: str | os.PathLike, reduce_to: int | None = None) -> Decoded:
    """:func:`load_grayscale` and :func:`colour_spread` of one file, read from disk once."""
    return decode_grayscale_and_colour(read_bytes(path, "image file", DataError), str(path), reduce_to)


def decode_grayscale_and_colour(data: bytes, name: str, reduce_to: int | None = None) -> Decoded:
    """:func:`decode_grayscale` and :func:`colour_spread` of an image's bytes (a file's, or an upload's)."""
    pixels = decode_grayscale(data, name, reduce_to)
    size = (int(pixels.shape[1]), int(pixels.shape[0]))
    if reduce_to and data.startswith(_JPEG_START):  # perhaps decoded reduced: the header says the file's size
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    return Decoded(pixels, colour_spread(data), size)


#: The first bytes of every JPEG file (its start-of-image marker).
_JPEG_START = b"\xff\xd8"
#: A JPEG decoded for a ``reduce_to`` px image keeps at least this many times that side (:func:`decode_grayscale`).
JPEG_REDUCED_MARGIN = 4


def decode_grayscale(data: bytes, name: str, reduce_to: int | None = None) -> np.ndarray:
    """Decode an image's bytes (PNG, JPEG, TIFF or DICOM) to a 2-D uint8 grayscale array.

    Conversions, all documented here so none is a surprise:

    * 8-bit grayscale (NIH's own format) is returned as is;
    * 16-bit grayscale is scaled to 8 bits over the full 16-bit range
      (``round(v / 257)``, so 65535 -> 255);
    * RGB is converted to luminance (ITU-R 601-2, Pillow's ``L``);
    * an alpha channel is composited onto black first, so transparent pixels
      become black rather than revealing whatever colour they hold;
    * DICOM goes through the standard's grayscale pipeline
      (:func:`cxrlearn.data.decoding.dicom.read_dicom`).

    ``reduce_to``: the side the image will be resized to (prediction's cache size). A JPEG larger than
    :data:`JPEG_REDUCED_MARGIN` times that is then decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT
    scaling (Pillow's ``draft``), keeping at least that margin: several times faster on a radiograph of 2,000 px
    or more, with answers within the tolerance tests/test_inference.py states. Training's cache decodes in full.

    ``name`` (a path or an upload's name) is what error messages call the image. Whatever the bytes,
    the only exception is :class:`DataError` (:class:`ImageTooLarge` for an image over
    :data:`MAX_DECODED_BYTES`): a decoder's own failure on damaged data is the file's fault, not a crash.
    """
    if not data:
        raise DataError(f"{name}: the file is empty")
    try:
        if is_dicom(data[:DICOM_MAGIC_OFFSET + 4], name):
            return read_dicom(data, name, check_dimensions)
        return _decode_with_pillow(data, name, reduce_to)
    except DataError:
        raise
    except MemoryError:
        raise ImageTooLarge(f"{name}: not enough memory to decode this image") from None
    except Exception as err:  # noqa: BLE001 - pydicom, Pillow and its plugins raise many types on hostile bytes
        raise DataError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def colour_spread(source: str | os.PathLike | bytes) -> float:
    """How coloured an image file is: the mean over pixels of (largest - smallest colour channel), in grey
    levels, on a thumbnail; 0 for grayscale files and DICOM. A chest X-ray saved as RGB has about 0.

    Decoding drops colour (:func:`decode_grayscale`); this is what the input check reads of it. A file that
    cannot be read here gives 0: whether it decodes at all is :func:`load_grayscale`'s to say.
    """
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if is_dicom(data[:DICOM_MAGIC_OFFSET + 4], "colour"):
            return 0.0
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA", "RGBX"):
                return 0.0
            image.draft("RGB", (128, 128))
            image.thumbnail((128, 128))
            rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
        return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())
    except Exception:  # noqa: BLE001 - a file Pillow cannot read has no colour to speak of here
        return 0.0


def _decode_with_pillow(data: bytes, name: str, reduce_to: int | None = None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # A decompression bomb warning becomes an error rather than a hang.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size  # from the header: nothing is decoded yet
                check_dimensions(name, width, height, _BYTES_PER_PIXEL.get(image.mode, 4))
                fast = _gray_png_with_opencv(data, image)
                if fast is not None:
                    return fast
                if reduce_to and image.format == "JPEG":
                    side = JPEG_REDUCED_MARGIN * reduce_to
                    image.draft(image.mode, (side, side))  # the largest DCT scaling that keeps both sides >= side
                image.load()
                return _to_grayscale(name, image)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageTooLarge(f"{name}: image is implausibly large ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports truncated and corrupt data as OSError ("image file is
        # truncated", "broken data stream") or SyntaxError (bad PNG chunks).
        raise DataError(f"{name}: cannot decode image: {err}") from None


#: The PNGs :func:`_gray_png_with_opencv` decodes: plain grayscale (NIH's are 8-bit), by Pillow's mode.
_OPENCV_PNG_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16}
#: The last 12 bytes of every whole PNG: the empty IEND chunk and its CRC.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _gray_png_with_opencv(data: bytes, image: Image.Image) -> np.ndarray | None:
    """A grayscale PNG's pixels decoded by OpenCV (libpng), or None for anything else or anything it refuses
    (Pillow then decodes it, and names what is wrong). The same pixels as Pillow's (PNG is lossless; tested on
    the sample's images), in three quarters of the time at 1,024 px: most of a radiograph's decoding is undoing
    PNG's row filters, which libpng does faster than Pillow. Pillow has already read the header and the image's
    size has been checked against :data:`MAX_DECODED_BYTES`; interlaced files, any with a transparency key or a
    palette, and any not ending in PNG's end chunk (a truncated file, which Pillow names as such) stay with
    Pillow."""
    dtype = _OPENCV_PNG_MODES.get(image.mode)
    if (image.format != "PNG" or dtype is None or image.info.get("interlace") or "transparency" in image.info
            or not data.endswith(_PNG_END)):
        return None
    import cv2  # deferred: OpenCV's import costs 0.1 s, and only decoding needs it here

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != dtype or pixels.shape != (image.size[1], image.size[0]):
        return None
    return pixels if dtype == np.uint8 else _SIXTEEN_TO_EIGHT[pixels]


#: round(v / 257) for every 16-bit value v: 65535 -> 255, the full range onto the full range.
_SIXTEEN_TO_EIGHT = np.rint(np.arange(65536) / 257.0).astype(np.uint8)


def _to_grayscale(path: str, image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # A lookup table rather than arithmetic: the 8-bit image comes straight from the 16-bit pixels, with no
        # float copies (three float64 copies of a 5,700 x 5,700 image took 780 MB).
        values = np.asarray(image)
        if mode == "I" and (values.max(initial=0) > 65535 or values.min(initial=0) < 0):
            raise DataError(f"{path}: 32-bit integer pixels are not supported")
        return _SIXTEEN_TO_EIGHT[values]
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    if mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(black, rgba).convert("L"), dtype=np.uint8).copy()
    if mode in ("RGB", "P", "CMYK", "YCbCr"):
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    raise DataError(f"{path}: unsupported image mode {mode!r}")


def check_images(paths: list[str | os.PathLike], progress: bool = True) -> list[tuple[str, str]]:
    """Decode every image; return ``(path, error message)`` for each that fails."""

    failures = []
    for path in tqdm(paths, desc="checking images", unit="img", disable=not progress):
        try:
            load_grayscale(path)
        except DataError as err:
            failures.append((str(path), str(err)))
    return failures
