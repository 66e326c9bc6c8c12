"""VinDr-CXR (Nguyen et al., Scientific Data 2022): ``image_labels_train.csv`` and ``image_labels_test.csv``.

Train: one row per image *and radiologist* (``image_id,rad_id,`` then 28 columns of 0/1; three
radiologists read each image). Test: one row per image, the consensus of five (no ``rad_id``). The
rule stated here: a finding is positive when most of an image's radiologists marked it (``majority``;
``any`` takes one); a finding made of several columns (Fracture: rib or clavicle) is marked by a reader
who marked any of them. The images are DICOM files ``<image_id>.dicom``. VinDr-CXR publishes no patient
identifier, so each image is its own patient: a split of it cannot keep a patient's images together.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cxrlearn.data.columns import IMAGE, PATIENT_ID, READERS, SOURCE_SPLIT
from cxrlearn.data.sources.generic import label_files, labels_from, read_frame, require_columns
from cxrlearn.errors import DataError

#: Harmonised finding -> VinDr-CXR's columns (positive if any of them is).
COLUMNS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",), "Cardiomegaly": ("Cardiomegaly",), "Consolidation": ("Consolidation",),
    "Edema": ("Edema",), "Emphysema": ("Emphysema",), "Fibrosis": ("Pulmonary fibrosis",),
    "Fracture": ("Rib fracture", "Clavicle fracture"), "Infiltration": ("Infiltration",),
    "Lung Opacity": ("Lung Opacity",), "Nodule or Mass": ("Nodule/Mass",), "Pleural Effusion": ("Pleural effusion",),
    "Pleural Thickening": ("Pleural thickening",), "Pneumonia": ("Pneumonia",), "Pneumothorax": ("Pneumothorax",),
}
FILES = ("image_labels_train.csv", "image_labels_test.csv")
RULES = ("majority", "any")


def read_vindr(path: str | os.PathLike, rule: str = "majority") -> pd.DataFrame:
    """``path``: one of the two tables, or the folder holding them (both are read)."""
    if rule not in RULES:
        raise DataError(f"VinDr-CXR aggregation rule must be one of {', '.join(RULES)}, not {rule!r}")
    parts = []
    for file in label_files(path, FILES):
        frame = read_frame(file)
        needed = ["image_id", *sorted({c for columns in COLUMNS.values() for c in columns})]
        require_columns(file, frame, needed, "a VinDr-CXR label table")
        values = {c: labels_from(file, frame[c], c, "negative") for c in needed[1:]}
        # Each reader's mark of a harmonised finding (any of its columns), then the readers' agreement.
        marks = pd.DataFrame({name: np.any([values[c] for c in columns], axis=0).astype(np.float32)
                              for name, columns in COLUMNS.items()})
        marks["image_id"] = frame["image_id"].str.strip()
        by_image = marks.groupby("image_id", sort=False)
        share = by_image.mean()
        agreed = share > 0.5 if rule == "majority" else share > 0
        out = pd.DataFrame({IMAGE: agreed.index + ".dicom", PATIENT_ID: agreed.index})
        for name in COLUMNS:
            out[name] = agreed[name].to_numpy(dtype=np.float32)
        out[READERS] = by_image.size().to_numpy()
        out[SOURCE_SPLIT] = "test" if "test" in file.name else "train"
        parts.append(out)
    return pd.concat(parts, ignore_index=True)
