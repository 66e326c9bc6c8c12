"""The columns of cxrlearn's label table: the one frame every dataset reader returns and everything above reads.

A row is one image: its file (a name, or a path relative to the image folder), its patient, optional
metadata, and one column per finding holding 1, 0 or NaN (unknown: not labelled for this image). NIH's
table has its 14 findings (:data:`cxrlearn.findings.FINDINGS`), all known; another table has its own
(:func:`finding_columns`). ``path`` is added when the image is found on disk
(:func:`cxrlearn.data.decoding.images.attach_images`), ``split`` when a split is applied, ``dataset`` when
tables of several datasets are merged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrlearn.findings import FINDINGS

IMAGE = "image"
PATIENT_ID = "patient_id"
FOLLOW_UP = "follow_up"
AGE = "age"
SEX = "sex"
VIEW = "view"
WIDTH = "width"
HEIGHT = "height"
SPACING_X = "pixel_spacing_x"
SPACING_Y = "pixel_spacing_y"
PATH = "path"
SPLIT = "split"
DATASET = "dataset"
SOURCE_SPLIT = "source_split"  # the dataset's own split as published (CheXpert's train/valid, MIMIC-CXR's)
READERS = "readers"  # how many readers labelled the image (VinDr-CXR)
SEXES = ("M", "F")
#: Every column that is not a finding (readers may keep others of their own: see :func:`finding_columns`).
METADATA = (IMAGE, PATIENT_ID, FOLLOW_UP, AGE, SEX, VIEW, WIDTH, HEIGHT, SPACING_X, SPACING_Y, PATH, SPLIT, DATASET,
            SOURCE_SPLIT, READERS, "finding_labels")
#: What an uncertain label (-1, CheXpert's labeller) becomes: unknown (U-Ignore), 1 (U-Ones) or 0 (U-Zeros).
UNCERTAIN_POLICIES = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}


def finding_columns(table: pd.DataFrame) -> list[str]:
    """The table's findings, in its column order: NIH's 14 for NIH's table, else every non-metadata column."""
    if all(name in table.columns for name in FINDINGS):
        return list(FINDINGS)
    return [c for c in table.columns if c not in METADATA]


def label_matrix(table: pd.DataFrame) -> np.ndarray:
    """The (N, 14) 0/1 label matrix of NIH's table (every label known)."""
    return table[list(FINDINGS)].to_numpy(dtype=np.uint8)


def label_values(table: pd.DataFrame, findings: list[str] | None = None) -> np.ndarray:
    """The (N, findings) labels of any table as float32: 1, 0, or NaN where unknown."""
    return table[findings or finding_columns(table)].to_numpy(dtype=np.float32)


def no_finding(table: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the images with none of the findings ("No Finding")."""
    return label_matrix(table).sum(axis=1) == 0
