"""`cxrlearn reproduce kufel2023`: from nothing to the paper's table in one command.

Stages, each recorded in ``OUT/reproduction-state.json`` when it finishes, so that a
rerun after an interruption continues at the first unfinished one (training itself
resumes from its last checkpoint):

1. ``download``: NIH's 12 archives into ``--data`` (resumable, MD5-checked), or
   nothing when ``--images`` names images already on disk;
2. ``split``: the custom patient-wise split of the images present (the paper's seed);
3. ``prepare``: the preprocessing cache at the recipe's size;
4. ``train``: the recipe's config (``--set`` overrides), into ``OUT/model``;
5. ``evaluate``: the model on the split's test images, with patient-level CIs;
6. with ``--official``: the same for a split that keeps NIH's official test list
   out of training, judged on that list (``official-split`` … ``official-evaluate``);
7. ``OUT/reproduction.md`` and ``reproduction.json``: per-finding AUC with 95% CIs
   beside the paper's values and the difference, the mean, time per stage, the
   machine and the versions.

Before preparing and training it prints an estimate of their time from a short
timing on the machine at hand.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from pydantic import ValidationError

from cxrlearn._files import read_json_object, write_atomic
from cxrlearn.configs import RECIPES, Recipe
from cxrlearn.data.cohort.split import read_split_file, split_and_save
from cxrlearn.data.columns import IMAGE, SPLIT
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.cache import (
    ImageCache,
    cache_location,
    decode_and_resize,
    prepare_cache,
    prepare_workers,
    table_fingerprint,
)
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.sources import tables
from cxrlearn.data.sources.download import ALL_PARTS, download_nih, parse_parts, read_archives
from cxrlearn.data.sources.nih import read_label_table
from cxrlearn.errors import ConfigError, Interrupted
from cxrlearn.evaluation.published import PUBLISHED, published_auc
from cxrlearn.evaluation.results import EvaluationMetrics
from cxrlearn.findings import FINDINGS
from cxrlearn.model.backbones import backbone_config
from cxrlearn.model.bundle import library_versions, read_meta
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.model.input_check import MAX_FIT_IMAGES
from cxrlearn.model.device import resolve_device
from cxrlearn.training.config import RunConfig, load_config, resolve_precision
from cxrlearn.workflows.evaluate import EvaluationOptions, evaluate
from cxrlearn.records import Record
from cxrlearn.workflows.train import CHECKPOINTS, check_before_work, run_preprocessing, train

log = logging.getLogger(__name__)

STATE_FILE = "reproduction-state.json"
REPORT_MD = "reproduction.md"
REPORT_JSON = "reproduction.json"


@dataclass
class ReproduceOptions:
    out: Path
    data: Path | None = None  # where the archives are downloaded and unpacked (default OUT/data)
    parts: str = ALL_PARTS
    images: Path | None = None  # images already on disk: no download
    official: bool = False
    sets: list[str] = field(default_factory=list)
    progress: bool = True
    command: list[str] = field(default_factory=list)


class Stage(Record):
    """A finished stage: its time (earlier interrupted attempts included), when it finished, and why it was
    skipped, if it was."""

    seconds: float
    finished: str
    skipped: str | None = None


class Attempt(Record):
    """A stage begun and not finished: seconds in earlier attempts, when this one started, and (if it was
    interrupted rather than killed) how long it ran."""

    earlier: float
    started: float
    spent: float | None = None


class ReproductionState(Record):
    """``reproduction-state.json``: the settings, the finished stages, and the unfinished ones."""

    settings: dict | None = None
    stages: dict[str, Stage] = {}
    unfinished: dict[str, Attempt] = {}


class _State:
    """The stages finished so far, with their times, and the settings they were made with."""

    def __init__(self, out: Path, settings: dict):
        self.path = out / STATE_FILE
        self.data = _read_state(self.path) if self.path.exists() else ReproductionState()
        before = self.data.settings
        if before is not None and before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ConfigError(
                f"{out} holds a reproduction made with other settings ({', '.join(changed)}: "
                + "; ".join(f"{k} was {before.get(k)!r}, now {settings.get(k)!r}" for k in changed)
                + "); rerun with the same options to continue it, or choose another --out")
        self.data.settings = settings
        self.data.stages = self.data.stages  # written even when empty
        self.save()

    def done(self, stage: str) -> bool:
        return stage in self.data.stages

    def finish(self, stage: str, seconds: float, skipped: str | None = None) -> None:
        finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.data.stages[stage] = (Stage(seconds=round(seconds, 1), finished=finished) if skipped is None
                                   else Stage(seconds=round(seconds, 1), skipped=skipped, finished=finished))
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data.to_dict(), indent=2) + "\n")


def _read_state(path: Path) -> ReproductionState:
    """The stages a reproduction finished, or :class:`ConfigError` naming the file when it is damaged."""
    data = read_json_object(path, ConfigError, "it records which stages are done: delete it to redo them all "
                            "(finished work on disk is reused where it can be)")
    try:
        return ReproductionState.model_validate(data)
    except ValidationError:
        raise ConfigError(f"{path}: not a record of a reproduction's stages; delete it to redo them all") from None


def _stage(state: _State, name: str, work) -> None:
    """Run ``work()`` unless the stage is recorded as finished; record it with its time, which counts the time
    spent in earlier, interrupted attempts at it too."""
    if state.done(name):
        log.info(f"[{name}] done earlier ({state.data.stages[name].seconds:.0f} s): skipped")
        return
    unfinished = state.data.unfinished
    earlier = _earlier_attempts(unfinished.get(name), state.path.parent)
    log.info(f"[{name}] …" + (f" (continued after {earlier:.0f} s in earlier attempts)" if earlier else ""))
    started = time.time()
    unfinished[name] = Attempt(earlier=round(earlier, 1), started=started)
    state.data.unfinished = unfinished  # recorded in the file from now on
    state.save()
    try:
        work()
    except BaseException:  # interrupted, or failed: this attempt's time is known
        unfinished[name].spent = round(time.time() - started, 1)
        state.save()
        raise
    seconds = earlier + time.time() - started
    unfinished.pop(name, None)
    state.finish(name, seconds)
    log.info(f"[{name}] done in {seconds:.0f} s")


def _earlier_attempts(entry: Attempt | None, out: Path) -> float:
    """Seconds spent on a stage by attempts that did not finish it: as recorded when one was interrupted, or, for
    one killed outright (SIGKILL, a lost machine), until the last file it wrote under ``out``."""
    if not entry:
        return 0.0
    if entry.spent is not None:
        return entry.earlier + entry.spent
    latest = max((p.stat().st_mtime for p in out.rglob("*") if p.is_file() and p.name != STATE_FILE),
                 default=entry.started)
    return entry.earlier + max(0.0, latest - entry.started)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def machine() -> Machine:
    """What ran it: processor, cores, memory, GPU."""

    info = Machine(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpu_cores=os.cpu_count(), python=platform.python_version())
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info.memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    info.gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        info.gpu_count = torch.cuda.device_count()
        info.gpu_memory_gb = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


@dataclass(frozen=True)
class TrainingEstimate:
    """How long training will take here (:func:`estimate_training`)."""

    device: str
    precision: str
    images_per_second: float
    epoch_seconds: float
    max_seconds: float


def estimate_prepare(paths: list[str], preprocessing: Preprocessing, workers: int, sample: int = 16) -> float:
    """Seconds to decode and resize ``paths`` into the cache, from timing the first few."""

    probe = paths[:sample]
    started = time.perf_counter()
    for path in probe:
        try:
            decode_and_resize(path, preprocessing)
        except Exception:  # noqa: BLE001 - an undecodable file is the prepare stage's to report
            pass
    per_image = (time.perf_counter() - started) / max(1, len(probe))
    return per_image * len(paths) / max(1, workers)


def estimate_training(config: RunConfig, n_train: int, n_val: int, steps: int = 4, n_test: int = 0
                      ) -> TrainingEstimate:
    """Seconds per epoch and for all epochs, from timing a few training steps of the config's model here, with
    the passes after training: the val and test AUCs and the input check's features of up to
    ``MAX_FIT_IMAGES`` training and validation images."""

    data, model_cfg, train = config.data, config.model, config.train
    device = resolve_device("cpu" if train.accelerator == "cpu" else "auto")
    precision = resolve_precision(train.precision, train.accelerator)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    batch, size = data.batch_size, data.image_size
    if device == "cpu":
        batch = min(batch, 16)  # a CPU's rate hardly depends on the batch; keep the probe short
    model = ChestXrayClassifier(model_cfg.backbone, model_cfg.head,
                                in_chans=data.channels).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, data.channels, size, size, device=device)
    y = torch.zeros(batch, len(FINDINGS), device=device)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocation, kernel choice
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - started)
    # Validation is a forward pass only: about a third of a training step per image.
    epoch = n_train / rate + n_val / (3 * rate)
    after = (n_val + n_test + min(n_train, MAX_FIT_IMAGES) + min(n_val, MAX_FIT_IMAGES)) / (3 * rate)
    return TrainingEstimate(device=device, precision=precision, images_per_second=round(rate, 1),
                            epoch_seconds=round(epoch, 1), max_seconds=round(epoch * train.epochs + after, 1))


def reproduce(recipe_name: str, options: ReproduceOptions) -> Reproduction:
    """Run (or continue) the reproduction; return what ``reproduction.json`` holds. Interrupted, it raises
    :class:`Interrupted`: the finished stages are kept, and the same command continues at the first other."""
    try:
        return _reproduce(recipe_name, options)
    except (KeyboardInterrupt, Interrupted) as err:
        raise Interrupted.keeping(err, f"the finished stages ({Path(options.out) / STATE_FILE}) and the interrupted "
                                  "stage's work so far (downloaded archives, the cache, training's last checkpoint)") \
            from None


def _reproduce(recipe_name: str, options: ReproduceOptions) -> Reproduction:

    if recipe_name not in RECIPES:
        raise ConfigError(f"no recipe {recipe_name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[recipe_name]
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file is there; a reproduction writes a folder")
    data_dir = Path(options.data) if options.data else out / "data"
    images = Path(options.images) if options.images else data_dir
    settings = {"recipe": recipe_name, "images": str(images), "download": None if options.images else options.parts,
                "official": options.official, "sets": list(options.sets)}
    planned = load_config(recipe.config, sets=options.sets)  # before anything is written: a bad --set fails here
    if options.images:  # a wrong backbone or a missing folder is refused before the split, cache and download
        check_before_work(planned.model_copy(update={"data": planned.data.model_copy(update={"images": str(images)})}))
    else:
        backbone_config(planned.model.backbone)
    state = _State(out, settings)
    title = recipe.title(planned.model.backbone, planned.data.image_size, planned.data.split_seed)
    log.info(f"reproducing {title} in {out}")

    if options.images:
        if not state.done("download"):
            state.finish("download", 0.0, skipped=f"--images {images}")
    else:
        archives = read_archives()
        parts = parse_parts(options.parts, len(archives))
        _stage(state, "download", lambda: download_nih(data_dir, parts, archives, progress=options.progress),
               parts=options.parts)

    table_path = tables.label_table()
    table = read_label_table(table_path)
    fingerprint = table_fingerprint(table)
    presence = attach_images(table, images)
    log.info(presence.summary())
    present = presence.table
    if present.empty:
        raise ConfigError(f"none of the images of NIH's label table is in {images}")

    models = [("", out / "model", out / "split.csv", None)]
    if options.official:
        models.append(("official-", out / "official" / "model", out / "official" / "split.csv", tables.test_list()))
    for prefix, run_dir, split_path, official_list in models:
        config = load_config(recipe.config, sets=options.sets)
        config.data.split = str(split_path)
        config.data.images = str(images)
        preprocessing = run_preprocessing(config)
        config.data.cache = config.data.cache or str(
            cache_location(None, preprocessing, out / "model", fingerprint))  # one cache for both models
        _stage(state, f"{prefix}split", lambda: _write_split(present, config, split_path, official_list, table_path))

        def prepare():
            listed = present[present[IMAGE].isin(set(read_split_file(split_path)[IMAGE]))]
            size = preprocessing.cache_size
            cache_dir = cache_location(config.data.cache, preprocessing, run_dir, fingerprint)
            workers = prepare_workers(config.data.prepare_workers)
            missing = listed[~listed[IMAGE].isin(_cached_names(cache_dir))]
            if len(missing):
                log.info(f"estimate: decoding {len(missing):,} images at {size} px with {workers} processes takes about "
                         f"{_duration(estimate_prepare(missing['path'].tolist(), preprocessing, workers))}")
            summary = prepare_cache(listed, cache_dir, fingerprint, preprocessing, workers=workers, images_dir=str(images),
                                    label_table=table_path.name, progress=options.progress)
            log.info(summary.text())

        _stage(state, f"{prefix}prepare", prepare)
        _stage(state, f"{prefix}train", lambda: _train(config, run_dir, split_path, options.progress))
        _stage(state, f"{prefix}evaluate",
               lambda: _evaluate(run_dir, images, out / f"{prefix}evaluation", official_list, options))
    report = write_reproduction(out, recipe, title, state.data, options)
    log.info(f"wrote {out / REPORT_MD} and {out / REPORT_JSON}")
    return report


def _cached_names(cache_dir: Path) -> set[str]:
    try:
        return set(ImageCache(cache_dir).rows)
    except Exception:  # noqa: BLE001 - no cache yet (or a partial one): everything is still to decode
        return set()


def _write_split(present, config: RunConfig, split_path: Path, official_list, table_path: Path) -> None:
    data = config.data
    split_and_save(present, split_path, table_path, ratios=data.ratios, seed=data.split_seed,
                   official_test_list=official_list)
    log.info(f"split of the {len(present):,} images present: {split_path}")


def _train(config: RunConfig, run_dir: Path, split_path: Path, progress: bool) -> None:
    split = pd.read_csv(split_path)
    n_train, n_val, n_test = (int((split[SPLIT] == name).sum()) for name in ("train", "val", "test"))
    estimate = estimate_training(config, n_train, n_val, n_test=n_test)
    log.info(f"estimate: {estimate.images_per_second:,.0f} training images/s here ({estimate.device}, "
             f"{estimate.precision}): about {_duration(estimate.epoch_seconds)} an epoch, at most "
             f"{_duration(estimate.max_seconds)} for {config.train.epochs} epochs and the passes after them (early "
             "stopping may end sooner), "
             "plus the first epoch's start-up (loader processes, CUDA, kernel selection)")
    resume = (run_dir / CHECKPOINTS / "last.ckpt").exists()
    if resume:
        log.info(f"continuing the interrupted training in {run_dir} from its last checkpoint")
    train(config, run_dir, resume=resume, progress=progress)


def _evaluate(run_dir: Path, images: Path, out: Path, official_list, options: ReproduceOptions) -> None:
    evaluation = EvaluationOptions(subset=None if official_list else "test",
                                   official_test=str(official_list) if official_list else None,
                                   progress=options.progress, command=options.command)
    evaluate(run_dir, None, images, out, evaluation)


class ReproducedFinding(Record):
    """One finding's AUC with its interval and positives; each published source's value beside it is an extra
    field named by the source ("Kufel 2023": 0.8…), read with ``getattr``; ``difference``: from the target."""

    auc: float | None
    auc_ci95: list[float] | None
    positives: int
    difference: float | None = None


class ReproducedModel(Record):
    folder: str
    backbone: str
    image_size: int
    epochs_run: int | None = None
    weights_source: str | None = None


class ReproducedResult(Record):
    """One model's result against the published values."""

    judged: str
    n_images: int
    n_patients: int
    mean_auc: float | None
    mean_auc_ci95: list[float] | None
    mean_over: list[str]
    per_finding: dict[str, ReproducedFinding]
    published_mean: dict[str, float]
    model: ReproducedModel


