"""From logits to what a user reads: probabilities and positive calls, as the bundle says.

The bundle's ``temperature`` (per finding, from ``cxrlearn evaluate
--calibrate``; absent means 1) and ``thresholds`` (per finding, chosen on
validation by ``cxrlearn evaluate``) are the one source of these facts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cxrlearn.inference.predict import sigmoid


def probabilities(logits: np.ndarray, findings: Sequence[str], temperature: dict | None = None) -> np.ndarray:
    """``sigmoid(logit / T)`` per finding; T = 1 where none is given."""
    t = np.array([float((temperature or {}).get(name) or 1.0) for name in findings])
    return sigmoid(np.asarray(logits, dtype=np.float64) / t)


def positive_calls(probs: np.ndarray, findings: Sequence[str], thresholds: dict) -> np.ndarray:
    """Boolean (N, F): probability at or above the finding's threshold; False where it has none."""
    t = np.array([np.inf if thresholds.get(name) is None else float(thresholds[name]) for name in findings])
    return np.asarray(probs) >= t
