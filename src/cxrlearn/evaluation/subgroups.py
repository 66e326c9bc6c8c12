"""AUC by dataset (a merged table's), sex, age band and view position: where is the model weaker?

Each subgroup gets the full per-finding treatment of
:func:`~cxrlearn.evaluation.metrics.finding_metrics` (with patient-level
intervals, since small groups are noisy). Age bands are the ones the data
statistics use (:data:`cxrlearn.data.cohort.stats.AGE_BANDS`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cxrlearn.data.cohort.stats import AGE_BANDS, age_band
from cxrlearn.data.columns import AGE, DATASET, PATIENT_ID, SEX, VIEW
from cxrlearn.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from cxrlearn.evaluation.metrics import FEW_CASES, finding_metrics
from cxrlearn.records import Record


class Subgroup(Record):
    """One (attribute, group) of ``metrics.json``'s ``subgroups``: counts, AUC per finding, and the mean AUC with
    its patient-level interval."""

    attribute: str
    group: str
    n_images: int
    n_patients: int
    mean_auc: float | None
    mean_auc_ci95: list[float] | None
    mean_over: list[str]
    auc: dict[str, float | None]
    positives: dict[str, int]

    @property
    def few_cases(self) -> bool:
        """Whether its mean AUC rests only on findings with fewer than ``FEW_CASES`` positives (a group of five
        images, say): marked †, its interval read as unknown."""
        return not any(self.positives.get(name, 0) >= FEW_CASES for name in self.mean_over)


def subgroup_metrics(rows: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, findings: Sequence[str],
                     n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> list[Subgroup]:
    """One entry per (attribute, group): counts, per-finding AUC and mean AUC with its interval.

    ``rows``: the evaluated images' table rows (``dataset``, ``sex``, ``age``, ``view`` where the table has
    them, ``patient_id``), aligned with ``labels`` and ``scores``. Images whose attribute is unknown are in no
    group of it; a finding a dataset has no labels for gets no AUC in that dataset's group.
    """
    groups = {}
    if DATASET in rows and rows[DATASET].nunique() > 1:  # a merged table: how does each source fare?
        groups["dataset"] = rows[DATASET].fillna("").astype(str).to_numpy()
    if SEX in rows:
        groups["sex"] = rows[SEX].fillna("").astype(str).to_numpy()
    if AGE in rows:
        groups["age"] = age_band(rows[AGE].to_numpy(dtype=float))
    if VIEW in rows:
        groups["view"] = rows[VIEW].fillna("").astype(str).to_numpy()
    bands = [name for name, _, _ in AGE_BANDS]
    out = []
    for attribute, values in groups.items():
        # Age bands in age order, the other attributes alphabetically.
        present = [b for b in bands if b in set(values)] if attribute == "age" else sorted(set(values) - {""})
        for value in present:
            mask = values == value
            metrics, _ = finding_metrics(labels[mask], scores[mask], rows[PATIENT_ID].to_numpy()[mask], findings,
                                         n_resamples=n_resamples, seed=seed)
            out.append(Subgroup(attribute=attribute, group=str(value), n_images=metrics.n_images,
                                n_patients=metrics.n_patients, mean_auc=metrics.mean_auc,
                                mean_auc_ci95=metrics.mean_auc_ci95, mean_over=metrics.mean_over, auc=metrics.auc,
                                positives=metrics.positives))
    return out
