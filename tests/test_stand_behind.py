"""The attack's findings outside DICOM (issue "answers ... can stand behind", part 5): each was a traceback, a
silent mix-up or a lost path before; each is one clear line, or handled, now."""

from __future__ import annotations

import errno
import http.server
import logging
import os
import threading
import time

import numpy as np
import pandas as pd
import pytest

from cxrlearn._files import write_atomic
from cxrlearn.cli.main import main
from cxrlearn.errors import ConfigError, DataError


def _train_args(table_path, sample_images, tmp_path):
    return ["train", "--csv", str(table_path), "--images", str(sample_images), "--backbone", "tf_efficientnet_lite0",
            "--image-size", "64", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress",
            "--set", "model.hub=false"]


@pytest.mark.parametrize("name,value", [("RANK", "abc"), ("RANK", "²"), ("SLURM_RESTART_COUNT", "²"),
                                        ("WORLD_SIZE", "-2")])
def test_a_launcher_variable_that_is_no_whole_number_is_one_line(table_path, sample_images, tmp_path, capsys,
                                                                 monkeypatch, name, value):
    """SLURM_RESTART_COUNT=², RANK=abc and RANK=² were tracebacks (Lightning's int(), or isdigit accepting '²')."""
    monkeypatch.setenv(name, value)
    assert main(_train_args(table_path, sample_images, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{name}={value!r}" in err and "not a whole number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_archive_name_too_long_for_a_file_name_is_refused_by_line(tmp_path):
    """A 300-character archive name ended in ENAMETOOLONG half-way through a download."""
    from cxrlearn.data.sources.download import read_archives

    listing = tmp_path / "archives.tsv"
    listing.write_text("archive\turl\tmd5\n" + "a" * 300 + ".tar.gz\thttp://127.0.0.1/x\t" + "0" * 32 + "\n")
    with pytest.raises(DataError, match="line 2: archive 'a{80}'... is not a plain file name of at most 200"):
        read_archives(listing)
    listing.write_text("archive\turl\tmd5\n" + "a" * 190 + ".tar.gz\thttp://127.0.0.1/x\t" + "0" * 32 + "\n")
    assert read_archives(listing)[0].name == "a" * 190 + ".tar.gz"


def test_prepare_decodes_again_what_a_cut_short_cache_lost(nih_table, sample_images, tmp_path, caplog):
    """prepare used to call a cache with a truncated pixels.u8 fine and append after its end, so every later row
    sat at the wrong offset (train then refused it). Now the rows lost are decoded again, and the cache reads as a
    fresh one."""
    from cxrlearn.data.decoding.images import attach_images
    from cxrlearn.data.pipeline.cache import PIXELS, ImageCache, prepare_cache, table_fingerprint
    from cxrlearn.data.preprocessing import Preprocessing

    table = attach_images(nih_table, sample_images).table.head(12)
    fingerprint, pre = table_fingerprint(nih_table), Preprocessing.for_cache(64)
    fresh, cut = tmp_path / "fresh", tmp_path / "cut"
    for folder in (fresh, cut):
        prepare_cache(table, folder, fingerprint, pre, workers=1, progress=False)
    with open(cut / PIXELS, "r+b") as handle:  # 4 whole rows and part of a fifth lost
        handle.truncate(7 * 64 * 64 + 100)
    with caplog.at_level(logging.WARNING):
        summary = prepare_cache(table, cut, fingerprint, pre, workers=1, progress=False)
    assert "holds 7 whole images but" in caplog.text and "the last 5 are decoded again" in caplog.text
    assert (summary.cached_before, summary.added) == (7, 5)
    a, b = ImageCache(fresh), ImageCache(cut)
    for name in table["image"]:
        assert np.array_equal(a.read(a.rows[name]), b.read(b.rows[name])), name


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """A full disk was reported without the path ("cannot write an output file")."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "split.csv"
    with pytest.raises(OSError) as raised:
        write_atomic(target, "image,patient_id,split\n")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert not target.exists() and not list(tmp_path.glob(".split.csv.tmp-*"))


def test_dicom_status_on_a_folder_that_is_no_outbox_changes_nothing(tmp_path, capsys):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    assert main(["dicom", "status", "--outbox", str(folder)]) == 2
    assert "not an outbox" in capsys.readouterr().err
    assert list(folder.iterdir()) == []
    assert main(["dicom", "status", "--outbox", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "missing").exists()


def test_compare_refuses_to_write_into_a_models_folder(evaluated, table_path, sample_images, capsys):
    run = evaluated[0]
    before = sorted(p.name for p in run.iterdir())
    assert main(["compare", str(run), str(run), "--csv", str(table_path), "--images", str(sample_images),
                 "--out", str(run / "comparison"), "--no-progress"]) == 2
    assert "inside the compared model" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


def test_patient_ids_with_and_without_leading_zeros_are_one_patient(tmp_path, caplog):
    """30 patients straddled the split of a hospital table whose IDs were '12' here and '00012' there."""
    from cxrlearn.data.sources.generic import read_table

    path = tmp_path / "labels.csv"
    pd.DataFrame({"image": ["a.png", "b.png", "c.png", "d.png", "e.png"],
                  "patient": ["12", "00012", "0007", "A12", "012"],
                  "Effusion": [1, 0, 0, 1, 0]}).to_csv(path, index=False)
    with caplog.at_level(logging.WARNING):
        table = read_table(path)
    assert table["patient_id"].tolist() == ["12", "12", "0007", "A12", "12"]  # "0007" alone is left as written
    assert "00012 = 012 = 12" in caplog.text


class _Answers500(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the standard library's name
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("uri,said", [
    ("http://127.0.0.1:9", "no tracking server answers there within 5 s"),
    ("javascript:alert(1)", "not a tracking URI MLflow can store runs at"),
    ("file:///proc/self/cwd/mlruns", "is a system folder"),
    ("databricks", "Databricks is not configured"),
])
def test_mlflow_uri_is_checked_in_seconds_before_any_work(table_path, sample_images, tmp_path, capsys,
                                                           monkeypatch, uri, said):
    """An unreachable server retried for about 6 minutes and ended in a traceback after the split was written;
    file:///proc/..., javascript:..., databricks without configuration: tracebacks."""
    monkeypatch.delenv("DATABRICKS_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    started = time.monotonic()
    assert main([*_train_args(table_path, sample_images, tmp_path), "--mlflow", uri]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_tracking_server_answering_500_is_one_line():
    from cxrlearn.workflows.train import check_tracking

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers500)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConfigError, match="the tracking server answered HTTP 500"):
            check_tracking(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
