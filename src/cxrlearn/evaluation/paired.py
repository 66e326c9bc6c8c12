"""Is model B better than model A on the same images? Paired tests of two AUCs.

* **DeLong's test** for two correlated ROC curves (DeLong, DeLong & Clarke-Pearson, Biometrics 1988): each
  model's AUC is the mean of its *placement values* (the share of the other class each image outranks, ties one
  half); their covariance across the two models on the same images gives the variance of the difference, and
  the difference over its standard error is compared with a standard normal. Computed with midranks (Sun & Xu,
  IEEE Signal Processing Letters 2014), O(n log n) rather than the definition's O(positives × negatives);
  the tests check it against the definition. It treats images as independent: a patient's several images are
  alike, so its p-values are somewhat too small where patients have many images; the paired patient
  bootstrap (:func:`paired_bootstrap`) is the check that accounts for them.
* **Holm's step-down correction** (Holm, Scand J Statist 1979) of the per-finding p-values: it controls the
  chance of any false "B differs from A" across the 14 findings, without assuming them independent.
* **The paired patient bootstrap**: both models' AUCs on the same resamples of patients
  (:func:`cxrlearn.evaluation.bootstrap.bootstrap_aucs` with one seed), so the interval of the difference keeps
  the pairing; the same computation ``evaluate --tta`` uses for flip averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import norm, rankdata

from cxrlearn.evaluation.bootstrap import (DEFAULT_RESAMPLES, DEFAULT_SEED, BootstrapResult, bootstrap_aucs,
                                          percentile_interval)


@dataclass(frozen=True)
class DeLong:
    """DeLong's test of AUC(B) - AUC(A) on the same images."""

    auc_a: float
    auc_b: float
    difference: float  # B - A
    standard_error: float
    z: float
    p_value: float  # two-sided

    @property
    def ci95(self) -> list[float]:
        """The normal-approximation 95% interval of the difference."""
        half = norm.ppf(0.975) * self.standard_error
        return [self.difference - half, self.difference + half]


def _placements(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per model (rows of ``scores``), the placement values of the positives (share of negatives each outranks,
    ties one half) and of the negatives (share of positives that outrank each), by midranks."""
    m, n = int(positive.sum()), int((~positive).sum())
    everything = rankdata(scores, axis=1)  # midranks: ties get their mean rank
    among_positives = rankdata(scores[:, positive], axis=1)
    among_negatives = rankdata(scores[:, ~positive], axis=1)
    of_positives = (everything[:, positive] - among_positives) / n
    of_negatives = 1.0 - (everything[:, ~positive] - among_negatives) / m
    return of_positives, of_negatives


def delong(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLong | None:
    """DeLong's test on the images whose label is known (0/1; NaN is left out), or None where the finding has
    fewer than two positive or two negative images (no variance to estimate)."""
    labels = np.asarray(labels, dtype=np.float64)
    known = ~np.isnan(labels)
    positive = labels[known] == 1
    if positive.sum() < 2 or (~positive).sum() < 2:
        return None
    scores = np.vstack([np.asarray(scores_a, dtype=np.float64)[known], np.asarray(scores_b, dtype=np.float64)[known]])
    of_positives, of_negatives = _placements(scores, positive)
    aucs = of_positives.mean(axis=1)
    covariance = np.cov(of_positives) / positive.sum() + np.cov(of_negatives) / (~positive).sum()
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = float(aucs[1] - aucs[0])
    if variance <= 0:  # the same scores (or the same ranking): no difference to test
        return DeLong(float(aucs[0]), float(aucs[1]), difference, 0.0, 0.0, 1.0)
    se = float(np.sqrt(variance))
    z = difference / se
    return DeLong(float(aucs[0]), float(aucs[1]), difference, se, z, float(2 * norm.sf(abs(z))))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count as a test)."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class PairedBootstrap:
    """Per-resample AUC differences B - A (R, F) and mean-AUC differences (R,), on the same patient resamples."""

    differences: np.ndarray
    mean_differences: np.ndarray
    resamples: int
    seed: int

    def interval(self, finding: int | None = None) -> list[float] | None:
        """The 95% percentile interval of one finding's difference, or of the mean AUC's (``finding`` None)."""
        values = self.mean_differences if finding is None else self.differences[:, finding]
        return percentile_interval(values)


def paired_difference(a: BootstrapResult, b: BootstrapResult, columns: Sequence[int]) -> PairedBootstrap:
    """The differences B - A of two models' bootstrap AUCs drawn on the same resamples (same patients, same
    seed); the mean AUC over ``columns`` (the findings both are judged on)."""
    if a.seed != b.seed or a.aucs.shape != b.aucs.shape:
        raise ValueError("paired bootstrap differences need both models' AUCs on the same resamples")
    return PairedBootstrap(b.aucs - a.aucs, b.mean_auc(columns) - a.mean_auc(columns), len(a.aucs), a.seed)


def paired_bootstrap(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, patients: np.ndarray,
                     columns: Sequence[int], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
                     ) -> PairedBootstrap:
    """Both models' AUCs on the same resamples of patients; the mean AUC over ``columns`` (the findings both
    are judged on)."""
    a = bootstrap_aucs(labels, scores_a, patients, resamples, seed)
    b = bootstrap_aucs(labels, scores_b, patients, resamples, seed)  # same seed and patients: same resamples
    return paired_difference(a, b, columns)
