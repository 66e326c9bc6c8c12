"""``cxrlearn predict --out DIR``: a whole archive into a Parquet dataset of shards, resumable, each image once.

The inputs (folders and files as ``predict`` takes them, or a manifest: :func:`read_manifest`) are cut, in their
order, into shards of at most ``shard_images`` images. A shard is predicted whole and written whole to
``DIR/part-<key>.parquet`` (a temporary name in ``DIR``, then renamed), ``key`` being a digest of the inputs it
covers, so a shard computed twice (a task retried after its node died) is the same file written twice, never two
files. Each row is one input: ``predict``'s columns (the image's name, the probabilities, the calls, the input
check, the bundle's digest and runtime), then ``path`` (the input as given), the manifest's other columns, and
``error`` (empty, or why the file could not be read: such a row has no probabilities). A rerun, after anything
(a killed worker or driver, a full disk), reads which inputs the shards already hold and predicts only the rest.
``DIR/_failures.csv`` lists every failed input of every shard, written again at the end of each run.

Engines: :func:`predict_local` in this process (``predict``'s decoding workers), and :func:`predict_on_ray`
(``--engine ray``): decoding and preparation as Ray Data CPU tasks, one shard each; the network in a pool of
actors (:class:`ShardPredictor`) that load the bundle once and write the shards. Ray is imported only there.
Both write the same rows. Every node must see the bundle, the images and ``DIR`` at the same paths (a shared
file system) and have cxrlearn installed.

What else a shard's answers go to (``--dicom-out``, ``--log``) is a :data:`ShardHook` the command passes in, called
where the shard is predicted (in the actor, on Ray) before the shard is written: a shard on disk has had its hook
run, and a rerun redoes both for a shard that is not. (This layer does not know DICOM or the log; the hook is the
command's.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Protocol
from urllib.parse import unquote, urlparse

import pandas as pd
from tqdm.auto import tqdm

from cxrlearn.data.columns import IMAGE, PATH
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.inference import PREDICT_BATCH_SIZE, SHARD_IMAGES
from cxrlearn.inference.predictor import (Prediction, Predictor, Provenance, display_names, find_inputs,
                                          prepared_files)

log = logging.getLogger(__name__)

SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
#: The columns every shard adds to ``predict``'s: the input as given (the tables' own path column), and why it
#: could not be read.
ERROR = "error"
#: Named with a leading underscore, as Parquet readers (pyarrow, Spark, pandas) skip such files in a dataset.
FAILURES_FILE = "_failures.csv"
#: A manifest's column of inputs (paths, or ``file://`` URIs).
MANIFEST_PATH = PATH


class ShardHook(Protocol):
    """Called with the predictor, the shard's key, and the shard's predicted files and their answers (in order),
    before the shard is written (module docstring); picklable, as Ray sends it to the actors."""

    summarise: bool  # whether the answers need the network's summaries (the prediction log's)

    def __call__(self, predictor: Predictor, key: str, paths: list[str], predictions: list[Prediction]) -> None: ...


@dataclass(frozen=True)
class Inputs:
    """What to predict: each input's path, the name its rows carry (``predict``'s: the file name, or the path
    where two inputs share one), and the manifest's other columns, row for row (None without a manifest)."""

    paths: list[str]
    names: list[str]
    carried: pd.DataFrame | None = None


@dataclass(frozen=True)
class Shard:
    """A run of inputs predicted and written together; ``rows`` index :class:`Inputs`."""

    rows: list[int]
    key: str

    @property
    def file(self) -> str:
        return f"{SHARD_PREFIX}{self.key}{SHARD_SUFFIX}"


@dataclass
class Summary:
    """What a run did: images predicted, skipped as already held by a shard, failed (named in _failures.csv)."""

    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    failed_in_all: int = 0  # failures in every shard of the dataset, this run's and earlier ones'

    def text(self, out: Path) -> str:
        named = f" ({self.failed_in_all:,} in all, named in {out / FAILURES_FILE})" if self.failed_in_all else ""
        return (f"{self.predicted:,} predicted, {self.skipped:,} skipped as done, {self.failed:,} failed{named}; "
                f"{out} holds {len(shard_files(out)):,} shard(s)")

    def add(self, bar: tqdm, shard: Shard, predicted: int, failed: int) -> None:
        """A shard written: counted, and shown on the progress bar."""
        self.predicted += predicted
        self.failed += failed
        self.shards.append(shard.file)
        bar.update(predicted + failed)
        bar.set_postfix({"done before": self.skipped, "failed": self.failed})


def wants_dataset(out: Path | None, engine: str) -> bool:
    """Whether ``--out`` is a Parquet dataset: with ``--engine ray``, or a folder, or a name ending ``.parquet``."""
    return out is not None and (engine != "local" or out.is_dir() or out.suffix.lower() == SHARD_SUFFIX)


