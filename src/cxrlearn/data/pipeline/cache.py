"""The preprocessing cache: every image decoded and resized once, then memory-mapped.

Decoding a 1024×1024 PNG and resizing it costs tens of milliseconds; doing it at
every step (as the loaders of torchxrayvision and the CheXNet re-implementations
do) makes training data-bound. ``cxrlearn prepare`` does it once, in parallel,
and stores the result as one uint8 array ``pixels.u8`` of shape (rows, S, S),
which the loader memory-maps: a sample is then a 64 KiB read (at S=256) that the
page cache serves. Pages are released from the process after each read
(:meth:`ImageCache.read`), so resident memory does not grow with the cache size.

Layout of a cache folder::

    meta.json     size, source folder, label table fingerprint, format version
    pixels.u8     raw uint8 rows of S*S pixels
    index.tsv     "image<TAB>row" lines, appended only after their rows are on disk
    failed.tsv    images that could not be decoded, with the reason (rewritten each run)

Resumable: rows are appended, and a row counts only once its index line is
written (after the pixels are flushed). An interrupted run leaves at most some
unindexed rows and a torn last index line; the next run drops both and goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from pydantic import ValidationError
from tqdm.auto import tqdm

from cxrlearn._files import read_json_object, write_atomic
from cxrlearn.data.columns import IMAGE, PATH, PATIENT_ID, finding_columns
from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.data.preprocessing import CACHE_RESAMPLING, Preprocessing
from cxrlearn.defaults import whole_number
from cxrlearn.errors import DataError
from cxrlearn.records import Record
from cxrlearn.settings import Whole

CACHE_FORMAT = 1
log = logging.getLogger(__name__)

META, PIXELS, INDEX, FAILED, LOCK = "meta.json", "pixels.u8", "index.tsv", "failed.tsv", ".lock"


#: The folder name of one run of ``train --seeds`` (``RUN/seed-K``).
SEED_MEMBER = re.compile(r"seed-[0-9]+")


def cache_location(cache: str | os.PathLike | None, preprocessing: Preprocessing, run_dir: str | os.PathLike,
                   fingerprint: str) -> Path:
    """Where a run's preprocessing cache is: ``data.cache`` when given, else beside the run folder, named by the
    label table and the cache's steps. Runs and evaluations of the same table and cache steps share one cache; the
    members of ``train --seeds`` (``RUN/seed-K``) share the one beside ``RUN``, as a single run there would."""
    if cache:
        return Path(cache)
    steps = str(preprocessing.cache_size) + ("" if preprocessing.cache_resampling == CACHE_RESAMPLING
                                             else f"-{preprocessing.cache_resampling}")
    run_dir = Path(run_dir)
    beside = run_dir.parent.parent if SEED_MEMBER.fullmatch(run_dir.name) else run_dir.parent
    return beside / "cache" / f"{fingerprint[:12]}-{steps}"


def table_fingerprint(table: pd.DataFrame) -> str:
    """SHA-256 over the table's image names, patients and labels: what a cache serves.

    The pixels themselves do not depend on labels, but a cache built for one table
    and read with another would silently pair images with the wrong rows of
    metadata when names are reused, so the two must agree.
    """

    columns = [IMAGE, PATIENT_ID, *finding_columns(table)]
    ordered = table[columns].sort_values(IMAGE, kind="stable")
    text = ordered.to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def decode_and_resize(path: str | os.PathLike, preprocessing: Preprocessing) -> np.ndarray:
    """One image as the cache stores it: decoded to grayscale, then resized (:meth:`Preprocessing.cached`).

    Non-square images are resized to a square without padding (NIH's are all
    1024×1024).
    """
    return preprocessing.cached(load_grayscale(path))


def _work(job: tuple[str, str, Preprocessing]) -> tuple[str, np.ndarray | None, str | None]:
    """Worker body: (name, pixels or None, error or None). Errors never escape."""
    name, path, preprocessing = job
    try:
        return name, decode_and_resize(path, preprocessing), None
    except DataError as err:
        return name, None, str(err)
    except Exception as err:  # noqa: BLE001 - a worker must report, not die, on any bad file
        return name, None, f"{path}: {type(err).__name__}: {err}"


@dataclass
class PrepareSummary:
    cached_before: int
    added: int
    failed: list[tuple[str, str]]
    seconds: float
    total: int

    def text(self) -> str:
        rate = self.added / self.seconds if self.seconds > 0 else 0.0
        return (
            f"cache holds {self.total:,} images: {self.added:,} added in {self.seconds:.1f} s "
            f"({rate:.1f} images/s), {self.cached_before:,} were already cached, "
            f"{len(self.failed):,} could not be used"
        )


class ImageCache:
    """A prepared cache, opened read-only and memory-mapped."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise DataError(f"{self.folder}: not a cxrlearn image cache (no {META}); build one with `cxrlearn prepare`")
        self.meta = _read_meta(meta_path)
        if self.meta.format != CACHE_FORMAT:
            raise DataError(f"{self.folder}: cache format {self.meta.format} is not {CACHE_FORMAT}; rebuild it")
        self.size = self.meta.size
        self.rows = _read_index(self.folder / INDEX)
        count = len(self.rows)
        if count == 0:
            raise DataError(f"{self.folder}: the cache is empty")
        available = (self.folder / PIXELS).stat().st_size // (self.size * self.size)
        if available < count:
            raise DataError(f"{self.folder}: {PIXELS} holds {available} rows but the index lists {count}; rebuild it")
        self._file = open(self.folder / PIXELS, "rb")
        self._map = mmap.mmap(self._file.fileno(), length=count * self.size * self.size, access=mmap.ACCESS_READ)
        #: All rows, memory-mapped read-only: (rows, S, S) uint8.
        self.pixels = np.frombuffer(self._map, dtype=np.uint8).reshape(count, self.size, self.size)

    def read(self, row: int) -> np.ndarray:
        """A copy of one row, after which its pages are unmapped from this process.

        The pages stay in the kernel's page cache, so a second read is as fast,
        but they no longer count in this process's resident memory: iterating a
        42 GB cache leaves the loader's RSS where it started.
        """
        row_bytes = self.size * self.size
        image = self.pixels[row].copy()
        start = row * row_bytes
        aligned = start - start % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, aligned, start + row_bytes - aligned)
        return image

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def __getitem__(self, name: str) -> np.ndarray:
        return self.pixels[self.rows[name]]

    def row_of(self, names: Iterable[str]) -> np.ndarray:
        """Rows of the named images; raises naming the first image not in the cache."""
        rows = []
        for name in names:
            row = self.rows.get(name)
            if row is None:
                raise DataError(f"{self.folder}: image {name} is not in the cache; run `cxrlearn prepare` again")
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    def check_compatible(self, fingerprint: str, preprocessing: Preprocessing | None = None) -> None:
        """Refuse a cache made with other preprocessing steps (size, resampling), or for another label table.

        ``fingerprint``: :func:`table_fingerprint` of the whole label table as read.
        """
        _check_compatible(self.meta, self.folder, fingerprint, preprocessing)


