"""Judging windows of a prediction log against the bundle's reference (after CheXstray, Soin et al. 2022).

Each window of answers (by count, or by time with a minimum count) is tested against the reference images'
answers and summaries (:class:`cxrlearn.model.reference.Reference`):

* **outputs**: each finding's probabilities (two-sample Kolmogorov-Smirnov), and each called finding's
  predicted-positive rate (two-proportion z-test, pooled);
* **inputs**: the input check's flag rate (two-proportion z-test), the 8-bit input's pixel statistics and the
  features' principal components (Kolmogorov-Smirnov each), and, where the reference was made from DICOM files,
  the categorical DICOM tags (chi-squared; a value the reference never had is named).

Holm's correction runs across all of a window's tests, so the chance that a window of independent answers drawn
like the reference's raises any alert is at most 5% (:data:`ALPHA`), whatever the number of tests. The tests take
each image as independent; one patient's follow-up films are alike, and on NIH's sample in-distribution windows
alerted 5-11% of the time (docs/benchmarks.md). A test whose Holm-
adjusted p-value is below it is an alert.

Across windows, a **CUSUM** on each kind of test watches for a slow drift that no single window shows: a kind's
window score is the z-value of its Bonferroni-combined p-value (its smallest p times its number of tests), and
``S = max(0, S + z - k)`` raises an alarm when it passes ``h`` (:data:`CUSUM_K`, :data:`CUSUM_H`; for
independent standard normal scores, about one false alarm in 465 windows; the combined p-values are conservative,
so fewer).

Beside the tests, each window gets a **label-free estimate of every finding's AUC** (confidence-based performance
estimation, as NannyML's CBPE: the AUC expected if each answer's label were drawn with its calibrated probability)
and the band that estimate has on the reference at the window's size: a falling estimate warns before labels
arrive, when the probabilities are calibrated (``cxrlearn evaluate --calibrate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Sequence

import numpy as np
from scipy import stats

from cxrlearn.evaluation.paired import holm
from cxrlearn.monitoring.log import KEYWORDS

#: The family-wise false-alarm rate of a window.
ALPHA = 0.05
#: The fewest answers a window is judged on.
MIN_WINDOW = 30
#: CUSUM's reference value and decision interval, in standard deviations of a window's score (Page 1954; with 0.5
#: and 5 the in-control average run length of a standard normal score is about 465 windows).
CUSUM_K, CUSUM_H = 0.5, 5.0
#: Reference resamples for the band of the label-free AUC estimate.
BAND_RESAMPLES = 200
#: What each kind of test watches, in words.
KINDS = {
    "probabilities": "the finding's probabilities (Kolmogorov-Smirnov)",
    "positive rate": "the finding's predicted-positive rate (two-proportion z-test)",
    "flag rate": "the input check's flag rate (two-proportion z-test)",
    "pixels": "a pixel statistic of the network's 8-bit input (Kolmogorov-Smirnov)",
    "features": "a principal component of the backbone's features (Kolmogorov-Smirnov)",
    "tags": "a DICOM tag's values (chi-squared against the reference's; the share of its commonest value shown)",
}
#: The DICOM tags judged as categories (:class:`cxrlearn.monitoring.log.AcquisitionTags` fields), in order.
CATEGORIES = ("modality", "manufacturer", "manufacturer_model", "view_position", "body_part", "photometric")


@dataclass(frozen=True)
class Sample:
    """Answers as the tests take them: probabilities (N, F), calls (N, F; None without thresholds), flags (N,),
    pixel statistics (N, P) and projections (N, K) (None where not recorded)."""

    probabilities: np.ndarray
    calls: np.ndarray | None
    flagged: np.ndarray
    pixels: np.ndarray | None
    projections: np.ndarray | None
    #: Per :data:`CATEGORIES` entry, each answer's value (None where absent); None where no answer is DICOM.
    tags: tuple[tuple[str | None, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.probabilities)

    def take(self, rows: np.ndarray) -> Sample:
        pick = (lambda a: None if a is None else a[rows])
        tags = None if self.tags is None else tuple(tuple(values[i] for i in rows) for values in self.tags)
        return Sample(self.probabilities[rows], pick(self.calls), self.flagged[rows], pick(self.pixels),
                      pick(self.projections), tags)


@dataclass(frozen=True)
class TestResult:
    """One test of one window: what it watched, the reference's and the window's value (a mean, a rate or a
    median), the statistic, its p-value and Holm-adjusted p-value, and whether it raised an alert."""

    kind: str
    subject: str
    reference_value: float
    window_value: float
    statistic: float
    p_value: float
    adjusted_p: float = 1.0
    alert: bool = False

    def describe(self) -> str:
        return (f"{self.kind} of {self.subject}: {self.window_value:.4g} against {self.reference_value:.4g} on the "
                f"reference (p = {self.p_value:.2g}, {self.adjusted_p:.2g} after Holm)")


@dataclass(frozen=True)
class EstimatedAuc:
    """A finding's label-free AUC estimate in a window, and the 95% band it has on the reference at that size."""

    finding: str
    estimate: float | None
    band: tuple[float, float] | None

    @property
    def outside(self) -> bool:
        return self.estimate is not None and self.band is not None and not self.band[0] <= self.estimate <= self.band[1]


