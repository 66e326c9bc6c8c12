"""`cxrlearn train`: from a label table and images (or a cache) to a model bundle.

Steps, each reusing what an earlier run left where it can:

1. read the label table; find the images present;
2. the split: the given file, or the custom patient-wise split of the images
   present (saved as ``RUN_DIR/split.csv`` with its report);
3. the preprocessing cache at the training size (built or extended);
4. the model with ImageNet weights (:mod:`cxrlearn.model.pretrained`);
5. Lightning: checkpoints (best by validation mean AUC, and last), early
   stopping, CSV and TensorBoard logs, AMP and DDP from the config;
6. the bundle in ``RUN_DIR``: the best weights, ``model.json`` and the metrics of
   the best checkpoint on val (and on test when the split has one).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import timm
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import (EarlyStopping, EMAWeightAveraging, LearningRateMonitor,
                                         ModelCheckpoint)
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.environments import SLURMEnvironment
from torch.utils.data import DataLoader, Subset

from cxrlearn import __version__
from cxrlearn._files import file_digest, read_json_object, remove_stale_temporaries, write_atomic
from cxrlearn.data.cohort.split import apply_split, read_split_file, report_path, split_and_save
from cxrlearn.data.columns import IMAGE, finding_columns
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.cache import cache_location, prepare_cache, table_fingerprint
from cxrlearn.data.pipeline.datamodule import ChestXrayDataModule
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.sources.datasets import labels_path, read_labels
from cxrlearn.defaults import launch_rank, launched_with_others, whole_number
from cxrlearn.errors import ConfigError, Interrupted
from cxrlearn.evaluation.metrics import auc_per_finding
from cxrlearn.evaluation.model_card import write_model_card
from cxrlearn.findings import FINDINGS, match_findings
from cxrlearn.inference.predict import predict_loader
from cxrlearn.model.backbones import backbone_config
from cxrlearn.model.bundle import bundle_digest, load_bundle, read_meta, save_bundle
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.model.device import resolve_device
from cxrlearn.model.input_check import MAX_FIT_IMAGES, InputCheck, fit_input_check, layout
from cxrlearn.model.meta import (BundleMeta, DataRecord, MemberRecord, SplitAuc, SplitRecord, TrainingMetrics,
                                 WeightsRecord)
from cxrlearn.model.pretrained import WeightsSource, load_backbone_weights
from cxrlearn.model.reference import REFERENCE_FILE
from cxrlearn.workflows.monitor import write_reference_from
from cxrlearn.workflows.tracking import (MLFLOW_RUN, MlflowRun, allow_file_store, check_tracking,  # noqa: F401
                                         git_commit)
from cxrlearn.records import Record
from cxrlearn.training.config import DataConfig, RunConfig, dump_config, flatten, resolve_precision, resolve_workers
from cxrlearn.training.losses import MultiLabelLoss, positive_weights
from cxrlearn.training.module import MONITOR, ChestXrayModule
from cxrlearn.training.stopping import StopBetweenBatches, first_step_to_log, resumes_exactly

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SPLIT_FILE = "split.csv"
CONFIG_FILE = "config.yaml"
#: The digests of the run's label table (its content's fingerprint) and split, checked whenever it continues.
INPUTS_FILE = "inputs.json"


def read_run_labels(data: DataConfig) -> pd.DataFrame:
    """The run's label table as its config says (:func:`cxrlearn.data.sources.datasets.read_labels`): a dataset's
    own files, the generic format, or NIH's table."""
    return read_labels(data.table, data.dataset, data.columns.model_dump(), data.findings, data.uncertain,
                       csv=data.csv)


def run_preprocessing(config: RunConfig) -> Preprocessing:
    """The run's one :class:`Preprocessing`: its backbone's mean and std (timm), its sizes and channels. The cache,
    the DataModule and the bundle (hence the Predictor) all take this value."""
    data = config.data
    timm_cfg = backbone_config(config.model.backbone)
    return Preprocessing.for_run(timm_cfg.mean, timm_cfg.std, input_size=data.image_size, cache_size=data.cache_size,
                                 channels=data.channels)


