"""Downloading NIH ChestX-ray14's 12 official image archives.

Each archive (``images_001.tar.gz`` … ``images_012.tar.gz``, about 42 GB in all)
is fetched with resume of partial files (HTTP Range), retries with exponential
backoff, MD5 verification against NIH's published sums, and safe extraction into
``DIR/images_NNN/images/*.png``, the layout :func:`cxrlearn.data.decoding.images.find_images`
reads. ``--parts 1`` gives the first archive's 4,999 images: a real small dataset.

The addresses and sums ship with cxrlearn (``tables/nih_archives.tsv``, from NIH's
download script), and so do NIH's label table, official split lists and boxes:
they are copied beside the images, so that a download is a complete dataset. Only the standard library is used: a download needs nothing
beyond ``urllib``, and each step is short enough to read.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from cxrlearn._files import file_digest
from cxrlearn.data.sources import tables
from cxrlearn.errors import DataError

log = logging.getLogger(__name__)


CHUNK = 1 << 20
COMPLETE = ".complete"
#: All twelve of NIH's image archives.
ALL_PARTS = "1-12"
#: Tries per archive after a failure, and seconds without data before one.
RETRIES, STALL_TIMEOUT_S = 5, 60.0


#: What an archive's name may be: a plain file name (no folder, no leading dot, no ``..``), so that neither the
#: download nor the folder it is extracted into can be anywhere but inside ``--to``.
#: At most 200 characters, so that the partial download's and the staging folder's names (a few more) stay under
#: the 255 bytes a file name may have.
ARCHIVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,192}\.(tar\.gz|tgz|tar)")


@dataclass(frozen=True)
class Archive:
    name: str  # images_001.tar.gz
    url: str
    md5: str

    @property
    def folder(self) -> str:
        """The folder it is extracted into: images_001."""
        return self.name.split(".", 1)[0]


def read_archives(path: str | os.PathLike | None = None) -> list[Archive]:
    """The archive list (``archive, url, md5`` tab-separated); cxrlearn's own copy by default."""
    if path is None:
        text = tables.packaged(tables.ARCHIVES).read_text(encoding="utf-8")
        source = "nih_archives.tsv"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: the archive list is not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise DataError(f"{path}: cannot read the archive list: {err.strerror or err}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].split("\t")[:3] != ["archive", "url", "md5"]:
        raise DataError(f"{source}: an archive list starts with the header archive<TAB>url<TAB>md5")
    archives = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) < 3 or not re.fullmatch(r"[0-9a-fA-F]{32}", cells[2].strip()):
            raise DataError(f"{source}: line {number} is not archive<TAB>url<TAB>md5 (32 hex digits)")
        name = cells[0].strip()
        if not ARCHIVE_NAME.fullmatch(name):
            raise DataError(f"{source}: line {number}: archive {name[:80]!r}{'...' if len(name) > 80 else ''} is not "
                            f"a plain file name of at most 200 characters like "
                            "images_001.tar.gz (letters, digits, '_' or '-', then .tar.gz, .tgz or .tar): it is "
                            "downloaded into, and extracted beside, the --to folder only")
        archives.append(Archive(name, cells[1].strip(), cells[2].strip().lower()))
    return archives


def parse_parts(text: str, count: int) -> list[int]:
    """``"1-12"``, ``"1,3,5-7"`` -> sorted 1-based archive numbers, each within 1..count."""
    parts: set[int] = set()
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece:
                low, high = (int(v) for v in piece.split("-", 1))
            else:
                low = high = int(piece)
        except ValueError:
            raise DataError(f"--parts: {piece!r} is not a number or a range like 1-12") from None
        if not 1 <= low <= high <= count:
            raise DataError(f"--parts: {piece!r} is outside 1-{count}")
        parts.update(range(low, high + 1))
    return sorted(parts)


class _Retry(Exception):
    """A transient failure: worth another try."""


