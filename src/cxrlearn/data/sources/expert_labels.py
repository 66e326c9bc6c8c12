"""Google's 2019 expert labels for 4,376 ChestX-ray14 images (Majkowska et al., Radiology 2019).

Three radiologists adjudicated four findings per image: Fracture, Pneumothorax,
Airspace opacity, and Nodule or mass. NIH's labels were mined from reports by
NLP and are noisy; these are the closest the dataset has to a reference
standard, so evaluation reports AUC against them beside NIH's labels on the
same images.

File: ``google2019_nih-chest-xray-labels.csv.gz`` (NIH's columns, then the four
findings as YES/NO and ``Set Id``; Windows line endings, plain or gzipped).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from cxrlearn.data.columns import IMAGE
from cxrlearn.data.sources.nih import _read_text
from cxrlearn.errors import DataError

#: The file's column -> canonical name. "Nodule or mass" has no single NIH
#: counterpart: it is compared with Nodule or Mass (the model: their maximum).
EXPERT_FINDINGS = {
    "Fracture": "fracture",
    "Pneumothorax": "pneumothorax",
    "Airspace opacity": "airspace_opacity",
    "Nodule or mass": "nodule_or_mass",
}
SET_ID = "set_id"


def read_expert_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Columns ``image``, the four findings as 0/1, and ``set_id`` (test or val)."""
    path = Path(path)
    frame = pd.read_csv(io.StringIO(_read_text(path)), dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    wanted = ["Image Index", *EXPERT_FINDINGS, "Set Id"]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}: not Google's 2019 expert label file?")
    out = pd.DataFrame({IMAGE: frame["Image Index"].str.strip(), SET_ID: frame["Set Id"].str.strip()})
    for column, name in EXPERT_FINDINGS.items():
        values = frame[column].str.strip().str.upper()
        bad = ~values.isin(["YES", "NO"])
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: line {i + 2}: {column} is {frame[column].iloc[i]!r}, not YES or NO")
        out[name] = (values == "YES").astype("uint8").to_numpy()
    repeated = out[IMAGE].duplicated()
    if repeated.any():
        raise DataError(f"{path}: image {out[IMAGE][repeated].iloc[0]!r} is listed more than once")
    return out