def check_before_work(config: RunConfig) -> None:
    """Refuse, naming the key, every setting that can be found wrong without reading data: run before a split,
    cache or file of the run is written, so a typo costs a second, not a cache build and a litter of files."""

    data, model = config.data, config.model
    if not data.images:
        raise ConfigError("training needs data.images (the image folder: --images)")
    _want(data.images, "data.images (--images)", folder=True)
    for key, value in (("data.table (--table)", data.table), ("data.csv (--csv)", data.csv)):
        if value:
            _want(value, key, folder=None if key.startswith("data.table") else False)
    for key, value in (("data.split (--split)", data.split), ("model.weights", model.weights)):
        if value:
            _want(value, key, folder=False)
    if data.cache and Path(data.cache).exists() and not Path(data.cache).is_dir():
        raise ConfigError(f"data.cache (--cache) {data.cache}: is a file; the cache is a folder")
    backbone_config(model.backbone)  # an unknown backbone is refused by name, with similar names
    if model.trainable_blocks is not None or config.optim.layer_decay is not None:
        with torch.device("meta"):  # the backbone's layout alone: no memory, no weights
            stages = len(getattr(timm.create_model(model.backbone, pretrained=False), "blocks", []))
        if model.trainable_blocks is not None and model.trainable_blocks > stages:
            raise ConfigError(f"model.trainable_blocks {model.trainable_blocks}: {model.backbone} has {stages} stages")
        if config.optim.layer_decay is not None and not stages:
            raise ConfigError(f"optim.layer_decay: {model.backbone} has no stages to decay the learning rate over "
                              "(timm EfficientNets have)")
    accelerator = config.train.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator {accelerator}: this machine has no CUDA GPU (auto or cpu train here)")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.accelerator mps: this machine has no Apple GPU (auto or cpu train here)")
    if model.init_from:
        read_meta(model.init_from)  # a folder that is not a bundle (or a damaged one) is refused by name


def _want(path: str, key: str, folder: bool | None) -> None:
    """``path`` must exist (a folder when ``folder``, a file when it is False, either when None)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key} {path}: no such {'folder' if folder else 'file'}")
    if folder and not path.is_dir():
        raise ConfigError(f"{key} {path}: is a file; a folder is needed here")
    if folder is False and path.is_dir():
        raise ConfigError(f"{key} {path}: is a folder; a file is needed here")


class RunInputs(Record):
    """``RUN/inputs.json``: what a run started with, so that a resumed run continues with its own data."""

    label_table: str | None = None  # the label table's fingerprint
    split: str | None = None  # the split file's SHA-256


def _recorded_inputs(run_dir: Path) -> RunInputs:
    """What ``RUN/inputs.json`` recorded of the run's data: the label table's fingerprint and the split's SHA-256."""
    path = run_dir / INPUTS_FILE
    if not path.is_file():
        return RunInputs()
    return RunInputs.model_validate(read_json_object(path, ConfigError, "so it cannot be checked that this run "
                                                     "continues with its own data"))


def prepare_data(config: RunConfig, run_dir: Path, preprocessing: Preprocessing, progress: bool = True):
    """Table, split and cache (made with the run's ``preprocessing``) for a run. Returns (table, fingerprint,
    present, split, cache_dir, split_path)."""

    data = config.data
    table_path = labels_path(data.table, data.csv)
    table = read_run_labels(data)
    fingerprint = table_fingerprint(table)
    presence = attach_images(table, data.images)
    log.info(presence.summary())
    present = presence.table

    split_path = run_dir / SPLIT_FILE
    inputs = _recorded_inputs(run_dir)
    if inputs.label_table not in (None, fingerprint):
        raise ConfigError(f"{run_dir}: the label table {table_path} holds other labels or images than the table this "
                          f"run started with (fingerprint {fingerprint[:12]}…, the run's {inputs.label_table[:12]}…): "
                          "a run continues with its own data; train anew in another --out")
    if inputs.split and split_path.is_file() and file_digest(split_path) != inputs.split:
        raise ConfigError(f"{split_path} was changed after this run made or took it (SHA-256 differs from the one "
                          f"recorded in {INPUTS_FILE}): a run continues with its own split; restore it, or train anew "
                          "in another --out")
    if data.split:
        split = read_split_file(data.split)
        if Path(data.split).resolve() != split_path.resolve():
            write_atomic(split_path, Path(data.split).read_bytes())
            # The split's report travels with it; a report of another split must not stay beside it.
            given_report, run_report = report_path(data.split), report_path(split_path)
            if given_report.is_file():
                write_atomic(run_report, given_report.read_bytes())
            elif run_report.exists():
                run_report.unlink()
    elif split_path.exists():  # a resumed run keeps its split
        split = read_split_file(split_path)
    else:
        split, _, _ = split_and_save(present, split_path, table_path, ratios=data.ratios,
                                     seed=data.split_seed)
        log.info(f"made the custom split of the {len(present):,} images present: {split_path}")
    apply_split(present.drop(columns="path"), split)  # refuses a split made from another table
    inputs = RunInputs(label_table=fingerprint, split=file_digest(split_path))
    write_atomic(run_dir / INPUTS_FILE, json.dumps(inputs.to_dict(), indent=2) + "\n")
    unknown = split.loc[~split[IMAGE].isin(set(table[IMAGE])), IMAGE]
    if len(unknown):
        log.warning(f"{len(unknown):,} image(s) of the split are not in the label table and are left out "
                    f"(e.g. {', '.join(unknown.iloc[:3])})")

    cache_dir = cache_location(config.data.cache, preprocessing, run_dir, fingerprint)
    in_split = present[present[IMAGE].isin(set(split[IMAGE]))]
    summary = prepare_cache(
        in_split, cache_dir, fingerprint, preprocessing, workers=data.prepare_workers,
        images_dir=str(data.images), label_table=table_path.name, progress=progress,
        wait=launched_with_others(),  # a shared cache is filled by whichever process comes first; the others wait
    )
    log.info(summary.text())
    return table, fingerprint, present, split, cache_dir, split_path


