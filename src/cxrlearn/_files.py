"""Small file helpers shared across the package."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (archives are gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def source_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a label source: a file's bytes, or, for a dataset's folder of label files, of the names and
    digests of the files directly in it (its image folders are not read)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    lines = "".join(f"{f.name}\t{file_digest(f)}\n" for f in sorted(path.iterdir()) if f.is_file())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def read_bytes(path: str | os.PathLike, what: str, error: type[Exception]) -> bytes:
    """A file's bytes, or ``error`` naming the file and what is wrong (missing, a folder, unreadable)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what}") from None
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}") from None


def first_line(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The first line of a small text file (a key, a token), stripped; "" when it has none. :func:`read_bytes`'s
    errors; bytes that are not UTF-8 are replaced, never raised on."""
    text = read_bytes(path, what, error).decode("utf-8", errors="replace").strip()
    return text.splitlines()[0].strip() if text else ""


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under umask 022).

    The umask can only be read by setting it, so it is set back at once, under a lock (threads share it).
    """
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new name in ``folder`` durable: after a power cut the file is there under its name."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a file system that cannot open folders: nothing more can be done
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def read_json_object(path: str | os.PathLike, error: type[Exception], advice: str) -> dict:
    """A JSON object from a file cxrlearn wrote, or ``error`` naming the file and what to do (``advice``) when it
    is damaged: empty, torn, not UTF-8, absurdly nested or long-numbered, or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise error(f"{path}: damaged ({type(err).__name__}: {str(err)[:120]}); {advice}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: damaged (not a JSON object); {advice}")
    return value


def utf8(text: str) -> bytes:
    """Text as UTF-8, a file name that is not (its undecodable bytes, which Python keeps as surrogates) written
    with those bytes as ``\\udcff`` escapes: the file stays valid UTF-8 and no other row is lost."""
    return text.encode("utf-8", errors="backslashreplace")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then a rename, then the folder synced.

    The file gets the mode a new file gets under the user's umask (``mkstemp``'s own 0600 would keep a
    colleague or a service account from reading a model). A run killed mid-write leaves the old file (or
    none) and a ``.tmp-*`` file that :func:`remove_stale_temporaries` clears, never a truncated one.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = utf8(data) if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(raw)
            out.flush()
            os.fchmod(out.fileno(), new_file_mode())
            os.fsync(out.fileno())
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except OSError as err:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if err.filename is None:  # a write to the open file (a full disk, a quota): name the file it was for
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete what interrupted :func:`write_atomic` calls left in ``folder``; return their names."""

    removed = []
    for stale in Path(folder).glob(".*.tmp-*"):
        if stale.is_file():
            stale.unlink()
            removed.append(stale.name)
    return removed
