"""The DICOM node's on-disk queue: nothing received is lost, nothing is sent twice under two names.

A folder, ``--outbox DIR``::

    received/<SOP Instance UID>.dcm        an instance acknowledged to its sender, waiting to be predicted on
    outgoing/<SOP Instance UID>.sr.dcm     a result waiting for the destination to confirm it
    outgoing/<SOP Instance UID>.sc.dcm
    refused/<SOP Instance UID>.txt (.dcm)  why an instance got no result (and the instance, when it was read)
    log.jsonl                              one line per event: received, predicted, sent, send failed, refused

Every file is written whole or not at all (:func:`cxrlearn._files.write_atomic`, synced) before the step that
depends on it: an instance is on disk before its sender hears "success"; its results are on disk before it
leaves ``received/``; a result leaves ``outgoing/`` only after the destination's success status. A node killed
at any point (even ``kill -9``) finds, when started again, what is left to do in these folders. Redoing a step
is harmless: results' UIDs come from the source instance and the bundle
(:func:`cxrlearn.dicom.results.derived_uid`), so a result predicted or sent twice is the same instance, which a
PACS stores once.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cxrlearn._files import write_atomic

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


class Outbox:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for name in (RECEIVED, OUTGOING, REFUSED):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._log_lock = threading.Lock()

    # ---- the steps ------------------------------------------------------------------------------------
    def receive(self, uid: str, data: bytes) -> Path:
        """An instance, synced to disk (acknowledge it only after this returns)."""
        path = self.root / RECEIVED / f"{safe_uid(uid)}.dcm"
        write_atomic(path, data)
        self.log("received", uid)
        return path

    def waiting(self, limit: int | None = None) -> list[Path]:
        """Received instances not yet predicted on, oldest first."""
        return _oldest_first(self.root / RECEIVED, "*.dcm")[:limit]

    def predicted(self, source: Path, results: dict[str, bytes]) -> None:
        """Results written (synced), then the source instance removed from ``received/``."""
        uid = source.stem
        for kind, data in results.items():
            write_atomic(self.root / OUTGOING / f"{uid}.{kind}.dcm", data)
        source.unlink(missing_ok=True)
        self.log("predicted", uid, results=sorted(results))

    def refuse(self, source: Path, why: str) -> None:
        """An instance no result can be made for: kept in ``refused/`` with the reason beside it."""
        target = self.root / REFUSED / source.name
        write_atomic(target.with_suffix(".txt"), why + "\n")
        os.replace(source, target)
        self.log("refused", source.stem, why=why)

    def refuse_unread(self, uid: str, why: str) -> None:
        """An instance refused before it could be read (an archive's damaged copy): only the reason is kept."""
        write_atomic(self.root / REFUSED / f"{safe_uid(uid)}.txt", why + "\n")
        self.log("refused", uid, why=why)

    def taken(self) -> set[str]:
        """Every instance this outbox ever received or refused (from its log)."""
        return {str(e.get("uid")) for e in self.events() if e.get("event") in ("received", "refused")}

    def to_send(self) -> list[Path]:
        """Results waiting for the destination, oldest first."""
        return _oldest_first(self.root / OUTGOING, "*.dcm")

    def sent(self, result: Path, destination: str) -> None:
        result.unlink(missing_ok=True)
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
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def counts(self) -> Counts:
        events = self.events()
        sends = [e for e in events if e.get("event") in ("sent", "send failed")]
        last = sends[-1] if sends else None
        return Counts(received=len(self.waiting()), outgoing=len(self.to_send()),
                      refused=len(list((self.root / REFUSED).glob("*.txt"))),
                      sent=sum(1 for e in events if e.get("event") == "sent"),
                      last_failure=last.get("why") if last and last.get("event") == "send failed" else None)


def _oldest_first(folder: Path, pattern: str) -> list[Path]:
    entries = []
    for path in folder.glob(pattern):
        try:
            entries.append((path.stat().st_mtime, path.name, path))
        except FileNotFoundError:  # taken by another step meanwhile
            continue
    return [path for _, _, path in sorted(entries)]