#: Settings a resumed run may change: where things are and how the work is spread, never what is learned.
RESUMABLE = frozenset({
    "data.images", "data.csv", "data.cache", "data.split", "data.num_workers", "data.prepare_workers",
    "train.epochs", "train.early_stopping_patience", "train.accelerator", "train.devices", "train.num_nodes",
    "train.strategy",
})


def check_same_run(config: RunConfig, run_dir: Path) -> None:
    """Refuse ``--resume`` with a split, data or model settings other than the run's own, naming each difference.

    A resumed run that changed its split would judge patients it had trained on; one that changed its image
    size or backbone would train a different model under the same name.
    """

    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir}: cannot resume: the run's {CONFIG_FILE} is missing, so its settings are unknown")
    try:
        saved = flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as err:
        raise ConfigError(f"{saved_path}: unreadable ({err}); cannot check that --resume continues the same run") from None
    now = flatten(yaml.safe_load(dump_config(config)))
    changed = [key for key in sorted(set(saved) | set(now))
               if key not in RESUMABLE and saved.get(key) != now.get(key)]
    problems = [f"{key} was {saved.get(key)!r}, now {now.get(key)!r}" for key in changed]
    run_split = run_dir / SPLIT_FILE
    given = config.data.split
    if given and run_split.is_file() and Path(given).resolve() != run_split.resolve():
        if file_digest(given) != file_digest(run_split):
            problems.append(f"the split {given} differs from the run's own {run_split} (other SHA-256)")
    if problems:
        raise ConfigError(f"{run_dir}: --resume (or a rerun into a run folder that already has its split) must "
                          "continue the same run, but " + "; ".join(problems)
                          + ". Resume with the run's own settings (its config.yaml and split.csv), or train anew "
                          "in another --out")


def build_model(config: RunConfig, findings: list[str]):
    """The classifier for ``findings`` with ImageNet weights (or a cxrlearn run's: ``model.init_from``), and
    where they came from."""
    m = config.model
    model = ChestXrayClassifier(
        m.backbone, m.head, num_findings=len(findings), in_chans=config.data.channels,
        drop_path_rate=m.drop_path_rate,
    )
    if m.init_from:
        source = init_from_bundle(model, findings, m.init_from)
    else:
        source = load_backbone_weights(
            model.backbone, m.backbone, m.weights, use_hub=m.hub, in_chans=config.data.channels
        )
    log.info(f"backbone {m.backbone}: weights from {source.kind} ({source.detail})")
    return model, source


def init_from_bundle(model: ChestXrayClassifier, findings: list[str], folder: str | os.PathLike) -> WeightsSource:
    """Start from a cxrlearn run's backbone and head. A finding the two share (by name, or by harmonised name:
    NIH's ``Effusion`` is ``Pleural Effusion``) keeps its row of the last layer; a new one starts from a fresh
    row. The backbone, the input channels and the head's width must be the run's."""
    donor, meta = load_bundle(folder)
    mine = (model.backbone_name, model.in_chans, model.head_config)
    theirs = (meta.backbone, meta.in_chans, meta.head)
    if mine != theirs:
        raise ConfigError(f"model.init_from {folder}: that run is {theirs[0]} with {theirs[1]} input channel(s) and "
                          f"head {theirs[2]}; this one is {mine[0]} with {mine[1]} and {mine[2]}: they must agree")
    state = donor.state_dict()
    last = f"head.{len(model.head) - 1}"
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(last + ".")} | {
        k: own[k] for k in own if k.startswith(last + ".")})
    matches = match_findings(findings, meta.findings)
    kept, new = [], []
    with torch.no_grad():
        for row, name in enumerate(findings):
            if name not in matches:
                new.append(name)
                continue
            source = meta.findings.index(matches[name])
            model.head[-1].weight[row] = state[f"{last}.weight"][source]
            model.head[-1].bias[row] = state[f"{last}.bias"][source]
            kept.append(name if matches[name] == name else f"{name} (from {matches[name]})")
    log.info(f"init from {folder}: kept the head rows of {len(kept)} finding(s)"
             + (f" ({', '.join(kept)})" if kept else "") + f"; {len(new)} new" + (f" ({', '.join(new)})" if new else ""))
    return WeightsSource("cxrlearn-run", f"{folder}: backbone and head; head rows kept for {', '.join(kept) or 'none'}; "
                                         f"new for {', '.join(new) or 'none'}")