def _fetch_into(url: str, part: Path, timeout: float, progress: bool, label: str) -> None:
    """One attempt: continue ``part`` from its current size. Raises _Retry on transient faults."""

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the file is whole
            return
        if err.code in (408, 429) or err.code >= 500:
            raise _Retry(f"HTTP {err.code}") from None
        raise DataError(f"{label}: the server answered HTTP {err.code} ({err.reason}) for {url}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, socket.gaierror):  # no name server answers for it: retrying will not help now
            host = urllib.parse.urlsplit(url).hostname
            raise DataError(f"{label}: cannot resolve the host {host} ({reason.strerror or reason}): no network "
                            "here, or no name server that knows it; run the same command again when there is "
                            "(what was downloaded is kept)") from None
        raise _Retry(str(reason)) from None
    with response:
        if offset and response.status == 206:
            mode = "ab"
        else:  # the server ignored the range (or there was none): start again
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        written = offset
        bar = tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label, disable=not progress, file=sys.stderr,
        )
        try:
            with open(part, mode) as handle:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except (http.client.IncompleteRead, TimeoutError, ConnectionError, OSError) as err:
                        raise _Retry(f"transfer cut off after {written:,} bytes ({type(err).__name__})") from None
                    if not block:
                        break
                    handle.write(block)
                    written += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
    if expected is not None and written < expected:
        raise _Retry(f"transfer cut off after {written:,} of {expected:,} bytes")


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str,
    retries: int = RETRIES,
    backoff: float = 2.0,
    timeout: float = STALL_TIMEOUT_S,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part``, and verify its MD5.

    Transient failures (cut connections, timeouts, 5xx) are retried up to
    ``retries`` times, waiting ``backoff``, 2×``backoff``, 4×… seconds. A file
    whose MD5 is wrong is downloaded once more from scratch; if it is wrong
    again the download is kept as ``dest.md5-mismatch`` (nothing is thrown away)
    and a :class:`DataError` says so.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        if file_digest(dest, "md5") == md5:
            return dest
        dest.replace(part)  # a damaged earlier download: verify again after resuming
    label = dest.name
    for fresh_start in (False, True):
        failures = 0
        while True:
            try:
                _fetch_into(url, part, timeout, progress, label)
                break
            except _Retry as err:
                failures += 1
                if failures > retries:
                    raise DataError(
                        f"{label}: giving up after {failures} tries ({err}); run the same command again "
                        f"to resume from {part.stat().st_size if part.exists() else 0:,} bytes"
                    ) from None
                wait = backoff * 2 ** (failures - 1)
                log.warning(f"{label}: {err}; retrying in {wait:g} s ({failures}/{retries})")
                time.sleep(wait)
        got = file_digest(part, "md5")
        if got == md5:
            part.replace(dest)
            return dest
        bad = dest.with_name(dest.name + ".md5-mismatch")
        part.replace(bad)
        if not fresh_start:
            log.warning(f"{label}: MD5 {got} is not NIH's {md5}; downloading it again from the start")
            continue
        raise DataError(
            f"{label}: MD5 {got} does not match the expected {md5}, twice; the download is kept as {bad}"
        )
    raise AssertionError("unreachable")


def _safe_members(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Regular files and folders that stay inside the target; anything else is refused."""
    members = []
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise DataError(f"{archive}: refusing member {member.name!r}: it would be written outside the folder")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive}: refusing member {member.name!r}: only files and folders are extracted")
        members.append(member)
    return members


def _extracted_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def extract_archive(archive: str | os.PathLike, folder: str | os.PathLike) -> int:
    """Extract a tar(.gz) into ``folder`` safely and atomically; return the file count.

    Extraction goes to a temporary sibling folder that is renamed when complete,
    so an interrupted run never leaves a half-filled folder behind.
    """
    archive, folder = Path(archive), Path(folder)
    if (folder / COMPLETE).exists():
        return _extracted_files(folder)
    if folder.exists():  # not one this download made (it would hold the marker): never delete it
        raise DataError(f"{folder} is already there and was not extracted by cxrlearn download (no {COMPLETE} "
                        f"in it); move it away, or name another --to, and run the same command again")
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _safe_members(archive, tar)
            tar.extractall(staging, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive}: cannot extract: {err}") from None
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    count = sum(1 for m in members if m.isfile())
    (staging / COMPLETE).write_text(f"{archive.name}\t{count}\n")
    staging.rename(folder)
    return count


def download_nih(
    to: str | os.PathLike,
    parts: list[int],
    archives: list[Archive] | None = None,
    keep_archives: bool = False,
    progress: bool = True,
    **download_options,
) -> dict[str, int]:
    """Fetch, verify and extract the chosen archives into ``to``; return files per archive."""
    to = Path(to)
    archives = archives if archives is not None else read_archives()
    extracted = {}
    for number in parts:
        archive = archives[number - 1]
        folder = to / archive.folder
        if (folder / COMPLETE).exists():
            count = _extracted_files(folder)
            log.info(f"{archive.name}: already extracted in {folder} ({count:,} files)")
        else:
            path = download_file(archive.url, to / archive.name, archive.md5, progress=progress, **download_options)
            count = extract_archive(path, folder)
            log.info(f"{archive.name}: {count:,} files extracted into {folder}")
            if not keep_archives:
                path.unlink()
        extracted[archive.name] = count
    copy_tables(to)
    return extracted


def copy_tables(to: str | os.PathLike) -> list[Path]:
    """Copy NIH's label table, official lists and boxes (shipped with cxrlearn) into ``to``."""
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tables.DATASET_FILES:
        target = to / name
        if not target.exists() or target.stat().st_size != tables.packaged(name).stat().st_size:
            shutil.copyfile(tables.packaged(name), target)
        written.append(target)
    return written
