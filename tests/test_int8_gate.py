"""The int8 export's gate (cxrlearn.workflows.quantize.GateFigures) on real labels of the sample: which files it
writes and which it refuses, under each gate."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlearn.evaluation.bootstrap import DEFAULT_SEED, bootstrap_aucs, percentile_interval
from cxrlearn.evaluation.paired import delong, holm
from cxrlearn.findings import FINDINGS
from cxrlearn.workflows.quantize import GATE_ALPHA, Int8Judgement, gate_figures


@pytest.fixture(scope="module")
def labelled(nih_table):
    """The labels and patients of 400 of NIH's images, and a float model's scores: the labels plus noise."""
    rows = nih_table.iloc[:400]
    labels = rows[list(FINDINGS)].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(0)
    scores = np.clip(0.35 * labels + rng.normal(0.3, 0.2, labels.shape), 0.001, 0.999)
    return labels, rows["patient_id"].to_numpy(), scores, rng


def test_an_honest_int8_file_passes_no_loss_but_not_equivalence_on_few_images(labelled):
    labels, patients, scores, rng = labelled
    int8 = np.clip(scores + rng.normal(0, 0.04, scores.shape), 0.001, 0.999)  # int8 moves each output a little
    figures = gate_figures(labels, scores, int8, patients, list(FINDINGS), resamples=200)
    low, high = figures.interval
    assert figures.worse == [] and low < -0.005 < high  # no loss shown, and none ruled out either
    assert figures.passes("no-loss", 0.005) and not figures.passes("equivalence", 0.005)
    assert figures.passes("equivalence", abs(low) + 0.001)  # a wide enough allowance: shown smaller
    # the interval is the paired patient bootstrap's
    boots = [bootstrap_aucs(labels, s, patients, 200, DEFAULT_SEED) for s in (scores, int8)]
    columns = [j for j in range(len(FINDINGS)) if np.nansum(labels[:, j]) > 0]
    assert figures.interval == pytest.approx(percentile_interval(boots[1].mean_auc(columns)
                                                                 - boots[0].mean_auc(columns)))


def test_a_finding_that_int8_damaged_is_named_and_refused_by_both_gates(labelled):
    labels, patients, scores, rng = labelled
    j = FINDINGS.index("Infiltration")
    int8 = scores.copy()
    int8[:, j] = rng.permutation(int8[:, j])  # one finding's outputs broken
    figures = gate_figures(labels, scores, int8, patients, list(FINDINGS), resamples=200)
    assert figures.worse == ["Infiltration"]
    tests = [delong(labels[:, k], scores[:, k], int8[:, k]) for k in range(len(FINDINGS))]
    adjusted = holm([None if t is None else t.p_value for t in tests])
    assert adjusted[j] < GATE_ALPHA and tests[j].difference < 0
    assert not figures.passes("no-loss", 1.0) and not figures.passes("equivalence", 1.0)
    # The refusal says which finding and what to do; the gate "none" writes it anyway.
    judged = Int8Judgement(len(labels), len(set(patients)), figures, 1.0, 1.0, 0.99, False, gate="no-loss")
    assert not judged.passed and "Infiltration lost significantly" in judged.advice()
    assert "--calibration-images" in judged.advice() and "--max-auc-loss" not in judged.advice()
    opened = Int8Judgement(len(labels), len(set(patients)), figures, 0.5, 1.0, 0.99, False, gate="none")
    assert opened.passed and "gate none: not judged" in opened.text() and "Infiltration" in opened.text()


def test_a_loss_of_mean_auc_larger_than_the_allowance_is_refused(labelled):
    labels, patients, scores, rng = labelled
    int8 = np.clip(scores + rng.normal(0, 0.25, scores.shape), 0.001, 0.999)  # every finding a little worse
    figures = gate_figures(labels, scores, int8, patients, list(FINDINGS), resamples=200)
    assert figures.interval[1] < -0.005 and not figures.passes("no-loss", 0.005)
    assert figures.mean_auc_int8 < figures.mean_auc_float