@dataclass
class Window:
    """A window of the log: its place, its answers, and its tests (none when it is too small to judge)."""

    index: int
    first: datetime
    last: datetime
    answers: int
    judged: bool
    note: str = ""
    tests: list[TestResult] = field(default_factory=list)
    estimated_auc: list[EstimatedAuc] = field(default_factory=list)
    positive_rates: list[float | None] = field(default_factory=list)  # per finding; None where not called
    flag_rate: float | None = None
    unseen: list[str] = field(default_factory=list)  # tag values the reference never had, in words
    #: Later answers of a patient already in the window (by the log's keyed patient hash): counted in ``answers``,
    #: left out of the tests, which take their images as independent (one patient's follow-up films are alike).
    repeats: int = 0

    @property
    def alerts(self) -> list[TestResult]:
        return [t for t in self.tests if t.alert]

    @property
    def drift_score(self) -> float:
        """-log10 of the smallest Holm-adjusted p-value: above -log10(0.05) = 1.3 is an alert."""
        return _score(self.tests)

    def tests_of(self, kind: str) -> list[TestResult]:
        return [t for t in self.tests if t.kind == kind]

    def drift_score_of(self, kind: str) -> float:
        """The drift score of one kind of test (:data:`KINDS`)."""
        return _score(self.tests_of(kind))


def _score(tests: Sequence[TestResult]) -> float:
    smallest = min((t.adjusted_p for t in tests), default=1.0)
    return float(-np.log10(max(smallest, 1e-300)))


def two_proportion_test(hits_a: int, n_a: int, hits_b: int, n_b: int) -> tuple[float, float]:
    """The pooled two-proportion z-test of a rate ``hits_a / n_a`` against ``hits_b / n_b``: (z, two-sided p).
    The same p as a chi-squared test of the 2×2 table without continuity correction."""
    pooled = (hits_a + hits_b) / (n_a + n_b)
    spread = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 0.0, 1.0
    z = (hits_a / n_a - hits_b / n_b) / spread
    return float(z), float(2 * stats.norm.sf(abs(z)))


def expected_auc(probabilities: np.ndarray) -> float | None:
    """The AUC expected if each answer's label were drawn with its probability (CBPE): expected correctly ordered
    positive-negative pairs over expected pairs, ties counting half. None when no pair is expected."""
    p = np.sort(np.asarray(probabilities, dtype=np.float64))
    negatives = 1 - p
    # For each answer as the positive: the expected negatives among lower scores (ties: half of those equal).
    _, first, counts = np.unique(p, return_index=True, return_counts=True)
    below = np.concatenate([[0.0], np.cumsum(negatives)])
    tied = np.repeat(below[first + counts] - below[first], counts)
    lower = np.repeat(below[first], counts) + 0.5 * (tied - negatives)  # an answer is not its own pair
    ordered = float(np.sum(p * lower))
    pairs = float(np.sum(p) * np.sum(negatives) - np.sum(p * negatives))
    return ordered / pairs if pairs > 0 else None


