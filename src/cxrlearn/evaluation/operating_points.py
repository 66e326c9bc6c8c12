"""Operating points: a probability threshold per finding, chosen on validation, applied to test.

Three rules, each over the thresholds where the decision changes (the distinct
scores of the validation images); an image is called positive when its
probability is at least the threshold:

* ``youden``: maximise Youden's J = sensitivity + specificity - 1 (Youden 1950);
* ``f1``: maximise F1, the harmonic mean of precision and sensitivity;
* ``spec90``: the highest sensitivity with specificity at least 90%, the
  screening rule (torchxrayvision and CheXpert report such points).

Thresholds are chosen on validation, never on the images they are judged on,
and the chosen ones are written into the model bundle for ``predict``.

A threshold is an estimate, and a handful of positives does not carry one (the attack saw Hernia's chosen on one
validation positive, and an SR call 11 of 14 findings "Present"): a finding with fewer than
:data:`MIN_VALIDATION_CASES` validation positives, or negatives, gets no threshold. It keeps its probability
everywhere, and is "not called: threshold not established" instead of a positive or negative call. The
sensitivity and specificity at each threshold come with Wilson 95% intervals.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from cxrlearn.evaluation.metrics import FEW_CASES, undefined_reason
from cxrlearn.records import Record

METHODS = ("youden", "f1", "spec90")
METHOD_NAMES = {"youden": "Youden's J", "f1": "maximum F1", "spec90": "sensitivity at 90% specificity"}
DEFAULT_METHOD = "youden"
TARGET_SPECIFICITY = 0.90
#: The fewest validation positives (and negatives) a finding's threshold is chosen on.
MIN_VALIDATION_CASES = FEW_CASES
#: What every output says of a finding without a threshold.
NOT_CALLED = "not called: threshold not established"


def choose_threshold(labels: np.ndarray, scores: np.ndarray, method: str) -> float:
    """The threshold ``method`` picks for one finding (labels must hold both classes)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if method == "f1":
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return float(thresholds[int(np.argmax(f1))])
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first point (threshold +inf) calls nothing positive
    if method == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if method == "spec90":
        allowed = np.flatnonzero(fpr <= 1.0 - TARGET_SPECIFICITY)
        if len(allowed) == 0:  # even the strictest threshold misses the target: call nothing positive
            return float(np.nextafter(scores.max(), np.inf))
        return float(thresholds[allowed[np.argmax(tpr[allowed])]])
    raise ValueError(f"unknown operating-point method {method!r} (one of {', '.join(METHODS)})")


class Confusion(Record):
    """Calling ``scores >= threshold`` positive: the counts, and the rates (None where a count is 0)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    sensitivity_ci95: list[float] | None = None  # Wilson score interval
    specificity_ci95: list[float] | None = None


#: ``{method: {finding: threshold or None}}``.
Thresholds = dict[str, dict[str, float | None]]
#: ``{method: {finding: Confusion at its threshold, or None}}``.
Table = dict[str, dict[str, Confusion | None]]


class Chosen(Record):
    """Thresholds chosen on validation images by every rule, and why a finding has none."""

    thresholds: Thresholds
    undefined: dict[str, str]


class OperatingPoints(Record):
    """``metrics.json``'s ``operating_points``: thresholds chosen on ``chosen_on`` (or the bundle's), applied to
    the judged images (``test``) and to the val images they were chosen on (``val``); or why there are none
    (``unavailable``)."""

    chosen_on: str | None = None
    bundle_method: str | None = None
    thresholds: Thresholds | None = None
    undefined: dict[str, str] | None = None
    test: Table | None = None
    val: Table | None = None
    unavailable: str | None = None


def choose_thresholds(labels: np.ndarray, scores: np.ndarray, findings: Sequence[str]) -> Chosen:
    """``{method: {finding: threshold or None}}`` and the reasons for the Nones."""
    out: dict = {method: {} for method in METHODS}
    undefined = {}
    for i, name in enumerate(findings):
        reason = undefined_reason(labels[:, i])
        reason = f"{reason} in validation" if reason else too_few_cases(labels[:, i])
        for method in METHODS:
            known = ~np.isnan(np.asarray(labels[:, i], dtype=np.float64))
            out[method][name] = None if reason else choose_threshold(labels[known, i], scores[known, i], method)
        if reason:
            undefined[name] = reason
    return Chosen(thresholds=out, undefined=undefined)


def too_few_cases(labels: np.ndarray) -> str | None:
    """Why these validation labels cannot carry a threshold (fewer than :data:`MIN_VALIDATION_CASES` positives
    or negatives), or None."""
    known = np.asarray(labels, dtype=np.float64)
    known = known[~np.isnan(known)]
    positives, negatives = int(known.sum()), int(len(known) - known.sum())
    for count, kind in ((positives, "positive"), (negatives, "negative")):
        if count < MIN_VALIDATION_CASES:
            return (f"only {count} {kind}{'s' if count != 1 else ''} in validation (a threshold needs at least "
                    f"{MIN_VALIDATION_CASES})")
    return None


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def wilson_interval(successes: int, total: int) -> list[float] | None:
    """The Wilson score 95% interval of a proportion (Wilson 1927), or None without cases."""
    if not total:
        return None
    z, p = 1.959963984540054, successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Confusion:
    """Counts and sensitivity, specificity, PPV and NPV of calling ``scores >= threshold`` positive."""
    labels = np.asarray(labels).astype(bool)
    called = np.asarray(scores) >= threshold
    tp, fp = int((called & labels).sum()), int((called & ~labels).sum())
    fn, tn = int((~called & labels).sum()), int((~called & ~labels).sum())
    return Confusion(threshold=float(threshold), tp=tp, fp=fp, tn=tn, fn=fn, sensitivity=_ratio(tp, tp + fn),
                     specificity=_ratio(tn, tn + fp), ppv=_ratio(tp, tp + fp), npv=_ratio(tn, tn + fn),
                     sensitivity_ci95=wilson_interval(tp, tp + fn), specificity_ci95=wilson_interval(tn, tn + fp))


def operating_point_table(labels: np.ndarray, scores: np.ndarray, thresholds: Thresholds, findings: Sequence[str]
                          ) -> Table:
    """``{method: {finding: confusion at its threshold, or None}}`` on these images (each finding on the
    images whose label of it is known)."""
    known = ~np.isnan(np.asarray(labels, dtype=np.float64))
    return {
        method: {
            name: None if chosen[name] is None else confusion(labels[known[:, i], i], scores[known[:, i], i],
                                                              chosen[name])
            for i, name in enumerate(findings)
        }
        for method, chosen in thresholds.items()
    }