def inputs_from(items: Iterable[str | os.PathLike]) -> tuple[Inputs, list[tuple[str, str]]]:
    """``predict``'s inputs (files, folders), and the files that cannot be read as files."""
    paths, unreadable = find_inputs(items)
    return Inputs([str(p) for p in paths], display_names(paths)), unreadable


def read_manifest(path: Path) -> Inputs:
    """A CSV or Parquet table with a ``path`` column (paths, relative ones to the manifest's folder, or ``file://``
    URIs); its other columns are carried to the output. Refused, naming the file, without that column, with an
    empty or a repeated input, or with a URI of another scheme."""
    try:
        table = pd.read_parquet(path) if path.suffix.lower() == SHARD_SUFFIX else pd.read_csv(path, dtype=str,
                                                                                              keep_default_na=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the manifest ({err})") from None
    if MANIFEST_PATH not in table.columns:
        raise DataError(f"{path}: the manifest has no '{MANIFEST_PATH}' column (found: {', '.join(map(str, table.columns))})")
    paths = [_manifest_path(str(value), path, i) for i, value in enumerate(table[MANIFEST_PATH])]
    repeated = pd.Series(paths)[pd.Series(paths).duplicated()]
    if len(repeated):
        raise DataError(f"{path}: {repeated.iloc[0]} is listed more than once")
    carried = table.drop(columns=[MANIFEST_PATH]).reset_index(drop=True)
    return Inputs(paths, display_names([Path(p) for p in paths]), carried if len(carried.columns) else None)


def _manifest_path(value: str, manifest: Path, row: int) -> str:
    if not value.strip():
        raise DataError(f"{manifest}: row {row + 2} has an empty {MANIFEST_PATH}")
    if "://" in value:
        parsed = urlparse(value)
        if parsed.scheme != "file":
            raise DataError(f"{manifest}: row {row + 2}: {value} is not a file:// URI or a path")
        value = unquote(parsed.path)
    return str(value if Path(value).is_absolute() else manifest.parent / value)


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}"))


def done_paths(out: Path) -> set[str]:
    """The inputs the shards in ``out`` hold (predicted or failed). A shard that cannot be read is refused by
    name: it was not written by this module (they are renamed into place whole)."""
    done: set[str] = set()
    for file in shard_files(out):
        try:
            done.update(pd.read_parquet(file, columns=[PATH])[PATH])
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{file}: not a readable shard of predictions ({err}); move it away and run again")
    return done


def plan(inputs: Inputs, out: Path, shard_images: int = SHARD_IMAGES) -> tuple[list[Shard], int]:
    """The shards still to predict (inputs no shard in ``out`` holds, in order), and how many inputs are done."""
    if shard_images < 1:
        raise ConfigError(f"shard size must be a whole number >= 1, not {shard_images!r}")
    done = done_paths(out)
    todo = [i for i, p in enumerate(inputs.paths) if p not in done]
    shards = []
    for start in range(0, len(todo), shard_images):
        rows = todo[start:start + shard_images]
        key = hashlib.sha256("\n".join(inputs.paths[i] for i in rows).encode("utf-8", "surrogateescape"))
        shards.append(Shard(rows, key.hexdigest()[:20]))
    return shards, len(inputs.paths) - len(todo)


def shard_frame(inputs: Inputs, shard: Shard, predictions: dict[int, Prediction], failures: dict[int, str],
                findings: list[str], provenance: Provenance | None) -> pd.DataFrame:
    """A shard's rows, in its inputs' order (module docstring)."""
    rows = []
    for i in shard.rows:
        if i in predictions:
            row = predictions[i].row(findings, provenance)
        else:
            row = {IMAGE: inputs.names[i], **(provenance.columns() if provenance else {})}
        row[PATH], row[ERROR] = inputs.paths[i], failures.get(i, "")
        rows.append(row)
    frame = _typed(pd.DataFrame(rows), findings)
    if inputs.carried is not None:
        frame = pd.concat([frame, inputs.carried.iloc[shard.rows].reset_index(drop=True)], axis=1)
    return frame


def _typed(frame: pd.DataFrame, findings: list[str]) -> pd.DataFrame:
    """One schema for every shard, whatever its rows: probabilities and the input score as floats, each call as a
    nullable 0/1 (empty where not called, or where the file failed), the rest as text."""
    for column in frame.columns:
        if column in findings or column == "input_score":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        elif column.endswith("_positive") and column[:-len("_positive")] in findings:
            frame[column] = pd.to_numeric(frame[column].replace("", None), errors="coerce").astype("Int8")
        else:
            frame[column] = frame[column].astype("string")
    return frame


