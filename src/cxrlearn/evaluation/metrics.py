"""Per-finding AUC-ROC and AUC-PR on predictions, with findings that cannot be scored said so.

The same functions serve training summaries, evaluation and tests (MONAI's
lesson: metrics are plain functions, engines get thin adapters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrlearn.evaluation.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    BootstrapResult,
    bootstrap_aucs,
    percentile_interval,
)

#: The fewest positives (and negatives) a per-finding figure rests on without a † beside it, and that a threshold
#: is chosen on (:mod:`cxrlearn.evaluation.operating_points`): below it a percentile bootstrap interval has few
#: distinct resamples, DeLong's normal approximation fails, and a threshold is noise.
FEW_CASES = 10


def undefined_reason(labels: np.ndarray) -> str | None:
    """Why a finding has no AUC on these labels (no known labels, no positives or no negatives), or None."""
    labels = np.asarray(labels, dtype=np.float64)
    known = labels[~np.isnan(labels)]
    if len(known) == 0:
        return "no known labels"
    positives = int(known.sum())
    if positives == 0:
        return "no positives"
    if positives == len(known):
        return "no negatives"
    return None


@dataclass
class AucSummary:
    """AUC-ROC per finding (None where undefined, with the reason) and their mean over the defined ones."""

    auc: dict[str, float | None]
    mean_auc: float | None
    mean_over: list[str]
    undefined: dict[str, str]

    def to_dict(self) -> dict:
        """JSON-ready (``metrics.json``); parts that were not measured (None) left out."""
        return {k: v for k, v in asdict(self).items() if v is not None or k in FindingMetrics.__dataclass_fields__}


@dataclass
class FindingMetrics(AucSummary):
    """:class:`AucSummary` with patient-level bootstrap intervals, AUC-PR and counts."""

    known: dict[str, int] = field(default_factory=dict)  # images whose label of the finding is known
    auc_ci95: dict[str, list[float] | None] = field(default_factory=dict)
    auc_pr: dict[str, float | None] = field(default_factory=dict)
    prevalence: dict[str, float] = field(default_factory=dict)
    positives: dict[str, int] = field(default_factory=dict)
    mean_auc_ci95: list[float] | None = None
    n_images: int = 0
    n_patients: int = 0
    bootstrap: dict = field(default_factory=dict)  # unit, resamples, seed, level, method, defined_resamples


def auc_per_finding(labels: np.ndarray, scores: np.ndarray, findings: Sequence[str]) -> AucSummary:
    """AUC-ROC per finding and their mean.

    Each finding is judged on the images whose label of it is known (``labels`` NaN where unknown). A
    finding without positives or without negatives among them has no AUC (None, with the reason); the mean
    is over the others and says which.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    auc, undefined = {}, {}
    for i, name in enumerate(findings):
        reason = undefined_reason(labels[:, i])
        if reason:
            auc[name] = None
            undefined[name] = reason
            continue
        known = ~np.isnan(labels[:, i])
        auc[name] = float(roc_auc_score(labels[known, i], scores[known, i]))
    scored = [name for name in findings if auc[name] is not None]
    mean = float(np.mean([auc[name] for name in scored])) if scored else None
    return AucSummary(auc, mean, scored, undefined)


def finding_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    patient_ids: np.ndarray,
    findings: Sequence[str],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    unit: str = "patient",
) -> tuple[FindingMetrics, BootstrapResult]:
    """AUC-ROC with patient-level bootstrap 95% intervals, AUC-PR and counts, per finding and mean.

    ``unit="image"`` resamples images instead of patients (for comparison only:
    it ignores that a patient's images are alike, and its intervals are too narrow).
    Returns the metrics and the bootstrap's per-resample AUCs (for
    paired comparisons, such as with and without test-time augmentation).
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    patient_ids = np.asarray(patient_ids)
    known = ~np.isnan(labels)
    positive = labels == 1
    summary = auc_per_finding(labels, scores, findings)
    groups = patient_ids if unit == "patient" else np.arange(len(labels))
    boot = bootstrap_aucs(labels, scores, groups, n_resamples=n_resamples, seed=seed, unit=unit)
    defined = [summary.auc[name] is not None for name in findings]
    result = FindingMetrics(
        **asdict(summary),
        auc_ci95={name: percentile_interval(boot.aucs[:, i]) if ok else None
                  for i, (name, ok) in enumerate(zip(findings, defined))},
        auc_pr={name: float(average_precision_score(labels[known[:, i], i], scores[known[:, i], i])) if ok else None
                for i, (name, ok) in enumerate(zip(findings, defined))},
        known={name: int(known[:, i].sum()) for i, name in enumerate(findings)},
        prevalence={name: float(positive[:, i].sum() / max(1, known[:, i].sum())) for i, name in enumerate(findings)},
        positives={name: int(positive[:, i].sum()) for i, name in enumerate(findings)},
        mean_auc_ci95=percentile_interval(boot.mean_auc([i for i, ok in enumerate(defined) if ok])) if any(defined)
        else None,
        n_images=int(len(labels)),
        n_patients=int(len(np.unique(patient_ids))),
        bootstrap={
            "unit": unit, "resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile",
            # Resamples in which a finding had no positives (or no negatives) give it no AUC.
            "defined_resamples": {name: int(np.isfinite(boot.aucs[:, i]).sum()) for i, name in enumerate(findings)},
        },
    )
    return result, boot
