"""Per-finding AUC-ROC and AUC-PR on predictions, with findings that cannot be scored said so.

The same functions serve training summaries, evaluation and tests (MONAI's
lesson: metrics are plain functions, engines get thin adapters).
"""

from __future__ import annotations

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


def undefined_reason(labels: np.ndarray) -> str | None:
    """Why a finding has no AUC on these labels (no positives or no negatives), or None."""
    positives = int(np.asarray(labels).sum())
    if positives == 0:
        return "no positives"
    if positives == len(labels):
        return "no negatives"
    return None


def auc_per_finding(labels: np.ndarray, scores: np.ndarray, findings: Sequence[str]) -> dict:
    """``{"auc": {finding: value or None}, "mean_auc", "mean_over", "undefined": {finding: reason}}``.

    A finding without positives or without negatives among the images has no
    AUC (None, with the reason); the mean is over the others and says which.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    auc, undefined = {}, {}
    for i, name in enumerate(findings):
        reason = undefined_reason(labels[:, i])
        if reason:
            auc[name] = None
            undefined[name] = reason
            continue
        auc[name] = float(roc_auc_score(labels[:, i], scores[:, i]))
    scored = [name for name in findings if auc[name] is not None]
    mean = float(np.mean([auc[name] for name in scored])) if scored else None
    return {"auc": auc, "mean_auc": mean, "mean_over": scored, "undefined": undefined}


def finding_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    patient_ids: np.ndarray,
    findings: Sequence[str],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    unit: str = "patient",
) -> tuple[dict, BootstrapResult]:
    """AUC-ROC with patient-level bootstrap 95% intervals, AUC-PR and counts, per finding and mean.

    ``unit="image"`` resamples images instead of patients (for comparison only:
    it ignores that a patient's images are alike, and its intervals are too narrow).
    Returns the JSON-ready metrics and the bootstrap's per-resample AUCs (for
    paired comparisons, such as with and without test-time augmentation).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    patient_ids = np.asarray(patient_ids)
    result = auc_per_finding(labels, scores, findings)
    groups = patient_ids if unit == "patient" else np.arange(len(labels))
    boot = bootstrap_aucs(labels, scores, groups, n_resamples=n_resamples, seed=seed, unit=unit)
    scored = [i for i, name in enumerate(findings) if result["auc"][name] is not None]
    result["auc_ci95"] = {
        name: percentile_interval(boot.aucs[:, i]) if result["auc"][name] is not None else None
        for i, name in enumerate(findings)
    }
    result["auc_pr"] = {
        name: float(average_precision_score(labels[:, i], scores[:, i])) if result["auc"][name] is not None else None
        for i, name in enumerate(findings)
    }
    result["prevalence"] = {name: float(labels[:, i].mean()) for i, name in enumerate(findings)}
    result["positives"] = {name: int(labels[:, i].sum()) for i, name in enumerate(findings)}
    result["mean_auc_ci95"] = percentile_interval(boot.mean_auc(scored)) if scored else None
    result["n_images"] = int(len(labels))
    result["n_patients"] = int(len(np.unique(patient_ids)))
    result["bootstrap"] = {
        "unit": unit,
        "resamples": n_resamples,
        "seed": seed,
        "level": 0.95,
        "method": "percentile",
        # Resamples in which a finding had no positives (or no negatives) give it no AUC.
        "defined_resamples": {name: int(np.isfinite(boot.aucs[:, i]).sum()) for i, name in enumerate(findings)},
    }
    return result, boot