class Machine(Record):
    """What ran it: :func:`machine`."""

    platform: str
    processor: str
    cpu_cores: int | None
    python: str
    memory_gb: float | None = None
    gpu: str | None = None
    gpu_count: int | None = None
    gpu_memory_gb: float | None = None


class Reproduction(Record):
    """``reproduction.json``."""

    recipe: str
    command: str | None
    date: str
    machine: Machine
    versions: dict[str, str]
    settings: dict
    stages: dict[str, Stage]
    results: dict[str, ReproducedResult] = {}


def _reproduced(metrics: EvaluationMetrics, run_dir: Path, beside, target: str | None) -> ReproducedResult:
    meta = read_meta(run_dir)
    paper = published_auc(target) if target else None
    rows = {}
    for finding in FINDINGS:
        auc = metrics.auc[finding]
        row = ReproducedFinding(auc=auc, auc_ci95=metrics.auc_ci95[finding], positives=metrics.positives[finding],
                                **{source: published_auc(source)[finding] for source in beside})
        if paper is not None:
            row.difference = None if auc is None else round(auc - paper[finding], 4)
        rows[finding] = row
    model = ReproducedModel(folder=str(run_dir), backbone=meta.backbone, image_size=meta.preprocessing.input_size,
                            epochs_run=meta.metrics.epochs_run,
                            weights_source=meta.weights_source.kind if meta.weights_source else None)
    return ReproducedResult(judged=metrics.subset, n_images=metrics.n_images, n_patients=metrics.n_patients,
                            mean_auc=metrics.mean_auc, mean_auc_ci95=metrics.mean_auc_ci95,
                            mean_over=metrics.mean_over, per_finding=rows,
                            published_mean={s: PUBLISHED[s].mean for s in beside}, model=model)


