"""Reading NIH ChestX-ray14's label table and its official split lists.

The table comes in several shapes that all mean the same thing:

* ``Data_Entry_2017.csv`` as NIH first shipped it: the bracketed headers
  ``OriginalImage[Width,Height]`` and ``OriginalImagePixelSpacing[x,y]`` are split
  by the comma into two columns each, and every row ends with an empty column;
* ``Data_Entry_2017_v2020.csv``, NIH's 2020 revision: the same, without the
  trailing column;
* tables derived from them, such as the widely used 5% sample's
  ``sample_labels.csv``, which writes ages as ``060Y`` and names the size
  columns ``OriginalImageWidth`` and so on.

Any of them may be gzipped. :func:`read_label_table` turns each into one frame
with canonical column names (below) and one 0/1 column per finding, in
:data:`~cxrlearn.findings.FINDINGS` order. "No Finding" is the all-zero vector.
"""

from __future__ import annotations

import difflib
import gzip
import io
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlearn._files import read_bytes
from cxrlearn.data.columns import (
    AGE,
    FOLLOW_UP,
    HEIGHT,
    IMAGE,
    PATIENT_ID,
    SEX,
    SEXES,
    SPACING_X,
    SPACING_Y,
    VIEW,
    WIDTH,
)
from cxrlearn.data.sources import tables
from cxrlearn.errors import DataError
from cxrlearn.findings import FINDINGS, NO_FINDING

#: NIH's own column of "|"-joined finding names, kept as read.
FINDING_LABELS = "finding_labels"

# Source header (after stripping) -> canonical name. Several spellings map to the
# same name; which ones a table uses depends on its vintage (module docstring).
_COLUMN_NAMES: dict[str, str] = {
    "Image Index": IMAGE,
    "Finding Labels": FINDING_LABELS,
    "Follow-up #": FOLLOW_UP,
    "Patient ID": PATIENT_ID,
    "Patient Age": AGE,
    "Patient Gender": SEX,
    "View Position": VIEW,
    "OriginalImage[Width": WIDTH,
    "Height]": HEIGHT,
    "OriginalImageWidth": WIDTH,
    "OriginalImageHeight": HEIGHT,
    "OriginalImagePixelSpacing[x": SPACING_X,
    "y]": SPACING_Y,
    "OriginalImagePixelSpacing_x": SPACING_X,
    "OriginalImagePixelSpacing_y": SPACING_Y,
}
# The source header a user should see in an error for each canonical column.
_SOURCE_NAME = {
    IMAGE: "Image Index",
    FINDING_LABELS: "Finding Labels",
    FOLLOW_UP: "Follow-up #",
    PATIENT_ID: "Patient ID",
    AGE: "Patient Age",
    SEX: "Patient Gender",
    VIEW: "View Position",
}
REQUIRED_COLUMNS = (IMAGE, FINDING_LABELS, FOLLOW_UP, PATIENT_ID, AGE, SEX, VIEW)
OPTIONAL_COLUMNS = (WIDTH, HEIGHT, SPACING_X, SPACING_Y)


def _read_text(path: Path) -> str:
    """Return the file's text, gunzipping when it is gzip data (whatever its name)."""
    raw = read_bytes(path, "file", DataError)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise DataError(f"{path}: damaged or truncated gzip data ({err})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not a UTF-8 text table (byte {err.start} cannot be decoded)"
        ) from None


def _line_number(row_index: int) -> int:
    """Line of the file holding data row ``row_index`` (line 1 is the header)."""
    return int(row_index) + 2


