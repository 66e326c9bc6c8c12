"""Per-finding AUC-ROC on predictions, with findings that cannot be scored said so.

The same function serves training summaries, evaluation and tests (MONAI's
lesson: metrics are plain functions, engines get thin adapters).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def auc_per_finding(labels: np.ndarray, scores: np.ndarray, findings: Sequence[str]) -> dict:
    """``{"auc": {finding: value or None}, "mean_auc", "mean_over", "undefined": {finding: reason}}``.

    A finding without positives or without negatives among the images has no
    AUC (None, with the reason); the mean is over the others and says which.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    auc, undefined = {}, {}
    for i, name in enumerate(findings):
        positives = int(labels[:, i].sum())
        if positives == 0 or positives == len(labels):
            auc[name] = None
            undefined[name] = "no positives" if positives == 0 else "no negatives"
            continue
        auc[name] = float(roc_auc_score(labels[:, i], scores[:, i]))
    scored = [name for name in findings if auc[name] is not None]
    mean = float(np.mean([auc[name] for name in scored])) if scored else None
    return {"auc": auc, "mean_auc": mean, "mean_over": scored, "undefined": undefined}
