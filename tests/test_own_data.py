"""Your own data: a table in the generic format (its own column names, six findings, blank and uncertain labels)
over the real sample images, fine-tuned from a cxrlearn run; predict and evaluate speak its findings; unknown
labels take no part in the loss, its gradients or the metrics; a model is judged on another table's shared
findings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrlearn.cli.main import main
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.evaluation.metrics import finding_metrics
from cxrlearn.evaluation.results import EvaluationMetrics
from cxrlearn.model.bundle import read_meta
from cxrlearn.training.config import load_config
from cxrlearn.training.losses import MultiLabelLoss
from cxrlearn.workflows.evaluate import EvaluationOptions, evaluate
from cxrlearn.workflows.train import train

#: The table's six findings: NIH's column (or columns, any positive) each is made from.
SIX = {"Pleural Effusion": ["Effusion"], "Cardiomegaly": ["Cardiomegaly"], "Atelectasis": ["Atelectasis"],
       "Pneumothorax": ["Pneumothorax"], "Infiltrate": ["Infiltration"], "Nodule or Mass": ["Nodule", "Mass"]}
#: The names cxrlearn reads them under: the table's "Infiltrate" is the harmonised Infiltration.
READ = {column: "Infiltration" if column == "Infiltrate" else column for column in SIX}


@pytest.fixture(scope="module")
def own_table(nih_table, sample_images, tmp_path_factory):
    """The sample images' labels written as a hospital might: columns file, mrn, sex, years, six findings;
    10% of labels blank (not labelled) and 5% uncertain (-1)."""
    present = attach_images(nih_table, sample_images).table
    rng = np.random.default_rng(11)
    out = pd.DataFrame({"file": present["image"], "mrn": "H" + present["patient_id"].astype(str),
                        "sex": present["sex"].map({"M": "male", "F": "female"}), "years": present["age"]})
    for name, columns in SIX.items():
        values = present[columns].max(axis=1).astype(int).astype(str).to_numpy(dtype=object)
        draw = rng.random(len(values))
        values[draw < 0.10] = ""
        values[(draw >= 0.10) & (draw < 0.15)] = "-1"
        out[name] = values
    path = tmp_path_factory.mktemp("own") / "labels.csv"
    out.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def fine_tuned(own_table, trained_run, sample_images, tmp_path_factory):
    """A run on the table, started from the NIH-trained run (same backbone and head width)."""
    source, _ = trained_run
    root = tmp_path_factory.mktemp("fine-tuned")
    config = load_config(overrides={
        "data": {"images": str(sample_images), "table": str(own_table), "columns": {"image": "file", "patient": "mrn",
                 "sex": "sex", "age": "years"}, "image_size": 64, "batch_size": 32, "num_workers": 0,
                 "cache": str(root / "cache")},
        "model": {"backbone": "tf_efficientnet_lite0", "hub": False, "head": {"units": 64, "dropout": 0.1},
                  "init_from": str(source)},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 1, "early_stopping_patience": 0, "seed": 5},
    })
    return train(config, root / "run", progress=False), source


def test_the_run_learns_the_tables_findings_from_the_source_run(fine_tuned):
    run, source = fine_tuned
    meta = read_meta(run)
    assert list(meta.findings) == list(READ.values())
    detail = meta.weights_source.detail
    kept, new = detail.split("new for")
    assert "Pleural Effusion" in kept and "Infiltration" in kept and new.strip() == "Nodule or Mass"
    assert meta.config["data"]["table"].endswith("labels.csv") and meta.input_check is not None


def test_predict_writes_the_six_findings(fine_tuned, sample_images, tmp_path):
    run, _ = fine_tuned
    out = tmp_path / "p.csv"
    images = sorted(sample_images.iterdir())[:3]
    assert main(["predict", "--model", str(run), *map(str, images), "--out", str(out), "--no-progress"]) == 0
    rows = pd.read_csv(out)
    assert [c for c in rows.columns if c in READ.values()] == list(READ.values()) and "Effusion" not in rows.columns
    assert rows[list(READ.values())].apply(lambda c: c.between(0, 1)).all().all()


def test_evaluate_reports_the_six_with_known_label_counts(fine_tuned, own_table, sample_images, tmp_path):
    run, _ = fine_tuned
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--images", str(sample_images), "--subset", "test",
                 "--out", str(out), "--resamples", "200", "--no-progress"]) == 0
    metrics = EvaluationMetrics.read(out / "metrics.json")
    assert list(metrics.auc) == list(READ.values())
    labels = pd.read_csv(own_table).set_index("file")
    split = pd.read_csv(run / "split.csv")
    judged = labels.loc[split.loc[split["split"] == "test", "image"]]
    for column, name in READ.items():
        known = pd.to_numeric(judged[column], errors="coerce").isin([0, 1])  # blank and uncertain (ignored) unknown
        assert metrics.known[name] == int(known.sum()) < metrics.n_images
        assert metrics.positives[name] == int((pd.to_numeric(judged[column], errors="coerce") == 1).sum())
    report = (out / "report.md").read_text()
    assert "| known labels |" in report and "Nodule or Mass" in report
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["label_Infiltration"].isna().sum() > 0  # unknown stays blank, never 0


def test_unknown_labels_move_neither_the_loss_nor_its_gradients():
    torch.manual_seed(0)
    logits = torch.randn(8, 6, requires_grad=True)
    targets = torch.randint(0, 2, (8, 6)).float()
    masked = targets.clone()
    masked[torch.rand(8, 6) < 0.3] = float("nan")
    known = ~torch.isnan(masked)
    for name in ("bce", "focal", "asymmetric"):
        loss = MultiLabelLoss(name)
        value = loss(logits, masked)
        (gradient,) = torch.autograd.grad(value, logits)
        assert torch.all(gradient[~known] == 0), name
        # The same as the loss over the known labels alone...
        reference = MultiLabelLoss(name)(logits[known][None], targets[known][None])
        assert torch.allclose(value, reference), name
        # ...and whatever the unknown labels or the logits at them, the same loss and gradients.
        shaken = logits.detach().clone()
        shaken[~known] += 5.0
        shaken.requires_grad_(True)
        again = loss(shaken, masked)
        (gradient_again,) = torch.autograd.grad(again, shaken)
        assert torch.allclose(again, value) and torch.allclose(gradient_again[known], gradient[known]), name


def test_metrics_judge_each_finding_on_its_known_labels():
    rng = np.random.default_rng(4)
    labels = (rng.random((300, 2)) < 0.3).astype(float)
    scores = rng.random((300, 2)) + labels * 0.5
    masked = labels.copy()
    masked[rng.random(300) < 0.4, 1] = np.nan
    full, _ = finding_metrics(labels, scores, np.arange(300), ["a", "b"], n_resamples=200)
    part, _ = finding_metrics(masked, scores, np.arange(300), ["a", "b"], n_resamples=200)
    known = ~np.isnan(masked[:, 1])
    alone, _ = finding_metrics(labels[known], scores[known], np.arange(300)[known], ["a", "b"], n_resamples=200)
    assert part.auc["a"] == full.auc["a"] and part.known == {"a": 300, "b": int(known.sum())}
    assert part.auc["b"] == pytest.approx(alone.auc["b"], abs=1e-12)
    assert part.auc_pr["b"] == pytest.approx(alone.auc_pr["b"], abs=1e-12)
    assert part.prevalence["b"] == pytest.approx(labels[known, 1].mean())


def test_a_model_is_judged_on_another_tables_shared_findings(trained_run, own_table, sample_images, tmp_path):
    run, split = trained_run
    table = pd.read_csv(own_table, dtype=str, keep_default_na=False)
    table["mrn"] = table["mrn"].str.removeprefix("H")  # the same patients as the run's split: its leak check holds
    table["dataset"] = np.where(table["mrn"].astype(int) % 3 == 0, "site-b", "site-a")  # as a merged table has
    external = tmp_path / "external.csv"
    table.to_csv(external, index=False)
    options = EvaluationOptions(split=str(split), subset="test", table=str(external),
                                columns={"image": "file", "patient": "mrn", "sex": "sex", "age": "years"}, resamples=200,
                                progress=False,
                                write_bundle=False)
    metrics = evaluate(run, None, sample_images, tmp_path / "external", options)
    # NIH's Effusion is the table's Pleural Effusion, its Infiltration the table's Infiltrate; Cardiomegaly,
    # Atelectasis and Pneumothorax by name.
    assert list(metrics.auc) == ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Pneumothorax"]
    assert metrics.skipped["Mass"] == "the table has no labels for it"
    assert metrics.skipped["Nodule or Mass"] == "the model does not predict it" and "Infiltrate" not in metrics.skipped
    assert "Not judged: " in (tmp_path / "external" / "report.md").read_text()
    assert json.loads((tmp_path / "external" / "metrics.json").read_text())["skipped"]["Hernia"]
    # A merged table's evaluation is also given dataset by dataset, each on its own images.
    by_dataset = {g.group: g for g in metrics.subgroups if g.attribute == "dataset"}
    assert set(by_dataset) == {"site-a", "site-b"}
    assert sum(g.n_images for g in by_dataset.values()) == metrics.n_images
    judged = pd.read_csv(tmp_path / "external" / "predictions.csv", dtype={"image": str}).query("split == 'test'")
    judged = judged.merge(table[["file", "dataset"]], left_on="image", right_on="file")
    site = judged[judged["dataset"] == "site-b"]
    assert by_dataset["site-b"].n_images == len(site)
    for name in by_dataset["site-b"].mean_over:
        known = site[f"label_{name}"].notna()
        assert by_dataset["site-b"].auc[name] == pytest.approx(
            roc_auc_score(site.loc[known, f"label_{name}"], site.loc[known, name]), abs=1e-9)
    assert "site-b" in (tmp_path / "external" / "report.md").read_text()
