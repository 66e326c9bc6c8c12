"""MIMIC-CXR-JPG (Johnson et al., 2019), as PhysioNet publishes it: three tables joined.

- ``mimic-cxr-2.0.0-chexpert.csv(.gz)``: ``subject_id,study_id`` and the 14 CheXpert-labeller columns
  (labels per *study*: 1.0, 0.0, -1.0 uncertain, blank unknown);
- ``mimic-cxr-2.0.0-metadata.csv(.gz)``: one row per image (``dicom_id``) with ``ViewPosition``;
- ``mimic-cxr-2.0.0-split.csv(.gz)``: ``dicom_id,study_id,subject_id,split`` (kept as ``source_split``).

Every image of a study takes the study's labels; a study the labeller did not label has unknown labels.
The image is ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` relative to the release folder, the patient the
``subject_id``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlearn.data.columns import IMAGE, PATIENT_ID, SOURCE_SPLIT, VIEW
from cxrlearn.data.sources.chexpert import HARMONISED as CHEXPERT_HARMONISED
from cxrlearn.data.sources.chexpert import labelled_frame
from cxrlearn.data.sources.generic import read_frame, require_columns
from cxrlearn.errors import DataError

HARMONISED = CHEXPERT_HARMONISED
TABLES = {"labels": "chexpert", "metadata": "metadata", "split": "split"}


def _find(folder: Path, kind: str) -> Path:
    found = sorted(folder.glob(f"mimic-cxr-*-{kind}.csv*"))
    if not found:
        raise DataError(f"{folder}: no mimic-cxr-*-{kind}.csv(.gz) here (MIMIC-CXR-JPG's {kind} table)")
    return found[-1]


def read_mimic(folder: str | os.PathLike, uncertain: str = "ignore") -> pd.DataFrame:
    """The release folder holding the three tables (and ``files/``)."""
    folder = Path(folder)
    paths = {role: _find(folder, kind) for role, kind in TABLES.items()}
    labels, metadata, split = (read_frame(paths[role]) for role in TABLES)
    for role, frame, needed in (("labels", labels, ["subject_id", "study_id"]),
                                ("metadata", metadata, ["dicom_id", "subject_id", "study_id", "ViewPosition"]),
                                ("split", split, ["dicom_id", "split"])):
        require_columns(paths[role], frame, needed, f"MIMIC-CXR-JPG's {TABLES[role]} table")
    values = pd.DataFrame(labelled_frame(paths["labels"], labels, HARMONISED, uncertain))
    values["study_id"] = labels["study_id"].str.strip()
    if values["study_id"].duplicated().any():
        raise DataError(f"{paths['labels']}: study {values['study_id'][values['study_id'].duplicated()].iloc[0]} "
                        "is labelled twice")
    images = metadata.assign(study_id=metadata["study_id"].str.strip(), subject_id=metadata["subject_id"].str.strip())
    joined = images.merge(values, on="study_id", how="left").merge(
        split[["dicom_id", "split"]].rename(columns={"split": "mimic_split"}), on="dicom_id", how="left")
    subject = joined["subject_id"]
    image = ("files/p" + subject.str[:2] + "/p" + subject + "/s" + joined["study_id"] + "/"
             + joined["dicom_id"].str.strip() + ".jpg")
    out = pd.DataFrame({IMAGE: image, PATIENT_ID: subject, VIEW: joined["ViewPosition"].str.strip().str.upper(),
                        SOURCE_SPLIT: joined["mimic_split"].fillna("")})
    for name in HARMONISED.values():
        out[name] = joined[name].to_numpy(dtype=np.float32)  # NaN where the study has no labels
    return out