SEEDS_FILE = "seeds.json"
#: The files of the bundle and its run that go to MLflow as artifacts (under ``bundle/``), when present.
BUNDLE_ARTIFACTS = ("model.json", "model.safetensors", "input_check.safetensors", REFERENCE_FILE, "MODEL_CARD.md",
                    "metrics.json", CONFIG_FILE, SPLIT_FILE, "split.report.json")


def _mlflow_logger(uri: str, config: RunConfig, run_dir: Path, resume: bool):
    """Lightning's MLFlowLogger for ``uri`` (``file:./mlruns`` or a tracking server): a resumed run logs into its
    first MLflow run (its id kept in ``RUN/mlflow.json``)."""
    allow_file_store(uri)
    saved = run_dir / MLFLOW_RUN
    run_id = (MlflowRun.model_validate(read_json_object(saved, ConfigError, "delete it to log the resumed run as a "
                                                         "new MLflow run")).run_id
              if resume and saved.is_file() else None)
    logger = MLFlowLogger(experiment_name="cxrlearn", run_name=run_dir.name, tracking_uri=uri, run_id=run_id,
                          log_model=False)
    if run_id is None:
        logger.log_hyperparams(flatten(config.to_dict()))
        for key, value in (("cxrlearn_version", __version__), ("cxrlearn_git_commit", git_commit())):
            if value:
                logger.experiment.set_tag(logger.run_id, key, value)
        record = MlflowRun(tracking_uri=uri, experiment_id=logger.experiment_id, run_id=logger.run_id)
        write_atomic(saved, json.dumps(record.to_dict(), indent=2) + "\n")
    return logger


def _log_bundle(logger, uri: str, run_dir: Path, split_path: Path, metrics: TrainingMetrics) -> None:
    """The split's digest, the final metrics and the bundle's files, into the run's MLflow run."""
    logger.experiment.log_param(logger.run_id, "split_sha256", file_digest(split_path))
    logger.experiment.set_tag(logger.run_id, "split_sha256", file_digest(split_path))
    logger.experiment.set_tag(logger.run_id, "model_sha256", bundle_digest(run_dir))  # as every answer names it
    logger.log_metrics({f"final_{name}_mean_auc": part.mean_auc for name, part in metrics.measured().items()
                        if part.mean_auc is not None})
    for name in BUNDLE_ARTIFACTS:
        if (run_dir / name).is_file():
            logger.experiment.log_artifact(logger.run_id, str(run_dir / name), artifact_path="bundle")
    log.info(f"MLflow: logged the bundle to run {logger.run_id} ({uri})")


