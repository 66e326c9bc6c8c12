"""Any labelled table: a hospital's own studies, or a public dataset's labels written out as one CSV or Parquet.

One row per image: an image column (a file name, or a path relative to the image folder), a patient
column, optional view, sex and age columns, and one column per finding holding 1, 0, blank (unknown:
not labelled for this image) or -1 (uncertain, as CheXpert's labeller writes it; what it becomes is the
``uncertain`` policy: unknown, positive or negative). Column names are the caller's
(:class:`TableColumns`, ``data.columns`` in a config); the findings are the named ones, or every other
column; ``view``, ``sex``, ``age`` and ``dataset`` columns are read as such unless named otherwise, so a table
:func:`write_table` wrote (a merged one, say) reads back as it was. The result is the frame
:mod:`cxrlearn.data.columns` describes.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlearn._files import read_bytes, write_atomic
from cxrlearn.data.columns import (AGE, DATASET, IMAGE, METADATA, PATIENT_ID, SEX, UNCERTAIN_POLICIES, VIEW,
                                   finding_columns)
from cxrlearn.data.decoding.images import outside
from cxrlearn.errors import DataError
from cxrlearn.findings import canonical_column

log = logging.getLogger(__name__)

#: The values a finding column may hold, and what each means (NaN: unknown).
LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}
_SEXES = {"m": "M", "male": "M", "f": "F", "female": "F"}


@dataclass(frozen=True)
class TableColumns:
    """Which of a table's columns hold what (``data.columns`` in a config)."""

    image: str = "image"
    patient: str = "patient"
    view: str | None = None
    sex: str | None = None
    age: str | None = None

    @classmethod
    def from_dict(cls, values: dict) -> TableColumns:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise DataError(f"data.columns: unknown key(s) {', '.join(sorted(unknown))} (known: image, patient, "
                            "view, sex, age)")
        return cls(**values)


def read_frame(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV (plain or gzipped) or Parquet file as text columns; :class:`DataError` naming the file."""
    path = Path(path)
    data = read_bytes(path, "label table", DataError)
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(io.BytesIO(data))
            return frame.astype(object).where(frame.notna(), "").astype(str)
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False,
                           compression="gzip" if data[:2] == b"\x1f\x8b" else None)
    except ImportError as err:
        raise DataError(f"{path}: reading Parquet needs pyarrow ({err})") from None
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as err:
        raise DataError(f"{path}: not a readable CSV or Parquet table ({err})") from None


def label_files(path: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """``path`` itself, or the files of ``names`` in the folder ``path`` (those present; at least one)."""
    path = Path(path)
    files = [path / name for name in names if (path / name).is_file()] if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: neither {' nor '.join(names)} is here")
    return files


def require_columns(path, frame: pd.DataFrame, needed, what: str) -> None:
    """:class:`DataError` naming the file and the columns it lacks to be ``what``."""
    missing = sorted(c for c in needed if c not in frame.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}: not {what}")


def labels_from(path, raw: pd.Series, column: str, uncertain: str, first_line: int = 2) -> np.ndarray:
    """One finding column's text as 1.0 / 0.0 / NaN, uncertain (-1) following the policy; a value of any other
    kind is refused naming the file, column and line."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"data.uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, not {uncertain!r}")
    text = raw.astype(str).str.strip()
    bad = ~text.isin(LABEL_VALUES.keys())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: column {column!r} line {row + first_line}: {text.iloc[row]!r} is not a label "
                        "(1, 0, -1 for uncertain, or blank for unknown)")
    values = text.map(LABEL_VALUES).to_numpy(dtype=np.float32)
    values[values == -1.0] = UNCERTAIN_POLICIES[uncertain]
    return values


def canonical_sex(raw: pd.Series) -> pd.Series:
    """``M``/``F`` from the common spellings; anything else (blank, "O", "Unknown") is unknown (None)."""
    return raw.astype(str).str.strip().str.lower().map(_SEXES).astype(object)


def canonical_age(path, raw: pd.Series, column: str, first_line: int = 2) -> np.ndarray:
    values = pd.to_numeric(raw.astype(str).str.strip().replace("", np.nan), errors="coerce").to_numpy(dtype=float)
    bad = (~np.isnan(values) & ((values < 0) | (values > 150))) | (raw.astype(str).str.strip().ne("")
                                                                     & np.isnan(values)).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: column {column!r} line {row + first_line}: {raw.iloc[row]!r} is not an age in years")
    return values


def same_patient_ids(ids: pd.Series, path) -> pd.Series:
    """Patient IDs of digits that differ only by leading zeros ("12" and "00012": a spreadsheet drops them, an
    export pads them) are one patient: they are written the same way (without the zeros), so that the patient-wise
    split keeps their images together, and a warning names the pairs. Other IDs are kept as they are written."""
    digits = ids.str.fullmatch(r"[0-9]+").fillna(False).astype(bool)
    stripped = ids[digits].str.lstrip("0").replace("", "0")
    variants = ids[digits].groupby(stripped).unique()
    merged = variants[variants.map(len) > 1]
    normal = ids.copy()
    if len(merged):
        clash = stripped.isin(merged.index)
        normal[clash[clash].index] = stripped[clash]
        shown = "; ".join(" = ".join(sorted(v)) for v in merged.iloc[:5])
        log.warning(f"{path}: {len(merged):,} patient ID(s) written with and without leading zeros are taken as one "
                    f"patient each ({shown}{'; ...' if len(merged) > 5 else ''}), so that no patient straddles the "
                    f"split")
    return normal