def write_reproduction(out: Path, recipe: Recipe, title: str, state: ReproductionState, options: ReproduceOptions
                       ) -> Reproduction:
    """``reproduction.json`` and ``reproduction.md`` from the evaluations' metrics and the stage times."""

    parts = [("custom", out / "model", out / "evaluation" / "metrics.json", recipe.published, (recipe.published,))]
    if options.official:
        parts.append(("official", out / "official" / "model", out / "official-evaluation" / "metrics.json", None,
                      recipe.official_published))
    report = Reproduction(recipe=title, command=" ".join(options.command) or None,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          machine=machine(), versions=library_versions(),
                          settings=state.settings, stages=state.stages, results={})
    lines = [f"# Reproduction: {report.recipe}", ""]
    for name, run_dir, path, target, beside in parts:
        report.results[name] = _reproduced(EvaluationMetrics.read(path), run_dir, beside, target)
        lines += _result_lines(name, report.results[name], beside, target is not None)
    lines += ["## Time per stage", "", "| stage | time |", "| --- | --- |"]
    lines += [f"| {stage} | {_duration(entry.seconds)}" + (f" ({entry.skipped})" if entry.skipped else "") + " |"
              for stage, entry in state.stages.items()]
    m = report.machine
    lines += ["", "## Machine and versions", "",
              f"- {m.processor}, {m.cpu_cores} CPU cores" + (f", {m.memory_gb} GB" if m.memory_gb else "")
              + (f"; GPU: {m.gpu} ×{m.gpu_count} ({m.gpu_memory_gb} GB)" if m.gpu else "; no GPU"),
              "- " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
              f"- settings: {json.dumps(state.settings)}", ""]
    if report.command:
        lines += [f"Command: `{report.command}`", ""]
    write_atomic(out / REPORT_JSON, json.dumps(report.to_dict(), indent=2) + "\n")
    write_atomic(out / REPORT_MD, "\n".join(lines))
    return report