def write_shard(frame: pd.DataFrame, out: Path, shard: Shard) -> Path:
    """``frame`` to ``out/part-<key>.parquet`` whole: a temporary name in ``out``, then renamed (a reader never
    sees half a shard; the same shard written twice is one file)."""
    target = out / shard.file
    partial = out / f".{shard.file}.{uuid.uuid4().hex}.partial"
    try:
        frame.to_parquet(partial, index=False)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def write_failures(out: Path) -> int:
    """``out/_failures.csv``: every failed input of every shard (path, error); the count."""
    frames = [pd.read_parquet(f, columns=[PATH, ERROR]) for f in shard_files(out)]
    failed = pd.concat(frames)[lambda t: t[ERROR] != ""] if frames else pd.DataFrame(columns=[PATH, ERROR])
    partial = out / f".{FAILURES_FILE}.{uuid.uuid4().hex}.partial"
    failed.sort_values(PATH).to_csv(partial, index=False)
    os.replace(partial, out / FAILURES_FILE)
    return len(failed)


def predict_shard(predictor: Predictor, inputs: Inputs, shard: Shard, prepared: Iterable[tuple[int, object, str | None]],
                  out: Path, batch_size: int, hook: ShardHook | None = None) -> tuple[int, int]:
    """Predict one shard from its prepared inputs (``(row, Prepared or None, error)``), run ``hook`` on its
    answers, and write it; (predicted, failed)."""
    predictions: dict[int, Prediction] = {}
    failures: dict[int, str] = {}
    pending: list[tuple[int, object]] = []
    if hook is not None and hook.summarise:
        predictor.summarise = True

    def flush():
        answers = predictor.predict_prepared([p for _, p in pending], [inputs.names[i] for i, _ in pending])
        predictions.update({i: a for (i, _), a in zip(pending, answers)})
        pending.clear()

    for row, ready, error in prepared:
        if ready is None:
            failures[row] = error
            continue
        pending.append((row, ready))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if hook is not None and predictions:
        rows = sorted(predictions)
        hook(predictor, shard.key, [inputs.paths[i] for i in rows], [predictions[i] for i in rows])
    write_shard(shard_frame(inputs, shard, predictions, failures, list(predictor.findings), predictor.provenance),
                out, shard)
    return len(predictions), len(failures)


def _progress(total: int, skipped: int, progress: bool) -> tqdm:
    return tqdm(total=total, desc="predict", unit="img", disable=not progress, file=sys.stderr,
                postfix={"done before": skipped, "failed": 0})


def predict_local(predictor: Predictor, inputs: Inputs, out: Path, shard_images: int = SHARD_IMAGES,
                  batch_size: int = PREDICT_BATCH_SIZE, workers: int = 0, progress: bool = True,
                  hook: ShardHook | None = None) -> Summary:
    """Every shard not yet in ``out``, in this process (``workers`` decoding processes ahead of the network)."""
    out.mkdir(parents=True, exist_ok=True)
    shards, skipped = plan(inputs, out, shard_images)
    summary = Summary(skipped=skipped)
    # One stream of prepared files for the whole run (its decoding workers start once), cut into the shards.
    todo = [Path(inputs.paths[i]) for shard in shards for i in shard.rows]
    stream = (item for batch in prepared_files(todo, predictor.preprocessing, batch_size, workers) for item in batch)
    with _progress(len(todo), skipped, progress) as bar:
        for shard in shards:
            taken = islice(stream, len(shard.rows))
            prepared = [(row, ready, error) for row, (_, ready, error) in zip(shard.rows, taken)]
            predicted, failed = predict_shard(predictor, inputs, shard, prepared, out, batch_size, hook)
            summary.add(bar, shard, predicted, failed)
    summary.failed_in_all = write_failures(out)
    return summary


# --- Ray ------------------------------------------------------------------------------------------------------

#: CPUs each model actor and each decoding task asks of Ray: fractions, so that a one-CPU node runs one model and
#: decodes beside it; unequal, so that Ray Data keeps the decoding in tasks of its own rather than fusing it into
#: the actors.
RAY_ACTOR_CPUS, RAY_DECODE_CPUS = 0.5, 0.25


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part used
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'cxrlearn[ray]'") from None
    return ray


def connect(address: str | None):
    """Ray, connected to the cluster at ``address`` (None: a local one is started). One line when it cannot be
    reached."""
    ray = _ray()
    if address and address != "auto":
        _reachable(address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours shows images, rate, time left and failures
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False if address is None else None)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"--engine ray: cannot reach a Ray cluster at {address or 'a new local one'} "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return ray


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, in one line and within seconds, a cluster address nothing answers at (Ray itself retries for
    minutes). ``ray://`` (Ray Client) addresses are left to Ray."""
    if address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise ConfigError(f"--engine ray: nothing answers at {address} (the head's host:port of `ray start --head`): "
                          f"{err}") from None


