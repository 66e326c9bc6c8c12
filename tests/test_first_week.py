"""A team's first week (issue 18): shareable files, interrupts, checks before work, hospital tables, ..."""

from __future__ import annotations

import copy
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cxrlearn._files import write_atomic
from cxrlearn.cli.main import main
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.sources.datasets import read_labels
from cxrlearn.findings import canonical_column

from test_training import split_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def present(nih_table, sample_images):
    return attach_images(nih_table, sample_images).table


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# 1. Files a team can share -------------------------------------------------------------------------------------

def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        os.umask(0o027)
        write_atomic(tmp_path / "b.json", b"{}")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "b.json") == 0o640
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_everything_a_run_writes_is_readable_by_a_colleague(evaluated, sample_images, tmp_path):
    """The bundle, config, metrics, split, checkpoints, evaluation and predictions get the mode of a new file
    under the umask (0644 under 022), not mkstemp's 0600."""
    run, out, _ = evaluated
    previous = os.umask(0o022)
    try:
        images = sorted(sample_images.glob("*.png"))[:3]
        assert main(["predict", "--model", str(run), *map(str, images), "--out", str(tmp_path / "p.csv"),
                     "--no-progress"]) == 0
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "p.csv") == 0o644
    expected = 0o666 & ~previous  # what the fixtures' run and evaluation were written under
    names = ["model.json", "model.safetensors", "input_check.safetensors", "config.yaml", "metrics.json",
             "split.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt"]
    for path in [run / n for n in names] + [out / "metrics.json", out / "report.html", out / "report.md"]:
        assert _mode(path) == expected, f"{path}: {oct(_mode(path))}, not {oct(expected)}"


# 2. An interrupt is not a crash ---------------------------------------------------------------------------------

