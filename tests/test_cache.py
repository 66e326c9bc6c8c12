"""The preprocessing cache on real NIH images: fidelity, resume, bad files, mismatches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline import cache as cache_module
from cxrlearn.data.pipeline.cache import ImageCache, prepare_cache, table_fingerprint
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.errors import DataError


@pytest.fixture(scope="module")
def fingerprint(nih_table):
    return table_fingerprint(nih_table)


@pytest.fixture(scope="module")
def full_size(nih_table, data_dir):
    return attach_images(nih_table, data_dir / "nih-sample" / "images-1024").table


@pytest.fixture(scope="module")
def built(tmp_path_factory, full_size, fingerprint):
    out = tmp_path_factory.mktemp("cache") / "c256"
    summary = prepare_cache(full_size, out, fingerprint, Preprocessing.for_cache(256), workers=2, progress=False)
    return out, summary


def test_cache_matches_an_independent_resize(built, full_size, sample_images):
    out, summary = built
    assert (summary.added, summary.cached_before, summary.failed) == (48, 0, [])
    cache = ImageCache(out)
    assert cache.pixels.shape == (48, 256, 256) and not cache.pixels.flags.writeable
    np.testing.assert_array_equal(cache.read(5), cache.pixels[5])
    for name, path in zip(full_size["image"], full_size["path"]):
        original = torch.from_numpy(np.array(Image.open(path)))[None].float()
        assert original.shape[-1] == 1024
        independent = TF.resize(original, [256, 256], antialias=True).round().clamp(0, 255)
        cached = torch.from_numpy(np.array(cache[name])).float()
        assert (cached - independent[0]).abs().mean() <= 1.0, name
        # NIH-sample's own 256 px copies were made by the same (Lanczos) resize.
        reference = np.asarray(Image.open(sample_images / name)).astype(int)
        assert np.abs(cache[name].astype(int) - reference).mean() <= 1.0, name


def test_rerun_skips_cached_images(built, full_size, fingerprint):
    out, _ = built
    again = prepare_cache(full_size, out, fingerprint, Preprocessing.for_cache(256), workers=1, progress=False)
    assert (again.cached_before, again.added, again.total) == (48, 0, 48)


def test_resume_after_interruption(tmp_path, built, full_size, fingerprint, monkeypatch):
    reference = ImageCache(built[0])
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real_work = cache_module._work

    def interrupted(job):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real_work(job)

    monkeypatch.setattr(cache_module, "_work", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(full_size, out, fingerprint, Preprocessing.for_cache(256), workers=1, progress=False, flush_every=8)
    monkeypatch.setattr(cache_module, "_work", real_work)
    assert len(ImageCache(out)) == 20
    # A hard kill can also leave pixels that were never indexed and a torn index line.
    with open(out / "pixels.u8", "ab") as handle:
        handle.write(os.urandom(256 * 256 + 1000))
    with open(out / "index.tsv", "a") as handle:
        handle.write("00000999_000.png\t2")
    resumed = prepare_cache(full_size, out, fingerprint, Preprocessing.for_cache(256), workers=2, progress=False)
    assert (resumed.cached_before, resumed.added, resumed.total) == (20, 28, 48)
    cache = ImageCache(out)
    assert (out / "pixels.u8").stat().st_size == 48 * 256 * 256
    for name in full_size["image"]:
        np.testing.assert_array_equal(cache[name], reference[name])


def test_corrupt_image_is_reported_and_skipped(tmp_path, full_size, fingerprint):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in full_size["path"][:6]:
        os.symlink(path, folder / os.path.basename(path))
    broken = os.path.basename(full_size["path"].iloc[6])
    (folder / broken).write_bytes(open(full_size["path"].iloc[6], "rb").read()[:5000])
    table = full_size.drop(columns="path")
    present = attach_images(table, folder).table
    summary = prepare_cache(present, tmp_path / "c", fingerprint, Preprocessing.for_cache(128), workers=2, progress=False)
    assert summary.added == 6 and [n for n, _ in summary.failed] == [broken]
    report = (tmp_path / "c" / "failed.tsv").read_text()
    assert report.startswith(broken + "\t") and "cannot decode image" in report
    assert broken not in ImageCache(tmp_path / "c")


def test_mismatched_cache_is_refused(built, full_size, nih_table, fingerprint):
    out, _ = built
    with pytest.raises(DataError, match=r"holds 256×256 images; it cannot take 224×224"):
        prepare_cache(full_size, out, fingerprint, Preprocessing.for_cache(224), progress=False)
    relabelled = nih_table.copy()
    relabelled.loc[0, "Hernia"] = 1 - relabelled.loc[0, "Hernia"]
    other = table_fingerprint(relabelled)
    assert other != fingerprint
    with pytest.raises(DataError, match=r"built for another label table"):
        prepare_cache(full_size, out, other, Preprocessing.for_cache(256), progress=False)
    cache = ImageCache(out)
    with pytest.raises(DataError, match=r"holds 256×256 images; it cannot take 512×512"):
        cache.check_compatible(fingerprint, Preprocessing.for_cache(512))
    with pytest.raises(DataError, match=r"built for another label table"):
        cache.check_compatible(other)
    with pytest.raises(DataError, match=r"not a cxrlearn image cache"):
        ImageCache(out.parent)


def test_prepare_workers_end_when_prepare_is_killed(table_path, sample_images, tmp_path):
    """`kill -9` of prepare's main process leaves no worker behind (they held files open for minutes)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as status:
                return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
        except FileNotFoundError:
            return False

    def children(pid: int) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                            found.append(int(entry))
                except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    pass
        return found

    # 1,115 images upscaled to 1024 px: long enough to be killed mid-way.
    process = subprocess.Popen([sys.executable, "-m", "cxrlearn.cli.main", "prepare", "--csv", str(table_path),
                                "--images", str(sample_images), "--size", "1024", "--workers", "2",
                                "--out", str(tmp_path / "cache")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    workers: list[int] = []
    while len(workers) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
        workers = [c for c in children(process.pid) if alive(c)]
    assert len(workers) >= 2, "prepare's workers did not start"
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if alive(w)], "workers outlived their parent"


def test_the_members_of_train_seeds_share_the_cache_a_single_run_beside_them_uses(tmp_path):
    """train --seeds built its own cache (RUN/cache) though one for the same table and steps lay beside RUN."""
    from cxrlearn.data.pipeline.cache import cache_location
    from cxrlearn.data.preprocessing import Preprocessing

    pre = Preprocessing.for_cache(64)
    single = cache_location(None, pre, tmp_path / "runs" / "a", "f" * 64)
    member = cache_location(None, pre, tmp_path / "runs" / "b" / "seed-3", "f" * 64)
    assert single == member == tmp_path / "runs" / "cache" / f"{'f' * 12}-64"
    assert cache_location(None, pre, tmp_path / "runs" / "seedling", "f" * 64).parent == tmp_path / "runs" / "cache"
    assert cache_location(tmp_path / "mine", pre, tmp_path / "runs" / "b" / "seed-0", "f" * 64) == tmp_path / "mine"