@dataclass
class ShardWork:
    """A shard as it travels through the cluster, pickled in a row's one column (:data:`WORK`): its inputs, their
    names and carried columns, then what the decoding task made of them, then what the model actor did."""

    key: str
    paths: list[str]
    names: list[str]
    carried: pd.DataFrame | None
    prepared: list | None = None  # (index, Prepared or None, error) per input, from the decoding task
    predicted: int = 0
    failed: int = 0

    @classmethod
    def of(cls, inputs: Inputs, shard: Shard) -> ShardWork:
        carried = None if inputs.carried is None else inputs.carried.iloc[shard.rows].reset_index(drop=True)
        return cls(shard.key, [inputs.paths[i] for i in shard.rows], [inputs.names[i] for i in shard.rows], carried)

    def row(self) -> dict:
        return {WORK: pickle.dumps(self)}


#: The one column of the Ray Data rows: a pickled :class:`ShardWork`.
WORK = "work"


def _decode_shard(row: dict, preprocessing) -> dict:
    """A Ray Data task: one shard's files read, decoded, checked and resized (the Predictor's own preparation)."""
    work: ShardWork = pickle.loads(row[WORK])
    paths = [Path(p) for p in work.paths]
    work.prepared = [ready for batch in prepared_files(paths, preprocessing, max(1, len(paths)), 0) for ready in batch]
    return work.row()


class ShardPredictor:
    """A Ray actor: loads the bundle once, then predicts and writes the shards it is given."""

    def __init__(self, model_dir: str, runtime: str, out: str, batch_size: int, hook: ShardHook | None = None):
        self.predictor = Predictor(model_dir, runtime=runtime)
        self.out, self.batch_size, self.hook = Path(out), batch_size, hook

    def __call__(self, batch: dict) -> dict:
        done = []
        for blob in batch[WORK]:
            work: ShardWork = pickle.loads(blob)
            inputs = Inputs(work.paths, work.names, work.carried)
            work.predicted, work.failed = predict_shard(self.predictor, inputs, Shard(list(range(len(work.paths))),
                                                                                      work.key),
                                                        work.prepared, self.out, self.batch_size, self.hook)
            work.prepared = None  # what goes back to the driver: the counts
            done.append(pickle.dumps(work))
        return {WORK: done}


def predict_on_ray(model_dir: Path, runtime: str, inputs: Inputs, out: Path, address: str | None = None,
                   actors: int | None = None, shard_images: int = SHARD_IMAGES, batch_size: int = PREDICT_BATCH_SIZE,
                   progress: bool = True, hook: ShardHook | None = None) -> Summary:
    """Every shard not yet in ``out``, on the Ray cluster at ``address`` (module docstring). ``actors``: models
    loaded at once (default: one per node)."""
    ray = connect(address)
    out.mkdir(parents=True, exist_ok=True)
    shards, skipped = plan(inputs, out, shard_images)
    summary = Summary(skipped=skipped)
    by_key = {s.key: s for s in shards}
    if shards:
        preprocessing = Predictor(model_dir, runtime=runtime).preprocessing  # a bad bundle: one line, here
        nodes = max(1, round(sum(amount for name, amount in ray.cluster_resources().items()  # alive nodes: each
                                 if name.startswith("node:") and not name.startswith("node:__"))))  # has node:<ip>
        pool = max(1, min(actors or nodes, len(shards)))
        items = [ShardWork.of(inputs, s).row() for s in shards]
        dataset = (ray.data.from_items(items, override_num_blocks=len(items))
                   .map(_decode_shard, fn_kwargs={"preprocessing": preprocessing}, num_cpus=RAY_DECODE_CPUS)
                   .map_batches(ShardPredictor, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
                                num_cpus=RAY_ACTOR_CPUS,
                                fn_constructor_kwargs={"model_dir": str(model_dir), "runtime": runtime,
                                                       "out": str(out), "batch_size": batch_size, "hook": hook}))
        started = time.monotonic()
        with _progress(sum(len(s.rows) for s in shards), skipped, progress) as bar:
            for row in dataset.iter_rows():
                done: ShardWork = pickle.loads(row[WORK])
                summary.add(bar, by_key[done.key], done.predicted, done.failed)
        log.info(f"ray: {len(shards)} shard(s) on {nodes} node(s), {pool} model(s), "
                 f"{time.monotonic() - started:.1f} s")
    summary.failed_in_all = write_failures(out)
    return summary
