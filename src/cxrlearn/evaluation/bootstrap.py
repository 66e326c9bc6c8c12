"""Confidence intervals for per-finding AUC by a bootstrap over patients.

ChestX-ray14 has 3.6 images per patient on average (up to 184), and a patient's
images are alike: resampling images as if independent makes intervals too
narrow. Here a resample draws *patients* with replacement and takes all their
images with them (the cluster bootstrap; Field & Welsh 2007), which is what the
test set is a sample of.

Speed. A resample is a vector of integer weights over images (how many times
its patient was drawn), so the AUC of a resample is a *weighted* AUC of the same
scores. The scores are sorted once per finding; each resample's AUC is then one
cumulative sum over (resamples × images) and a few gathers at the positives — no re-sorting and no
call to scikit-learn per resample (which would take minutes on the official test
list: 14 findings × 1,000 resamples × 25,596 images). Ties count one half, as in
scikit-learn's ``roc_auc_score``; :func:`weighted_auc` equals it with
``sample_weight`` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cxrlearn.defaults import SEED

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = SEED
#: Resamples processed together: bounds memory to about chunk × images × 8 bytes per array.
CHUNK = 100


class _SortedFinding:
    """One finding's scores sorted once, with each image's block of tied scores. An image whose label is
    unknown (NaN) is neither positive nor negative: it weighs nothing in any resample."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.float64)
        self.order = np.argsort(scores, kind="stable")
        ordered = scores[self.order]
        positive = (labels == 1)[self.order]
        self.negative = (labels == 0)[self.order]
        new_block = np.r_[True, ordered[1:] != ordered[:-1]]
        block = np.cumsum(new_block) - 1
        first = np.flatnonzero(new_block)
        last = np.r_[first[1:] - 1, len(ordered) - 1]
        self.positive = positive
        self.positions = np.flatnonzero(positive)
        # For each positive: the last position before its block of ties, and the block's last position.
        self.before = first[block[self.positions]] - 1
        self.block_end = last[block[self.positions]]

    def auc(self, weights_sorted: np.ndarray) -> np.ndarray:
        """AUC under each row of weights (R, N), given in sorted order."""
        # Cumulative negative weight along the sorted scores. Weights are small integers,
        # so float32 sums are exact while below 2**24 (16.7 M images a resample).
        dtype = np.float32 if weights_sorted.shape[1] < 2**23 else np.float64
        negatives = np.cumsum(np.where(self.negative, weights_sorted, 0), axis=1, dtype=dtype)
        below = np.where(self.before >= 0, negatives[:, np.maximum(self.before, 0)], 0)
        # Negatives strictly below count fully, tied ones half: (below + up to block end) / 2.
        credit = 0.5 * (below + negatives[:, self.block_end])
        positive_w = weights_sorted[:, self.positions]
        pairs = (positive_w * credit).sum(axis=1, dtype=np.float64)
        total = positive_w.sum(axis=1, dtype=np.float64) * negatives[:, -1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, pairs / np.where(total > 0, total, 1.0), np.nan)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC-ROC of ``scores`` for 0/1 ``labels`` under each row of ``weights`` (R, N).

    Returns R values; NaN where a row gives no positive or no negative weight.
    """
    finding = _SortedFinding(labels, scores)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return finding.auc(weights[:, finding.order])


def resample_counts(n_groups: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(R, G) times each of G groups is drawn when G are drawn with replacement, per resample."""
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples).astype(np.float32)


@dataclass
class BootstrapResult:
    """Per-resample AUCs (R, F) and what they were drawn over."""

    aucs: np.ndarray
    unit: str
    seed: int

    @property
    def n_resamples(self) -> int:
        return len(self.aucs)

    def mean_auc(self, columns: Sequence[int]) -> np.ndarray:
        """Each resample's mean AUC over ``columns`` (findings undefined in a resample left out)."""
        chosen = self.aucs[:, list(columns)]
        defined = ~np.isnan(chosen).all(axis=1)
        out = np.full(len(chosen), np.nan)
        out[defined] = np.nanmean(chosen[defined], axis=1)
        return out


def bootstrap_aucs(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    unit: str = "patient",
) -> BootstrapResult:
    """AUC of every finding (column) in each of ``n_resamples`` cluster-bootstrap resamples.

    ``groups``: any per-image cluster key (patient ids); images sharing a key are
    drawn together. The same ``seed`` and ``groups`` give the same resamples, so
    two score sets (with and without TTA, say) can be compared pairwise.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    rng = np.random.default_rng(seed)
    findings = [_SortedFinding(labels[:, f], scores[:, f]) for f in range(labels.shape[1])]
    aucs = np.empty((n_resamples, labels.shape[1]))
    for start in range(0, n_resamples, CHUNK):
        stop = min(n_resamples, start + CHUNK)
        counts = resample_counts(n_groups, stop - start, rng)
        for f, finding in enumerate(findings):
            # An image's weight is the number of times its patient was drawn.
            aucs[start:stop, f] = finding.auc(counts[:, group_index[finding.order]])
    return BootstrapResult(aucs=aucs, unit=unit, seed=seed)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """The central ``level`` percentile interval of the finite values, or None if there are none."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return [float(low), float(high)]
