"""PadChest (Bustos et al., Medical Image Analysis 2020): ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``.

One row per image: ``ImageID`` (the PNG's name), ``ImageDir`` (its archive folder), ``PatientID``,
``PatientBirth`` (year), ``PatientSex_DICOM``, ``Projection`` (PA, AP, AP_horizontal, L, COSTAL),
``StudyDate_DICOM`` (YYYYMMDD) and ``Labels``: the findings the report states, a Python-style list of
lower-case terms (``['pleural effusion', 'cardiomegaly']``; ``['normal']``). A finding is positive when
one of its terms is listed and negative when none is; an image without labels, or marked ``exclude``,
has unknown labels. Age is the study year less the birth year.
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pandas as pd

from cxrlearn.data.columns import AGE, IMAGE, PATIENT_ID, SEX, VIEW
from cxrlearn.data.sources.generic import canonical_sex, read_frame, require_columns
from cxrlearn.errors import DataError

#: Harmonised finding -> PadChest's terms for it (its label hierarchy's finer terms included).
TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "round atelectasis", "total atelectasis"),
    "Cardiomegaly": ("cardiomegaly",),
    "Consolidation": ("consolidation",),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis",),
    "Fracture": ("fracture", "rib fracture", "clavicle fracture", "vertebral fracture", "humeral fracture",
                 "callus rib fracture"),
    "Hernia": ("hiatal hernia",),
    "Infiltration": ("infiltrates",),
    "Mass": ("mass", "pulmonary mass"),
    "Nodule": ("nodule", "multiple nodules"),
    "Pleural Effusion": ("pleural effusion", "loculated pleural effusion"),
    "Pleural Thickening": ("pleural thickening", "apical pleural thickening"),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",),
}
NEEDED = ("ImageID", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection", "StudyDate_DICOM", "Labels")


def _terms(path, line: int, text: str) -> set[str] | None:
    """The listed terms, or None for an unlabelled row."""
    text = text.strip()
    if not text or text.lower() == "nan":
        return None
    try:
        listed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise DataError(f"{path}: line {line}: Labels {text[:60]!r} is not a list of terms") from None
    if not isinstance(listed, (list, tuple)):
        raise DataError(f"{path}: line {line}: Labels {text[:60]!r} is not a list of terms")
    terms = {str(term).strip().lower() for term in listed if str(term).strip()}
    return None if "exclude" in terms or not terms else terms


def read_padchest(path: str | os.PathLike) -> pd.DataFrame:
    frame = read_frame(path)
    require_columns(path, frame, NEEDED, "PadChest's label table")
    labels = {name: np.zeros(len(frame), dtype=np.float32) for name in TERMS}
    for row, text in enumerate(frame["Labels"]):
        terms = _terms(path, row + 2, text)
        for name, synonyms in TERMS.items():
            labels[name][row] = np.nan if terms is None else float(any(t in terms for t in synonyms))
    birth = pd.to_numeric(frame["PatientBirth"].str.strip(), errors="coerce")
    year = pd.to_numeric(frame["StudyDate_DICOM"].str.strip().str[:4], errors="coerce")
    out = pd.DataFrame({IMAGE: frame["ImageID"].str.strip(), PATIENT_ID: frame["PatientID"].str.strip(),
                        VIEW: frame["Projection"].str.strip().str.upper(), SEX: canonical_sex(frame["PatientSex_DICOM"]),
                        AGE: (year - birth).to_numpy(dtype=float)})
    return out.assign(**labels)