class CacheMeta(Record):
    """``meta.json``: what a cache holds and for which table (caches made before ``resampling`` was recorded were
    made with Lanczos)."""

    format: Any = None
    size: Whole
    dtype: str = "uint8"
    resampling: str = CACHE_RESAMPLING
    source: str | None = None
    label_table: str = "unknown"
    table_fingerprint: str | None = None


def _check_compatible(meta: CacheMeta, folder: Path, fingerprint: str, preprocessing: Preprocessing | None) -> None:
    """The one check that a cache folder serves this table with these steps (reading it, or adding to it)."""
    if meta.format != CACHE_FORMAT:
        raise DataError(f"{folder}: cache format {meta.format} is not {CACHE_FORMAT}; prepare the cache in a "
                        "new folder")
    if preprocessing is not None:
        size, resampling = meta.size, meta.resampling
        if preprocessing.cache_size != size:
            raise DataError(f"{folder}: the cache holds {size}×{size} images; it cannot take "
                            f"{preprocessing.cache_size}×{preprocessing.cache_size} ones. Prepare a cache of that size "
                            "in another folder (another --out)")
        if preprocessing.cache_resampling != resampling:
            raise DataError(f"{folder}: the cache's images were resized with {resampling}, not "
                            f"{preprocessing.cache_resampling}; prepare a cache in another folder (another --out)")
    if fingerprint != meta.table_fingerprint:
        raise DataError(f"{folder}: the cache was built for another label table "
                        f"({meta.label_table}); prepare a cache for this table in another folder "
                        "(another --out)")