def _result_lines(name: str, result: ReproducedResult, beside, with_difference: bool) -> list[str]:
    def num(v):
        return "—" if v is None else f"{v:.3f}"

    title = ("Custom patient-wise split (the paper's protocol)" if name == "custom"
             else "NIH's official test list (a split that keeps it out of training)")
    header = ["finding", "positives", "AUC", "95% CI"] + list(beside) + (["difference"] if with_difference else [])
    model = result.model
    lines = [f"## {title}", "", f"Model: {model.backbone} at {model.image_size} px, {model.epochs_run} epochs, "
             f"ImageNet weights from {model.weights_source} ({model.folder}). Judged: {result.judged}: "
             f"{result.n_images:,} images of {result.n_patients:,} patients. Intervals: patient-level "
             "bootstrap over patients, 95%.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for finding, e in result.per_finding.items():
        ci = "—" if not e.auc_ci95 else f"{e.auc_ci95[0]:.3f}–{e.auc_ci95[1]:.3f}"
        cells = [finding, str(e.positives), num(e.auc), ci] + [num(getattr(e, s)) for s in beside]
        if with_difference:
            cells.append("—" if e.difference is None else f"{e.difference:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    ci = result.mean_auc_ci95
    mean_cells = ["**mean**", "", f"**{num(result.mean_auc)}**", "—" if not ci else f"{ci[0]:.3f}–{ci[1]:.3f}"]
    mean_cells += [num(result.published_mean[s]) for s in beside]
    if with_difference:
        mean_cells.append("—" if result.mean_auc is None else
                          f"{result.mean_auc - result.published_mean[beside[0]]:+.3f}")
    lines += ["| " + " | ".join(mean_cells) + " |", ""]
    lines += [f"- {s}: {PUBLISHED[s].described()}." for s in beside]
    lines.append("")
    return lines