def _ks(kind: str, subject: str, reference: np.ndarray, window: np.ndarray, centre=np.mean) -> TestResult:
    result = stats.ks_2samp(window, reference)
    return TestResult(kind, subject, float(centre(reference)), float(centre(window)), float(result.statistic),
                      float(result.pvalue))


def _rate(kind: str, subject: str, reference: np.ndarray, window: np.ndarray) -> TestResult:
    z, p = two_proportion_test(int(window.sum()), len(window), int(reference.sum()), len(reference))
    return TestResult(kind, subject, float(reference.mean()), float(window.mean()), z, p)


def _tag_tests(reference_counts: Sequence[dict[str, int]], window: Sample) -> list[TestResult]:
    """Chi-squared of each categorical tag's values in the window against the reference's counts."""
    tests = []
    for name, counts, values in zip(CATEGORIES, reference_counts, window.tags or ()):
        seen = [v for v in values if v is not None]
        if not counts or not seen:
            continue
        categories = sorted(set(counts) | set(seen))
        if len(categories) < 2:
            continue
        table = np.array([[counts.get(c, 0) for c in categories], [seen.count(c) for c in categories]])
        chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
        top = max(counts, key=counts.get)
        tests.append(TestResult("tags", f"{KEYWORDS[name]} (share of '{top}')", counts[top] / sum(counts.values()),
                                seen.count(top) / len(seen), float(chi2), float(p)))
    return tests


def unseen_values(reference_counts: Sequence[dict[str, int]], window: Sample) -> list[str]:
    """Each tag value the window has and the reference never had, in words."""
    said = []
    for name, counts, values in zip(CATEGORIES, reference_counts, window.tags or ()):
        if counts:
            for value in sorted({v for v in values if v is not None} - set(counts)):
                said.append(f"{KEYWORDS[name]} '{value}' ({values.count(value)} answers) was not in the reference "
                            "images")
    return said


def window_tests(reference: Sample, window: Sample, findings: Sequence[str], called: Sequence[bool],
                 pixel_names: Sequence[str], reference_tags: Sequence[dict[str, int]] = ()) -> list[TestResult]:
    """Every test of a window against the reference (``reference_tags``: its counts of each of :data:`CATEGORIES`'
    values, where it was made from DICOM files), each with its Holm-adjusted p-value and alert."""
    tests = [_ks("probabilities", name, reference.probabilities[:, j], window.probabilities[:, j])
             for j, name in enumerate(findings)]
    if reference.calls is not None and window.calls is not None:
        tests += [_rate("positive rate", name, reference.calls[:, j], window.calls[:, j])
                  for j, name in enumerate(findings) if called[j]]
    tests.append(_rate("flag rate", "the input check", reference.flagged, window.flagged))
    if reference.pixels is not None and window.pixels is not None:
        tests += [_ks("pixels", name, reference.pixels[:, j], window.pixels[:, j], np.median)
                  for j, name in enumerate(pixel_names)]
    if reference.projections is not None and window.projections is not None:
        tests += [_ks("features", f"component {k + 1}", reference.projections[:, k], window.projections[:, k],
                      np.median) for k in range(reference.projections.shape[1])]
    tests += _tag_tests(reference_tags, window)
    adjusted = holm([t.p_value for t in tests])
    return [TestResult(t.kind, t.subject, t.reference_value, t.window_value, t.statistic, t.p_value, float(a),
                       bool(a < ALPHA))
            for t, a in zip(tests, adjusted)]


