"""AUC against Google's 2019 radiologist labels, beside NIH's labels on the same images.

Two of the four expert findings map onto the model's outputs: Pneumothorax
(its own output) and "Nodule or mass" (scored by the larger of the Nodule and
Mass probabilities; NIH's label: Nodule or Mass). If the model looks better
against NIH's labels than against the radiologists', part of what it learnt
is the NLP labeller, not the disease.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cxrlearn.data.columns import IMAGE
from cxrlearn.data.sources.expert_labels import SET_ID
from cxrlearn.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from cxrlearn.evaluation.metrics import finding_metrics

#: Expert finding -> (its column in the expert table, the model findings it is scored by).
COMPARED = {
    "Pneumothorax": ("pneumothorax", ("Pneumothorax",)),
    "Nodule or mass": ("nodule_or_mass", ("Nodule", "Mass")),
}


def expert_metrics(
    images: Sequence[str],
    patient_ids: np.ndarray,
    scores: np.ndarray,
    nih_labels: np.ndarray,
    findings: Sequence[str],
    expert: pd.DataFrame,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """On the evaluated images that have expert labels: AUC (with intervals) against each label set."""
    position = {name: i for i, name in enumerate(images)}
    labelled = expert[expert[IMAGE].isin(position)]
    rows = np.array([position[name] for name in labelled[IMAGE]], dtype=int)
    result = {"n_images": int(len(rows)), "sets": labelled[SET_ID].value_counts().to_dict()}
    if len(rows) == 0:
        result["note"] = "none of the evaluated images has expert labels"
        return result
    index = {name: i for i, name in enumerate(findings)}
    names = list(COMPARED)
    model_scores = np.stack(
        [scores[rows][:, [index[f] for f in fs]].max(axis=1) for _, fs in COMPARED.values()], axis=1
    )
    expert_y = np.stack([labelled[column].to_numpy() for column, _ in COMPARED.values()], axis=1)
    nih_y = np.stack([nih_labels[rows][:, [index[f] for f in fs]].max(axis=1) for _, fs in COMPARED.values()], axis=1)
    patients = np.asarray(patient_ids)[rows]
    for key, y in (("expert", expert_y), ("nih", nih_y)):
        metrics, _ = finding_metrics(y, model_scores, patients, names, n_resamples=n_resamples, seed=seed)
        result[key] = {k: getattr(metrics, k) for k in ("auc", "auc_ci95", "positives", "undefined")}
    # How often NIH's NLP labels agree with the radiologists on these images.
    result["agreement"] = {name: float((expert_y[:, i] == nih_y[:, i]).mean()) for i, name in enumerate(names)}
    return result
