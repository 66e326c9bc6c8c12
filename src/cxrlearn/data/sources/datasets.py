"""The datasets cxrlearn reads by name (``--dataset NAME``), and tables of several merged into one.

Every reader returns cxrlearn's frame (:mod:`cxrlearn.data.columns`). NIH's keeps NIH's 14 names (the
models trained on it predict those); the others name their findings in the harmonised vocabulary
(:data:`cxrlearn.findings.HARMONISED`), and :func:`merge_tables` harmonises NIH's too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cxrlearn.data.columns import DATASET, IMAGE, PATIENT_ID, finding_columns
from cxrlearn.data.decoding.images import outside
from cxrlearn.data.sources import tables
from cxrlearn.data.sources.chexpert import read_chexpert
from cxrlearn.data.sources.generic import TableColumns, read_table
from cxrlearn.data.sources.mimic import read_mimic
from cxrlearn.data.sources.nih import read_label_table
from cxrlearn.data.sources.padchest import read_padchest
from cxrlearn.data.sources.vindr import read_vindr
from cxrlearn.errors import DataError
from cxrlearn.findings import NIH_HARMONISED, canonical_column

#: Name -> reader of (path, uncertain policy). NIH's table has no uncertain labels; PadChest's and
#: VinDr-CXR's neither (VinDr-CXR's readers' marks are aggregated by majority).
READERS: dict[str, Callable[[str | os.PathLike, str], pd.DataFrame]] = {
    "nih": lambda path, uncertain: read_label_table(path),
    "chexpert": read_chexpert,
    "mimic": read_mimic,
    "padchest": lambda path, uncertain: read_padchest(path),
    "vindr": lambda path, uncertain: read_vindr(path),
}


def read_dataset(name: str, path: str | os.PathLike | None, uncertain: str = "ignore") -> pd.DataFrame:
    """The label table of dataset ``name`` at ``path`` (NIH's: the shipped table when ``path`` is None)."""
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; cxrlearn reads {', '.join(READERS)} (or any table: --table)")
    if path is None and name != "nih":
        raise DataError(f"--dataset {name}: say where its label files are")
    return READERS[name](path, uncertain)


def labels_path(table: str | os.PathLike | None = None, csv: str | os.PathLike | None = None) -> Path:
    """The file or folder :func:`read_labels` reads for these settings."""
    given = table or csv
    return Path(given) if given else tables.label_table()


def read_labels(table: str | os.PathLike | None = None, dataset: str | None = None, columns: dict | None = None,
                findings: list[str] | None = None, uncertain: str = "ignore",
                csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """A label table, as a config or the command line says (``data.table``, ``data.dataset``, ``data.columns``,
    ``data.findings``, ``data.uncertain``, ``data.csv``): another dataset's files at ``table``, read by its own
    reader; else the generic format at ``table`` (``columns`` naming its columns); else NIH's table at
    ``table`` or ``csv`` (as shipped when neither is given). ``findings`` keeps only those (in that order)."""
    if dataset not in (None, "nih"):
        frame = read_dataset(dataset, table, uncertain)
    elif table is not None and dataset is None:
        frame = read_table(table, TableColumns.from_dict(columns or {}), findings, uncertain)
    else:
        frame = read_label_table(table or csv)
    if findings:
        present = finding_columns(frame)
        findings = [f if f in present else canonical_column(f) for f in findings]
        absent = [f for f in findings if f not in present]
        if absent:
            raise DataError(f"data.findings names {', '.join(map(repr, absent))}, not among the table's findings "
                            f"({', '.join(present)})")
        frame = frame.drop(columns=[f for f in present if f not in findings])
        frame = frame[[c for c in frame.columns if c not in findings] + list(findings)]
    return frame


def harmonise_nih(table: pd.DataFrame) -> pd.DataFrame:
    """NIH's table with its findings under their harmonised names (``Effusion`` -> ``Pleural Effusion``)."""
    return table.rename(columns=NIH_HARMONISED)


def merge_tables(tables: dict[str, pd.DataFrame], image_folders: dict[str, str] | None = None) -> pd.DataFrame:
    """One table from several datasets' (name -> table; NIH's finding names harmonised in each): a ``dataset``
    column, patient ids prefixed by the dataset (no two datasets share a patient), and every finding any of them
    has; a finding a dataset lacks is unknown (NaN) there, never negative.

    ``image_folders`` (name -> folder) puts a dataset's relative image paths under a folder of the one image
    folder training reads (``chexpert`` -> ``CheXpert-v1.0-small``); file names (NIH's) are found by name where
    NIH's archives unpack in it and need none."""
    if not tables:
        raise DataError("nothing to merge")
    image_folders = dict(image_folders or {})
    unknown = sorted(set(image_folders) - set(tables))
    if unknown:
        raise DataError(f"an image folder is given for {', '.join(map(repr, unknown))}, not among the tables "
                        f"({', '.join(tables)})")
    parts, findings = [], []
    for name, table in tables.items():
        if name in image_folders:
            table = table.assign(**{IMAGE: _under(name, table[IMAGE], image_folders[name])})
        both = [c for c in finding_columns(table) if NIH_HARMONISED.get(c) in table.columns]
        if both:
            raise DataError(f"{name}: has both {both[0]!r} and {NIH_HARMONISED[both[0]]!r}, one finding under two "
                            "names: keep one")
        table = harmonise_nih(table)  # NIH's names, in NIH's table or a table that uses them
        findings += [f for f in finding_columns(table) if f not in findings]
        parts.append(table.assign(**{DATASET: name, PATIENT_ID: name + ":" + table[PATIENT_ID].astype(str)}))
    merged = pd.concat(parts, ignore_index=True, sort=False)
    for finding in findings:
        merged[finding] = merged[finding].astype(np.float32)  # absent in a dataset: NaN
    repeated = merged.duplicated("image")
    if repeated.any():
        image = merged[IMAGE][repeated].iloc[0]
        sources = merged.loc[merged[IMAGE] == image, DATASET].tolist()
        where = (f"twice in {sources[0]}" if sources[0] == sources[1]
                 else f"in both {sources[0]} and {sources[1]}")
        raise DataError(f"image {image!r} is listed {where}: an image may be in one source only")
    return merged


def _under(name: str, images: pd.Series, folder: str) -> pd.Series:
    """A dataset's relative image paths under ``folder``; file names are refused (:func:`find_images`
    finds them by name)."""
    if outside(folder.strip()):
        raise DataError(f"--image-folder {name}={folder}: not a folder inside the image folder (absolute paths, "
                        "'..' and backslashes are refused)")
    folder = folder.strip().strip("/")
    named = ~images.str.contains("/", regex=False)
    if named.any():
        raise DataError(f"{name}: its images are file names ({images[named].iloc[0]!r}), found by name in the "
                        "image folder as NIH's archives unpack: give no folder for them")
    if not folder:
        raise DataError(f"{name}: an empty image folder")
    return folder + "/" + images.str.lstrip("/")
