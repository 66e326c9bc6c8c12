"""A team's first week (issue 18): shareable files, interrupts, checks before work, hospital tables, ..."""

from __future__ import annotations

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
    split = split_file(present, tmp_path / "split.csv", 400, 60)
    run = tmp_path / "run"
    args = ["train", "--csv", str(table_path), "--images", str(sample_images), "--split", str(split),
            "--backbone", "tf_efficientnet_lite0", "--image-size", "64", "--batch-size", "8", "--epochs", "1",
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
    assert line.startswith("cxrlearn train: interrupted (SIGTERM): kept training's progress at epoch 1"), line
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
