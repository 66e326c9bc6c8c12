"""Paired tests of two AUCs on the same images (cxrlearn.evaluation.paired), checked against independent
computations on real NIH labels. The two "models" are real per-image values of the label table that carry
some signal about the findings and tie a lot (age, follow-up number, the original image's height), so that
midranks are exercised."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrlearn.evaluation.paired import delong, holm, paired_bootstrap


def _delong_by_definition(labels, a, b):
    """DeLong et al. 1988 as written: placement values from every positive-negative pair (O(m n))."""
    positive, negative = labels == 1, labels == 0
    components = []
    for scores in (a, b):
        x, y = scores[positive][:, None], scores[negative][None, :]
        psi = (x > y) + 0.5 * (x == y)
        components.append((psi.mean(axis=1), psi.mean(axis=0)))
    v10 = np.vstack([c[0] for c in components])
    v01 = np.vstack([c[1] for c in components])
    s = np.cov(v10) / positive.sum() + np.cov(v01) / negative.sum()
    return v10.mean(axis=1), s[0, 0] + s[1, 1] - 2 * s[0, 1]


@pytest.fixture(scope="module")
def patients_sample(nih_table):
    """3,000 real images of the label table (every 37th row: many patients, some with several images)."""
    return nih_table.iloc[::37].head(3000).reset_index(drop=True)


@pytest.mark.parametrize("finding", ["Cardiomegaly", "Effusion", "Infiltration", "Hernia"])
def test_delong_equals_its_definition_on_real_labels(patients_sample, finding):
    frame = patients_sample
    labels = frame[finding].to_numpy(dtype=float)
    a = frame["age"].to_numpy(dtype=float)
    b = frame["follow_up"].to_numpy(dtype=float) + 0.01 * frame["height"].to_numpy(dtype=float)
    result = delong(labels, a, b)
    aucs, variance = _delong_by_definition(labels, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    assert [result.auc_a, result.auc_b] == pytest.approx(list(aucs), abs=1e-12)
    assert result.standard_error ** 2 == pytest.approx(variance, rel=1e-9)
    assert 0 < result.p_value <= 1 and result.ci95[0] < result.difference < result.ci95[1]


def test_delong_of_a_model_with_itself_and_of_undefined_findings(patients_sample):
    labels = patients_sample["Effusion"].to_numpy(dtype=float)
    age = patients_sample["age"].to_numpy(dtype=float)
    same = delong(labels, age, age)
    assert same.difference == 0 and same.p_value == 1
    assert delong(np.zeros(10), np.arange(10.0), np.arange(10.0)) is None  # no positive: no AUC
    with_unknown = labels.copy()
    with_unknown[:100] = np.nan  # unknown labels are left out, as everywhere in cxrlearn
    assert delong(with_unknown, age, age + 1).auc_a == pytest.approx(roc_auc_score(labels[100:], age[100:]))


def test_delong_variance_agrees_with_the_bootstrap_where_images_are_independent(patients_sample):
    """DeLong's variance is the bootstrap's in the limit; resampling images (each its own group), the two
    standard errors of the difference agree within Monte Carlo error."""
    frame = patients_sample
    findings = ["Cardiomegaly", "Effusion", "Emphysema"]
    labels = frame[findings].to_numpy(dtype=float)
    a = np.repeat(frame[["age"]].to_numpy(dtype=float), 3, axis=1)
    b = np.repeat((frame["follow_up"] + 0.01 * frame["height"]).to_numpy(dtype=float)[:, None], 3, axis=1)
    boot = paired_bootstrap(labels, a, b, np.arange(len(frame)), columns=[0, 1, 2], resamples=1000, seed=5)
    for f in range(3):
        test = delong(labels[:, f], a[:, f], b[:, f])
        spread = np.nanstd(boot.differences[:, f])
        assert spread == pytest.approx(test.standard_error, rel=0.15), findings[f]
        low, high = boot.interval(f)
        assert low < test.difference < high
    same = paired_bootstrap(labels, a, a, frame["patient_id"].to_numpy(), columns=[0, 1, 2], resamples=200)
    assert same.interval() == [0.0, 0.0]  # the same model on the same resamples: no difference at all


def test_holm_adjusts_as_the_procedure_says():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 (monotone).
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