class _ContinuedTable(ExperimentWriter):
    """Lightning's CSV writer, but continuing the table of the run being resumed (Lightning's own starts it over):
    the rows logged before the checkpoint stay, those logged after it (by a run stopped at once, which the
    resumed run logs again) are dropped."""

    def __init__(self, log_dir: str, from_step: int | None):
        self.from_step = from_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.from_step is None or not path.is_file():
            return super()._check_log_dir_exists()
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            keys, rows = list(reader.fieldnames or []), [row for row in reader]
        kept = [row for row in rows if str(row.get("step", "")).isdigit() and int(row["step"]) < self.from_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(kept)
        write_atomic(path, out.getvalue().encode())
        self.metrics_keys = sorted(keys)


class RunTable(CSVLogger):
    """``RUN/logs/metrics.csv``: one table of the whole run, continued by a resumed run from the step of the
    checkpoint ``continuing``."""

    def __init__(self, run_dir: Path, continuing: dict | None = None):
        super().__init__(run_dir, name="logs", version="")
        self._from_step = first_step_to_log(continuing) if continuing is not None else None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedTable(self.log_dir, self._from_step)
        return self._experiment


def _continued_checkpoint(last: Path) -> dict:
    """The checkpoint a resumed run continues; a warning when the continued run will not be the uninterrupted
    one (in cxrlearn's words: Lightning, seeing a loader that keeps its place, no longer warns itself)."""
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    if not resumes_exactly(checkpoint):
        log.warning(f"{last} was written in the middle of an epoch without the loader's place in it (by an older "
                    f"cxrlearn): the continued run repeats that epoch's first batches and will differ from an "
                    f"uninterrupted run; resume from an epoch's end checkpoint, or train anew, for an exact run")
    return checkpoint


def _trainer(config: RunConfig, run_dir: Path, callbacks, progress: bool, resume: bool = False, tracker=None):
    t = config.train
    devices = whole_number(str(t.devices)) if whole_number(str(t.devices)) is not None else t.devices
    processes = (devices if isinstance(devices, int) else 1) * int(t.num_nodes)
    strategy = t.strategy
    if strategy == "auto" and processes > 1:
        strategy = "ddp"
    # A resumed run continues the run's table (logs/metrics.csv) and its TensorBoard events.
    table = RunTable(run_dir, continuing=_continued_checkpoint(run_dir / CHECKPOINTS / "last.ckpt") if resume else None)
    loggers = [table, TensorBoardLogger(run_dir, name="logs", version="")]
    if tracker is not None:
        loggers.append(tracker)
    plugins = [_atomic_checkpoints()]
    if SLURMEnvironment.detect():  # cxrlearn requeues on SIGUSR1 itself (train), keeping progress as --resume reads it
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        default_root_dir=run_dir,
        plugins=plugins,
        max_epochs=int(t.epochs),
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=int(t.num_nodes),
        strategy=strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        benchmark=bool(t.cudnn_benchmark),
        accumulate_grad_batches=int(t.accumulate_grad_batches),
        callbacks=callbacks,
        logger=loggers,
        use_distributed_sampler=False,  # the DataModule makes its own samplers
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=10,
        deterministic=bool(t.deterministic),
        limit_train_batches=t.limit_train_batches,
        num_sanity_val_steps=0,
    )


def _atomic_checkpoints():
    """Lightning's checkpoint writer, but writing beside the checkpoint (then renaming) instead of in the
    system's temporary folder, so that a write killed half-way leaves a temporary file that the next run in
    this folder removes (:func:`cxrlearn._files.remove_stale_temporaries`), not 4 MB lost in /tmp."""

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            write_atomic(path, buffer.getvalue())

    return AtomicCheckpointIO()


def train(config: RunConfig, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
          tracking: str | None = None) -> Path:
    """Run the training that ``config`` describes into ``run_dir``; return the bundle folder. ``tracking``: an
    MLflow tracking URI to log parameters, per-epoch metrics, the split's digest and the bundle to.

    Interrupted (Ctrl-C, SIGTERM, SIGUSR1), it raises :class:`Interrupted` saying what was kept and how to continue.
    Under SLURM, SIGUSR1 (``sbatch --signal=USR1@90``) also asks SLURM to requeue the job, and a requeued job
    continues its run as ``resume`` does."""
    if config.train.seeds > 1:
        return train_seeds(config, Path(run_dir), resume, progress, tracking)
    if not resume and _requeued() and (Path(run_dir) / CHECKPOINTS / "last.ckpt").exists():
        restarts = os.environ["SLURM_RESTART_COUNT"]
        log.info(f"SLURM requeued this job ({restarts} time(s)): {run_dir} continues as with --resume")
        resume = True
    try:
        return _train(config, Path(run_dir), resume, progress, tracking)
    except (KeyboardInterrupt, Interrupted) as err:
        if getattr(err, "signal_name", "") == "SIGUSR1":
            _requeue_slurm_job()
        if isinstance(err, Interrupted) and err.kept:
            raise
        last = Path(run_dir) / CHECKPOINTS / "last.ckpt"
        if last.exists():
            raise Interrupted.keeping(err, f"training's progress at its last checkpoint: {last}", "--resume") \
                from None
        raise Interrupted.keeping(err, f"the split and the preprocessing cache made so far ({run_dir})") from None


def _requeued() -> bool:
    """Whether SLURM requeued this job (``SLURM_RESTART_COUNT`` of 1 or more)."""
    return (whole_number(os.environ.get("SLURM_RESTART_COUNT")) or 0) > 0


class SeedRun(Record):
    """One run of ``--seeds``: its folder, its training seed and what training measured."""

    folder: str
    seed: int
    metrics: TrainingMetrics


class SeedSpread(Record):
    """The runs' AUCs on one split: per finding and of the mean AUC, their mean and standard deviation (ddof 1)."""

    mean_auc: float | None
    mean_auc_sd: float | None
    auc: dict[str, float | None]
    auc_sd: dict[str, float | None]


