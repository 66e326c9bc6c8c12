"""``cxrlearn dicom poll``: results for a DICOMweb archive's radiographs, fetched and stored over HTTP.

Each round (dicomweb-client):

1. **find** (QIDO-RS): CR and DX instances, of studies dated on or after ``--since`` when given, that this
   outbox has not taken before, and whose SOP class is a radiograph's;
2. **retrieve** (WADO-RS) each into the outbox's ``received/`` (synced), logged as ``received``: an instance the
   log names is never retrieved again, so a rerun, or a poll every minute, never duplicates;
3. **predict** on what waits, in batches, making each image's structured report and secondary capture
   (:mod:`cxrlearn.dicom.predicting`, as the DICOM node does);
4. **store** (STOW-RS) the results in the archive; a result leaves ``outgoing/`` only once the archive has
   confirmed it (HTTP 200 and not listed among the failed SOP instances). What the archive did not take waits
   for the next round.

The outbox is the same folder the node uses (:mod:`cxrlearn.dicom.outbox`), so ``cxrlearn dicom status`` reads it,
and a poll killed at any point picks up where it stopped. Its results' UIDs are derived from the source and the
bundle, so a result stored twice is one instance in the archive.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from cxrlearn._files import first_line
from cxrlearn.dicom.outbox import Outbox, safe_uid
from cxrlearn.dicom.predicting import predict_batch
from cxrlearn.dicom.results import SOURCE_CLASSES, to_bytes
from cxrlearn.errors import ConfigError
from cxrlearn.inference.predictor import Predictor

log = logging.getLogger("cxrlearn.dicom")

#: The modalities searched for: radiographs (a secondary capture's modality, OT, says nothing of what it shows).
MODALITIES = ("CR", "DX")
#: Images predicted on together, and results sent in one STOW-RS request, at most.
POLL_BATCH = 16
TIMEOUT_S = 60
#: Tries of one HTTP request (dicomweb-client retries refused connections and 429/503/504 answers, waiting 1 s,
#: then 2 s): a brief hiccup is ridden out within a round; a longer outage waits for the next round.
HTTP_ATTEMPTS, HTTP_BACKOFF_MS = 3, 500
#: DICOM JSON tags (PS3.18 F.2) read from a QIDO-RS answer.
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
FAILED_SOP_SEQUENCE = "FailedSOPSequence"


def parse_since(text: str) -> datetime.date:
    """``--since``: a date as YYYY-MM-DD or YYYYMMDD."""
    match = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})", text.strip())
    try:
        return datetime.date(*(int(g) for g in match.groups()))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise ConfigError(f"--since {text!r}: expected a date as YYYY-MM-DD") from None


@dataclass(frozen=True)
class Found:
    """An instance a QIDO-RS search named."""

    study: str
    series: str
    sop: str


@dataclass(frozen=True)
class Round:
    """What one round did."""

    found: int  # new instances found
    retrieved: int
    predicted: int
    stored: int  # results the archive confirmed
    waiting: int  # results still to store
    failure: str | None  # why the round could not finish, if it could not


def _value(entry: dict, tag: str) -> str | None:
    values = entry.get(tag, {}).get("Value") or [None]
    return values[0]


class Poller:
    """One model, one archive, one outbox; :meth:`run_round` once, or every ``--interval`` seconds."""

    def __init__(self, predictor: Predictor, outbox: Outbox, url: str, since: datetime.date | None = None,
                 token: str | None = None, batch: int = POLL_BATCH):
        self.predictor, self.outbox, self.url, self.since, self.batch = predictor, outbox, url.rstrip("/"), since, batch
        session = requests.Session()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        self.client = DICOMwebClient(self.url, session=session, timeout=TIMEOUT_S)
        self.client.set_http_retry_params(max_attempts=HTTP_ATTEMPTS, wait_exponential_multiplier=HTTP_BACKOFF_MS)
        self.taken = outbox.taken()  # read once, then kept up to date
        predictor.with_gradients()  # Grad-CAM's torch model, loaded before the first image

    # ---- 1. find --------------------------------------------------------------------------------------
    def find(self) -> list[Found]:
        """New radiograph instances in the archive, by QIDO-RS (one search per modality, every page)."""
        found: dict[str, Found] = {}
        for modality in MODALITIES:
            filters = {"Modality": modality}
            if self.since:
                filters["StudyDate"] = f"{self.since:%Y%m%d}-"
            for entry in self.client.search_for_instances(search_filters=filters, get_remaining=True):
                study, series, sop = (_value(entry, tag) for tag in (STUDY_UID, SERIES_UID, SOP_UID))
                sop_class = _value(entry, SOP_CLASS)
                if not (study and series and sop) or (sop_class and sop_class not in SOURCE_CLASSES):
                    continue
                if sop not in self.taken:
                    found[sop] = Found(study, series, sop)
        return list(found.values())

    # ---- 2. retrieve ----------------------------------------------------------------------------------
    def retrieve(self, instance: Found) -> bool:
        """One instance into ``received/`` by WADO-RS; False (logged, tried again next round) if it failed."""
        try:
            uid = safe_uid(instance.sop)
        except ValueError as err:
            log.warning("skipped an instance of study %s: %s", instance.study, err)
            self.taken.add(instance.sop)
            return False
        try:
            ds = self.client.retrieve_instance(instance.study, instance.series, instance.sop)
            data = to_bytes(ds)
        except requests.RequestException as err:
            log.warning("could not retrieve %s: %s (tried again next round)", uid, err)
            return False
        except Exception as err:  # noqa: BLE001 - a damaged instance: refused, and the poll goes on
            self.outbox.refuse_unread(uid, f"{uid}: the archive's copy cannot be read ({type(err).__name__}: {err})")
            self.taken.add(uid)
            return False
        self.outbox.receive(uid, data)
        self.taken.add(uid)
        return True

    # ---- 4. store -------------------------------------------------------------------------------------
    def store(self, results: list[Path]) -> int:
        """Results into the archive by STOW-RS, :data:`POLL_BATCH` per request; the number confirmed. Raises
        ``requests.RequestException`` when the archive cannot be reached (the results stay queued)."""
        stored = 0
        for start in range(0, len(results), self.batch):
            chunk, datasets = [], []
            for path in results[start:start + self.batch]:
                try:
                    datasets.append(pydicom.dcmread(io.BytesIO(path.read_bytes())))
                    chunk.append(path)
                except FileNotFoundError:
                    continue
            if not datasets:
                continue
            answer = self.client.store_instances(datasets)
            failed = {str(item.get("ReferencedSOPInstanceUID", "")): item.get("FailureReason")
                      for item in answer.get(FAILED_SOP_SEQUENCE, [])}
            for path, ds in zip(chunk, datasets):
                if str(ds.SOPInstanceUID) in failed:
                    self.outbox.send_failed(path, self.url, f"failure reason {failed[str(ds.SOPInstanceUID)]}")
                else:
                    self.outbox.sent(path, self.url)
                    stored += 1
        return stored

    # ---- a round --------------------------------------------------------------------------------------
    def run_round(self) -> Round:
        found = retrieved = predicted = stored = 0
        failure = None
        try:
            new = self.find()
            found = len(new)
            retrieved = sum(self.retrieve(instance) for instance in new)
        except requests.RequestException as err:
            failure = f"cannot search {self.url}: {_reason(err)}"
        except ValueError as err:  # an answer that is not DICOM JSON: not a DICOMweb root
            failure = f"cannot search {self.url}: its answer is not DICOM JSON ({err}); is it the DICOMweb root?"
        while waiting := self.outbox.waiting(self.batch):
            predicted += predict_batch(self.outbox, self.predictor, waiting)
        try:
            stored = self.store(self.outbox.to_send())
        except requests.RequestException as err:
            reason = f"cannot store in {self.url}: {_reason(err)}"
            pending = self.outbox.to_send()
            if pending:
                self.outbox.send_failed(pending[0], self.url, reason)
            failure = failure or reason
        return Round(found, retrieved, predicted, stored, len(self.outbox.to_send()), failure)


def _reason(err: requests.RequestException) -> str:
    """A failed request in a few words (requests' own message quotes the whole connection pool)."""
    response = getattr(err, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    if isinstance(err, requests.Timeout):
        return f"no answer within {TIMEOUT_S} s"
    if isinstance(err, requests.ConnectionError):
        return "no connection (is the archive running, and the URL right?)"
    return type(err).__name__


def read_token(path: str | os.PathLike) -> str:
    """``--token-file``: the bearer token on the file's first line, refused by name when there is none."""
    token = first_line(path, "token file", ConfigError)
    if not token:
        raise ConfigError(f"--token-file {path}: no token on its first line")
    return token


def check_url(url: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url.strip()):
        raise ConfigError(f"--url {url!r}: expected the archive's DICOMweb root, as http://HOST:PORT/dicom-web")
    return url.strip()
