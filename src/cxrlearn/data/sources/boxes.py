"""NIH's radiologist bounding boxes (``BBox_List_2017.csv``): 984 boxes for 8 findings.

Coordinates are in the 1024×1024 pixel space NIH distributes the images in
(:data:`BOX_SPACE`); the header has trailing empty columns, and Infiltration is
spelled ``Infiltrate``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from cxrlearn.data.columns import IMAGE
from cxrlearn.data.sources.nih import _read_text
from cxrlearn.errors import DataError
from cxrlearn.findings import canonical_finding

BOX_SPACE = 1024
FINDING = "finding"


def read_boxes(path: str | os.PathLike) -> pd.DataFrame:
    """Columns ``image, finding, x, y, w, h`` (finding names canonical)."""
    path = Path(path)
    frame = pd.read_csv(io.StringIO(_read_text(path)), header=None, skiprows=1, dtype=str, keep_default_na=False)
    if frame.shape[1] < 6:
        raise DataError(f"{path}: expected the columns Image Index, Finding Label, Bbox [x, y, w, h]")
    out = pd.DataFrame({IMAGE: frame[0].str.strip()})
    findings = []
    for i, name in enumerate(frame[1]):
        try:
            findings.append(canonical_finding(name))
        except KeyError:
            raise DataError(f"{path}: line {i + 2}: unknown finding {name!r}") from None
    out[FINDING] = findings
    for column, source in zip("xywh", range(2, 6)):
        values = pd.to_numeric(frame[source].str.strip(), errors="coerce")
        if values.isna().any():
            i = int(values.isna().to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: line {i + 2}: box {column} {frame[source].iloc[i]!r} is not a number")
        out[column] = values.to_numpy()
    return out
