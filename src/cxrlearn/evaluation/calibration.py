"""Calibration: does a predicted 30% mean "positive three times in ten"?

* Expected calibration error (ECE; Naeini et al. 2015, Guo et al. 2017): the
  image-weighted mean gap between mean predicted probability and observed
  frequency over equal-width probability bins.
* Reliability diagrams: those bins drawn (see :mod:`cxrlearn.evaluation.report`).
* Temperature scaling (Guo et al. 2017), one temperature per finding fitted on
  validation by minimising binary cross-entropy: ``sigmoid(logit / T)``. It
  leaves the ranking, hence AUC, unchanged, and only moves probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from cxrlearn.records import Record

DEFAULT_BINS = 10
#: Temperatures are searched in [e^-3, e^3]: wide enough for any sane model.
LOG_T_BOUNDS = (-3.0, 3.0)


class Reliability(Record):
    """One finding's reliability diagram: per equal-width bin, its count, mean probability and observed
    frequency (None for an empty bin), and the ECE."""

    ece: float
    bins: int
    count: list[int]
    mean_probability: list[float | None]
    observed_frequency: list[float | None]


class Calibration(Record):
    """``metrics.json``'s ``calibration``: the judged probabilities' reliability per finding (``test``); with
    temperature scaling, the temperatures, any finding it failed for, and the raw probabilities' reliability."""

    bins: int
    test: dict[str, Reliability]
    temperature: dict[str, float] | None = None
    temperature_failed: dict[str, str] | None = None
    test_uncalibrated: dict[str, Reliability] | None = None


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Equal-width bins: per-bin count, mean probability and observed frequency, and the ECE."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    index = np.minimum((probabilities * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, probabilities, minlength=bins) / count
        observed = np.bincount(index, labels, minlength=bins) / count
    filled = count > 0
    ece = float((count[filled] * np.abs(mean_p[filled] - observed[filled])).sum() / max(1, len(labels)))
    return Reliability(ece=ece, bins=bins, count=count.tolist(),
                       mean_probability=[float(v) if ok else None for v, ok in zip(mean_p, filled)],
                       observed_frequency=[float(v) if ok else None for v, ok in zip(observed, filled)])


def calibration_per_finding(labels: np.ndarray, probabilities: np.ndarray, findings: Sequence[str],
                            bins: int = DEFAULT_BINS) -> dict[str, Reliability]:
    known = ~np.isnan(np.asarray(labels, dtype=np.float64))
    return {name: reliability(labels[known[:, i], i], probabilities[known[:, i], i], bins)
            for i, name in enumerate(findings)}


def _bce(logits: np.ndarray, labels: np.ndarray) -> float:
    # log(1 + e^-|z|) + max(z, 0) - y z: stable for large |z|.
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the cross-entropy of ``sigmoid(logits / T)``."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    best = minimize_scalar(lambda log_t: _bce(logits / np.exp(log_t), labels), bounds=LOG_T_BOUNDS,
                           method="bounded", options={"xatol": 1e-6})
    return float(np.exp(best.x))


@dataclass
class TemperatureFit:
    """Temperatures per finding, and the findings whose fit failed, with why (their temperature is kept at 1)."""

    temperature: dict[str, float]
    failed: dict[str, str] = field(default_factory=dict)


def at_bound(temperature: float, tolerance: float = 1e-3) -> bool:
    """Whether a fitted temperature sits at an end of the searched range: the optimum lies beyond it, so
    scaling did not work (a bound such as e^3 pulls every probability towards 50%)."""
    log_t = np.log(temperature)
    return bool(min(abs(log_t - LOG_T_BOUNDS[0]), abs(log_t - LOG_T_BOUNDS[1])) < tolerance)


def fit_temperatures(logits: np.ndarray, labels: np.ndarray, findings: Sequence[str]) -> TemperatureFit:
    """A temperature per finding, fitted on validation; 1.0 (no change) where validation has only one class of a
    finding, or where the fit ends at the bound of its range (named in ``failed``)."""
    fit = TemperatureFit({})
    for i, name in enumerate(findings):
        known = ~np.isnan(np.asarray(labels[:, i], dtype=np.float64))
        column = labels[known, i]
        if not 0 < column.sum() < len(column):
            fit.temperature[name] = 1.0
            continue
        t = fit_temperature(logits[known, i], column)
        if at_bound(t):
            fit.failed[name] = (f"the fitted temperature reached the bound of its range ({t:.3g}): scaling cannot "
                                "calibrate this finding on these validation images; kept at 1")
            t = 1.0
        fit.temperature[name] = t
    return fit