def _rows_where(path: Path, mask: np.ndarray, what: str, values: pd.Series) -> DataError:
    """An error naming the first few offending lines and their values."""
    bad = np.flatnonzero(mask)
    shown = ", ".join(f"line {_line_number(i)} ({values.iloc[i]!r})" for i in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return DataError(f"{path}: {what}: {shown}{more}")


def _parse_age(path: Path, raw: pd.Series) -> np.ndarray:
    """Ages in years. Plain integers, or the derived tables' ``060Y``/``011M``/``020D``.

    Months and days are converted to whole years (rounded down), so an infant of
    ``011M`` is 0 years old.
    """
    text = raw.str.strip().str.upper()
    match = text.str.fullmatch(r"(\d{1,3})([YMD]?)")
    if not match.all():
        raise _rows_where(path, ~match.to_numpy(), "Patient Age is not a number of years", raw)
    parts = text.str.extract(r"(\d{1,3})([YMD]?)")
    number = parts[0].astype(np.int64).to_numpy()
    unit = parts[1].to_numpy()
    years = np.where(unit == "M", number // 12, np.where(unit == "D", number // 365, number))
    return years.astype(np.int16)


def _parse_int(path: Path, raw: pd.Series, column: str) -> np.ndarray:
    text = raw.str.strip()
    ok = text.str.fullmatch(r"\d+")
    if not ok.all():
        raise _rows_where(path, ~ok.to_numpy(), f"{column} is not a whole number", raw)
    return text.astype(np.int64).to_numpy()


def parse_finding_labels(path: Path, raw: pd.Series) -> np.ndarray:
    """The ``Finding Labels`` column as an (N, 14) uint8 matrix in FINDINGS order.

    Raises a :class:`DataError` naming the line for an unknown finding name, an
    empty cell, or "No Finding" given together with a finding: a typo must never
    become a silently wrong label.
    """
    text = raw.str.strip()
    if (text == "").any():
        raise _rows_where(path, (text == "").to_numpy(), "Finding Labels is empty", raw)
    # Each distinct label string is parsed once: the full table has ~800 of them.
    codes, uniques = pd.factorize(text, sort=False)
    known = {name: i for i, name in enumerate(FINDINGS)}
    unique_vectors = np.zeros((len(uniques), len(FINDINGS)), dtype=np.uint8)
    for u, labels in enumerate(uniques):
        names = [name.strip() for name in labels.split("|")]
        if NO_FINDING in names:
            if len(names) > 1:
                raise _rows_where(
                    path, (codes == u), f"'{NO_FINDING}' is given together with findings", raw
                )
            continue
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, FINDINGS + (NO_FINDING,), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise _rows_where(
                    path,
                    (codes == u),
                    f"unknown finding {name!r} (known: {', '.join(FINDINGS)}, "
                    f"or '{NO_FINDING}'){hint}",
                    raw,
                )
            unique_vectors[u, known[name]] = 1
    return unique_vectors[codes]


def _canonical_columns(path: Path, header: list[str]) -> dict[str, str]:
    """Map the file's headers to canonical names; raise naming any missing column."""
    mapping: dict[str, str] = {}
    for column in header:
        name = _COLUMN_NAMES.get(column.strip())
        if name is not None and name not in mapping.values():
            mapping[column] = name
    missing = [c for c in REQUIRED_COLUMNS if c not in mapping.values()]
    if missing:
        described = []
        for canonical in missing:
            expected = _SOURCE_NAME[canonical]
            close = difflib.get_close_matches(expected, [h.strip() for h in header], n=1)
            hint = f" (found {close[0]!r}: renamed?)" if close else ""
            described.append(f"{expected!r}{hint}")
        found = ", ".join(repr(h) for h in header if h.strip() and not h.startswith("Unnamed"))
        raise DataError(
            f"{path}: missing column(s) {', '.join(described)}. "
            f"An NIH ChestX-ray14 label table has {', '.join(repr(_SOURCE_NAME[c]) for c in REQUIRED_COLUMNS)}; "
            f"this file has {found}"
        )
    return mapping


def read_label_table(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read an NIH ChestX-ray14 label table (2017 or 2020 format, plain or gzipped); without a path,
    NIH's 2020 table as shipped with cxrlearn (:mod:`cxrlearn.data.sources.tables`).

    Returns a frame with the columns ``image, patient_id, follow_up, age, sex, view``
    (plus ``width, height, pixel_spacing_x, pixel_spacing_y`` where the table has
    them, and ``finding_labels`` as written), then one uint8 column per finding in
    :data:`FINDINGS` order. Rows keep the file's order.

    Raises :class:`DataError` naming the file and line for missing columns,
    unparseable values, unknown findings and duplicated images.
    """
    if path is None:

        path = tables.label_table()
    path = Path(path)
    text = _read_text(path)
    try:
        frame = pd.read_csv(
            io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=False
        )
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: not a readable CSV table ({err})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    mapping = _canonical_columns(path, list(frame.columns))
    # The 2017 file's trailing empty column (and any other unknown column) is dropped.
    frame = frame[list(mapping)].rename(columns=mapping)
    if frame.empty:
        raise DataError(f"{path}: the table has a header but no rows")

    out = pd.DataFrame({IMAGE: frame[IMAGE].str.strip()})
    empty_name = (out[IMAGE] == "").to_numpy()
    if empty_name.any():
        raise _rows_where(path, empty_name, "Image Index is empty", frame[IMAGE])
    duplicated = out[IMAGE].duplicated(keep=False).to_numpy()
    if duplicated.any():
        raise _rows_where(path, duplicated, "the same image is listed more than once", out[IMAGE])

    out[PATIENT_ID] = _parse_int(path, frame[PATIENT_ID], "Patient ID")
    out[FOLLOW_UP] = _parse_int(path, frame[FOLLOW_UP], "Follow-up #")
    out[AGE] = _parse_age(path, frame[AGE])
    sex = frame[SEX].str.strip().str.upper()
    bad_sex = ~sex.isin(SEXES).to_numpy()
    if bad_sex.any():
        raise _rows_where(path, bad_sex, "Patient Gender is not M or F", frame[SEX])
    out[SEX] = sex.to_numpy()
    view = frame[VIEW].str.strip().str.upper()
    if (view == "").any():
        raise _rows_where(path, (view == "").to_numpy(), "View Position is empty", frame[VIEW])
    out[VIEW] = view.to_numpy()
    for column in OPTIONAL_COLUMNS:
        if column in frame:
            values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
            if values.isna().any():
                raise _rows_where(
                    path, values.isna().to_numpy(), f"{column} is not a number", frame[column]
                )
            out[column] = values.to_numpy()
    out[FINDING_LABELS] = frame[FINDING_LABELS].str.strip().to_numpy()
    labels = parse_finding_labels(path, frame[FINDING_LABELS])
    for i, name in enumerate(FINDINGS):
        out[name] = labels[:, i]
    return out


def read_image_list(path: str | os.PathLike) -> list[str]:
    """Read one of NIH's official split lists (``train_val_list.txt``, ``test_list.txt``).

    One image name a line; blank lines are ignored. A name listed twice is an error.
    """
    path = Path(path)
    names = [line.strip() for line in _read_text(path).splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: the image list is empty")
    seen: set[str] = set()
    for number, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(f"{path}: image {name!r} is listed more than once (again on entry {number})")
        seen.add(name)
    return names