class SeedsSummary(Record):
    """``RUN/seeds.json``: the runs of one recipe differing only in the training seed, and their spread."""

    runs: list[SeedRun]
    val: SeedSpread | None = None
    test: SeedSpread | None = None


def _spread(values: list[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return float(np.mean(known)), float(np.std(known, ddof=1)) if len(known) > 1 else None


def seed_spread(runs: list[SeedRun], split: str) -> SeedSpread | None:
    parts = [getattr(run.metrics, split) for run in runs]
    if any(part is None for part in parts):
        return None
    mean, sd = _spread([part.mean_auc for part in parts])
    findings = list(parts[0].auc)
    per = {name: _spread([part.auc.get(name) for part in parts]) for name in findings}
    return SeedSpread(mean_auc=mean, mean_auc_sd=sd, auc={n: v[0] for n, v in per.items()},
                      auc_sd={n: v[1] for n, v in per.items()})


def train_seeds(config: RunConfig, run_dir: Path, resume: bool, progress: bool, tracking: str | None) -> Path:
    """``train.seeds`` runs into ``run_dir/seed-K`` (training seed ``train.seed + K``), all on the first run's split
    (or the given one); then ``seeds.json``. Continued (``resume``, or a requeued SLURM job), finished runs are kept
    and an interrupted one resumes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    split = config.data.split
    runs = []
    for k in range(config.train.seeds):
        member = run_dir / f"seed-{k}"  # cache.SEED_MEMBER: the members share the cache beside run_dir
        seed = config.train.seed + k
        one = config.model_copy(update={"train": config.train.model_copy(update={"seed": seed, "seeds": 1}),
                                        "data": config.data.model_copy(update={"split": split})})
        if (resume or _requeued()) and (member / "model.json").is_file():
            log.info(f"seed {seed}: {member} is trained already")
        else:
            log.info(f"seed {seed} ({k + 1} of {config.train.seeds}): training into {member}")
            train(one, member, resume=(resume or _requeued()) and (member / CHECKPOINTS / "last.ckpt").exists(),
                  progress=progress, tracking=tracking)
        split = split or str(member / SPLIT_FILE)  # the first run's split serves the others
        runs.append(SeedRun(folder=member.name, seed=seed, metrics=read_meta(member).metrics or TrainingMetrics()))
    summary = SeedsSummary(runs=runs, val=seed_spread(runs, "val"), test=seed_spread(runs, "test"))
    write_atomic(run_dir / SEEDS_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")
    for name, part in (("val", summary.val), ("test", summary.test)):
        if part is not None and part.mean_auc is not None:
            log.info(f"{name} mean AUC over {len(runs)} seeds: {part.mean_auc:.4f}"
                     + (f" ± {part.mean_auc_sd:.4f} (SD)" if part.mean_auc_sd is not None else ""))
    return run_dir


def _requeue_slurm_job() -> None:
    """Ask SLURM to requeue this job (``scontrol requeue``), from the run's first process, as Lightning's own
    SLURM plugin would; the progress is kept already, and the requeued job continues it."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job or launch_rank() != 0:
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning(f"SLURM job {job} was not requeued (scontrol: {err}): submit it again to continue")
        return
    if done.returncode == 0:
        log.info(f"asked SLURM to requeue job {job}: it continues this run when it starts again")
    else:
        log.warning(f"SLURM job {job} was not requeued (scontrol exit {done.returncode}: {done.stderr.strip()}): "
                    "submit it again to continue")


def open_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> Path:
    """The run folder made (or checked for ``--resume``) and its config written; the path of its last checkpoint."""
    last = run_dir / CHECKPOINTS / "last.ckpt"
    if resume and not last.exists():
        raise ConfigError(f"{run_dir}: nothing to resume ({last} does not exist)")
    if not resume and last.exists():
        raise ConfigError(f"{run_dir} holds an earlier run; pass --resume to continue it, or choose another --out")
    if resume or (run_dir / SPLIT_FILE).is_file() and (run_dir / CONFIG_FILE).is_file():
        # before anything in the run folder is written; a rerun of a run stopped before its first checkpoint
        # continues it too, and keeps its split: it may not change the settings that made it.
        check_same_run(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Only the first process of a distributed run clears what interrupted writes left: in a run folder shared by
    # several nodes, another process's temporaries may be writes under way.
    for folder in (run_dir, run_dir / CHECKPOINTS) if launch_rank() == 0 else ():
        for name in remove_stale_temporaries(folder):
            log.info(f"removed {folder / name}, left by an interrupted write")
    write_atomic(run_dir / CONFIG_FILE, dump_config(config))
    return last


def _train(config: RunConfig, run_dir: Path, resume: bool, progress: bool, tracking: str | None) -> Path:
    check_before_work(config)
    check_tracking(tracking)
    last = open_run_dir(config, run_dir, resume)
    started = time.time()
    L.seed_everything(config.train.seed, workers=True, verbose=False)

    preprocessing = run_preprocessing(config)
    table, fingerprint, present, split, cache_dir, split_path = prepare_data(config, run_dir, preprocessing, progress)
    data = config.data
    findings = finding_columns(table)
    datamodule = ChestXrayDataModule(
        cache_dir, table, split, preprocessing, findings=findings, batch_size=data.batch_size,
        num_workers=resolve_workers(data.num_workers), seed=config.train.seed, fingerprint=fingerprint,
    )
    datamodule.setup("fit")

    model, weights_source = build_model(config, findings)
    loss_cfg = config.loss.model_dump()
    pos_weight = None
    if loss_cfg.pop("pos_weight"):
        pos_weight = positive_weights(torch.from_numpy(datamodule.datasets["train"].labels))
    module = ChestXrayModule(
        model, MultiLabelLoss(pos_weight=pos_weight, **loss_cfg), config.optim, findings,
        seed=config.train.seed, freeze_bn=config.model.freeze_bn,
        channels_last=config.train.channels_last,
        tta=config.train.tta,
        trainable_blocks=config.model.trainable_blocks,
    )
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINTS, filename="best", monitor=MONITOR, mode="max", auto_insert_metric_name=False,
        enable_version_counter=False,  # one best.ckpt, never a stale one beside best-v1.ckpt
    )
    # Lightning's save_last only refreshes last.ckpt when a new best is saved; resuming
    # needs the latest epoch whatever its score, so "last" is a checkpoint of its own.
    latest = ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="last", monitor=None, save_top_k=1,
                             enable_version_counter=False)
    stopper = StopBetweenBatches(last)
    callbacks = [checkpoint, latest, stopper, LearningRateMonitor(logging_interval="epoch")]
    if config.train.ema_decay is not None:  # Lightning's: validation and checkpoints see the averaged weights
        callbacks.append(EMAWeightAveraging(decay=config.train.ema_decay))
    if config.train.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=config.train.early_stopping_patience))
    tracker = _mlflow_logger(tracking, config, run_dir, resume) if tracking else None
    trainer = _trainer(config, run_dir, callbacks, progress, resume, tracker)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    if stopper.requested:  # after the last epoch: the bundle is written by --resume
        raise Interrupted(stopper.requested, f"the finished training ({last}); --resume writes the bundle",
                          "--resume")
    if not trainer.is_global_zero:
        return run_dir

    best = checkpoint.best_model_path or str(last)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    metrics = summarise(model, datamodule, config.train.tta, findings)
    metrics.best_checkpoint = Path(best).name
    metrics.epochs_run = trainer.current_epoch
    metrics.seconds = round(time.time() - started, 1)
    check = fit_check(model, datamodule, resolve_device())
    write_run_bundle(run_dir, model, config, preprocessing, weights_source, split_path, datamodule, metrics, check,
                     findings)
    if tracker is not None:
        _log_bundle(tracker, tracking, run_dir, split_path, metrics)
    log.info("mean AUC: " + ", ".join(f"{name} {part.mean_auc:.4f}" for name, part in metrics.measured().items()
                                       if part.mean_auc is not None)
             + f"; the model bundle is {run_dir}/model.json + model.safetensors")
    return run_dir


