"""Descriptive statistics against independent counts of the real table."""

from __future__ import annotations

import numpy as np

from cxrlearn.data.cohort.split import make_split
from cxrlearn.data.cohort.stats import table_stats
from cxrlearn.findings import FINDINGS


def test_table_stats(nih_table):
    stats = table_stats(nih_table)
    assert stats.images == 112_120 and stats.patients == 30_805
    for name in FINDINGS:
        assert stats.findings[name].positives == nih_table[name].sum()
        assert stats.co_occurrence[name][name] == nih_table[name].sum()
    both = ((nih_table["Effusion"] == 1) & (nih_table["Atelectasis"] == 1)).sum()
    assert stats.co_occurrence["Effusion"]["Atelectasis"] == stats.co_occurrence["Atelectasis"]["Effusion"] == both
    assert sum(stats.findings_per_image.values()) == 112_120
    assert stats.findings_per_image["0"] == stats.no_finding.images == 60_361
    assert stats.views == {"AP": (nih_table["view"] == "AP").sum(), "PA": (nih_table["view"] == "PA").sum()}
    assert sum(stats.sex.patients.values()) == 30_805
    assert sum(stats.age.bands.values()) == 112_120
    assert stats.age.median == np.median(nih_table["age"])


def test_stats_per_split_add_up(nih_table):
    table = nih_table.head(3000)
    split = make_split(table)
    merged = table.merge(split, on=["image", "patient_id"])
    parts = [table_stats(merged[merged["split"] == s]) for s in ("train", "val", "test")]
    assert sum(p.images for p in parts) == 3000
    assert sum(p.patients for p in parts) == table["patient_id"].nunique()
    for name in FINDINGS:
        assert sum(p.findings[name].positives for p in parts) == table[name].sum()
