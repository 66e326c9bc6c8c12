"""CheXpert (Irvin et al., AAAI 2019): ``train.csv`` and ``valid.csv`` as Stanford publishes them.

Header: ``Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,`` then the 13 observations (Enlarged
Cardiomediastinum … Support Devices). Labels: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain,
blank not mentioned (unknown). ``Path`` starts with the release's folder (``CheXpert-v1.0-small/`` for the
downsampled release, ``CheXpert-v1.0/`` for the full one): the image is that path without it, relative to
the folder that holds ``train/`` and ``valid/``. The patient is the ``patientNNNNN`` folder.
"""

from __future__ import annotations

import os

import pandas as pd

from cxrlearn.data.columns import AGE, IMAGE, PATIENT_ID, SEX, SOURCE_SPLIT, VIEW
from cxrlearn.data.sources.generic import (
    canonical_age,
    canonical_sex,
    label_files,
    labels_from,
    read_frame,
    require_columns,
)
from cxrlearn.errors import DataError

#: CheXpert's observations, each its own harmonised name ("No Finding" is the absence of the others).
OBSERVATIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
HARMONISED = {name: name for name in OBSERVATIONS}
FILES = ("train.csv", "valid.csv")
_RELEASES = ("CheXpert-v1.0-small/", "CheXpert-v1.0/")


def labelled_frame(path, frame: pd.DataFrame, mapping: dict[str, str], uncertain: str) -> dict[str, object]:
    """The harmonised finding columns of a CheXpert-labeller frame (CheXpert's and MIMIC-CXR's)."""
    require_columns(path, frame, mapping, "a CheXpert-labeller table")
    return {harmonised: labels_from(path, frame[column], column, uncertain) for column, harmonised in mapping.items()}


def read_chexpert(path: str | os.PathLike, uncertain: str = "ignore") -> pd.DataFrame:
    """``path``: ``train.csv`` or ``valid.csv``, or the folder holding them (both are read)."""
    parts = []
    for file in label_files(path, FILES):
        frame = read_frame(file)
        require_columns(file, frame, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"],
                        "CheXpert's train.csv or valid.csv")
        image = frame["Path"].str.strip()
        for release in _RELEASES:
            image = image.str.removeprefix(release)
        patient = image.str.extract(r"(patient\d+)", expand=False)
        if patient.isna().any():
            row = int(patient.isna().to_numpy().argmax())
            raise DataError(f"{file}: line {row + 2}: no patientNNNNN folder in {frame['Path'].iloc[row]!r}")
        lateral = frame["Frontal/Lateral"].str.strip().str.lower().eq("lateral")
        out = pd.DataFrame({IMAGE: image, PATIENT_ID: patient,
                            VIEW: frame["AP/PA"].str.strip().str.upper().where(~lateral, "LATERAL"),
                            SEX: canonical_sex(frame["Sex"]), AGE: canonical_age(file, frame["Age"], "Age"),
                            SOURCE_SPLIT: "valid" if file.name.startswith("valid") else "train"})
        parts.append(out.assign(**labelled_frame(file, frame, HARMONISED, uncertain)))
    return pd.concat(parts, ignore_index=True)
