"""Comparing models on the same real images (`cxrlearn compare`), the linear probe, and runs of several seeds."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxrlearn.cli.main import main
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.evaluation.comparison import FOREST_COLUMNS, plot_forest
from cxrlearn.evaluation.paired import delong
from cxrlearn.model.bundle import load_bundle, read_meta
from cxrlearn.training.config import load_config
from cxrlearn.workflows.compare import compare
from cxrlearn.workflows.evaluate import EvaluationOptions
from cxrlearn.workflows.probe import PROBE_FILE, linear_probe
from cxrlearn.workflows.train import SEEDS_FILE, train

RESAMPLES = 200


def _small_config(trained_run, sample_images, table_path, **train_options):
    """The trained run's data, split, cache and backbone (64 px), for a second model to compare with it."""
    run, split = trained_run
    return load_config(overrides={
        "data": {"images": str(sample_images), "csv": str(table_path), "split": str(split), "image_size": 64,
                 "batch_size": 32, "num_workers": 0, "cache": str(Path(run).parent / "cache")},
        "model": {"backbone": "tf_efficientnet_lite0", "hub": False, "head": {"units": 64, "dropout": 0.1}},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"early_stopping_patience": 0, **train_options},
    })


@pytest.fixture(scope="module")
def probe_run(trained_run, sample_images, table_path, tmp_path_factory):
    return linear_probe(_small_config(trained_run, sample_images, table_path),
                        tmp_path_factory.mktemp("probe") / "probe", progress=False)


@pytest.fixture(scope="module")
def seeds_run(trained_run, sample_images, table_path, tmp_path_factory):
    config = _small_config(trained_run, sample_images, table_path, epochs=1, seed=11, seeds=2,
                           limit_train_batches=4)
    return train(config, tmp_path_factory.mktemp("seeds") / "seeds", progress=False)


@pytest.fixture(scope="module")
def compared(trained_run, probe_run, table_path, sample_images, tmp_path_factory):
    run, _ = trained_run
    out = tmp_path_factory.mktemp("compare")
    before = {p: (Path(p) / "model.json").read_bytes() for p in (run, probe_run)}
    comparison = compare([run, probe_run], table_path, sample_images, out,
                         EvaluationOptions(subset="test", resamples=RESAMPLES, progress=False))
    return comparison, out, before


def test_the_linear_probe_is_a_bundle_holding_its_regression(probe_run, trained_run):
    """The bundle's head is the regression: its validation mean AUC through the network equals the fit's own, and
    the head is one affine map (the BatchNorm and the last layer are the identity)."""
    probe = json.loads((Path(probe_run) / PROBE_FILE).read_text())
    by_strength = probe["val_mean_auc_by_C"]
    assert by_strength[f"{probe['chosen_C']:g}"] == max(by_strength.values())
    meta = read_meta(probe_run)
    assert (meta.head.units, meta.head.activation) == (len(meta.findings), "linear")
    assert meta.metrics.val.mean_auc == pytest.approx(by_strength[f"{probe['chosen_C']:g}"], abs=1e-4)
    assert "logistic regression" in meta.weights_source.detail
    assert (Path(probe_run) / "input_check.safetensors").is_file()

    model, _ = load_bundle(probe_run)
    features = torch.randn(5, model.backbone.num_features)
    assert torch.allclose(model.head(features), model.head[0](features), atol=1e-5)


def test_the_probe_beats_chance_on_real_images_of_other_patients(probe_run):
    assert read_meta(probe_run).metrics.test.mean_auc > 0.55


