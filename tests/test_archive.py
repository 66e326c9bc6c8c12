"""A whole archive into a Parquet dataset (cxrlearn.workflows.archive): shards written whole, a rerun that predicts
only what no shard holds, each image exactly once, locally and on a real two-node Ray cluster whose worker node
is killed mid-run; the rows equal `predict`'s CSV."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from raycluster import RayCluster

from cxrlearn.cli.main import main
from cxrlearn.findings import FINDINGS
from cxrlearn.inference.predictor import Predictor
from cxrlearn.workflows.archive import ERROR, FAILURES_FILE, PATH, shard_files


def _dataset(folder) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in shard_files(folder)], ignore_index=True)


def _same_rows_as_csv(dataset: pd.DataFrame, csv: pd.DataFrame, tolerance: float, thresholds: dict) -> None:
    """The dataset's predicted rows are predict's CSV rows: the same columns first, the same provenance and input
    check, probabilities within ``tolerance``, and the same calls but where a probability lies within
    ``tolerance`` of its threshold (another process's thread count moves the last digits)."""
    predicted = dataset[dataset[ERROR] == ""].set_index("image").loc[csv["image"]]
    assert list(dataset.columns[:len(csv.columns)]) == list(csv.columns)
    np.testing.assert_allclose(predicted[list(FINDINGS)].to_numpy(float), csv[list(FINDINGS)].to_numpy(float),
                               atol=tolerance)
    for column in ("input_check", "model_sha256", "runtime", "runtime_sha256"):
        assert predicted[column].fillna("").tolist() == csv[column].fillna("").astype(str).tolist(), column
    for finding in FINDINGS:
        column = f"{finding}_positive"
        expected = pd.to_numeric(csv[column].astype(str).replace("", None)).fillna(-1).to_numpy()
        differ = predicted[column].astype("Float64").fillna(-1).to_numpy() != expected
        on_the_line = np.abs(predicted[finding].to_numpy(float) - (thresholds.get(finding) or 2.0)) <= tolerance
        assert not (differ & ~on_the_line).any(), column


@pytest.fixture(scope="module")
def manifest(sample_images, tmp_path_factory):
    """48 sample images (two as file:// URIs, with a study column carried), a missing file and a broken one."""
    folder = tmp_path_factory.mktemp("archive")
    images = sorted(sample_images.glob("*.png"))[:48]
    (folder / "broken.png").write_text("Impression: no acute disease.")
    paths = [str(p) for p in images] + [str(folder / "gone.png"), "broken.png"]
    paths[0], paths[1] = images[0].as_uri(), images[1].as_uri()
    table = pd.DataFrame({"path": paths, "study": [f"S{i:03d}" for i in range(len(paths))]})
    table.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv", images


@pytest.fixture(scope="module")
def csv_predictions(evaluated, manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("csv") / "predictions.csv"
    assert main(["predict", "--model", str(evaluated[0]), *map(str, manifest[1]), "--out", str(out),
                 "--no-progress"]) == 0
    return pd.read_csv(out, keep_default_na=False)


def test_a_parquet_dataset_holds_each_image_once_and_a_rerun_completes_it(evaluated, manifest, csv_predictions,
                                                                           tmp_path, capsys):
    table, images = manifest
    out = tmp_path / "predictions.parquet"
    common = ["predict", "--model", str(evaluated[0]), "--manifest", str(table), "--out", str(out), "--shard-images",
              "8", "--workers", "0", "--no-progress"]
    assert main(common) == 3  # two inputs failed: named, not lost
    assert "48 predicted, 0 skipped as done, 2 failed" in capsys.readouterr().err
    files = shard_files(out)
    assert len(files) == 7 and not list(out.glob(".*"))  # 50 inputs in shards of 8; no partial file left
    dataset = _dataset(out)
    assert len(dataset) == 50 and dataset[PATH].is_unique
    _same_rows_as_csv(dataset, csv_predictions, 1e-5, Predictor(evaluated[0]).thresholds)  # batches of 8, not 16
    assert dict(zip(dataset["image"], dataset["study"]))[images[5].name] == "S005"  # the manifest's column carried
    assert set(dataset[PATH]) >= {str(images[0]), str(images[1])}  # file:// URIs read as paths
    failures = pd.read_csv(out / FAILURES_FILE)
    assert sorted(failures[PATH].str.rsplit("/", n=1).str[-1]) == ["broken.png", "gone.png"]
    assert failures[ERROR].str.contains("no such image file").any() and failures[ERROR].str.contains("not an image").any()
    assert pd.read_parquet(out).shape[0] == 50  # a reader of the whole folder skips _failures.csv

    # A rerun predicts nothing; a lost shard (and a partial file a crash left) is redone, and only it.
    assert main(common) == 0
    assert "0 predicted, 50 skipped as done, 0 failed (2 in all" in capsys.readouterr().err
    # (a shard of readable images: shards are named by digest, so which name holds the two failed ones varies)
    gone = next(f for f in files if (pd.read_parquet(f)[ERROR] == "").all())
    lost = pd.read_parquet(gone)
    gone.unlink()
    (out / f".{gone.name}.dead.partial").write_bytes(b"PAR1 half a shard")
    main(common)
    assert f"{len(lost)} predicted, {50 - len(lost)} skipped as done" in capsys.readouterr().err
    again = _dataset(out)
    assert len(again) == 50 and again[PATH].is_unique and set(again[PATH]) == set(dataset[PATH])


def test_a_dataset_writes_dicom_results_and_the_log_per_shard_once(evaluated, sample_images, tmp_path, capsys):
    """--dicom-out and --log with a Parquet dataset: each DICOM input's report (its probabilities the dataset's),
    segmentation and capture in the folder of its shard, a lateral view named in that folder's _refused.csv, every
    answer in the log; a rerun writes nothing again, and a lost shard is redone with the same DICOM objects."""
    import highdicom as hd
    import pydicom

    from cxrlearn.cli.shard_outputs import REFUSED_FILE
    from cxrlearn.data.decoding.images import load_grayscale
    from cxrlearn.monitoring.log import PredictionLog
    from xray_files import chest_dx

    inputs = tmp_path / "in"
    inputs.mkdir()
    images = sorted(sample_images.glob("*.png"))[:6]
    for i, image in enumerate(images[:4]):
        ds = chest_dx(load_grayscale(image), patient_id=f"A-{i}")
        if i == 3:
            ds.ViewPosition = "LL"  # a lateral view: a row in the dataset, no DICOM result
        ds.save_as(inputs / f"dx{i}.dcm", enforce_file_format=True)
    for image in images[4:]:
        (inputs / image.name).write_bytes(image.read_bytes())
    out, dicom, log = tmp_path / "p.parquet", tmp_path / "dicom", tmp_path / "log.sqlite"
    common = ["predict", "--model", str(evaluated[0]), str(inputs), "--out", str(out), "--dicom-out", str(dicom),
              "--log", str(log), "--shard-images", "3", "--workers", "0", "--no-progress"]
    assert main(common) == 0
    assert "6 predicted" in capsys.readouterr().err
    dataset = _dataset(out).set_index("image")
    folders = sorted(dicom.iterdir())
    assert [f.name for f in folders] == sorted(f"part-{f.name[5:-8]}" for f in shard_files(out))
    reports = sorted(dicom.glob("part-*/*.sr.dcm"))
    assert sorted(r.name for r in reports) == ["dx0.sr.dcm", "dx1.sr.dcm", "dx2.sr.dcm"]
    assert len(list(dicom.glob("part-*/*.seg.dcm"))) == len(list(dicom.glob("part-*/*.sc.dcm"))) == 3
    for report in reports:
        sr = hd.sr.srread(report)
        row = dataset.loc[report.name.replace(".sr.dcm", ".dcm")]
        for group in sr.content.get_image_measurement_groups():
            finding = group.finding_type.meaning
            if finding in FINDINGS:
                value = next(float(i.MeasuredValueSequence[0].NumericValue) for i in group[0].ContentSequence
                             if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeMeaning == "Probability")
                assert abs(value - row[finding]) < 1e-5
    refused = pd.concat([pd.read_csv(f) for f in dicom.glob(f"part-*/{REFUSED_FILE}")])
    assert [Path(p).name for p in refused["path"]] == ["dx3.dcm"] and "lateral view LL" in refused["reason"].iloc[0]
    assert len(PredictionLog(str(log)).answers()) == 6
    uids = {r.name: pydicom.dcmread(r).SOPInstanceUID for r in dicom.glob("part-*/*.dcm")}

    assert main(common) == 0  # done: nothing predicted, written or logged again
    assert "0 predicted, 6 skipped as done" in capsys.readouterr().err
    assert len(PredictionLog(str(log)).answers()) == 6
    lost = next(f for f in shard_files(out) if (dicom / f"part-{f.name[5:-8]}" / "dx0.sr.dcm").exists())
    lost.unlink()
    assert main(common) == 0
    assert "3 predicted, 3 skipped as done" in capsys.readouterr().err
    assert {r.name: pydicom.dcmread(r).SOPInstanceUID for r in dicom.glob("part-*/*.dcm")} == uids  # the same
    assert len(PredictionLog(str(log)).answers()) == 9  # the redone shard's answers logged again, with their times


def test_a_dataset_refuses_bad_manifests_and_options_in_one_line(evaluated, manifest, tmp_path, capsys, monkeypatch):
    model = str(evaluated[0])
    (tmp_path / "nopath.csv").write_text("file,study\na.png,S1\n")
    (tmp_path / "web.csv").write_text("path\nhttps://example.org/a.png\n")
    (tmp_path / "twice.csv").write_text("path\n/x/a.png\n/x/a.png\n")
    for name, said in (("nopath.csv", "no 'path' column"), ("web.csv", "is not a file:// URI"),
                       ("twice.csv", "listed more than once")):
        assert main(["predict", "--model", model, "--manifest", str(tmp_path / name), "--out",
                     str(tmp_path / "o.parquet"), "--no-progress"]) == 2
        assert name in (err := capsys.readouterr().err) and said in err
    assert main(["predict", "--model", model, "--manifest", str(manifest[0]), "--out", str(tmp_path / "x.csv")]) == 2
    assert "--manifest writes a Parquet dataset" in capsys.readouterr().err
    assert main(["predict", "--model", model, str(manifest[1][0]), "--out", str(tmp_path / "o.parquet"),
                 "--cam", str(tmp_path / "cam")]) == 2
    assert "--cam: not with a Parquet dataset" in capsys.readouterr().err
    (tmp_path / "codes.csv").write_text("finding,scheme,value,meaning\nNodules,SCT,27925004,Nodule\n")
    assert main(["predict", "--model", model, str(manifest[1][0]), "--out", str(tmp_path / "o.parquet"),
                 "--dicom-out", str(tmp_path / "d"), "--codes", str(tmp_path / "codes.csv")]) == 2
    assert "finding 'Nodules' is not one of the model's" in capsys.readouterr().err  # before any shard
    assert not (tmp_path / "o.parquet").exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main(["predict", "--model", model, str(manifest[1][0]), "--out", str(tmp_path / "o.parquet"),
                 "--engine", "ray"]) == 2
    assert "--engine ray needs Ray: pip install 'cxrlearn[ray]'" in capsys.readouterr().err
    monkeypatch.undo()  # Ray back as it was (not yet imported: a real import follows)
    assert main(["predict", "--model", model, str(manifest[1][0]), "--out", str(tmp_path / "o.parquet"),
                 "--engine", "ray", "--address", "127.0.0.1:9"]) == 2
    assert "nothing answers at 127.0.0.1:9" in capsys.readouterr().err


def _predict_on_ray(model, images_table, out, address, *extra) -> subprocess.Popen:
    command = ["from cxrlearn.cli.main import main; raise SystemExit(main())", "predict", "--model", str(model),
               "--manifest", str(images_table), "--out", str(out), "--engine", "ray", "--address", address,
               "--shard-images", "10", "--no-progress", *extra]
    return subprocess.Popen([sys.executable, "-c", *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def test_ray_on_two_nodes_survives_a_killed_node_and_predicts_each_image_once(evaluated, sample_images, tmp_path):
    """`ray start --head` and a second node, one CPU each; the second node's raylet is killed (kill -9) once two
    shards are written; the run (or the rerun after it) completes, every image exactly once, the rows predict's;
    the actors record every answer in the prediction log (--log: a shard redone after the kill, again)."""
    from cxrlearn.monitoring.log import PredictionLog

    images = sorted(sample_images.glob("*.png"))[100:260]
    pd.DataFrame({"path": [str(p) for p in images]}).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "ray.parquet"
    cluster = RayCluster().start()
    try:
        logged = ["--log", str(tmp_path / "log.sqlite")]
        run = _predict_on_ray(evaluated[0], tmp_path / "manifest.csv", out, cluster.address, *logged)
        deadline = time.monotonic() + 300
        while len(shard_files(out)) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        written_before = len(shard_files(out))
        assert 2 <= written_before < 16, run.communicate()[0][-3000:]
        cluster.kill_worker_raylet()
        first, _ = run.communicate(timeout=600)
        print(f"first run (exit {run.returncode}): {first[-600:]}")
        rerun = _predict_on_ray(evaluated[0], tmp_path / "manifest.csv", out, cluster.address, *logged)
        said, _ = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, said[-3000:]
        assert "skipped as done, 0 failed" in said
    finally:
        cluster.stop()
    dataset = _dataset(out)
    assert len(dataset) == len(images) and dataset[PATH].is_unique and set(dataset[PATH]) == set(map(str, images))
    assert (dataset[ERROR] == "").all()
    answers = PredictionLog(str(tmp_path / "log.sqlite")).answers()
    assert {a.source for a in answers} == {p.name for p in images} and len(answers) >= len(images)
    local = tmp_path / "local.csv"
    assert main(["predict", "--model", str(evaluated[0]), *map(str, images), "--out", str(local),
                 "--no-progress"]) == 0
    _same_rows_as_csv(dataset, pd.read_csv(local, keep_default_na=False), 1e-5, Predictor(evaluated[0]).thresholds)
