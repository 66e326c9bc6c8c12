"""Evaluation: AUC equal to scikit-learn's, patient-level intervals, null handling, thresholds chosen
on val and stored, calibration, subgroups and expert labels, on a model trained on real sample images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import EXPERT
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cxrlearn.cli.main import main
from cxrlearn.data.sources.expert_labels import read_expert_labels
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.evaluation.bootstrap import bootstrap_aucs, weighted_auc
from cxrlearn.evaluation.calibration import fit_temperature, reliability
from cxrlearn.evaluation.metrics import finding_metrics
from cxrlearn.evaluation.results import EvaluationMetrics
from cxrlearn.evaluation.operating_points import choose_threshold, confusion
from cxrlearn.findings import FINDINGS
from cxrlearn.model.bundle import read_meta
from cxrlearn.workflows.evaluate import EvaluationOptions, evaluate

# ---- the statistics on their own ---------------------------------------------------------------------


def test_weighted_auc_equals_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    scores = np.round(rng.random(400) + 0.4 * labels, 1)  # coarse scores: many ties
    weights = rng.integers(0, 4, size=(6, 400))
    expected = [roc_auc_score(labels, scores, sample_weight=w) for w in weights]
    assert np.allclose(weighted_auc(labels, scores, weights), expected, atol=1e-12, rtol=0)


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_clustered_images():
    # 60 patients with 10 images each; a patient's images share label and score, as a
    # patient's follow-up X-rays largely do. Resampling images treats 600 images as
    # independent; there are really 60 independent units.
    rng = np.random.default_rng(1)
    patient_label = rng.random(60) < 0.4
    patient_score = rng.normal(size=60) + patient_label
    patients = np.repeat(np.arange(60), 10)
    labels = patient_label[patients][:, None].astype(int)
    scores = (patient_score[patients] + rng.normal(scale=0.01, size=600))[:, None]
    by_patient, _ = finding_metrics(labels, scores, patients, ["x"], n_resamples=400, unit="patient")
    by_image, _ = finding_metrics(labels, scores, patients, ["x"], n_resamples=400, unit="image")
    width = lambda m: m.auc_ci95["x"][1] - m.auc_ci95["x"][0]  # noqa: E731
    assert by_patient.auc["x"] == by_image.auc["x"]
    assert width(by_patient) > 2.0 * width(by_image)
    # With one image per patient the two coincide exactly (same draws).
    single = np.arange(600)
    a, _ = finding_metrics(labels, scores, single, ["x"], n_resamples=200, unit="patient")
    b, _ = finding_metrics(labels, scores, single, ["x"], n_resamples=200, unit="image")
    assert a.auc_ci95 == b.auc_ci95


def test_a_finding_without_positives_or_negatives_gets_null_with_the_reason():
    rng = np.random.default_rng(2)
    labels = (rng.random((50, 3)) < 0.3).astype(int)
    labels[:, 1] = 0
    labels[:, 2] = 1
    scores = rng.random((50, 3))
    metrics, _ = finding_metrics(labels, scores, np.arange(50), ["a", "b", "c"], n_resamples=100)
    assert metrics.auc["b"] is None and metrics.undefined["b"] == "no positives"
    assert metrics.auc["c"] is None and metrics.undefined["c"] == "no negatives"
    assert metrics.auc_ci95["b"] is None and metrics.auc_pr["c"] is None
    assert metrics.mean_over == ["a"]
    assert metrics.mean_auc == pytest.approx(roc_auc_score(labels[:, 0], scores[:, 0]), abs=1e-12)
    assert "NaN" not in json.dumps(metrics.to_dict())  # JSON-ready: None, not NaN


def test_threshold_rules_are_optimal_over_every_candidate():
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.25
    scores = rng.random(300) + 0.3 * labels
    candidates = np.unique(scores)
    points = [confusion(labels, scores, t) for t in candidates]
    youden = [p.sensitivity + p.specificity - 1 for p in points]
    f1 = [2 * p.tp / (2 * p.tp + p.fp + p.fn) for p in points]
    chosen = confusion(labels, scores, choose_threshold(labels, scores, "youden"))
    assert chosen.sensitivity + chosen.specificity - 1 == pytest.approx(max(youden))
    chosen = confusion(labels, scores, choose_threshold(labels, scores, "f1"))
    assert 2 * chosen.tp / (2 * chosen.tp + chosen.fp + chosen.fn) == pytest.approx(max(f1))
    spec90 = confusion(labels, scores, choose_threshold(labels, scores, "spec90"))
    assert spec90.specificity >= 0.9
    assert spec90.sensitivity == max(p.sensitivity for p in points if p.specificity >= 0.9)


def test_temperature_scaling_recovers_a_known_temperature_and_keeps_auc():
    rng = np.random.default_rng(4)
    true_logits = rng.normal(scale=2.0, size=20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-true_logits))
    overconfident = 2.5 * true_logits
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    assert roc_auc_score(labels, overconfident / t) == pytest.approx(roc_auc_score(labels, overconfident))
    before = reliability(labels, 1 / (1 + np.exp(-overconfident))).ece
    after = reliability(labels, 1 / (1 + np.exp(-overconfident / t))).ece
    assert after < 0.02 < before


def test_expected_calibration_error_on_a_hand_worked_example():
    # Bin [0.1, 0.2): 2 images at 0.15, one positive -> gap |0.15 - 0.5| = 0.35.
    # Bin [0.9, 1.0]: 2 images at 0.95, both positive -> gap 0.05. ECE = (2*0.35 + 2*0.05) / 4 = 0.2.
    result = reliability(np.array([0, 1, 1, 1]), np.array([0.15, 0.15, 0.95, 0.95]))
    assert result.ece == pytest.approx(0.2)
    assert result.count[1] == 2 and result.count[9] == 2 and sum(result.count) == 4


def test_bootstrap_benchmark_scale_runs_in_one_pass():
    # The official test list's shape (25,596 images of 2,797 patients, 14 findings), 100
    # resamples: the mean of the resampled AUCs lands on the point estimate.
    rng = np.random.default_rng(5)
    patients = np.sort(rng.integers(0, 2797, 25596))
    labels = rng.random((25596, 14)) < 0.05
    scores = rng.random((25596, 14)) + 0.5 * labels
    boot = bootstrap_aucs(labels, scores, patients, n_resamples=100)
    point = [roc_auc_score(labels[:, i], scores[:, i]) for i in range(14)]
    assert np.allclose(boot.aucs.mean(axis=0), point, atol=0.01)


def test_expert_label_file_is_read_and_bad_values_are_named(data_dir, tmp_path):
    expert = read_expert_labels(data_dir / "nih" / EXPERT)
    assert len(expert) == 4376
    assert set(expert["set_id"]) == {"test", "val"}
    assert expert["pneumothorax"].sum() == 238 and expert["nodule_or_mass"].sum() == 605
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Fracture,Pneumothorax,Airspace opacity,Nodule or mass,Set Id\n"
                   "a.png,NO,NO,NO,NO,test\nb.png,NO,MAYBE,NO,NO,val\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: Pneumothorax is 'MAYBE'"):
        read_expert_labels(bad)


# ---- a model trained on real sample images, then evaluated (fixtures in conftest.py) -------------------


def test_evaluate_writes_metrics_report_and_figures(evaluated):
    run, out, metrics = evaluated
    for name in ("metrics.json", "predictions.csv", "report.md", "report.html", "roc_curves.png", "reliability.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("mean_auc", "mean_auc_ci95", "auc", "auc_ci95", "positives", "n_images", "n_patients", "mean_over",
                "auc_pr", "operating_points", "calibration", "subgroups", "expert", "tta", "provenance"):
        assert key in saved, key
    assert set(saved["auc"]) == set(FINDINGS) and EvaluationMetrics.read(out / "metrics.json") == metrics
    low, high = saved["mean_auc_ci95"]
    assert low < saved["mean_auc"] < high
    assert (out / "roc_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Kufel 2023" in report and "CheXNet 2017" in report and "Operating points" in report
    assert "<table>" in (out / "report.html").read_text()


def test_evaluated_auc_equals_scikit_learn_on_the_same_predictions(evaluated, trained_run):
    _, out, metrics = evaluated
    predictions = pd.read_csv(out / "predictions.csv")
    judged = predictions[predictions["split"] == "test"]
    split = pd.read_csv(trained_run[1])
    assert len(judged) == (split["split"] == "test").sum() == metrics.n_images
    scored = 0
    for name in FINDINGS:
        y, p = judged[f"label_{name}"], judged[name]
        if 0 < y.sum() < len(y):
            assert metrics.auc[name] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
            assert metrics.auc_pr[name] == pytest.approx(average_precision_score(y, p), abs=1e-9)
            scored += 1
        else:
            assert metrics.auc[name] is None and name not in metrics.mean_over
    assert scored == len(metrics.mean_over) >= 10


def test_thresholds_chosen_on_val_are_stored_in_the_bundle_and_applied_to_test(evaluated):
    run, out, metrics = evaluated
    meta = read_meta(run)
    predictions = pd.read_csv(out / "predictions.csv")
    val = predictions[predictions["split"] == "val"]
    judged = predictions[predictions["split"] == "test"]
    assert meta.threshold_method == "youden" and meta.tta is True
    assert meta.temperature == metrics.calibration.temperature
    assert meta.operating_points == metrics.operating_points.thresholds
    for name in FINDINGS:
        y, p = val[f"label_{name}"].to_numpy(), val[name].to_numpy()
        stored = meta.thresholds[name]
        if not 10 <= y.sum() <= len(y) - 10:  # fewer than 10 val positives or negatives: no threshold
            assert stored is None
            continue
        # Youden's J from scikit-learn's ROC curve on the val predictions alone.
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        assert stored == thresholds[1:][np.argmax((tpr - fpr)[1:])]
        applied = metrics.operating_points.test["youden"][name]
        called = judged[name].to_numpy() >= stored
        positive = judged[f"label_{name}"].to_numpy() == 1
        assert applied.threshold == stored
        assert (applied.tp, applied.fp) == ((called & positive).sum(), (called & ~positive).sum())


def test_subgroups_on_real_sample_images(evaluated, nih_table):
    _, out, metrics = evaluated
    judged = pd.read_csv(out / "predictions.csv").query("split == 'test'").merge(
        nih_table[["image", "sex", "view"]], on="image")
    groups = {(g.attribute, g.group): g for g in metrics.subgroups}
    assert {k for k in groups if k[0] == "sex"} == {("sex", "M"), ("sex", "F")}
    assert {k for k in groups if k[0] == "view"} == {("view", v) for v in set(judged["view"])} <= {("view", "PA"), ("view", "AP")}
    for attribute in ("sex", "age", "view"):
        assert sum(g.n_images for (a, _), g in groups.items() if a == attribute) == metrics.n_images
    women = judged[judged["sex"] == "F"]
    assert groups[("sex", "F")].n_images == len(women)
    assert groups[("sex", "F")].n_patients == women["patient_id"].nunique()
    for name in groups[("sex", "F")].mean_over:
        assert groups[("sex", "F")].auc[name] == pytest.approx(roc_auc_score(women[f"label_{name}"], women[name]), abs=1e-9)


def test_expert_label_table_on_real_sample_images(evaluated, data_dir):
    _, out, metrics = evaluated
    expert = read_expert_labels(data_dir / "nih" / EXPERT)
    predictions = pd.read_csv(out / "predictions.csv")
    judged = predictions[predictions["split"] == "test"].merge(expert, on="image")
    result = metrics.expert
    assert result.n_images == len(judged) > 0
    y = judged["pneumothorax"]
    assert result.expert.positives["Pneumothorax"] == int(y.sum())
    if 0 < y.sum() < len(y):
        assert result.expert.auc["Pneumothorax"] == pytest.approx(roc_auc_score(y, judged["Pneumothorax"]), abs=1e-9)
    nodule_or_mass = np.maximum(judged["Nodule"], judged["Mass"])
    y = judged["nodule_or_mass"]
    if 0 < y.sum() < len(y):
        assert result.expert.auc["Nodule or mass"] == pytest.approx(roc_auc_score(y, nodule_or_mass), abs=1e-9)
    nih = np.maximum(judged["label_Nodule"], judged["label_Mass"])
    assert result.nih.positives["Nodule or mass"] == int(nih.sum())


def test_tta_comparison_is_reported(evaluated):
    _, _, metrics = evaluated
    t = metrics.tta
    assert t.difference == pytest.approx(t.mean_auc_with_tta - t.mean_auc_without_tta)
    assert t.verdict in ("helps", "hurts", "no difference the bootstrap can tell from chance")
    assert t.mean_auc_with_tta == metrics.mean_auc


def test_judging_training_patients_is_refused(trained_run, table_path, sample_images, tmp_path):
    run, split = trained_run
    frame = pd.read_csv(split)
    frame.loc[frame["split"] == "train", "split"] = "test"
    leaky = tmp_path / "leaky.csv"
    frame.to_csv(leaky, index=False)
    with pytest.raises(DataError, match="patients this model was trained on"):
        evaluate(run, table_path, sample_images, tmp_path / "out",
                 EvaluationOptions(split=str(leaky), resamples=100, progress=False, write_bundle=False))


def test_official_test_list_is_judged_and_val_keeps_none_of_its_patients(trained_run, table_path, sample_images,
                                                                          test_list_path, nih_table, tmp_path):
    run, split = trained_run
    metrics = evaluate(run, table_path, sample_images, tmp_path / "official",
                       EvaluationOptions(official_test=str(test_list_path), resamples=100, progress=False,
                                         write_bundle=False))
    official = set(test_list_path.read_text().split())
    present = set(pd.read_csv(split)["image"])
    listed = nih_table[nih_table["image"].isin(official & present)]
    assert metrics.n_images == len(listed) == 171
    assert metrics.n_patients == listed["patient_id"].nunique()
    assert metrics.provenance.split.official_test.file == "test_list.txt"
    predictions = pd.read_csv(tmp_path / "official" / "predictions.csv")
    val = predictions[predictions["split"] == "val"]
    assert len(val) > 0 and not set(val["patient_id"]) & set(listed["patient_id"])
    assert set(predictions.loc[predictions["split"] == "official-test", "image"]) == set(listed["image"])


def test_cli_evaluate_reports_bad_input_with_status_2(trained_run, table_path, sample_images, tmp_path, capsys):
    run, _ = trained_run
    code = main(["evaluate", "--model", str(tmp_path), "--csv", str(table_path), "--images", str(sample_images),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "not a cxrlearn model bundle" in capsys.readouterr().err
    code = main(["evaluate", "--model", str(run), "--csv", str(table_path), "--images", str(sample_images),
                 "--out", str(tmp_path / "out"), "--subset", "holdout", "--no-progress"])
    assert code == 2
    assert "--subset must be one of" in capsys.readouterr().err


# ---- any folder of images ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_patients(trained_run, sample_images, tmp_path_factory):
    """A folder of real images of patients the run neither trained nor validated on (its test split)."""
    import shutil

    _, split = trained_run
    frame = pd.read_csv(split)
    folder = tmp_path_factory.mktemp("other-patients")
    for name in frame.loc[frame["split"] == "test", "image"]:
        shutil.copyfile(sample_images / name, folder / name)
    return folder


def test_evaluate_any_folder_matches_scikit_learn_on_predict_output(evaluated, other_patients, nih_table, tmp_path):
    run, _, _ = evaluated
    out = tmp_path / "external"
    code = main(["evaluate", "--model", str(run), "--images", str(other_patients), "--out", str(out),
                 "--resamples", "200", "--no-progress"])
    assert code == 0
    metrics = EvaluationMetrics.read(out / "metrics.json")
    names = sorted(p.name for p in other_patients.iterdir())
    assert metrics.n_images == len(names)
    assert metrics.n_patients == nih_table[nih_table["image"].isin(names)]["patient_id"].nunique()
    assert main(["predict", str(other_patients), "--model", str(run), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    predicted = pd.read_csv(tmp_path / "p.csv").merge(nih_table[["image", *FINDINGS]], on="image",
                                                        suffixes=("", "_label"))
    assert len(predicted) == len(names)
    scored = 0
    for name in FINDINGS:
        y = predicted[f"{name}_label"]
        if 0 < y.sum() < len(y):
            # evaluate runs batches of 64 cached images, predict batches of 16 files: oneDNN's results differ by
            # about 1e-6 between batch sizes, which can swap one near-tied pair (an AUC step of
            # 1 / (positives x negatives), about 1e-5 here). A wrong pipeline would be off by far more.
            step = 1.0 / (y.sum() * (len(y) - y.sum()))
            assert metrics.auc[name] == pytest.approx(roc_auc_score(y, predicted[name]), abs=1.5 * step)
            scored += 1
    assert scored == len(metrics.mean_over) >= 10
    # The bundle's thresholds, chosen on the run's val split, applied as they are; the bundle is not rewritten.
    meta = read_meta(run)
    assert metrics.operating_points.thresholds == meta.operating_points
    assert "val" not in metrics.operating_points
    assert metrics.calibration.temperature == meta.temperature


def test_evaluate_any_folder_refuses_training_and_validation_patients(trained_run, table_path, sample_images,
                                                                       tmp_path, capsys):
    run, _ = trained_run
    code = main(["evaluate", "--model", str(run), "--csv", str(table_path), "--images", str(sample_images),
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "of the train split" in err and "of the val split" in err and "--subset test" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--calibrate fits temperatures on validation images"):
        evaluate(run, None, sample_images, tmp_path / "out", EvaluationOptions(calibrate=True, progress=False))


def test_published_values_are_keyed_by_finding_and_average_to_their_means():
    from cxrlearn.evaluation.published import PUBLISHED, published_auc

    for source, entry in PUBLISHED.items():
        assert set(entry.auc) == set(FINDINGS), source
        values = published_auc(source)
        assert list(values) == list(FINDINGS)
        assert abs(np.mean(list(values.values())) - entry.mean) < 0.0015, source


def test_metrics_json_keeps_its_format_reads_older_files_and_has_a_current_schema(evaluated, tmp_path):
    """The parts are typed records in code and the same keys on disk; a file of an earlier cxrlearn (without the
    parts added since) still reads; docs/*.schema.json are generated from the declarations."""
    _, out, metrics = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    assert json.loads(json.dumps(metrics.to_dict())) == saved
    assert set(saved["operating_points"]) == {"chosen_on", "bundle_method", "thresholds", "undefined", "test", "val"}
    assert set(saved["calibration"]) >= {"bins", "test", "temperature", "test_uncalibrated"}
    assert set(saved["input_check"]) == {"available", "flagged", "judged", "reasons", "mean_auc_all",
                                         "mean_auc_unflagged", "note"}
    assert isinstance(metrics.operating_points.test["youden"][FINDINGS[0]].tp, int)
    older = {k: v for k, v in saved.items() if k not in ("input_check", "tta", "expert", "skipped")}
    (tmp_path / "metrics.json").write_text(json.dumps(older))
    read = EvaluationMetrics.read(tmp_path / "metrics.json")
    assert read.tta is None and read.expert is None and not read.input_check.available
    assert read.operating_points.thresholds == metrics.operating_points.thresholds
    assert json.loads(json.dumps(read.to_dict())) == {**older, "skipped": {}, "input_check": {}}
    (tmp_path / "broken.json").write_text(json.dumps({**saved, "operating_points": {"test": 3}}))
    with pytest.raises(DataError, match="broken.json: not a metrics.json"):
        EvaluationMetrics.read(tmp_path / "broken.json")

    from cxrlearn.evaluation.results import json_schema as metrics_schema
    from cxrlearn.model.meta import json_schema as model_schema

    docs = Path(__file__).resolve().parents[1] / "docs"
    for name, schema in (("metrics.schema.json", metrics_schema()), ("model.schema.json", model_schema())):
        assert json.loads((docs / name).read_text()) == schema, \
            f"docs/{name} is out of date: python -m cxrlearn.{'evaluation.results' if 'metrics' in name else 'model.meta'} > docs/{name}"


# ---- no call on a handful of positives -----------------------------------------------------------------------


def test_a_threshold_needs_ten_validation_positives_and_negatives():
    """The attack's demo bundle chose Hernia's threshold on 1 validation positive; now fewer than 10 positives (or
    negatives) leave a finding without a threshold, with the reason; 10 are enough."""
    from cxrlearn.evaluation.operating_points import MIN_VALIDATION_CASES, choose_thresholds, wilson_interval

    rng = np.random.default_rng(0)
    n = 200
    scores = rng.random((n, 3))
    labels = np.zeros((n, 3))
    labels[:3, 0] = 1  # 3 positives
    labels[:MIN_VALIDATION_CASES, 1] = 1  # exactly enough
    labels[: n - 4, 2] = 1  # 4 negatives
    chosen = choose_thresholds(labels, scores, ["a", "b", "c"])
    assert chosen.thresholds["youden"]["a"] is None and chosen.thresholds["youden"]["c"] is None
    assert chosen.thresholds["youden"]["b"] is not None
    assert chosen.undefined == {"a": "only 3 positives in validation (a threshold needs at least 10)",
                                "c": "only 4 negatives in validation (a threshold needs at least 10)"}
    low, high = wilson_interval(8, 10)  # Wilson's interval for 8 of 10, as tables give it
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    assert wilson_interval(0, 0) is None


def test_findings_without_a_threshold_are_not_called_anywhere(evaluated, sample_images, capsys):
    """Every finding of the evaluated bundle with fewer than 10 validation positives (or negatives) has no threshold,
    and is 'not called' in predict's CSV (an empty call, not a 0), the service's answer, the model card and the
    report; the others keep theirs, with Wilson intervals on the judged images."""
    from cxrlearn.evaluation.operating_points import MIN_VALIDATION_CASES, NOT_CALLED
    from cxrlearn.model.bundle import read_meta

    run, out, metrics = evaluated
    meta = read_meta(run)
    val_positives = meta.data.positives["val"]
    val_images = meta.data.images["val"]
    few = {f for f, n in val_positives.items()
           if n < MIN_VALIDATION_CASES or val_images - n < MIN_VALIDATION_CASES}
    assert few and few != set(meta.findings)  # the sample's small validation split has both kinds
    assert {f for f, t in meta.thresholds.items() if t is None} == few
    assert set(meta.not_called) == few and all("in validation" in why for why in meta.not_called.values())

    image = sorted(sample_images.glob("*.png"))[0]
    assert main(["predict", "--model", str(run), str(image), "--no-progress"]) == 0
    row = pd.read_csv(io.StringIO(capsys.readouterr().out), keep_default_na=False).iloc[0]
    assert set(row["not_called"].split("|")) == few
    for finding in meta.findings:
        assert (row[f"{finding}_positive"] == "") == (finding in few), finding
        assert 0 <= float(row[finding]) <= 1  # the probability is always given
    assert not few & set(filter(None, row["positive_findings"].split("|")))

    card = (run / "MODEL_CARD.md").read_text()
    assert card.count(NOT_CALLED) == len(few) + 1  # one row each, and the rule stated once
    assert f"fewer than {MIN_VALIDATION_CASES} validation positives or negatives" in card
    report = (out / "report.md").read_text()
    assert report.count(NOT_CALLED) >= len(few)
    called = [f for f in meta.findings if f not in few]
    point = metrics.operating_points.test[meta.threshold_method][called[0]]
    assert point.sensitivity_ci95 is None or point.sensitivity_ci95[0] <= point.sensitivity <= point.sensitivity_ci95[1]
