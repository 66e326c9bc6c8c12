"""The patient-wise stratified split: the fairness bar on the full table, determinism,
official-test mode, and split files that would leak patients."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrlearn.data.cohort.split import (
    PREVALENCE_TOLERANCE,
    SHARE_TOLERANCE,
    SPLITS,
    STRATA,
    apply_split,
    make_split,
    read_split_file,
    report_path,
    split_report,
    split_to_csv,
    write_split,
)
from cxrlearn.data.sources.nih import read_image_list
from cxrlearn.errors import DataError
from cxrlearn.findings import FINDINGS

RATIOS = (0.7, 0.1, 0.2)


def prevalence_deviation(table: pd.DataFrame, split: pd.DataFrame, reference: pd.DataFrame | None = None):
    """Independent check: (split prevalence / reference prevalence) - 1 for every stratum."""
    merged = table.merge(split, on=["image", "patient_id"])
    reference = merged if reference is None else reference
    def prevalences(frame):
        labels = frame[list(FINDINGS)].to_numpy()
        return np.append(labels.mean(axis=0), (labels.sum(axis=1) == 0).mean())
    overall = prevalences(reference)
    return {s: prevalences(merged[merged["split"] == s]) / overall - 1 for s in merged["split"].unique()}


@pytest.fixture(scope="module")
def custom_split(nih_table):
    return make_split(nih_table, RATIOS, seed=2137)


def test_full_table_meets_the_fairness_bar(nih_table, custom_split):
    assert len(custom_split) == len(nih_table)
    assert set(custom_split["split"]) == set(SPLITS)
    deviation = prevalence_deviation(nih_table, custom_split)
    for name, ratio in zip(SPLITS, RATIOS):
        worst = np.abs(deviation[name]).max()
        assert worst <= PREVALENCE_TOLERANCE, (name, STRATA[int(np.abs(deviation[name]).argmax())], worst)
        share = (custom_split["split"] == name).mean()
        assert abs(share - ratio) <= SHARE_TOLERANCE, (name, share)
    assert (custom_split.groupby("patient_id")["split"].nunique() == 1).all()


def test_report_agrees_with_an_independent_count(nih_table, custom_split):
    report = split_report(nih_table, custom_split, ratios=RATIOS)
    deviation = prevalence_deviation(nih_table, custom_split)
    for name in SPLITS:
        entry = report.splits[name]
        assert entry.images == (custom_split["split"] == name).sum()
        assert entry.patients == custom_split.loc[custom_split["split"] == name, "patient_id"].nunique()
        got = np.array([entry.relative_deviation[s] for s in STRATA])
        np.testing.assert_allclose(got, deviation[name], atol=1e-6)
    assert report.shared_patients == 0
    assert report.max_share_deviation_points <= 100 * SHARE_TOLERANCE
    assert abs(report.max_relative_deviation.value) <= PREVALENCE_TOLERANCE


def test_random_patient_split_is_far_less_fair(nih_table, custom_split):
    random = make_split(nih_table, RATIOS, seed=2137, method="random")
    assert (random.groupby("patient_id")["split"].nunique() == 1).all()
    random_worst = max(np.abs(d).max() for d in prevalence_deviation(nih_table, random).values())
    custom_worst = max(np.abs(d).max() for d in prevalence_deviation(nih_table, custom_split).values())
    assert random_worst > 0.10 > PREVALENCE_TOLERANCE >= custom_worst


def test_deterministic_byte_identical(nih_table, custom_split, tmp_path):
    again = make_split(nih_table, RATIOS, seed=2137)
    first = write_split(custom_split, tmp_path / "a.csv")
    second = write_split(again, tmp_path / "b.csv")
    assert first == second
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    other_seed = make_split(nih_table, RATIOS, seed=1)
    assert split_to_csv(other_seed) != split_to_csv(custom_split)


def test_official_test_mode(nih_table, test_list_path):
    official = read_image_list(test_list_path)
    split = make_split(nih_table, RATIOS, seed=2137, official_test=official)
    assert set(split.loc[split["split"] == "test", "image"]) == set(official)
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    pool = nih_table[~nih_table["image"].isin(official)]
    deviation = prevalence_deviation(pool, split, reference=pool)
    share_of_pool = (split["split"] == "train").sum() / len(pool)
    assert abs(share_of_pool - 0.875) <= SHARE_TOLERANCE
    for name in ("train", "val"):
        assert np.abs(deviation[name]).max() <= PREVALENCE_TOLERANCE, name
    report = split_report(nih_table, split, ratios=RATIOS, official_test=True)
    assert report.mode == "official-test"
    # The official list's own skew, as published: Pneumothorax at over twice its rate.
    assert report.max_relative_deviation.finding == "Pneumothorax"
    assert report.max_relative_deviation.value > 1.0
    assert abs(report.within_train_val.max_relative_deviation.value) <= PREVALENCE_TOLERANCE


def test_official_list_that_is_not_patient_wise(nih_table):
    first_patient = nih_table[nih_table["patient_id"] == 1]["image"].tolist()
    with pytest.raises(DataError, match=r"patient 1 has images both on and off the official test list"):
        make_split(nih_table.head(500), RATIOS, official_test=first_patient[:1])


@pytest.mark.parametrize("ratios, message", [((0.7, 0.2, 0.2), "add up to 1"), ((0.7, -0.1, 0.4), "non-negative")])
def test_bad_ratios(nih_table, ratios, message):
    with pytest.raises(DataError, match=message):
        make_split(nih_table.head(100), ratios)


def test_small_table_of_present_images(nih_table, sample_images):
    from cxrlearn.data.decoding.images import attach_images

    present = attach_images(nih_table, sample_images).table
    split = make_split(present, RATIOS)
    assert sorted(split["image"]) == sorted(present["image"])
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    for name, ratio in zip(SPLITS, RATIOS):
        assert abs((split["split"] == name).mean() - ratio) <= 0.02


def test_write_and_read_back(nih_table, custom_split, tmp_path):
    report = split_report(nih_table, custom_split, ratios=RATIOS, seed=2137)
    path = tmp_path / "out" / "split.csv"
    write_split(custom_split, path, report)
    assert path.read_text().splitlines()[0] == "image,patient_id,split"
    saved = json.loads(report_path(path).read_text())
    assert saved["splits"]["test"]["images"] == report.splits["test"].images
    back = read_split_file(path)
    pd.testing.assert_frame_equal(back, custom_split[["image", "patient_id", "split"]], check_dtype=False)


def _split_file(tmp_path, rows, header="image,patient_id,split"):
    path = tmp_path / "split.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_split_file_with_a_shared_patient(tmp_path):
    path = _split_file(tmp_path, ["a.png,7,train", "b.png,8,val", "c.png,7,test"])
    with pytest.raises(DataError, match=r"patient 7 is in more than one split: train \(line 2: a.png\), test \(line 4: c.png\)"):
        read_split_file(path)


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["a.png,7,training"], "image,patient_id,split", r"line 2: unknown split 'training'"),
        (["a.png,7,train", "a.png,7,train"], "image,patient_id,split", r"image 'a.png' is listed more than once \(lines 2, 3\)"),
        (["a.png,7"], "image,patient_id", r"missing column\(s\) split"),
        (["a.png,,train"], "image,patient_id,split", r"line 2: patient_id is empty"),  # other tables' ids are text
    ],
)
def test_bad_split_files(tmp_path, rows, header, message):
    with pytest.raises(DataError, match=message):
        read_split_file(_split_file(tmp_path, rows, header))


def test_split_from_another_table_is_refused(nih_table):
    split = pd.DataFrame({"image": ["00000001_000.png"], "patient_id": [2], "split": ["train"]})
    with pytest.raises(DataError, match=r"00000001_000.png belongs to patient 2 there but to patient 1"):
        apply_split(nih_table, split)
