"""`cxrlearn reproduce kufel2023` on the real sample: killed during training, rerun, continued."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

from cxrlearn.evaluation.published import published_auc
from cxrlearn.findings import FINDINGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--set", "model.backbone=tf_efficientnet_lite0", "--set", "data.image_size=64", "--set", "train.epochs=3",
         "--set", "model.hub=false", "--set", "data.num_workers=0", "--set", "data.batch_size=32",
         "--set", "train.early_stopping_patience=0"]


def command(sample_images, out, *extra):
    return [sys.executable, "-m", "cxrlearn.cli.main", "reproduce", "kufel2023", "--images", str(sample_images),
            "--out", str(out), "--no-progress", *SMALL, *extra]


def test_reproduce_killed_during_training_continues_where_it_stopped(sample_images, tmp_path):
    out = tmp_path / "R"
    process = subprocess.Popen(command(sample_images, out), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    last = out / "model" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert process.poll() is None, "the run ended before it could be interrupted:\n" + process.stderr.read()[-3000:]
    os.killpg(process.pid, signal.SIGKILL)  # as a lost machine or an out-of-memory kill would
    process.wait()
    process.stderr.close()
    state = json.loads((out / "reproduction-state.json").read_text())
    assert {"download", "split", "prepare"} <= set(state["stages"]) and "train" not in state["stages"]
    split_before = (out / "split.csv").read_bytes()
    report = json.loads((out / "split.report.json").read_text())  # the same provenance as `cxrlearn split`'s
    assert report["label_table"]["file"] == "Data_Entry_2017_v2020.csv.gz" and len(report["label_table"]["sha256"]) == 64
    assert report["seed"] == 2137 and report["method"] == "stratified"

    killed_after = last.stat().st_mtime - state["unfinished"]["train"]["started"]  # at least, training ran so long
    rerun = subprocess.run(command(sample_images, out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[split] done earlier" in rerun.stderr and "[prepare] done earlier" in rerun.stderr
    assert "continuing the interrupted training" in rerun.stderr
    assert "estimate:" in rerun.stderr
    # One table: the killed run's epochs, then the continued run's, each once.
    with open(out / "model" / "logs" / "metrics.csv") as handle:
        validated = [int(row["epoch"]) for row in csv.DictReader(handle) if row.get("val/mean_auc")]
    assert validated == list(range(len(validated))) and len(validated) >= 2, validated
    assert not list((out / "model" / "logs").glob("resumed-*"))
    assert (out / "split.csv").read_bytes() == split_before

    report = json.loads((out / "reproduction.json").read_text())
    result = report["results"]["custom"]
    assert set(result["per_finding"]) == set(FINDINGS)
    kufel = published_auc("Kufel 2023")
    for name, entry in result["per_finding"].items():
        assert entry["Kufel 2023"] == kufel[name]
        if entry["auc"] is not None:
            assert abs(entry["difference"] - (entry["auc"] - kufel[name])) < 1e-3
    assert result["n_images"] == json.loads((out / "evaluation" / "metrics.json").read_text())["n_images"] > 0
    assert result["model"]["epochs_run"] == 3
    assert set(report["stages"]) == {"download", "split", "prepare", "train", "evaluate"}
    # The training stage's time counts the killed attempt too; the heading names the model trained.
    assert "[train] … (continued after" in rerun.stderr
    assert report["stages"]["train"]["seconds"] >= killed_after > 0
    assert report["recipe"] == ("Kufel et al. 2023 (J Pers Med 13:1426): tf_efficientnet_lite0 at 64 px, custom "
                                "patient-wise split, seed 2137")
    markdown = (out / "reproduction.md").read_text()
    assert markdown.startswith(f"# Reproduction: {report['recipe']}")
    assert all(f"| {name} |" in markdown for name in FINDINGS) and "Kufel 2023" in markdown
    assert "## Time per stage" in markdown and "## Machine and versions" in markdown

    # The same folder with other settings is refused before anything is written.
    other = subprocess.run(command(sample_images, out, "--set", "train.epochs=4"), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 2
    assert "other settings (sets: " in other.stderr and "train.epochs=4" in other.stderr
