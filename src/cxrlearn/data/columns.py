"""The columns of cxrlearn's label table: the one frame every dataset reader returns and everything above reads.

A row is one image: its file name, its patient, optional metadata, and one 0/1 column per finding
(:data:`cxrlearn.findings.FINDINGS`). ``path`` is added when the image is found on disk
(:func:`cxrlearn.data.decoding.images.attach_images`), ``split`` when a split is applied.
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
SEXES = ("M", "F")


def label_matrix(table: pd.DataFrame) -> np.ndarray:
    """The (N, findings) 0/1 label matrix of a label table."""
    return table[list(FINDINGS)].to_numpy(dtype=np.uint8)


def no_finding(table: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the images with none of the findings ("No Finding")."""
    return label_matrix(table).sum(axis=1) == 0