def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxrlearn.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_in_the_first_epoch_exits_130_keeps_the_epoch_and_resumes(table_path, sample_images, present,
                                                                         tmp_path):
    # An epoch of 900 images at 128 px takes about 20 s on two cores: the signal, 3 s in, lands inside it.
    split = split_file(present, tmp_path / "split.csv", 900, 60)
    run = tmp_path / "run"
    args = ["train", "--csv", str(table_path), "--images", str(sample_images), "--split", str(split),
            "--backbone", "tf_efficientnet_lite0", "--image-size", "128", "--batch-size", "16", "--epochs", "1",
            "--set", "model.hub=false", "--set", "data.num_workers=2", "--set", "train.early_stopping_patience=0",
            "--set", f"data.cache={tmp_path / 'cache'}", "--out", str(run), "--no-progress"]
    process = _cli(*args)
    deadline = time.time() + 240
    while not (run / "logs").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the logs folder appears when fitting starts
    time.sleep(3)  # a few batches into the first (and only) epoch
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    line = err.strip().splitlines()[-1]
    # Numbered as the progress bar numbers epochs (the attack saw "epoch 1" said under a bar at "Epoch 0").
    assert line.startswith("cxrlearn train: interrupted (SIGTERM): kept training's progress in epoch 0 (as the "
                           "progress bar counts), after "), line
    assert "continue with: " in line and line.endswith("--resume"), line
    assert "Traceback" not in err
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "model.json").exists()

    resumed = _cli(*args, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    meta = json.loads((run / "model.json").read_text())
    assert meta["metrics"]["epochs_run"] == 1


def test_interrupt_before_training_says_to_rerun_the_same_command(table_path, sample_images, tmp_path):
    """Ctrl-C while the cache is built: exit 130, the split kept, and the same command (no --resume) continues."""
    run = tmp_path / "run"
    args = ["train", "--csv", str(table_path), "--images", str(sample_images), "--backbone", "tf_efficientnet_lite0",
            "--image-size", "64", "--set", "model.hub=false", "--set", "data.prepare_workers=1",
            "--set", f"data.cache={tmp_path / 'cache'}", "--out", str(run), "--no-progress"]
    process = _cli(*args)
    deadline = time.time() + 120
    while not (tmp_path / "cache").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("cxrlearn train: interrupted (SIGINT): kept the split and the preprocessing cache"), line
    assert "--resume" not in line and "Traceback" not in err
    assert (run / "split.csv").is_file()


# 3. Checked before any work -------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--backbone", "efficientnet_b9", "unknown backbone 'efficientnet_b9'"),
    ("--init-from", "NOT-A-RUN", "not a cxrlearn model bundle"),
    ("--table", "missing.csv", "data.table (--table) missing.csv: no such file"),
    ("--images", "no-such-folder", "data.images (--images) no-such-folder: no such folder"),
    ("--split", "no-split.csv", "data.split (--split) no-split.csv: no such file"),
])
def test_train_refuses_bad_settings_before_writing_anything(table_path, sample_images, tmp_path, capsys, option,
                                                            value, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOT-A-RUN").mkdir()
    args = {"--csv": str(table_path), "--images": str(sample_images), "--out": str(tmp_path / "run"),
            "--set": f"data.cache={tmp_path / 'cache'}"}
    args[option] = value
    argv = ["train"] + [word for pair in args.items() for word in pair]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# 4. Tables as hospitals write them ------------------------------------------------------------------------------

def test_finding_columns_match_the_harmonised_names_whatever_their_spelling():
    assert canonical_column("Infiltrate") == "Infiltration"
    assert canonical_column("pleural effusion") == "Pleural Effusion"
    assert canonical_column("PLEURAL-THICKENING") == "Pleural Thickening"
    assert canonical_column("pleural_thickening") == "Pleural Thickening"
    assert canonical_column("Pleural_Thickening") == "Pleural_Thickening"  # NIH's own name, as NIH writes it
    assert canonical_column(" cardiomegaly ") == "Cardiomegaly"
    assert canonical_column("Effusion") == "Effusion"  # NIH's; harmonised wherever tables meet
    assert canonical_column("Tuberculosis") == "Tuberculosis"  # a finding of the table's own


def _hospital_table(present, path: Path, extra: dict | None = None) -> Path:
    rows = present.sort_values("image").head(60)
    frame = pd.DataFrame({
        "file": ("h" + rows["image"]).to_numpy(), "mrn": rows["patient_id"].astype(str).to_numpy(),
        "Infiltrate": rows["Infiltration"].astype(int).to_numpy(),
        "pleural effusion": rows["Effusion"].astype(int).to_numpy(),
        "cardiomegaly": rows["Cardiomegaly"].astype(int).to_numpy(),
        **(extra or {}),
    })
    frame.to_csv(path, index=False)
    return path


def test_a_hospital_table_reads_under_harmonised_names_and_ignores_columns_not_named(present, tmp_path, capsys):
    path = _hospital_table(present, tmp_path / "labels.csv",
                           {"accession": [f"A{i}" for i in range(60)], "site": ["north"] * 60})
    columns = {"image": "file", "patient": "mrn"}
    with pytest.raises(Exception, match="'accession' line 2"):  # without --findings an accession is a finding
        read_labels(path, None, columns)
    table = read_labels(path, None, columns, ["Infiltrate", "pleural effusion", "cardiomegaly"])
    assert [c for c in table.columns if c not in ("image", "patient_id")] == \
        ["Infiltration", "Pleural Effusion", "Cardiomegaly"]
    assert table["Infiltration"].sum() == present.sort_values("image").head(60)["Infiltration"].sum()
    # --findings by the harmonised names finds the same columns
    again = read_labels(path, None, columns, ["Infiltration", "Pleural Effusion", "Cardiomegaly"])
    pd.testing.assert_frame_equal(table, again)
    capsys.readouterr()

    for command in (["stats"], ["split", "--out", str(tmp_path / "split.csv")]):
        assert main([*command, "--table", str(path), "--column", "image=file", "--column", "patient=mrn",
                     "--findings", "Infiltrate,pleural effusion,cardiomegaly"]) == 0
        err = capsys.readouterr().err
        assert err.count("accession, site ignored") == 1, err
    merged = tmp_path / "merged.csv"
    assert main(["merge", "--out", str(merged), "nih", f"hospital={path}", "--column", "image=file", "--column",
                 "patient=mrn", "--findings", "Infiltrate,pleural effusion,cardiomegaly"]) == 0
    header = pd.read_csv(merged, nrows=0).columns
    assert "Infiltrate" not in header and "Infiltration" in header and "pleural effusion" not in header


def test_two_columns_that_name_one_finding_are_refused(present, tmp_path):
    path = _hospital_table(present, tmp_path / "labels.csv", {"Infiltration": [0] * 60})
    with pytest.raises(Exception, match="columns 'Infiltrate' and 'Infiltration' both name the finding"):
        read_labels(path, None, {"image": "file", "patient": "mrn"})


# 5. prepare and train meet -------------------------------------------------------------------------------------

def test_config_reference_lists_every_key_and_is_current():
    """docs/config.md is generated from the config module: a key added without its meaning, or a changed default
    or range, fails here until the reference is regenerated."""
    from cxrlearn.training import config

    keys = set(config.flatten(config.defaults()))
    assert keys == set(config.SETTINGS)
    undescribed = [key for key, field in config.SETTINGS.items() if not field.description]
    assert undescribed == [], f"settings without a description: {undescribed}"
    written = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert written == config.reference(), \
        "docs/config.md is out of date: python -m cxrlearn.training.config > docs/config.md"
    for key in keys:
        assert f"| `{key}` |" in written


def test_train_uses_the_cache_prepare_made(table_path, sample_images, present, tmp_path, capsys):
    split = split_file(present, tmp_path / "split.csv", 48, 16)
    images = tmp_path / "images"
    images.mkdir()
    for image in pd.read_csv(split)["image"]:
        (images / image).symlink_to(sample_images / image)
    cache = tmp_path / "prepared"
    assert main(["prepare", "--csv", str(table_path), "--images", str(images), "--size", "64", "--out",
                 str(cache)]) == 0
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing == f"train on it with: cxrlearn train ... --images {images} --cache {cache} " \
                      "--set data.cache_size=64"
    pixels_written = (cache / "pixels.u8").stat().st_mtime_ns
    index = (cache / "index.tsv").read_bytes()
    assert main(["train", "--csv", str(table_path), "--images", str(images), "--split", str(split), "--cache",
                 str(cache), "--backbone", "tf_efficientnet_lite0", "--image-size", "64", "--epochs", "1",
                 "--set", "model.hub=false", "--set", "data.num_workers=0", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert not (tmp_path / "cache").exists()  # no second cache beside the run
    assert (cache / "pixels.u8").stat().st_mtime_ns == pixels_written  # nothing to add: all cached
    assert (cache / "index.tsv").read_bytes() == index
    assert json.loads((tmp_path / "run" / "model.json").read_text())["config"]["data"]["cache"] == str(cache)


# 7. Calibration that says when it fails --------------------------------------------------------------------------

def test_a_temperature_at_its_bound_is_reported_and_kept_at_one(evaluated):
    import numpy as np

    from cxrlearn.evaluation.calibration import LOG_T_BOUNDS, fit_temperature, fit_temperatures
    from cxrlearn.evaluation.report import build_blocks, render_markdown

    rng = np.random.default_rng(5)
    true_logits = rng.normal(scale=2.0, size=4000)
    labels = np.stack([rng.random(4000) < 1 / (1 + np.exp(-true_logits)),  # calibratable: 2x overconfident
                       rng.random(4000) < 0.3], axis=1).astype(np.float32)  # B: logits say nothing about it
    logits = np.stack([2 * true_logits, 8 * rng.normal(size=4000)], axis=1)
    assert fit_temperature(logits[:, 1], labels[:, 1]) == pytest.approx(np.exp(LOG_T_BOUNDS[1]), rel=1e-3)
    fit = fit_temperatures(logits, labels, ["A", "B"])
    assert fit.temperature["A"] == pytest.approx(2.0, rel=0.1)
    assert fit.temperature["B"] == 1.0 and list(fit.failed) == ["B"]
    assert "reached the bound of its range" in fit.failed["B"]

    # The report says so per finding.
    metrics = copy.deepcopy(evaluated[2])  # the session's fixture stays as it is
    findings = list(metrics.auc)
    metrics.calibration.temperature_failed = {findings[0]: fit.failed["B"]}
    text = render_markdown(build_blocks(metrics, findings))
    assert f"Temperature scaling failed for {findings[0]}: the fitted temperature reached the bound" in text


# 6. Heatmaps a reader can use ----------------------------------------------------------------------------------

def test_cam_overlays_are_at_the_images_own_resolution_with_a_caption(evaluated, data_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from cxrlearn.data.decoding.images import load_grayscale
    from cxrlearn.inference.gradcam import heatmaps, overlay
    from cxrlearn.inference.predictor import Predictor

    run, _, _ = evaluated
    image = sorted((data_dir / "nih-sample" / "images-1024").glob("*.png"))[0]
    out = tmp_path / "cam"
    assert main(["predict", "--model", str(run), str(image), "--out", str(tmp_path / "p.csv"), "--cam", str(out),
                 "--cam-findings", "Effusion", "--no-progress"]) == 0
    picture = np.asarray(Image.open(out / f"{image.stem}_Effusion.png"))
    decoded = load_grayscale(image)
    assert decoded.shape == (1024, 1024)
    assert picture.shape[1] == 1024 and picture.shape[0] > 1024  # the image's own size, and a caption below it
    heat = heatmaps(Predictor(run), decoded, ["Effusion"])["Effusion"]
    assert np.abs(picture[:1024].astype(int) - overlay(decoded, heat).astype(int)).max() <= 1
    caption = picture[1024:]
    assert (caption > 128).any(axis=2).mean() > 0.02  # text and the colour scale are drawn
    assert caption[..., 0].max() > 200 and caption[..., 2].max() > 200  # the scale runs from blue to red


# 10. Answers that can be traced ---------------------------------------------------------------------------------

def test_predictions_name_the_bundle_and_cxrlearn(evaluated, sample_images, tmp_path):
    from cxrlearn import __version__
    from cxrlearn.model.bundle import bundle_digest

    run, _, _ = evaluated
    images = [str(p) for p in sorted(sample_images.glob("*.png"))[:4]]
    assert main(["predict", "--model", str(run), *images, "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    assert main(["predict", "--model", str(run), *images, "--out", str(tmp_path / "p.json"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    digest = bundle_digest(run)
    assert list(table.columns[-4:]) == ["model_sha256", "runtime", "runtime_sha256", "cxrlearn_version"]
    assert (table["runtime"] == "torch").all()
    assert (table["model_sha256"] == digest).all() and (table["cxrlearn_version"].astype(str) == __version__).all()
    rows = json.loads((tmp_path / "p.json").read_text())
    assert {(r["model_sha256"], r["cxrlearn_version"]) for r in rows} == {(digest, __version__)}
    # Another threshold is another model's answer: the digest follows model.json too.
    copy_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(run, copy_dir, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    meta = json.loads((copy_dir / "model.json").read_text())
    first = next(iter(meta["thresholds"]))
    meta["thresholds"][first] = 0.5
    (copy_dir / "model.json").write_text(json.dumps(meta))
    assert bundle_digest(copy_dir) != digest


# 8. A model card with every bundle -----------------------------------------------------------------------------

def test_the_model_card_is_written_from_the_bundle_and_printed_by_card(evaluated, capsys):
    from cxrlearn.model.bundle import bundle_digest

    run, out, metrics = evaluated
    card = (run / "MODEL_CARD.md").read_text(encoding="utf-8")  # rewritten by the evaluation
    meta = json.loads((run / "model.json").read_text())
    assert card.startswith(f"# Model card: {meta['backbone']}, 14 chest X-ray findings")
    for heading in ("Intended use", "What it is not for", "Training data", "Performance", "Operating points",
                    "The input check", "Known limitations", "Versions and digests"):
        assert f"## {heading}" in card
    assert "not a medical device" in card and bundle_digest(run) in card and meta["split"]["sha256"] in card
    assert f"{metrics.n_images:,} images of {metrics.n_patients:,} patients" in card
    first = next(f for f in metrics.auc if metrics.auc[f] is not None)
    low, high = metrics.auc_ci95[first]
    assert f"| {first} | {metrics.positives[first]:,} | {metrics.auc[first]:.3f} | {low:.3f}–{high:.3f} |" in card
    assert f"| {first} | {meta['thresholds'][first]:.3f} |" in card
    assert "| sex |" in card  # subgroups
    for split, count in meta["data"]["images"].items():
        assert f"{split} {count:,}" in card
    assert main(["card", str(run)]) == 0
    assert capsys.readouterr().out == card


# 9. Experiment tracking where teams keep it ---------------------------------------------------------------------

def test_train_logs_to_an_mlflow_file_store(table_path, sample_images, present, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from cxrlearn._files import file_digest

    monkeypatch.chdir(tmp_path)
    split = split_file(present, tmp_path / "split.csv", 48, 16)
    run = tmp_path / "run"
    assert main(["train", "--csv", str(table_path), "--images", str(sample_images), "--split", str(split),
                 "--backbone", "tf_efficientnet_lite0", "--image-size", "64", "--epochs", "2", "--set",
                 "model.hub=false", "--set", "data.num_workers=0", "--set", "train.early_stopping_patience=0",
                 "--set", f"data.cache={tmp_path / 'cache'}", "--out", str(run), "--no-progress",
                 "--mlflow", "file:./mlruns"]) == 0
    ids = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri="file:./mlruns")
    logged = client.get_run(ids["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["model.backbone"] == "tf_efficientnet_lite0"
    assert logged.data.params["data.image_size"] == "64"
    assert logged.data.params["split_sha256"] == file_digest(run / "split.csv")
    from cxrlearn import __version__
    from cxrlearn.model.bundle import bundle_digest

    tags = logged.data.tags  # what the run is: cxrlearn's version (and commit in a checkout), its split, its model
    assert tags["cxrlearn_version"] == __version__ and tags["model_sha256"] == bundle_digest(run)
    assert tags["split_sha256"] == file_digest(run / "split.csv")
    history = client.get_metric_history(ids["run_id"], "val/mean_auc")
    assert len(history) == 2  # one a epoch
    artifacts = {a.path for a in client.list_artifacts(ids["run_id"], "bundle")}
    assert {"bundle/model.json", "bundle/model.safetensors", "bundle/MODEL_CARD.md", "bundle/config.yaml"} <= artifacts
    assert mlflow.__name__ == "mlflow"

    # evaluate --mlflow logs into the same run: its AUCs as metrics named after its folder, and its report.
    trained_on = set(pd.read_csv(split)["patient_id"])
    external = tmp_path / "external"
    external.mkdir()
    for image in present.loc[~present["patient_id"].isin(trained_on), "image"].head(120):
        (external / image).symlink_to(sample_images / image)
    assert main(["evaluate", "--model", str(run), "--csv", str(table_path), "--images", str(external), "--out",
                 str(tmp_path / "external-eval"), "--resamples", "100", "--no-progress", "--mlflow", "file:./mlruns"]) == 0
    measured = json.loads((tmp_path / "external-eval" / "metrics.json").read_text())
    logged = client.get_run(ids["run_id"])
    assert logged.data.metrics["eval/external-eval/mean_auc"] == pytest.approx(measured["mean_auc"])
    assert {f"eval/external-eval/auc/{name}" for name, auc in measured["auc"].items() if auc is not None} <= set(
        logged.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(ids["run_id"], "evaluation/external-eval")}
    assert "evaluation/external-eval/report.html" in artifacts and "evaluation/external-eval/metrics.json" in artifacts


def test_mlflow_missing_is_a_one_line_error(table_path, sample_images, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["train", "--csv", str(table_path), "--images", str(sample_images), "--out", str(tmp_path / "run"),
                 "--mlflow", "file:./mlruns"]) == 2
    assert "MLflow is not installed; install the extra: pip install 'cxrlearn[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# 11. Smaller things ----------------------------------------------------------------------------------------------

def test_download_without_a_name_server_fails_at_once_naming_the_host(tmp_path, capsys, monkeypatch):
    import socket

    def no_name_server(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_name_server)  # as on a machine without a network
    archives = tmp_path / "archives.tsv"
    archives.write_text("archive\turl\tmd5\nimages_001.tar.gz\thttps://nihcc.example.org/images_001.tar.gz\t"
                        + "0" * 32 + "\n")
    started = time.monotonic()
    assert main(["download", "nih", "--to", str(tmp_path / "nih"), "--archives", str(archives), "--parts", "1"]) == 2
    assert time.monotonic() - started < 5  # not 64 s of retries
    err = capsys.readouterr().err
    assert "cannot resolve the host nihcc.example.org (Temporary failure in name resolution)" in err


def test_stats_names_findings_in_full_and_counts_the_split_in_all(table_path, sample_images, tmp_path, capsys):
    split = tmp_path / "split.csv"
    assert main(["split", "--csv", str(table_path), "--images", str(sample_images), "--out", str(split)]) == 0
    capsys.readouterr()
    assert main(["stats", "--csv", str(table_path), "--split", str(split), "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    assert "13. Pleural_Thickening" in printed and "14. Hernia" in printed
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["all"]["images"] == len(pd.read_csv(split)) == sum(stats[s]["images"] for s in ("train", "val", "test"))


def test_merge_names_both_sources_of_a_repeated_image(present, tmp_path, capsys):
    path = _hospital_table(present, tmp_path / "labels.csv")
    other = pd.read_csv(path).head(5)
    other.to_csv(tmp_path / "other.csv", index=False)
    assert main(["merge", "--out", str(tmp_path / "m.csv"), f"a={path}", f"b={tmp_path / 'other.csv'}",
                 "--column", "image=file", "--column", "patient=mrn"]) == 2
    assert f"image 'h{present.sort_values('image')['image'].iloc[0]}' is listed in both a and b" \
        in capsys.readouterr().err


def test_a_training_set_one_over_a_whole_batch_trains(table_path, sample_images, present, tmp_path):
    """17 training images at batch 8 left a last batch of one, which the head's BatchNorm cannot take: the first
    epoch crashed (found when an interrupted first epoch was resumed from its start)."""
    from cxrlearn.training.config import load_config
    from cxrlearn.workflows.train import train

    rows = []
    for patient, group in present.groupby("patient_id", sort=True):
        if len(group) == 1:
            rows.append((group["image"].iloc[0], patient, "train" if len(rows) < 17 else "val"))
        if len(rows) == 25:
            break
    split = tmp_path / "split.csv"
    pd.DataFrame(rows, columns=["image", "patient_id", "split"]).to_csv(split, index=False)
    config = load_config(overrides={
        "data": {"images": str(sample_images), "csv": str(table_path), "split": str(split), "image_size": 64,
                 "batch_size": 8, "num_workers": 0, "cache": str(tmp_path / "cache")},
        "model": {"backbone": "tf_efficientnet_lite0", "hub": False, "head": {"units": 16}},
        "train": {"epochs": 1, "early_stopping_patience": 0}})
    run = train(config, tmp_path / "run", progress=False)
    assert json.loads((run / "model.json").read_text())["data"]["images"]["train"] == 17


def test_evaluate_and_reproduce_interrupted_exit_130_naming_what_was_kept(evaluated, sample_images, tmp_path,
                                                                         capsys, monkeypatch):
    import cxrlearn.workflows.evaluate as evaluate_module
    import cxrlearn.workflows.reproduce as reproduce_module
    from cxrlearn.errors import Interrupted

    def stopped(*args, **kwargs):
        raise Interrupted("SIGTERM")

    run, _, _ = evaluated
    monkeypatch.setattr(evaluate_module, "prepare_cache", stopped)
    before = (run / "model.json").read_bytes()
    assert main(["evaluate", "--model", str(run), "--images", str(sample_images), "--subset", "test",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("cxrlearn evaluate: interrupted (SIGTERM): kept the images decoded into the preprocessing")
    assert line.endswith(f"continue with: cxrlearn evaluate --model {run} --images {sample_images} --subset test "
                         f"--out {tmp_path / 'eval'} --no-progress")
    assert (run / "model.json").read_bytes() == before and not (tmp_path / "eval").exists()

    monkeypatch.setattr(reproduce_module, "attach_images", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["reproduce", "kufel2023", "--images", str(sample_images), "--out", str(tmp_path / "R"),
                 "--set", "model.backbone=tf_efficientnet_lite0", "--set", "model.hub=false"]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("cxrlearn reproduce: interrupted (SIGINT): kept the finished stages")
    assert "continue with: cxrlearn" in line and "--resume" not in line


def test_evaluate_help_says_what_it_judges(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "every image of --images that the label table labels" in text and "--subset" in text
