"""``cxrlearn dicom poll``: results for a DICOMweb archive's radiographs, fetched and stored over HTTP.

Each round (dicomweb-client):

1. **find** (QIDO-RS): CR and DX instances, of studies dated on or after ``--since`` when given, that this
   outbox has not taken before, and whose SOP class is a radiograph's;
2. **retrieve** (WADO-RS) each into the outbox's ``received/`` (synced), logged as ``received``: an instance the
   log names is never retrieved again, so a rerun, or a poll every minute, never duplicates;
3. **predict** on what waits, in batches, making each image's structured report and secondary capture
   (:mod:`cxrlearn.dicom.predicting`, as the DICOM node does);
4. **store** (STOW-RS) the results in the archive; a result leaves ``outgoing/`` only once the archive has
   confirmed that very instance (its SOP Instance UID among the answer's ReferencedSOPSequence). An answer that
   confirms nothing (HTML, an empty body, 204, a redirect, a list of only some of them) keeps the rest waiting
   for the next round.

A misbehaving archive gets a line, never a traceback: answers of the wrong shape are refused by name; a search is
read page by page, at most :data:`MAX_PAGES` pages and :data:`SEARCH_DEADLINE_S` seconds a round (the rest waits
for the next round); redirects are not followed (a redirected POST would be re-sent without its body, and a
token to another host); an answer must arrive whole within :data:`ANSWER_DEADLINE_S` however it trickles; a
retrieved instance whose SOP Instance UID is not the one asked for is refused, not answered; and a round in which
every retrieval failed says so (the command exits 2).

The outbox is the same folder the node uses (:mod:`cxrlearn.dicom.outbox`), so ``cxrlearn dicom status`` reads it,
and a poll killed at any point picks up where it stopped. Its results' UIDs are derived from the source and the
bundle, so a result stored twice is one instance in the archive.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient

from cxrlearn._files import first_line
from cxrlearn.dicom.outbox import Outbox, safe_uid
from cxrlearn.dicom.predicting import predict_batch
from cxrlearn.dicom.routing import Accept
from cxrlearn.dicom.results import ResultOptions, to_bytes
from cxrlearn.dicom.source import RADIOGRAPH_CLASSES, patient_key
from cxrlearn.errors import ConfigError
from cxrlearn.inference.predictor import Predictor
from cxrlearn.monitoring.log import PredictionLog

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
#: A search read page by page: at most this many pages (of the archive's size) and seconds a round.
MAX_PAGES, SEARCH_DEADLINE_S = 200, 120.0
#: Seconds one answer may take to arrive whole, however it trickles (each read also has TIMEOUT_S).
ANSWER_DEADLINE_S = 300.0


class ArchiveError(Exception):
    """The archive answered, but not as DICOMweb says it must: what was wrong, in a few words."""


class AnswerTooSlow(requests.Timeout):
    """An answer that did not arrive whole within :data:`ANSWER_DEADLINE_S`."""


class _ArchiveSession(requests.Session):
    """A session that follows no redirect and gives each answer :data:`ANSWER_DEADLINE_S` to arrive whole.

    A redirected search or retrieval is an error (a token must not follow it to another host); a redirected store
    is answered as it came, so it confirms nothing and the results stay (dicomweb-client retries a request that
    raised, and a store's body, sent in chunks, would go again empty). An answer's body is read as it arrives and
    abandoned at the deadline: a server that trickles a byte at a time within each read's timeout cannot hold a
    round for ever."""

    last_redirect: str | None = None

    def request(self, method, url, *args, **kwargs):
        kwargs["allow_redirects"] = False
        kwargs["stream"] = True
        started = time.monotonic()
        response = super().request(method, url, *args, **kwargs)
        if response.is_redirect:
            response.close()
            self.last_redirect = (f"HTTP {response.status_code} to {response.headers.get('Location', '?')[:200]}: a "
                                  "redirect, which is not followed (give the archive's own DICOMweb root)")
            if method.upper() != "POST":
                raise requests.HTTPError(self.last_redirect, response=response)
            return response
        chunks = []
        try:
            while chunk := response.raw.read1(1 << 16, decode_content=True):
                chunks.append(chunk)
                if time.monotonic() - started > ANSWER_DEADLINE_S:
                    raise AnswerTooSlow(f"no whole answer within {ANSWER_DEADLINE_S:g} s")
        finally:
            response.close()
        response._content, response._content_consumed = b"".join(chunks), True
        return response


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
    retrieved: int  # of those, retrieved into the outbox
    predicted: int
    stored: int  # results the archive confirmed
    waiting: int  # results still to store
    failure: str | None  # why the round could not finish, if it could not


def _value(entry: dict, tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON data set, when it is text; None otherwise."""
    element = entry.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    value = values[0] if isinstance(values, list) and values else None
    return value if isinstance(value, str) else None


def _confirmed(answer) -> set[str]:
    """The SOP Instance UIDs a STOW-RS answer says were stored (PS3.18 10.5.3: ReferencedSOPSequence)."""
    try:
        items = answer.get("ReferencedSOPSequence") or []
        return {str(item.get("ReferencedSOPInstanceUID", "")) for item in items}
    except (AttributeError, TypeError):
        return set()


def _failures(answer) -> dict[str, str]:
    try:
        return {str(item.get("ReferencedSOPInstanceUID", "")): str(item.get("FailureReason", "none given"))
                for item in answer.get("FailedSOPSequence") or []}
    except (AttributeError, TypeError):
        return {}


class Poller:
    """One model, one archive, one outbox; :meth:`run_round` once, or every ``--interval`` seconds."""

    def __init__(self, predictor: Predictor, outbox: Outbox, url: str, since: datetime.date | None = None,
                 token: str | None = None, batch: int = POLL_BATCH, prediction_log: PredictionLog | None = None,
                 accept: Accept = Accept(), options: ResultOptions = ResultOptions()):
        self.predictor, self.outbox, self.url, self.since, self.batch = predictor, outbox, url.rstrip("/"), since, batch
        self.accept, self.options = accept, options
        self.prediction_log = prediction_log
        if prediction_log is not None:
            predictor.summarise = True
        self.session = session = _ArchiveSession()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        self.client = DICOMwebClient(self.url, session=session, timeout=TIMEOUT_S)
        self.client.set_http_retry_params(max_attempts=HTTP_ATTEMPTS, wait_exponential_multiplier=HTTP_BACKOFF_MS)
        self.taken = outbox.taken()  # read once, then kept up to date
        self.cut_short: str | None = None  # why the last search stopped before its end, if it did
        predictor.with_gradients()  # Grad-CAM's torch model, loaded before the first image

    # ---- 1. find --------------------------------------------------------------------------------------
    def find(self) -> list[Found]:
        """New radiograph instances in the archive, by QIDO-RS (one search per modality, page by page, within
        :data:`MAX_PAGES` and :data:`SEARCH_DEADLINE_S`). Raises :class:`ArchiveError` for an answer that is not
        a list of DICOM JSON data sets."""
        found: dict[str, Found] = {}
        deadline = time.monotonic() + SEARCH_DEADLINE_S
        self.cut_short = None
        for modality in MODALITIES:
            filters = {"Modality": modality}
            if self.since:
                filters["StudyDate"] = f"{self.since:%Y%m%d}-"
            offset = 0
            for page in range(MAX_PAGES + 1):
                if page == MAX_PAGES or time.monotonic() > deadline:
                    self.cut_short = (f"the {modality} search did not end within {MAX_PAGES} pages or "
                                      f"{SEARCH_DEADLINE_S:g} s; the rest is searched next round")
                    log.warning("%s: %s", self.url, self.cut_short)
                    break
                entries = self.client.search_for_instances(search_filters=filters, offset=offset)
                if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                    raise ArchiveError(f"its {modality} search answered {type(entries).__name__} where a list of "
                                       "DICOM JSON data sets belongs")
                new = 0
                for entry in entries:
                    study, series, sop = (_value(entry, tag) for tag in (STUDY_UID, SERIES_UID, SOP_UID))
                    sop_class = _value(entry, SOP_CLASS)
                    if not (study and series and sop) or (sop_class and sop_class not in RADIOGRAPH_CLASSES):
                        continue
                    if sop not in self.taken and sop not in found:
                        found[sop] = Found(study, series, sop)
                        new += 1
                if not entries or (new == 0 and page > 0):  # the end, or an archive that ignores the offset
                    break
                offset += len(entries)
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
            got = str(ds.get("SOPInstanceUID", "")).strip()
        except requests.RequestException as err:
            log.warning("could not retrieve %s: %s (tried again next round)", uid, _reason(err))
            return False
        except Exception as err:  # noqa: BLE001 - a damaged instance: refused, and the poll goes on
            self.outbox.refuse_unread(uid, f"{uid}: the archive's copy cannot be read ({type(err).__name__}: {err})")
            self.taken.add(uid)
            return False
        if got != uid:  # never answer one instance with another's results
            self.outbox.refuse_unread(uid, f"{uid}: the archive answered with instance {got[:64] or 'without a UID'}"
                                           " instead; no result is made")
            self.taken.add(uid)
            return False
        self.outbox.receive(uid, data, patient_key(ds))
        self.taken.add(uid)
        return True

    # ---- 4. store -------------------------------------------------------------------------------------
    def store(self, results: list[Path]) -> int:
        """Results into the archive by STOW-RS, :data:`POLL_BATCH` per request; the number confirmed (each by its
        SOP Instance UID in the answer). Raises ``requests.RequestException`` when the archive cannot be reached
        (the results stay queued)."""
        stored = 0
        for start in range(0, len(results), self.batch):
            chunk = []
            for path in results[start:start + self.batch]:
                if (taken := self.outbox.take_result(path)) is not None:
                    chunk.append((path, *taken))
            if not chunk:
                continue
            self.session.last_redirect = None
            try:
                answer = self.client.store_instances([ds for _, ds, _ in chunk])
            except (ValueError, KeyError, TypeError, AttributeError) as err:  # says JSON or XML, is not
                answer = None
                log.warning("%s answered a store with what is not DICOM JSON or XML (%s)", self.url, err)
            confirmed, failed = _confirmed(answer), _failures(answer)
            redirect = self.session.last_redirect
            for path, ds, stamp in chunk:
                uid = str(ds.SOPInstanceUID)
                if uid in confirmed and uid not in failed:
                    self.outbox.sent(path, self.url, stamp)
                    stored += 1
                else:
                    why = (f"failure reason {failed[uid]}" if uid in failed else redirect or
                           "the archive's answer did not confirm this instance (no ReferencedSOPSequence item "
                           "names it)")
                    self.outbox.send_failed(path, self.url, why)
                    log.warning("%s: not stored in %s: %s", path.name, self.url, why)
        return stored

    # ---- a round --------------------------------------------------------------------------------------
    def run_round(self) -> Round:
        found = retrieved = predicted = stored = 0
        failure = None
        try:
            new = self.find()
            found = len(new)
            retrieved = sum(self.retrieve(instance) for instance in new)
            said = [self.cut_short] if self.cut_short else []
            if found and not retrieved:
                said.append(f"none of the {found} new instance(s) could be retrieved from {self.url}")
            failure = "; ".join(said) or None
        except requests.RequestException as err:
            failure = f"cannot search {self.url}: {_reason(err)}"
        except ArchiveError as err:
            failure = f"cannot search {self.url}: {err}"
        except ValueError as err:  # an answer that is not DICOM JSON: not a DICOMweb root
            failure = f"cannot search {self.url}: its answer is not DICOM JSON ({err}); is it the DICOMweb root?"
        while waiting := self.outbox.waiting(self.batch):
            predicted += predict_batch(self.outbox, self.predictor, waiting, prediction_log=self.prediction_log,
                                       command="dicom poll", accept=self.accept, options=self.options)
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
    if response is not None and response.is_redirect:
        return str(err)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    if isinstance(err, AnswerTooSlow):
        return str(err)
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