def test_the_forest_plot_wraps_many_pairs_into_rows(compared, tmp_path):
    comparison, out, _ = compared
    one_width, one_height = Image.open(out / "forest.png").size  # one pair: one panel
    many = comparison.model_copy(update={"pairs": comparison.pairs * 10})  # five models make ten pairs
    plot_forest(tmp_path / "forest.png", many)
    width, height = Image.open(tmp_path / "forest.png").size
    rows = -(-10 // FOREST_COLUMNS)
    assert width < (FOREST_COLUMNS + 0.5) * one_width and height > (rows - 0.5) * one_height


def test_compare_pairs_two_runs_on_the_same_test_images(compared, trained_run, probe_run):
    comparison, out, before = compared
    run, _ = trained_run
    for name in ("compare.json", "compare.md", "compare.html", "forest.png"):
        assert (out / name).is_file(), name
    assert (out / "forest.png").stat().st_size > 10_000
    assert "Holm" in (out / "compare.html").read_text()
    # No bundle is changed by a comparison.
    assert all((Path(p) / "model.json").read_bytes() == data for p, data in before.items())
    # Both runs share a split: every test image is compared, and each model's AUCs and intervals are evaluate's own
    # (the same patients, seed and resamples).
    a, b = comparison.models
    assert comparison.left_out == {a.name: 0, b.name: 0}
    for model in (a, b):
        metrics = json.loads((out / "models" / model.name / "metrics.json").read_text())
        assert metrics["n_images"] == comparison.n_images
        assert model.mean_auc == pytest.approx(metrics["mean_auc"], abs=1e-12)
        assert model.mean_auc_ci95 == pytest.approx(metrics["mean_auc_ci95"], abs=1e-12)
        for finding in comparison.findings:
            assert model.auc_ci95[finding] == metrics["auc_ci95"][finding]
    [pair] = comparison.pairs
    assert pair.mean_auc_difference == pytest.approx(b.mean_auc - a.mean_auc, abs=1e-12)
    low, high = pair.mean_auc_difference_ci95
    assert low < high
    tested = [r for r in pair.findings if r.delong_p is not None]
    assert len(tested) >= 10
    for row in tested:
        assert row.difference == pytest.approx(row.auc_b - row.auc_a, abs=1e-9)
        assert row.holm_p >= row.delong_p
        assert row.bootstrap_ci95[0] <= row.bootstrap_ci95[1]
    # The judged images' predictions give the same test statistic when recomputed from the CSVs.
    frames = [pd.read_csv(out / "models" / m.name / "predictions.csv").query("split == 'test'").set_index("image")
              for m in (a, b)]
    finding = tested[0].finding
    images = frames[0].index
    labels = frames[0][f"label_{finding}"].to_numpy(dtype=float)
    again = delong(labels, frames[0].loc[images, finding].to_numpy(), frames[1].loc[images, finding].to_numpy())
    assert again.p_value == pytest.approx(tested[0].delong_p, rel=1e-9)
    assert a.auc[finding] == pytest.approx(roc_auc_score(labels, frames[0].loc[images, finding]), abs=1e-12)


def test_compare_refuses_images_of_patients_a_model_trained_on(trained_run, probe_run, table_path, sample_images,
                                                              tmp_path):
    run, _ = trained_run
    with pytest.raises(DataError, match="trained or validated on"):
        compare([probe_run, run], table_path, sample_images, tmp_path / "out",
                EvaluationOptions(resamples=RESAMPLES, progress=False))
    assert not (tmp_path / "out" / "compare.json").exists()


def test_compare_needs_two_models_and_names_a_folder_that_is_neither(trained_run, table_path, sample_images, tmp_path):
    run, _ = trained_run
    with pytest.raises(ConfigError, match="at least two"):
        compare([run], table_path, sample_images, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a model bundle"):
        compare([run, tmp_path / "empty"], table_path, sample_images, tmp_path / "out")


def test_seeds_train_runs_that_differ_only_in_seed_on_one_split(seeds_run):
    summary = json.loads((Path(seeds_run) / SEEDS_FILE).read_text())
    assert [r["seed"] for r in summary["runs"]] == [11, 12]
    assert [r["folder"] for r in summary["runs"]] == ["seed-0", "seed-1"]
    splits = [(Path(seeds_run) / f"seed-{k}" / "split.csv").read_bytes() for k in range(2)]
    assert splits[0] == splits[1]
    metas = [read_meta(Path(seeds_run) / f"seed-{k}") for k in range(2)]
    assert [m.config["train"]["seed"] for m in metas] == [11, 12]
    means = [m.metrics.val.mean_auc for m in metas]
    assert summary["val"]["mean_auc"] == pytest.approx(np.mean(means), abs=1e-12)
    assert summary["val"]["mean_auc_sd"] == pytest.approx(np.std(means, ddof=1), abs=1e-12)
    assert means[0] != means[1]  # different seeds, different models


def test_compare_takes_a_seeds_folder_as_the_mean_of_its_members(seeds_run, trained_run, table_path, sample_images,
                                                                tmp_path):
    run, _ = trained_run
    assert main(["compare", str(run), str(seeds_run), "--csv", str(table_path), "--images", str(sample_images),
                 "--subset", "test", "--resamples", str(RESAMPLES), "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    single, seeds = result["models"]
    assert len(seeds["members"]) == 2 and len(seeds["members_mean_auc"]) == 2
    assert "members_mean_auc" not in single
    members = [pd.read_csv(tmp_path / "models" / seeds["name"] / f"seed-{k}" / "predictions.csv")
               .query("split == 'test'").set_index("image") for k in range(2)]
    images = members[0].index
    for finding in result["mean_over"][:3]:
        mean = (members[0].loc[images, finding] + members[1].loc[images, finding]) / 2
        labels = members[0].loc[images, f"label_{finding}"].to_numpy(dtype=float)
        assert seeds["auc"][finding] == pytest.approx(roc_auc_score(labels, mean), abs=1e-9)
        own = [roc_auc_score(labels, m.loc[images, finding]) for m in members]
        assert seeds["members_auc_sd"][finding] == pytest.approx(np.std(own, ddof=1), abs=1e-9)


@pytest.fixture(scope="module")
def ensemble_run(trained_run, probe_run, tmp_path_factory):
    run, _ = trained_run
    out = tmp_path_factory.mktemp("ensemble") / "ens"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["ensemble", str(run), str(probe_run), "--out", str(out), "--no-progress"]) == 0
    (out.parent / "printed.txt").write_text(printed.getvalue())
    return out


def test_an_ensemble_bundle_averages_its_members_probabilities(ensemble_run, trained_run, probe_run, sample_images):
    from cxrlearn.inference.predictor import Predictor

    run, _ = trained_run
    meta = read_meta(ensemble_run)
    assert [m.folder for m in meta.members] == [str(run), str(probe_run)]
    assert meta.thresholds and meta.evaluation is not None  # chosen on the members' val images
    # Its members' own AUCs printed beside its own, and its card names them with their weights' digests.
    printed = (ensemble_run.parent / "printed.txt").read_text()
    line = next(line for line in printed.splitlines() if line.startswith("val mean AUC: ensemble "))
    assert f"{run.name} 0." in line and f"{probe_run.name} 0." in line
    card = (ensemble_run / "MODEL_CARD.md").read_text()
    assert "## Members" in card and all(m.weights_sha256 in card and m.folder in card for m in meta.members)
    assert (ensemble_run / "evaluation" / "report.html").is_file()
    assert (ensemble_run / "input_check.safetensors").is_file()
    images = sorted(Path(sample_images).glob("*.png"))[:6]
    ensemble = Predictor(ensemble_run).predict_files(images, progress=False)[0]
    members = []
    for folder in (run, probe_run):  # the members' networks: their own flip averaging and temperatures are not carried
        member = Predictor(folder)
        member.tta, member.temperature = False, None
        members.append(member.predict_files(images, progress=False)[0])
    assert not meta.tta and meta.temperature is None
    for finding in meta.findings:
        mean = [(a.probabilities[finding] + b.probabilities[finding]) / 2 for a, b in zip(*members)]
        assert np.allclose([p.probabilities[finding] for p in ensemble], mean, atol=1e-5), finding


def test_an_ensemble_exports_to_one_onnx_graph_and_draws_heatmaps(ensemble_run, sample_images, tmp_path):
    from cxrlearn.inference.predictor import Predictor

    assert main(["export", "--model", str(ensemble_run)]) == 0
    images = sorted(Path(sample_images).glob("*.png"))[:4]
    torch_p = Predictor(ensemble_run).predict_files(images, progress=False)[0]
    onnx_p = Predictor(ensemble_run, runtime="onnx").predict_files(images, progress=False)[0]
    for finding in read_meta(ensemble_run).findings:
        assert np.allclose([p.probabilities[finding] for p in torch_p], [p.probabilities[finding] for p in onnx_p],
                           atol=1e-4), finding
    assert main(["predict", str(images[0]), "--model", str(ensemble_run), "--cam", str(tmp_path / "cam"),
                 "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    assert list((tmp_path / "cam").glob("*.png"))


def test_an_ensemble_refuses_members_of_other_splits(trained_run, probe_run, tmp_path):
    import shutil

    run, _ = trained_run
    other = tmp_path / "other"
    shutil.copytree(probe_run, other)
    meta = json.loads((other / "model.json").read_text())
    meta["split"]["sha256"] = "0" * 64
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="split file"):
        from cxrlearn.workflows.ensemble import make_ensemble
        make_ensemble([run, other], tmp_path / "ens", progress=False)
    assert not (tmp_path / "ens" / "model.json").exists()


def test_no_claim_on_a_handful_of_positives(tmp_path):
    """compare's headline said "probe better after Holm's correction: Hernia", a finding with 3 test positives, and
    the forest plot painted it red. A finding with fewer than 10 positives (or negatives) is now marked † in every
    output and left out of the claims and the colouring, however small its p-value; one with enough is claimed."""
    from cxrlearn.evaluation.comparison import Scored, build_blocks, compare_scores
    from cxrlearn.evaluation.report import render_markdown

    rng = np.random.default_rng(3)
    n = 400
    labels = np.zeros((n, 2))
    labels[:60, 0] = 1  # enough positives
    labels[:4, 1] = 1  # a handful
    noise = rng.normal(0, 1, (n, 2))
    a = 1 / (1 + np.exp(-(noise + 0.3 * labels)))  # A barely separates either finding
    b = 1 / (1 + np.exp(-(noise + 4.0 * labels)))  # B separates both almost perfectly
    patients = np.array([f"p{i}" for i in range(n)])
    comparison = compare_scores(labels, patients, ["Effusion", "Hernia"], [
        Scored("base", "a", ["a"], [a]), Scored("probe", "b", ["b"], [b])], resamples=200, seed=0, judged="test")
    pair = comparison.pairs[0]
    hernia = next(r for r in pair.findings if r.finding == "Hernia")
    assert hernia.few_cases and hernia.positives == 4 and hernia.holm_p < 0.05  # "significant", and yet no claim
    assert pair.better_after_holm == ["Effusion"] and pair.few_cases == ["Hernia"]
    text = render_markdown(build_blocks(comparison))
    assert "| Hernia † |" in text and "Hernia" not in text.split("**Per finding, after Holm's correction**")[1] \
        .split(".")[0]
    plot_forest(tmp_path / "forest.png", comparison)
    assert (tmp_path / "forest.png").stat().st_size > 0


def test_the_linear_probe_says_when_its_chosen_strength_is_at_the_edge_of_its_grid(caplog):
    """A strength chosen at the edge of the grid may not be the best one: the probe says so, with rounded AUCs."""
    import logging

    from cxrlearn.workflows.probe import fit_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = (x[:, :2] + 0.1 * rng.normal(size=(300, 2)) > 0).astype(float)  # nearly separable: the weakest C wins
    with caplog.at_level(logging.INFO, logger="cxrlearn.workflows.probe"):
        fit = fit_probe(x[:200], y[:200], x[200:], y[200:], ["a", "b"], strengths=(0.0001, 0.01, 1.0))
    assert fit.strength == 1.0
    assert "the chosen C=1 is the weakest regularisation tried" in caplog.text
    assert all(len(line.split("validation mean AUC ")[1]) == 6 for line in caplog.text.splitlines()
               if "validation mean AUC" in line)  # 0.xxxx, not 0.9876543210987