def summarise(model, datamodule, tta: bool, findings: list[str]) -> TrainingMetrics:
    """Per-finding AUC of ``model`` on the val and test images (single process)."""
    device = resolve_device()
    out = TrainingMetrics()
    for name in ("val", "test"):
        if name in datamodule.datasets:
            loader = datamodule.eval_loader(name)
            probs, labels, _ = predict_loader(model, loader, datamodule.transform, tta=tta, device=device)
            setattr(out, name, SplitAuc(**auc_per_finding(labels, probs, findings).to_dict(), n_images=len(labels)))
    model.cpu()
    return out


def evenly_spaced(count: int, most: int) -> np.ndarray:
    """At most ``most`` indices of ``count`` items, evenly spaced."""
    return np.unique(np.linspace(0, count - 1, min(count, most)).astype(int))


@torch.no_grad()
def backbone_features(model, datamodule, name: str, device: str, chosen: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The layouts (:func:`cxrlearn.model.input_check.layout`) and the backbone's pooled features of split
    ``name``'s images (``chosen`` of them, or all), without augmentation; the model is left on ``device``."""
    model = model.to(device).eval()
    transform = datamodule.transform.to(device)
    dataset = datamodule.datasets[name]
    chosen = np.arange(len(dataset)) if chosen is None else chosen
    augmentation, dataset.augmentation = dataset.augmentation, None
    try:
        loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=datamodule.batch_size,
                            num_workers=datamodule.num_workers)
        layouts, features = [], []
        for images, _, _ in loader:
            layouts.append(layout(images[:, 0].numpy()))
            features.append(model.backbone(transform(images.to(device))).float().cpu().numpy())
    finally:
        dataset.augmentation = augmentation
    return np.concatenate(layouts), np.concatenate(features)