def _read_meta(path: Path) -> CacheMeta:
    """A cache's meta.json, or :class:`DataError` naming it (empty, torn, not an object, not UTF-8)."""
    try:
        return CacheMeta.model_validate(read_json_object(path, DataError, "delete the cache folder and prepare again"))
    except ValidationError:
        raise DataError(f"{path}: not a cache description (an object with the cache's size); delete the cache "
                        "folder and prepare again") from None


@contextlib.contextmanager
def writing(folder: Path, wait: bool = False):
    """Hold the cache folder's lock while adding to it: a second ``prepare`` (or training run) on the same
    cache is refused by name rather than let the two truncate each other's files; with ``wait``, it waits for
    the first to finish instead (the other processes of one distributed run, which find the work done)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{folder}: another cxrlearn process is adding to this cache; wait for it to finish, "
                            "or use another cache folder") from None
        yield
    finally:
        handle.close()  # closing releases the lock


def _read_index(path: Path) -> dict[str, int]:
    """Committed index entries; a torn last line (no newline) is ignored."""
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): the cache's index is damaged; delete the cache "
                        "folder and prepare again") from None
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is torn or empty
    rows: dict[str, int] = {}
    for number, line in enumerate(complete, start=1):
        name, _, row = line.partition("\t")
        if whole_number(row) != len(rows):
            raise DataError(f"{path}: line {number} is damaged ({line!r}); delete the cache folder and prepare again")
        rows[name] = int(row)
    return rows


def _open_or_create(out: Path, preprocessing: Preprocessing, fingerprint: str, images_dir: str, label_table: str
                    ) -> dict[str, int]:
    """Check or write meta.json; return the committed index, with any torn tail cut off."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    size = preprocessing.cache_size
    if meta_path.exists():
        _check_compatible(_read_meta(meta_path), out, fingerprint, preprocessing)
    else:
        meta = CacheMeta(format=CACHE_FORMAT, size=size, dtype="uint8", resampling=preprocessing.cache_resampling,
                         source=images_dir, label_table=label_table, table_fingerprint=fingerprint)
        write_atomic(meta_path, json.dumps(meta.to_dict(), indent=2) + "\n")
    rows = _read_index(out / INDEX)
    index_path = out / INDEX
    if index_path.exists():
        # Drop a torn last line so that appends start on a fresh line.
        with open(index_path, "r+b") as handle:
            data = handle.read()
            cut = data.rfind(b"\n") + 1
            handle.truncate(cut)
    pixels_path = out / PIXELS
    row_bytes = size * size
    held = pixels_path.stat().st_size // row_bytes if pixels_path.exists() else 0
    if held < len(rows):  # the file was cut short (a copy or a disk that failed): those images are decoded again
        log.warning(f"{pixels_path} holds {held:,} whole images but {index_path} lists {len(rows):,}: the last "
                    f"{len(rows) - held:,} are decoded again")
        rows = {name: row for name, row in rows.items() if row < held}
        write_atomic(index_path, "".join(f"{name}\t{row}\n" for name, row in rows.items()))
    if pixels_path.exists() and pixels_path.stat().st_size > len(rows) * row_bytes:
        with open(pixels_path, "r+b") as handle:  # rows written but never indexed (or a torn last row)
            handle.truncate(len(rows) * row_bytes)
    return rows