def read_table(path: str | os.PathLike, columns: TableColumns = TableColumns(), findings: list[str] | None = None,
               uncertain: str = "ignore") -> pd.DataFrame:
    """A labelled table in the generic format, as cxrlearn's frame (image, patient_id, [view, sex, age], findings)."""
    frame = read_frame(path)
    given = {"image": columns.image, "patient": columns.patient, "view": columns.view, "sex": columns.sex,
             "age": columns.age}
    missing = [f"{role} ({name!r})" for role, name in given.items() if name and name not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column for {', '.join(missing)}; its columns are {', '.join(frame.columns)}. "
                        "Name them with data.columns (for example --set data.columns.image=Path)")
    for role in ("view", "sex", "age"):  # a column under cxrlearn's own name (a table write_table wrote)
        if given[role] is None and role in frame.columns:
            given[role] = role
    columns = TableColumns(**given)
    used = {name for name in given.values() if name} | ({DATASET} if DATASET in frame.columns else set())
    others = [c for c in frame.columns if c not in used]
    if findings:
        findings = _chosen_columns(path, findings, others)
        ignored = [c for c in others if c not in findings]
        if ignored:
            log.info(f"{Path(path).name}: column(s) {', '.join(ignored)} ignored (not among the findings named)")
    else:
        findings = others
    if not findings:
        raise DataError(f"{path}: no finding columns (every column is the image, patient or metadata)")
    clash = [f for f in findings if f in METADATA]
    if clash:
        raise DataError(f"{path}: finding column(s) {', '.join(clash)} have the names of cxrlearn's own columns; "
                        "rename them")
    out = pd.DataFrame({IMAGE: frame[columns.image].str.strip(), PATIENT_ID: frame[columns.patient].str.strip()})
    for role, target in (("image", IMAGE), ("patient", PATIENT_ID)):
        empty = out[target].eq("")
        if empty.any():
            raise DataError(f"{path}: column {given[role]!r} line {int(np.flatnonzero(empty)[0]) + 2} is empty")
    out[PATIENT_ID] = same_patient_ids(out[PATIENT_ID], path)
    escaping = out[IMAGE].map(outside).to_numpy()
    if escaping.any():
        row = int(np.flatnonzero(escaping)[0])
        raise DataError(f"{path}: column {given['image']!r} line {row + 2}: {out[IMAGE].iloc[row]!r} is not a path "
                        "inside the image folder (absolute paths, '..' and backslashes are refused)")
    repeated = out[IMAGE].duplicated()
    if repeated.any():
        raise DataError(f"{path}: image {out[IMAGE][repeated].iloc[0]!r} is listed twice "
                        f"(line {int(np.flatnonzero(repeated)[0]) + 2})")
    if DATASET in frame.columns:  # a merged table written out (cxrlearn.data.sources.datasets.merge_tables)
        out[DATASET] = frame[DATASET].str.strip()
    if columns.view:
        out[VIEW] = frame[columns.view].str.strip().str.upper()
    if columns.sex:
        out[SEX] = canonical_sex(frame[columns.sex])
    if columns.age:
        out[AGE] = canonical_age(path, frame[columns.age], columns.age)
    for column, name in _finding_names(path, findings).items():
        out[name] = labels_from(path, frame[column], column, uncertain)
    return out


def _chosen_columns(path, wanted: list[str], columns: list[str]) -> list[str]:
    """The table's columns that ``wanted`` names, by the column's name or its canonical finding name
    (``--findings Infiltration`` finds an ``Infiltrate`` column); one named that the table lacks is refused."""
    by_name = {c: c for c in columns} | {canonical_column(c): c for c in columns if canonical_column(c) not in columns}
    absent = [w for w in wanted if w.strip() not in by_name and canonical_column(w) not in by_name]
    if absent:
        raise DataError(f"{path}: finding column(s) {', '.join(map(repr, absent))} not in the table "
                        f"(its columns: {', '.join(columns)})")
    return [by_name.get(w.strip()) or by_name[canonical_column(w)] for w in wanted]


def _finding_names(path, columns: list[str]) -> dict[str, str]:
    """Each finding column and the name it is read under (:func:`cxrlearn.findings.canonical_column`): two
    columns that name one finding are refused, naming both."""
    names: dict[str, str] = {}
    for column in columns:
        name = canonical_column(column)
        twin = next((c for c, n in names.items() if n == name), None)
        if twin is not None:
            raise DataError(f"{path}: columns {twin!r} and {column!r} both name the finding {name!r}: keep one")
        names[column] = name
    renamed = [f"{c} -> {n}" for c, n in names.items() if c != n]
    if renamed:
        log.info(f"{Path(path).name}: finding column(s) read under their harmonised names: {', '.join(renamed)}")
    return names


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """cxrlearn's frame as a table in the generic format (Parquet for ``.parquet``, else CSV; gzipped for ``.gz``):
    image, patient, the metadata it has (dataset, view, sex, age) and each finding as 1, 0 or blank (unknown).
    :func:`read_table` with the default columns reads it back as it was."""
    path = Path(path)
    findings = finding_columns(table)
    out = pd.DataFrame({"image": table[IMAGE], "patient": table[PATIENT_ID]})
    for column in (DATASET, VIEW, SEX, AGE):
        if column in table.columns:
            out[column] = table[column]
    for finding in findings:
        out[finding] = pd.array(table[finding].to_numpy(dtype=np.float64), dtype="Float64").astype("Int8")
    buffer = io.BytesIO()
    if path.suffix.lower() == ".parquet":
        out.to_parquet(buffer, index=False)
    else:
        out.to_csv(buffer, index=False, compression={"method": "gzip", "mtime": 0} if path.suffix.lower() == ".gz"
                   else None)
    write_atomic(path, buffer.getvalue())
    return path
