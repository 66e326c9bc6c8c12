"""The prediction log: one row per answered image, written in the same step as the answer, by ``predict --log``,
``serve --log`` and the DICOM node and poller (into their outbox by default).

A log is an SQLite file (the standard library's; write-ahead logging, so the service's threads and several
processes write to one file, and a writer killed mid-way loses no committed row). Each row holds:

* when, which command, the source's name (a file name, an SOP Instance UID, a request id), and what computed the
  answer (:class:`cxrlearn.inference.predictor.Provenance`, and the digest of the reference its summary was
  projected with);
* every finding's probability and call, and the input check's verdict and score;
* the image's summary (:class:`cxrlearn.model.reference.ImageSummary`): pixel statistics, the projection of its
  features, its size;
* for DICOM inputs, the tags drift studies use (:class:`AcquisitionTags`).

No pixels and no names are stored. A Patient ID is stored only as a keyed hash (HMAC-SHA-256 with the site's key
file, by default ``LOG.key`` beside the log, made once), so the log is not a second copy of the PACS but one
patient's answers can still be told apart. The log has a schema version; :data:`MIGRATIONS` brings an older one up
to date, and a newer one is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
import json
import os
import secrets
import sqlite3
import threading
import urllib.parse
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from cxrlearn.errors import ConfigError
from cxrlearn.inference.predictor import Prediction, Predictor, Provenance
from cxrlearn.model.reference import ImageSummary

#: The log's schema version: what :data:`MIGRATIONS` brings every log to.
SCHEMA_VERSION = 1
#: The table that marks an SQLite file as a cxrlearn prediction log (its schema version in it).
META_TABLE = "cxrlearn_log"
ANSWERS_TABLE = "answers"
#: The DICOM node's and poller's log, in their outbox, unless ``--log`` names another.
NODE_LOG = "predictions.sqlite"
#: How long a writer waits for another's transaction to end, in seconds.
BUSY_TIMEOUT_S = 30


@dataclass(frozen=True)
class AcquisitionTags:
    """The DICOM attributes drift studies watch (CheXstray; the ACR's Assess-AI registry), as written in the
    source instance (None where absent). Read by :func:`acquisition_tags`."""

    modality: str | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    view_position: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    bits_stored: int | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing: str | None = None
    kvp: float | None = None
    exposure: float | None = None
    patient_sex: str | None = None
    patient_age: str | None = None
    study_date: str | None = None
    accession_number: str | None = None


#: Each field of :class:`AcquisitionTags` and the DICOM keyword it is read from.
KEYWORDS = {
    "modality": "Modality", "manufacturer": "Manufacturer", "manufacturer_model": "ManufacturerModelName",
    "view_position": "ViewPosition", "body_part": "BodyPartExamined", "photometric": "PhotometricInterpretation",
    "bits_stored": "BitsStored", "rows": "Rows", "columns": "Columns", "pixel_spacing": "PixelSpacing", "kvp": "KVP",
    "exposure": "Exposure", "patient_sex": "PatientSex", "patient_age": "PatientAge", "study_date": "StudyDate",
    "accession_number": "AccessionNumber",
}
#: Each field of :class:`AcquisitionTags` and the type its value is read as.
TAG_TYPES: dict[str, type] = {f.name: (int if "int" in str(f.type) else float if "float" in str(f.type) else str)
                              for f in fields(AcquisitionTags)}


def _value(dataset, keyword: str, kind: type):
    try:
        value = getattr(dataset, keyword, None)
    except Exception:  # noqa: BLE001 - a malformed element (pydicom raises its own types) is as good as absent
        return None
    if value is None or value == "":
        return None
    if kind is str:
        text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return text[:64] or None  # a long string is a damaged element, not a tag worth keeping whole
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def acquisition_tags(dataset) -> AcquisitionTags:
    """The :class:`AcquisitionTags` of a pydicom data set (an element that cannot be read is None)."""
    return AcquisitionTags(**{name: _value(dataset, KEYWORDS[name], TAG_TYPES[name]) for name in KEYWORDS})


def patient_id(dataset) -> str | None:
    """The data set's Patient ID, or None."""
    return _value(dataset, "PatientID", str)


def file_tags(source: Path | BinaryIO) -> tuple[AcquisitionTags | None, str | None]:
    """A DICOM file's (a path, or its bytes as a file object) :class:`AcquisitionTags` and Patient ID; (None, None)
    for a file that is not DICOM or whose header cannot be read."""
    import pydicom  # only where there is a DICOM file to read

    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM (an image file), or a header pydicom cannot read: no tags
        return None, None
    return acquisition_tags(ds), patient_id(ds)


@dataclass(frozen=True)
class Answered:
    """One answer to record: the prediction, the source's name, and for a DICOM input its tags and Patient ID
    (which the log keeps only as a keyed hash)."""

    prediction: Prediction
    source: str
    tags: AcquisitionTags | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class LoggedAnswer:
    """A row of the log, read back."""

    id: int
    answered_at: datetime
    command: str
    source: str
    model_sha256: str
    runtime: str
    runtime_sha256: str
    cxrlearn_version: str
    reference_sha256: str | None
    findings: tuple[str, ...]
    probabilities: tuple[float, ...]
    positive: tuple[str, ...] | None
    not_called: tuple[str, ...]
    input_check: str
    input_score: float | None
    flagged: bool
    pixel_statistics: tuple[float, ...] | None
    projection: tuple[float, ...] | None
    width: int | None
    height: int | None
    tags: AcquisitionTags
    patient_hash: str | None


_TAG_COLUMNS = [f.name for f in fields(AcquisitionTags)]


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases a log can live in (SQLite, PostgreSQL)."""

    name: str
    placeholder: str
    serial: str  # the id column
    real: str
    list_tables: str
    set_version: str


SQLITE = Dialect("SQLite", "?", "id INTEGER PRIMARY KEY AUTOINCREMENT", "REAL",
                 "SELECT name FROM sqlite_master WHERE type = 'table'",
                 f"INSERT OR REPLACE INTO {META_TABLE} VALUES ('schema_version', ?)")
POSTGRES = Dialect("PostgreSQL", "%s", "id BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION",
                   "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
                   f"INSERT INTO {META_TABLE} VALUES ('schema_version', %s) "
                   "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value")


def migrations(dialect: Dialect) -> dict[int, list[str]]:
    """Each schema version's statements, applied in order to bring a log from the version before it."""
    kind = {int: "INTEGER", float: dialect.real, str: "TEXT"}
    return {
        1: [
            f"CREATE TABLE {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            f"""CREATE TABLE {ANSWERS_TABLE} (
                {dialect.serial},
                answered_at TEXT NOT NULL, command TEXT NOT NULL, source TEXT NOT NULL,
                model_sha256 TEXT NOT NULL, runtime TEXT NOT NULL, runtime_sha256 TEXT NOT NULL,
                cxrlearn_version TEXT NOT NULL, reference_sha256 TEXT,
                findings TEXT NOT NULL, probabilities TEXT NOT NULL, positive TEXT, not_called TEXT NOT NULL,
                input_check TEXT NOT NULL, input_score {dialect.real}, flagged INTEGER NOT NULL,
                pixel_statistics TEXT, projection TEXT, width INTEGER, height INTEGER,
                {", ".join(f"{name} {kind[TAG_TYPES[name]]}" for name in _TAG_COLUMNS)},
                patient_hash TEXT)""",
            f"CREATE INDEX answers_by_time ON {ANSWERS_TABLE} (model_sha256, answered_at)",
        ],
    }


MIGRATIONS = migrations(SQLITE)
_COLUMNS = ["answered_at", "command", "source", "model_sha256", "runtime", "runtime_sha256", "cxrlearn_version",
            "reference_sha256", "findings", "probabilities", "positive", "not_called", "input_check", "input_score",
            "flagged", "pixel_statistics", "projection", "width", "height", *_TAG_COLUMNS, "patient_hash"]
#: The URL schemes of a log in a database server (``postgresql://user@host:port/database``).
DATABASE_SCHEMES = ("postgresql", "postgres")


def _json(values) -> str | None:
    return None if values is None else json.dumps(list(values))


def _tuple(text: str | None) -> tuple | None:
    return None if text is None else tuple(json.loads(text))


def _shown(url: str) -> str:
    """A database URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class PredictionLog:
    """``PredictionLog(target).record(answers, predictor, command)`` from any thread or process; ``answers()``
    reads the rows back. ``target``: an SQLite file, or a PostgreSQL URL (``postgresql://user@host/db``, with the
    optional extra ``cxrlearn[postgres]``) where several nodes write to one database. ``key_file``: the site's key
    for Patient IDs (for a file, by default ``LOG.key`` beside it, made when first needed; for a database, given,
    the same file on every node)."""

    def __init__(self, target: str | os.PathLike, key_file: str | os.PathLike | None = None, create: bool = True):
        text = str(target)
        self._key: bytes | None = None
        self._lock = threading.Lock()
        if urllib.parse.urlsplit(text).scheme in DATABASE_SCHEMES:
            self._connect_database(text, key_file, create)
            return
        if "://" in text:
            raise ConfigError(f"--log {text[:200]}: a log is an SQLite file or a postgresql:// URL")
        self.path, self.name, self.dialect = Path(text), text, SQLITE
        if not create and not self.path.is_file():
            raise ConfigError(f"{self.path}: no such prediction log")
        if self.path.is_dir():
            raise ConfigError(f"{self.path}: a folder, not a prediction log file")
        self.key_file: Path | None = Path(key_file) if key_file else self.path.with_name(self.path.name + ".key")
        self._errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False,
                                       isolation_level=None)
            self._open(create)
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"{self.path}: not a cxrlearn prediction log ({err})") from None
        except OSError as err:
            raise ConfigError(f"{self.path}: cannot open the prediction log ({err.strerror or err})") from None

    def _connect_database(self, url: str, key_file, create: bool) -> None:
        self.path, self.name, self.dialect = None, _shown(url), POSTGRES
        if importlib.util.find_spec("psycopg") is None:
            raise ConfigError(f"--log {self.name}: a PostgreSQL log needs psycopg; install the extra: "
                              "pip install 'cxrlearn[postgres]'")
        if key_file is None and create:
            raise ConfigError(f"--log {self.name}: give --site-key FILE, the key Patient IDs are hashed with (the same "
                              "file on every node that writes to this database)")
        self.key_file = Path(key_file) if key_file else None
        import psycopg

        self._errors = (psycopg.Error,)
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as err:
            raise ConfigError(f"--log {self.name}: cannot reach the database ({str(err).strip().splitlines()[0]})"
                              ) from None
        try:
            self._open(create)
        except psycopg.Error as err:
            raise ConfigError(f"--log {self.name}: {str(err).strip().splitlines()[0]}") from None

    def _execute(self, statement: str, arguments: tuple = ()):
        return self._db.execute(statement.replace("?", self.dialect.placeholder), arguments)

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction, serialised against other writers (SQLite's write lock, a PostgreSQL advisory lock)."""
        if self.dialect is POSTGRES:
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(20261202)")
                yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _tables(self) -> set[str]:
        return {name for (name,) in self._execute(self.dialect.list_tables).fetchall()}

    def _open(self, create: bool) -> None:
        tables = self._tables()
        if tables and META_TABLE not in tables:
            raise ConfigError(f"{self.name}: not a cxrlearn prediction log (a database with other tables: "
                              f"{', '.join(sorted(tables)[:5])})")
        if self.dialect is SQLITE and (META_TABLE in tables or create):
            self._db.execute("PRAGMA journal_mode=WAL")
        version = self.schema_version() if META_TABLE in tables else 0
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{self.name}: a prediction log of schema version {version}, written by a newer "
                              f"cxrlearn (this one reads up to {SCHEMA_VERSION}); upgrade cxrlearn")
        if version < SCHEMA_VERSION and not create:
            raise ConfigError(f"{self.name}: an empty or older prediction log; a command that writes it "
                              "(predict --log) brings it up to date")
        if version == SCHEMA_VERSION:
            return
        with self._lock, self._transaction():
            version = self.schema_version() if META_TABLE in self._tables() else 0  # another writer may have won
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in migrations(self.dialect)[step]:
                    self._db.execute(statement)
            if version < SCHEMA_VERSION:
                self._execute(self.dialect.set_version, (str(SCHEMA_VERSION),))

    def schema_version(self) -> int:
        row = self._execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- writing ---------------------------------------------------------------------------------------
    def _patient_hash(self, patient: str | None) -> str | None:
        if not patient:
            return None
        if self._key is None:
            if self.key_file is None:
                raise ConfigError(f"{self.name}: no site key to hash Patient IDs with (--site-key FILE)")
            self._key = _site_key(self.key_file)
        return hmac.new(self._key, patient.encode("utf-8"), hashlib.sha256).hexdigest()

    def record(self, answers: Sequence[Answered], predictor: Predictor, command: str) -> None:
        """One row per answer of ``predictor``'s, in one transaction: all of them are in the log when this returns,
        or none (and :class:`ConfigError` says why)."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        rows = [self._row(answer, predictor.provenance, command, predictor.reference_sha256, predictor.findings, now)
                for answer in answers]
        if not rows:
            return
        statement = (f"INSERT INTO {ANSWERS_TABLE} ({', '.join(_COLUMNS)}) "
                     f"VALUES ({', '.join(self.dialect.placeholder for _ in _COLUMNS)})")
        with self._lock:
            try:
                with self._transaction():
                    self._db.cursor().executemany(statement, rows)
            except self._errors as err:
                raise ConfigError(f"{self.name}: could not record {len(rows)} answer(s) in the prediction log "
                                  f"({str(err).strip().splitlines()[0] if str(err).strip() else err})") from None

    def _row(self, answer: Answered, provenance: Provenance, command: str, reference_sha256: str | None,
             findings: Sequence[str], now: str) -> tuple:
        prediction = answer.prediction
        names = list(findings) or list(prediction.probabilities)
        summary: ImageSummary | None = prediction.summary
        tags = answer.tags or AcquisitionTags()
        return (now, command, answer.source, provenance.model_sha256, provenance.runtime, provenance.runtime_sha256,
                provenance.cxrlearn_version, reference_sha256 if summary and summary.projection else None,
                _json(names), _json(round(prediction.probabilities[name], 6) for name in names),
                _json(prediction.positive), _json(prediction.not_called), prediction.input_check,
                prediction.input_score, int(prediction.flagged),
                _json(summary.pixels) if summary else None, _json(summary.projection) if summary else None,
                summary.width if summary else None, summary.height if summary else None,
                *(getattr(tags, name) for name in _TAG_COLUMNS), self._patient_hash(answer.patient_id))

    # ---- reading ---------------------------------------------------------------------------------------
    def answers(self, since: datetime | None = None) -> list[LoggedAnswer]:
        """Every row (those answered at or after ``since``), oldest first."""
        query = f"SELECT id, {', '.join(_COLUMNS)} FROM {ANSWERS_TABLE}"
        arguments: tuple[Any, ...] = ()
        if since is not None:
            query += " WHERE answered_at >= ?"
            arguments = (since.astimezone(timezone.utc).isoformat(timespec="milliseconds"),)
        with self._lock:
            try:
                rows = self._execute(query + " ORDER BY answered_at, id", arguments).fetchall()
            except self._errors as err:
                raise ConfigError(f"{self.name}: the prediction log cannot be read ({err})") from None
        try:
            return [_logged(row) for row in rows]
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{self.name}: a row of the prediction log is damaged ({err})") from None


def _logged(row: tuple) -> LoggedAnswer:
    (row_id, answered_at, command, source, model_sha256, runtime, runtime_sha256, version, reference_sha256, findings,
     probabilities, positive, not_called, input_check, input_score, flagged, pixels, projection, width, height,
     *rest) = row
    tags, patient_hash = AcquisitionTags(*rest[:len(_TAG_COLUMNS)]), rest[len(_TAG_COLUMNS)]
    return LoggedAnswer(row_id, datetime.fromisoformat(answered_at), command, source, model_sha256, runtime,
                        runtime_sha256, version, reference_sha256, _tuple(findings), _tuple(probabilities),
                        _tuple(positive), _tuple(not_called), input_check, input_score, bool(flagged), _tuple(pixels),
                        _tuple(projection), width, height, tags, patient_hash)


def _site_key(path: Path) -> bytes:
    """The site's key for Patient IDs, made (32 random bytes, readable by its owner alone) where there is none."""
    if not path.exists():
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass  # another writer made it first
        except OSError as err:
            raise ConfigError(f"{path}: cannot make the site key for Patient IDs ({err.strerror or err})") from None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the site key for Patient IDs ({err})") from None
    if len(key) < 32:
        raise ConfigError(f"{path}: the site key for Patient IDs is shorter than 32 characters (damaged?)")
    return key.encode("utf-8")