def die_with_parent() -> None:
    """In a worker process: end when the process that started it ends, even by ``kill -9``.

    Linux delivers SIGTERM at the parent's death (``PR_SET_PDEATHSIG``); elsewhere, and as a second
    line, a thread checks every second whether the worker has been orphaned.
    """

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    parent = os.getppid()
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def prepare_workers(requested: int | None = None) -> int:
    """The processes :func:`prepare_cache` decodes with: as requested, else one per CPU core."""
    return max(1, requested or (os.cpu_count() or 1))


def prepare_cache(
    table: pd.DataFrame,
    out: str | os.PathLike,
    fingerprint: str,
    preprocessing: Preprocessing,
    workers: int | None = None,
    images_dir: str = "",
    label_table: str = "",
    progress: bool = True,
    flush_every: int = 256,
    wait: bool = False,
) -> PrepareSummary:
    """Decode and resize the table's present images (column ``path``) into a cache, as ``preprocessing`` says
    (steps 1-2: :meth:`Preprocessing.cached`).

    ``fingerprint``: :func:`table_fingerprint` of the whole label table as read
    (before restricting it to the images present), recorded in the cache so that
    a cache is never read with another table.

    Images already cached are skipped. Undecodable ones are listed in
    ``failed.tsv`` and left out. Returns a summary; raises :class:`DataError` for
    a cache of another size or table, or one that another process is adding to
    (with ``wait``: waits for it).
    """

    out = Path(out)
    with writing(out, wait):
        return _prepare(table, out, fingerprint, preprocessing, workers, images_dir, label_table, progress,
                        flush_every)


def _prepare(table, out: Path, fingerprint: str, preprocessing: Preprocessing, workers, images_dir: str,
             label_table: str, progress: bool, flush_every: int) -> PrepareSummary:
    started = time.perf_counter()
    size = preprocessing.cache_size
    rows = _open_or_create(out, preprocessing, fingerprint, images_dir, label_table)
    cached_before = len(rows)
    todo = [(name, path) for name, path in zip(table[IMAGE], table[PATH]) if name not in rows]
    workers = prepare_workers(workers)
    failed: list[tuple[str, str]] = []
    row_bytes = size * size
    pending_names: list[str] = []

    with open(out / PIXELS, "ab") as pixel_file, open(out / INDEX, "a", encoding="utf-8") as index_file:

        def commit() -> None:
            # Pixels reach the disk before the index lines that point at them.
            pixel_file.flush()
            os.fsync(pixel_file.fileno())
            index_file.write("".join(f"{n}\t{rows[n]}\n" for n in pending_names))
            index_file.flush()
            os.fsync(index_file.fileno())
            pending_names.clear()

        jobs = ((name, str(path), preprocessing) for name, path in todo)
        bar = tqdm(total=len(todo), desc=f"prepare {size}px", unit="img", disable=not progress, file=sys.stderr)
        pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent) if workers > 1 else None
        try:
            results = pool.map(_work, jobs, chunksize=8) if pool else map(_work, jobs)
            for name, pixels, error in results:
                bar.update(1)
                if error is not None:
                    failed.append((name, error))
                    continue
                assert pixels.nbytes == row_bytes
                pixel_file.write(pixels.tobytes())
                rows[name] = len(rows)
                pending_names.append(name)
                if len(pending_names) >= flush_every:
                    commit()
        finally:
            commit()
            bar.close()
            if pool:
                pool.shutdown(cancel_futures=True)
    (out / FAILED).write_text("".join(f"{n}\t{m}\n" for n, m in failed), encoding="utf-8")
    return PrepareSummary(cached_before, len(rows) - cached_before, failed, time.perf_counter() - started, len(rows))
