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
from cxrlearn.records import Record

#: Expert finding -> (its column in the expert table, the model findings it is scored by).
COMPARED = {
    "Pneumothorax": ("pneumothorax", ("Pneumothorax",)),
    "Nodule or mass": ("nodule_or_mass", ("Nodule", "Mass")),
}


class AgainstLabels(Record):
    """AUC of the compared findings against one label set, with intervals, positives, and any without an AUC."""

    auc: dict[str, float | None]
    auc_ci95: dict[str, list[float] | None]
    positives: dict[str, int]
    undefined: dict[str, str]


class ExpertComparison(Record):
    """``metrics.json``'s ``expert``: on the judged images that have Google's expert labels, AUC against them
    and against NIH's labels of the same images, and how often the two label sets agree; or a note why not."""

    n_images: int
    sets: dict[str, int] | None = None
    note: str | None = None
    expert: AgainstLabels | None = None
    nih: AgainstLabels | None = None
    agreement: dict[str, float] | None = None


def expert_metrics(
    images: Sequence[str],
    patient_ids: np.ndarray,
    scores: np.ndarray,
    nih_labels: np.ndarray,
    findings: Sequence[str],
    expert: pd.DataFrame,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> ExpertComparison:
    """On the evaluated images that have expert labels: AUC (with intervals) against each label set."""
    position = {name: i for i, name in enumerate(images)}
    labelled = expert[expert[IMAGE].isin(position)]
    rows = np.array([position[name] for name in labelled[IMAGE]], dtype=int)
    sets = {str(k): int(v) for k, v in labelled[SET_ID].value_counts().items()}
    if len(rows) == 0:
        return ExpertComparison(n_images=0, sets=sets, note="none of the evaluated images has expert labels")
    index = {name: i for i, name in enumerate(findings)}
    names = list(COMPARED)
    model_scores = np.stack(
        [scores[rows][:, [index[f] for f in fs]].max(axis=1) for _, fs in COMPARED.values()], axis=1
    )
    expert_y = np.stack([labelled[column].to_numpy() for column, _ in COMPARED.values()], axis=1)
    nih_y = np.stack([nih_labels[rows][:, [index[f] for f in fs]].max(axis=1) for _, fs in COMPARED.values()], axis=1)
    patients = np.asarray(patient_ids)[rows]
    against = {}
    for key, y in (("expert", expert_y), ("nih", nih_y)):
        metrics, _ = finding_metrics(y, model_scores, patients, names, n_resamples=n_resamples, seed=seed)
        against[key] = AgainstLabels(auc=metrics.auc, auc_ci95=metrics.auc_ci95, positives=metrics.positives,
                                     undefined=metrics.undefined)
    # How often NIH's NLP labels agree with the radiologists on these images.
    agreement = {name: float((expert_y[:, i] == nih_y[:, i]).mean()) for i, name in enumerate(names)}
    return ExpertComparison(n_images=int(len(rows)), sets=sets, **against, agreement=agreement)
