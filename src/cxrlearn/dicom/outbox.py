"""The DICOM node's on-disk queue: nothing received is lost, nothing is sent twice under two names.

A folder, ``--outbox DIR``::

    received/<UID>_<key>.dcm           an instance acknowledged to its sender, waiting to be predicted on
    outgoing/<UID>_<key>.sr.dcm        a result waiting for the destination to confirm it
    outgoing/<UID>_<key>.sc.dcm
    refused/<name>.txt (and the file)  why an instance or a file got no result (and the file, where there is one)
    log.jsonl                          one line per event: received, predicted, sent, send failed, refused, ignored

``<UID>`` is the instance's SOP Instance UID and ``<key>`` a digest of its study and patient
(:func:`item_name`): two patients' instances that carry the same SOP Instance UID are two items, never one.

Every file is written whole or not at all (:func:`cxrlearn._files.write_atomic`, synced) before the step that
depends on it: an instance is on disk before its sender hears "success"; its results are on disk before it
leaves ``received/``; a result leaves ``outgoing/`` only after the destination's success status for the very
file that was sent (a result replaced meanwhile stays). A node killed at any point (even ``kill -9``) finds,
when started again, what is left to do in these folders. Redoing a step is harmless: results' UIDs come from the
source instance and the bundle (:func:`cxrlearn.dicom.results.derived_uid`), so a result predicted or sent twice
is the same instance, which a PACS stores once.

The outbox survives its own damage: an entry named ``*.dcm`` that is not a regular file (a folder, a FIFO, a
link) is moved to ``refused/`` with the reason instead of being read, and a log line that is not a JSON object
is skipped like a torn one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cxrlearn._files import write_atomic
from cxrlearn.dicom.routing import NOT_FOR_THIS_MODEL
from cxrlearn.errors import DataError

log = logging.getLogger("cxrlearn.dicom")

RECEIVED, OUTGOING, REFUSED, LOG = "received", "outgoing", "refused", "log.jsonl"
#: A SOP Instance UID as a file name: digits and dots only (PS3.5 9.1), at most 64 characters.
_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def safe_uid(uid: str) -> str:
    """``uid`` if it is a well-formed UID, safe as a file name; ValueError otherwise (a sender's bad data)."""
    uid = str(uid).strip().rstrip("\x00")
    if not _UID.match(uid) or ".." in uid:
        raise ValueError(f"SOP Instance UID {uid!r} is not a valid UID")
    return uid


@dataclass(frozen=True)
class Counts:
    """What an outbox holds now, and what its log says happened."""

    received: int  # waiting to be predicted on
    outgoing: int  # results waiting for the destination
    refused: int
    sent: int  # results the destination confirmed, ever
    last_failure: str | None  # the latest "send failed" line's reason, if the latest send attempt failed
    not_for_model: int = 0  # refused, ever, as radiographs the model is not for (cxrlearn.dicom.routing)


class Outbox:
    def __init__(self, root: str | os.PathLike, create: bool = True):
        """``create``: make the outbox's folders where they are missing (the node and the poller); without it
        (``dicom status``), a folder that is not an outbox is refused and left as it is."""
        self.root = Path(root)
        missing = [name for name in (RECEIVED, OUTGOING, REFUSED) if not (self.root / name).is_dir()]
        if missing and not create:
            raise DataError(f"{self.root}: not an outbox (no {', '.join(f'{m}/' for m in missing)} in it): a "
                            f"`cxrlearn dicom listen` or `dicom poll` outbox has all three")
        for name in missing:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._log_lock = threading.Lock()

    # ---- the steps ------------------------------------------------------------------------------------
    def receive(self, uid: str, data: bytes, key: str = "") -> Path:
        """An instance, synced to disk (acknowledge it only after this returns); ``key`` tells its patient and
        study apart (:func:`item_name`)."""
        path = self.root / RECEIVED / f"{item_name(uid, key)}.dcm"
        write_atomic(path, data)
        self.log("received", uid, file=path.name)
        return path

    def waiting(self, limit: int | None = None) -> list[Path]:
        """Received instances not yet predicted on, oldest first (entries that are not files set aside)."""
        return self._regular_files(RECEIVED)[:limit]

    def predicted(self, source: Path, results: dict[str, bytes]) -> None:
        """Results written (synced), then the source instance removed from ``received/``."""
        for kind, data in results.items():
            write_atomic(self.root / OUTGOING / f"{source.stem}.{kind}.dcm", data)
        source.unlink(missing_ok=True)
        self.log("predicted", _uid_of(source.name), file=source.name, results=sorted(results))

    def refuse(self, source: Path, why: str, results: dict[str, bytes] | None = None) -> None:
        """An instance (or an outgoing file) no result can be made or sent for: moved to ``refused/`` with the
        reason beside it, so that it never blocks another; ``results`` (a report that says it was not analysed)
        queued first, as :meth:`predicted` queues them."""
        for kind, data in (results or {}).items():
            write_atomic(self.root / OUTGOING / f"{source.stem}.{kind}.dcm", data)
        target = self.root / REFUSED / source.name
        write_atomic(target.with_name(target.name + ".txt"), why + "\n")
        try:
            os.replace(source, target)
        except FileNotFoundError:  # taken meanwhile: the reason is kept all the same
            pass
        self.log("refused", _uid_of(source.name), file=source.name, why=why)

    def refuse_unread(self, uid: str, why: str) -> None:
        """An instance refused before it could be read (an archive's damaged copy): only the reason is kept."""
        write_atomic(self.root / REFUSED / f"{safe_uid(uid)}.txt", why + "\n")
        self.log("refused", uid, why=why)

    def ignore(self, uid: str, why: str) -> None:
        """An instance acknowledged but not kept (cxrlearn's own result sent back to it)."""
        self.log("ignored", uid, why=why)

    def taken(self) -> set[str]:
        """Every instance this outbox ever received or refused (from its log)."""
        return {str(e.get("uid")) for e in self.events() if e.get("event") in ("received", "refused")}

    def to_send(self) -> list[Path]:
        """Results waiting for the destination, oldest first (entries that are not files set aside)."""
        return self._regular_files(OUTGOING)

    def take_result(self, result: Path):
        """A result to send, as (dataset, stamp of that very file: :meth:`sent` removes it only if it is still the
        one); None when it is gone, or when it is not a DICOM file that can be sent (empty, truncated, foreign: then
        it is moved to ``refused/`` with the reason, so it is never sent and never blocks another)."""
        try:
            with open(result, "rb") as handle:
                before = os.fstat(handle.fileno())
                data = handle.read()
            ds = _dataset(data)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - whatever the file holds
            why = f"{OUTGOING}/{result.name}: not a DICOM file that can be sent ({type(err).__name__}: {err})"
            self.refuse(result, why)
            log.warning("set aside %s", why)
            return None
        return ds, (before.st_ino, before.st_mtime_ns, before.st_size)

    def sent(self, result: Path, destination: str, stamp: tuple | None = None) -> None:
        """The destination confirmed ``result``: removed, unless a newer result has replaced the file since it was
        read (``stamp`` from :meth:`take_result`), which then waits for its own confirmation."""
        try:
            now = os.stat(result)
            if stamp is None or (now.st_ino, now.st_mtime_ns, now.st_size) == stamp:
                result.unlink()
        except FileNotFoundError:
            pass
        self.log("sent", result.name.removesuffix(".dcm"), to=destination)

    def send_failed(self, result: Path, destination: str, why: str) -> None:
        self.log("send failed", result.name.removesuffix(".dcm"), to=destination, why=why)

    # ---- the record -----------------------------------------------------------------------------------
    def log(self, event: str, uid: str, **details) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, "uid": uid, **details})
        with self._log_lock, open(self.root / LOG, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def events(self) -> list[dict]:
        """The log's lines (a line torn by a crash mid-write is skipped)."""
        path = self.root / LOG
        if not path.exists():
            return []
        events = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(event, dict):  # a line that is JSON but not an object ("42", "null", "[1]") is skipped
                events.append(event)
        return events

    def counts(self) -> Counts:
        events = self.events()
        sends = [e for e in events if e.get("event") in ("sent", "send failed")]
        last = sends[-1] if sends else None
        return Counts(received=len(self.waiting()), outgoing=len(self.to_send()),
                      refused=len(list((self.root / REFUSED).glob("*.txt"))),
                      sent=sum(1 for e in events if e.get("event") == "sent"),
                      last_failure=str(last.get("why")) if last and last.get("event") == "send failed" else None,
                      not_for_model=sum(1 for e in events if e.get("event") == "refused"
                                        and NOT_FOR_THIS_MODEL in str(e.get("why"))))

    def _regular_files(self, folder: str) -> list[Path]:
        """The ``*.dcm`` files of a folder, oldest first; any other entry of that name (a folder, a FIFO, a link:
        reading one could loop or hang) is moved to ``refused/`` with the reason."""
        entries = []
        for path in (self.root / folder).glob("*.dcm"):
            try:
                info = os.lstat(path)
            except FileNotFoundError:  # taken by another step meanwhile
                continue
            if stat.S_ISREG(info.st_mode):
                entries.append((info.st_mtime, path.name, path))
            else:
                kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                        else "a link" if stat.S_ISLNK(info.st_mode) else "not a regular file")
                self.refuse(path, f"{folder}/{path.name}: {kind}, not a DICOM file: set aside")
        return [path for _, _, path in sorted(entries)]


def _dataset(data: bytes):
    """An outgoing file's bytes as the dataset to send; ValueError when it is not one."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not str(ds.get(keyword, "")).strip():
            raise ValueError(f"it has no {keyword}")
    return ds


def item_name(uid: str, key: str = "") -> str:
    """An instance's name in the outbox: its SOP Instance UID (checked), and with ``key`` (its study and patient) a
    digest of it, so that another patient's instance with the same UID is another item."""
    uid = safe_uid(uid)
    return f"{uid}_{hashlib.sha256(key.encode()).hexdigest()[:12]}" if key else uid


def _uid_of(name: str) -> str:
    """The SOP Instance UID an outbox file's name starts with."""
    stem = name.split("_")[0].removesuffix(".dcm")
    return stem.removesuffix(".sr").removesuffix(".sc")