def auc_bands(reference: np.ndarray, size: int, findings: Sequence[str], seed: int = 0
              ) -> list[tuple[float, float] | None]:
    """Per finding, the 2.5th-97.5th percentiles of the label-free AUC estimate over reference resamples of
    ``size`` answers."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(reference), size) for _ in range(BAND_RESAMPLES)]
    bands: list[tuple[float, float] | None] = []
    for j in range(len(findings)):
        estimates = [e for e in (expected_auc(reference[rows, j]) for rows in draws) if e is not None]
        bands.append((float(np.percentile(estimates, 2.5)), float(np.percentile(estimates, 97.5)))
                     if estimates else None)
    return bands


def judge_window(index: int, times: Sequence[datetime], reference: Sample, window: Sample,
                 findings: Sequence[str], called: Sequence[bool], pixel_names: Sequence[str],
                 band_cache: dict[int, list], reference_tags: Sequence[dict[str, int]] = (), repeats: int = 0
                 ) -> Window:
    """One window of answers (their times, their :class:`Sample`) judged against the reference; ``repeats``
    answers of the window's patients were left out of ``window`` (:attr:`Window.repeats`)."""
    out = Window(index, times[0], times[-1], len(window) + repeats, judged=len(window) >= MIN_WINDOW,
                 repeats=repeats)
    out.positive_rates = [float(window.calls[:, j].mean()) if window.calls is not None and called[j] else None
                          for j in range(len(findings))]
    out.flag_rate = float(window.flagged.mean())
    if not out.judged:
        out.note = (f"too small to judge ({len(window)} answers" + (" of distinct patients" if repeats else "")
                    + f"; a window needs {MIN_WINDOW})")
        return out
    out.tests = window_tests(reference, window, findings, called, pixel_names, reference_tags)
    out.unseen = unseen_values(reference_tags, window)
    if len(window) not in band_cache:
        band_cache[len(window)] = auc_bands(reference.probabilities, len(window), findings)
    out.estimated_auc = [EstimatedAuc(name, expected_auc(window.probabilities[:, j]), band_cache[len(window)][j])
                         for j, name in enumerate(findings)]
    return out


def split_windows(times: Sequence[datetime], count: int | None = None, span: timedelta | None = None
                  ) -> list[np.ndarray]:
    """The rows of each window, oldest first: consecutive runs of ``count`` answers, or of ``span`` of time from
    the first answer (empty spans left out)."""
    if count is not None:
        return [np.arange(start, min(start + count, len(times))) for start in range(0, len(times), count)]
    assert span is not None
    start = times[0]
    slots = np.array([int((t - start) / span) for t in times])
    return [np.flatnonzero(slots == slot) for slot in np.unique(slots)]


@dataclass(frozen=True)
class CusumAlarm:
    """A slow drift: the CUSUM of one kind of test passed :data:`CUSUM_H` at a window."""

    kind: str
    window: int
    statistic: float

    def describe(self) -> str:
        return (f"slow drift in {self.kind}: CUSUM {self.statistic:.1f} over {CUSUM_H:g} at window {self.window} "
                "(each window's score below the alert line, their sum above it)")


def kind_score(window: Window, kind: str) -> float | None:
    """The z-value of a kind's Bonferroni-combined p-value in a window (None where it had no such test)."""
    tests = window.tests_of(kind)
    if not tests:
        return None
    combined = min(1.0, len(tests) * min(t.p_value for t in tests))
    return float(np.clip(stats.norm.isf(max(combined, 1e-300)), -5.0, 10.0))


def cusum(windows: Sequence[Window]) -> tuple[list[CusumAlarm], dict[str, list[float]]]:
    """The CUSUM of each kind over the judged windows: its alarms (the sum starts again after each) and its value
    at each judged window."""
    alarms: list[CusumAlarm] = []
    paths: dict[str, list[float]] = {}
    for kind in KINDS:
        total, path = 0.0, []
        for window in (w for w in windows if w.judged):
            score = kind_score(window, kind)
            if score is not None:
                total = max(0.0, total + score - CUSUM_K)
                if total > CUSUM_H:
                    alarms.append(CusumAlarm(kind, window.index, round(total, 3)))
                    path.append(total)
                    total = 0.0
                    continue
            path.append(total)
        if any(window.tests_of(kind) for window in windows):
            paths[kind] = path
    return alarms, paths