def fit_check(model, datamodule, device: str) -> InputCheck | None:
    """The input check (:mod:`cxrlearn.model.input_check`): fitted on at most ``MAX_FIT_IMAGES`` training images
    (evenly spaced, without augmentation), thresholded on as many validation images."""
    if not {"train", "val"} <= set(datamodule.datasets):
        log.warning("no validation images: the bundle gets no input check")
        return None
    counts = {name: min(len(datamodule.datasets[name]), MAX_FIT_IMAGES) for name in ("train", "val")}
    log.info(f"input check: the backbone's features of {counts['train']:,} training and {counts['val']:,} "
             f"validation images ({device})")
    train_layouts, train_features = backbone_features(
        model, datamodule, "train", device, evenly_spaced(len(datamodule.datasets["train"]), MAX_FIT_IMAGES))
    val_layouts, val_features = backbone_features(
        model, datamodule, "val", device, evenly_spaced(len(datamodule.datasets["val"]), MAX_FIT_IMAGES))
    model.cpu()
    return fit_and_log_check(train_layouts, train_features, val_layouts, val_features)


def fit_and_log_check(train_layouts, train_features, val_layouts, val_features) -> InputCheck:
    check = fit_input_check(train_layouts, train_features, val_features, val_layouts)
    log.info(f"input check: fitted on {len(train_features):,} training images, threshold at the "
             f"{check.fit.percentile:g}th percentile of {len(val_features):,} validation images")
    return check


def write_run_bundle(run_dir, model, config, preprocessing, weights_source, split_path, datamodule, metrics,
                     check: InputCheck | None = None, findings: list[str] = FINDINGS,
                     members: list[MemberRecord] | None = None) -> None:
    """The bundle of a run (or, with ``members``, of an ensemble: its backbone named by its members')."""
    sizes = {name: len(ds) for name, ds in datamodule.datasets.items()}
    positives = {name: dict(zip(findings, np.nansum(ds.labels, axis=0).astype(int).tolist()))
                 for name, ds in datamodule.datasets.items()}
    networks = model.members if members else [model]
    meta = BundleMeta(
        backbone="+".join(m.backbone_name for m in networks), head=networks[0].head_config, in_chans=model.in_chans,
        preprocessing=preprocessing, members=members,
        findings=tuple(findings), config=config.to_dict(), split=SplitRecord(split_path.name, file_digest(split_path)),
        data=DataRecord(label_table=labels_path(config.data.table, config.data.csv).name, images=sizes,
                        positives=positives, missing_from_cache=datamodule.missing),
        weights_source=WeightsRecord(kind=weights_source.kind, detail=weights_source.detail), metrics=metrics,
        input_check=check.fit if check else None,
    )
    if check:
        check.save(run_dir)
    save_bundle(run_dir, model, meta)
    write_atomic(run_dir / "metrics.json", json.dumps(metrics.to_dict(), indent=2) + "\n")
    write_model_card(run_dir)
    write_reference(run_dir, datamodule)


def write_reference(run_dir: Path, datamodule) -> None:
    """The bundle's monitoring reference (:mod:`cxrlearn.model.reference`) from the run's validation images (at
    most ``MAX_FIT_IMAGES``, evenly spaced), for ``cxrlearn monitor`` to judge a deployment's answers against."""
    if "val" not in datamodule.datasets:
        log.warning("no validation images: the bundle gets no monitoring reference (make one with `cxrlearn monitor "
                    f"--model {run_dir} --reference-images DIR`)")
        return
    dataset = datamodule.datasets["val"]
    chosen = evenly_spaced(len(dataset), MAX_FIT_IMAGES).tolist()
    loader = DataLoader(Subset(dataset, chosen), batch_size=datamodule.batch_size, num_workers=datamodule.num_workers)
    write_reference_from(run_dir, loader, f"the run's {len(chosen):,} validation images")
