"""`cxrlearn evaluate`: a model bundle, a label table and images in; metrics, report and thresholds out.

1. the images to judge: a subset of a split (by default the run's own test
   split) or NIH's official test list; the validation images for operating
   points and calibration come from the same split's ``val``;
2. a leak check: no judged patient may be in the model's training split;
3. predictions through the same preprocessing cache and transform as training;
4. optional temperature scaling (fitted on val), then thresholds chosen on val
   and written into the bundle;
5. on the judged images: per-finding AUC-ROC and AUC-PR with patient-level
   bootstrap intervals, operating points, calibration, subgroups, expert labels
   and, with ``tta``, a paired comparison with and without flip averaging;
6. ``metrics.json``, ``predictions.csv`` and the report (``report.md``,
   ``report.html`` and figures) in the output folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn

from cxrlearn._files import file_digest, source_digest, write_atomic
from cxrlearn.data.cohort.split import SPLIT, SPLITS, apply_split, read_split_file
from cxrlearn.data.columns import IMAGE, PATIENT_ID, finding_columns
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.cache import cache_location, prepare_cache, table_fingerprint
from cxrlearn.data.pipeline.datamodule import judging_loader
from cxrlearn.data.pipeline.normalize import normalizer
from cxrlearn.data.sources.datasets import labels_path, read_labels
from cxrlearn.data.sources.expert_labels import read_expert_labels
from cxrlearn.data.sources.nih import read_image_list, read_label_table
from cxrlearn.errors import ConfigError, DataError, Interrupted
from cxrlearn.evaluation import calibration
from cxrlearn.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, percentile_interval
from cxrlearn.evaluation.expert import ExpertComparison, expert_metrics
from cxrlearn.evaluation.metrics import FindingMetrics, auc_per_finding, finding_metrics
from cxrlearn.evaluation.model_card import write_model_card
from cxrlearn.evaluation.operating_points import (DEFAULT_METHOD, METHODS, NOT_CALLED, Chosen, OperatingPoints, choose_thresholds,
                                                  operating_point_table)
from cxrlearn.evaluation.report import write_report
from cxrlearn.evaluation.results import (BundleRecord, EvaluationMetrics, FileRecord, InputCheckSummary, Provenance,
                                         SplitRecord, TtaComparison)
from cxrlearn.evaluation.subgroups import subgroup_metrics
from cxrlearn.findings import FINDINGS, match_findings
from cxrlearn.inference.outputs import probabilities
from cxrlearn.inference.predict import Forward, average_with_mirror, predict_logits, torch_forward
from cxrlearn.inference.predictor import ONNX_FILES, Predictor
from cxrlearn.model.bundle import library_versions, load_bundle, read_meta, write_meta
from cxrlearn.model.device import resolve_device
from cxrlearn.model.input_check import InputCheck, Verdict, cheap_reasons
from cxrlearn.model.meta import BundleMeta, LastEvaluation
from cxrlearn.workflows import EVALUATE_BATCH_SIZE
from cxrlearn.workflows.monitor import write_reference_from

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
#: The ``split`` of the judged rows in ``predictions.csv`` when they are not a split's subset.
OFFICIAL_TEST = "official-test"
ALL_PRESENT = "judged"


@dataclass
class EvaluationOptions:
    split: str | None = None  # split file; default: the run's own (when a subset is asked for)
    subset: str | None = None  # None with no split: judge every labelled image present
    official_test: str | None = None  # NIH's test_list.txt: judge its images instead of a subset
    expert_labels: str | None = None  # Google's 2019 expert label file
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    tta: bool = False
    calibrate: bool = False
    threshold_method: str = DEFAULT_METHOD
    cache: str | None = None
    batch_size: int = EVALUATE_BATCH_SIZE
    workers: int | None = None
    write_bundle: bool = True
    progress: bool = True
    runtime: str = "torch"  # or an ONNX file of the bundle (RUNTIMES); the bundle is then not updated
    command: list[str] = field(default_factory=list)
    # Another label table than the run's own (external validation): a dataset's files, or the generic format.
    table: str | None = None
    dataset: str | None = None
    columns: dict | None = None
    uncertain: str = "ignore"
    findings: list[str] | None = None  # the table's finding columns (default: every column without a role)

    @property
    def chooses_thresholds(self) -> bool:
        """Whether a split (or the official list) is judged, with thresholds chosen on its val images; else
        every labelled image present is judged with the bundle's own."""
        return bool(self.official_test or self.split or self.subset)

    @property
    def judged_split(self) -> str:
        """The ``split`` value of the judged rows in ``predictions.csv`` (the others are the val images)."""
        if self.official_test:
            return OFFICIAL_TEST
        return (self.subset or "test") if self.chooses_thresholds else ALL_PRESENT


@dataclass
class _Judged:
    """One set of images with its rows, labels and logits."""

    rows: pd.DataFrame
    labels: np.ndarray
    logits: np.ndarray
    flipped: np.ndarray | None = None  # logits of the mirrored images (tta)
    verdicts: list[Verdict] | None = None  # the bundle's input check on each image (None: not asked for)


@dataclass
class _Selection:
    """What is judged, and where operating points and temperatures come from."""

    judged: pd.DataFrame
    val: pd.DataFrame | None  # None: the bundle's thresholds and temperatures are used as they are
    what: str
    info: SplitRecord


def _run_split(run_dir: Path, meta: BundleMeta) -> tuple[Path, pd.DataFrame]:
    if meta.split is None:
        raise ConfigError(f"{run_dir}: the bundle records no split file; it is needed to check that no training "
                          "patient is judged")
    run_split = run_dir / meta.split.file
    if not run_split.is_file():
        raise ConfigError(f"{run_dir}: the bundle's split file {run_split.name} is missing; it is needed to "
                          "check that no training patient is judged")
    if file_digest(run_split) != meta.split.sha256:
        raise ConfigError(f"{run_split}: changed since training (its SHA-256 differs from the bundle's)")
    return run_split, read_split_file(run_split)


def _images_to_judge(present: pd.DataFrame, images: str, run_dir: Path, meta: BundleMeta,
                     options: EvaluationOptions) -> _Selection:
    """The judged images (and val images where thresholds are chosen again), with the leak check applied.

    * ``--official-test``: the listed images present; val from the split (default: the run's);
    * ``--split`` and/or ``--subset``: that subset of the split (default: the run's); val from the same split;
    * neither: every labelled image present. None may be of a patient of the run's train or val split,
      and the bundle's own thresholds and temperatures (chosen on the run's val split) are used.
    """

    run_split, trained_on = _run_split(run_dir, meta)
    if not options.chooses_thresholds:
        return _all_present(present, images, run_split, trained_on)

    split_path = Path(options.split) if options.split else run_split
    split = trained_on if split_path == run_split else read_split_file(split_path)
    if not present[IMAGE].isin(set(split[IMAGE])).any():
        raise DataError(f"none of the {len(split):,} images of {split_path} is in {images}; to judge the images "
                        f"in {images} themselves, leave out --split and --subset")
    rows = apply_split(present, split, source=str(split_path))
    val = rows[rows[SPLIT] == "val"]
    subset = options.subset or "test"
    if options.official_test:
        listed = set(read_image_list(options.official_test))
        judged = present[present[IMAGE].isin(listed)].assign(**{SPLIT: OFFICIAL_TEST})
        what = f"NIH's official test list ({Path(options.official_test).name}): {len(judged):,} of its {len(listed):,} images present"
        val = val[~val[PATIENT_ID].isin(set(judged[PATIENT_ID]))]
    else:
        if subset not in SPLITS:
            raise ConfigError(f"--subset must be one of {', '.join(SPLITS)}, not {subset!r}")
        judged = rows[rows[SPLIT] == subset]
        what = f"the {subset} split of {split_path.name}"
    if judged.empty:
        raise DataError(f"no images to judge: {what} has none among the images present in {images}")
    if val.empty:
        raise DataError(f"{split_path}: none of its validation images is in {images}; operating points are "
                        "chosen on val. To judge with the bundle's own thresholds, leave out --split and --subset")
    train_patients = set(trained_on.loc[trained_on[SPLIT] == "train", PATIENT_ID])
    if val[PATIENT_ID].isin(train_patients).any():
        log.warning(f"validation images of {split_path.name} include patients this model was trained on; "
                    "thresholds and temperatures chosen on them will be optimistic")
    leaking = judged[judged[PATIENT_ID].isin(train_patients)]
    if len(leaking):
        raise DataError(
            f"{len(leaking):,} of the {len(judged):,} images to judge ({leaking[PATIENT_ID].nunique():,} patients, "
            f"e.g. {leaking[IMAGE].iloc[0]}) are of patients this model was trained on ({run_split.name}); "
            "their AUC would be inflated. Judge images of other patients (for the official test list, train "
            "with a split made by `cxrlearn split --official-test`)"
        )
    info = SplitRecord(file=split_path.name, sha256=file_digest(split_path),
                       subset=None if options.official_test else subset)
    if options.official_test:
        info.official_test = FileRecord(file=Path(options.official_test).name,
                                        sha256=file_digest(options.official_test))
    return _Selection(judged, val, what, info)


def _all_present(present: pd.DataFrame, images: str, run_split: Path, trained_on: pd.DataFrame) -> _Selection:
    """Every labelled image present, refused where any is of a patient the run trained or validated on."""
    if present.empty:
        raise DataError(f"none of the images in {images} is in the label table: there is nothing to judge")
    seen = {}
    for name in ("train", "val"):
        patients = set(trained_on.loc[trained_on[SPLIT] == name, PATIENT_ID])
        rows = present[present[PATIENT_ID].isin(patients)]
        if len(rows):
            seen[name] = rows
    if seen:
        parts = "; ".join(f"{len(rows):,} of the {name} split ({rows[PATIENT_ID].nunique():,} patients, "
                          f"e.g. {rows[IMAGE].iloc[0]})" for name, rows in seen.items())
        raise DataError(
            f"{sum(map(len, seen.values())):,} of the {len(present):,} labelled images in {images} are of patients "
            f"the model was trained or validated on ({run_split}): {parts}. Their AUC would be inflated, and the "
            "bundle's thresholds were chosen on the val patients. To judge the run's own test split, pass "
            "--subset test; to judge other patients, give a folder without these images"
        )
    judged = present.assign(**{SPLIT: ALL_PRESENT})
    what = f"every labelled image in {Path(images).name} ({len(judged):,} images, none of the run's train or val patients)"
    info = SplitRecord(file=run_split.name, sha256=file_digest(run_split), subset=None, all_present=True)
    return _Selection(judged, None, what, info)


def _predict(forward: Forward, meta: BundleMeta, cache_dir: Path, rows: pd.DataFrame, tta: bool,
             options: EvaluationOptions, findings: list[str], columns: list[int], check: InputCheck | None = None
             ) -> _Judged:
    """Logits of the model's outputs ``columns`` (the judged ``findings``) on the cached ``rows``; with ``check``,
    its verdicts too, from the same pass (cached pixels are square, so the aspect check is not made here)."""
    cached, loader = judging_loader(cache_dir, rows, findings, meta.preprocessing, options.batch_size)
    verdicts: list[Verdict] = []

    def judge(pixels: np.ndarray, features: np.ndarray | None) -> None:
        verdicts.extend(check.judge(pixels, features, [cheap_reasons(p) for p in pixels]))

    logits, labels, _ = predict_logits(forward, loader, progress=options.progress,
                                       inspect=judge if check is not None else None)
    flipped = None
    if tta:
        flipped, _, _ = predict_logits(forward, loader, progress=options.progress, flip=True)
        flipped = flipped[:, columns]
    return _Judged(cached, labels, logits[:, columns], flipped, verdicts if check is not None else None)


def _forward(model_dir: Path, model, meta: BundleMeta, runtime: str) -> Forward:
    """The network evaluation runs: the bundle's in PyTorch (on a GPU when there is one), or an ONNX file of it."""
    if runtime == "torch":
        return torch_forward(model, normalizer(meta.preprocessing), resolve_device())
    runner = Predictor(model_dir, runtime=runtime)
    return lambda images: runner.features_and_logits(images.numpy())


def _flagged_summary(verdicts: list[Verdict], labels: np.ndarray, probs: np.ndarray, findings, mean_auc
                     ) -> InputCheckSummary:
    """How many judged images the input check flags, why, and the mean AUC with and without them."""
    flagged = np.array([not v.ok for v in verdicts])
    reasons: dict[str, int] = {}
    for v in verdicts:
        if v.reason:
            reasons[v.reason.kind.value] = reasons.get(v.reason.kind.value, 0) + 1
    kept = auc_per_finding(labels[~flagged], probs[~flagged], findings).mean_auc if (~flagged).any() else None
    return InputCheckSummary(available=True, flagged=int(flagged.sum()), judged=len(verdicts), reasons=reasons,
                             mean_auc_all=mean_auc, mean_auc_unflagged=kept,
                             note="from cached pixels: the aspect and colour checks apply to files, not to the cache")


def _judged_table(meta: BundleMeta, csv, options: EvaluationOptions) -> tuple[pd.DataFrame, Path]:
    """The label table to judge with, and its file or folder: ``options.table``/``dataset`` (another table);
    else ``csv`` (NIH's); else the run's own, as its config recorded it."""
    if options.table or options.dataset:
        return (read_labels(options.table, options.dataset, options.columns, options.findings, options.uncertain),
                labels_path(options.table))
    if csv:
        return read_label_table(csv), Path(csv)
    trained = meta.trained_data
    return (read_labels(trained.table, trained.dataset, trained.columns, trained.findings, trained.uncertain,
                        csv=trained.csv),
            labels_path(trained.table, trained.csv))


def _shared_findings(table: pd.DataFrame, predicted: list[str]) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """The findings both the model predicts and the table labels (by name, or by harmonised name: the
    table's column renamed to the model's), in the model's order; and each one left out, with why."""
    labelled = finding_columns(table)
    matches = match_findings(predicted, labelled)
    shared = [name for name in predicted if name in matches]
    renames = {matches[name]: name for name in shared}
    skipped = {name: "the table has no labels for it" for name in predicted if name not in matches}
    skipped |= {name: "the model does not predict it" for name in labelled if name not in renames}
    if not shared:
        raise DataError(f"the model predicts {', '.join(predicted)}; the table labels {', '.join(labelled)}: "
                        "no finding in common (by name or harmonised name), nothing to judge")
    if skipped:
        log.warning("judged on the shared findings only; left out: "
                    + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    unused = [c for c in labelled if c not in renames]
    return table.drop(columns=unused).rename(columns=renames), shared, skipped


def evaluate(model_dir: str | os.PathLike, csv: str | os.PathLike | None, images: str | os.PathLike,
             out: str | os.PathLike, options: EvaluationOptions | None = None) -> EvaluationMetrics:
    """Evaluate the bundle in ``model_dir`` on images of ``images``; write results to ``out``; return the metrics.

    Interrupted, it raises :class:`Interrupted`: the images decoded into the cache so far are kept, and the
    same command continues from them; the bundle and ``out`` are written only at the end, whole."""
    try:
        return _evaluate(model_dir, csv, images, out, options or EvaluationOptions())
    except (KeyboardInterrupt, Interrupted) as err:
        raise Interrupted.keeping(err, "the images decoded into the preprocessing cache so far (the model bundle is "
                                  "unchanged)") from None


def _check_options(options: EvaluationOptions) -> None:
    if options.threshold_method not in METHODS:
        raise ConfigError(f"threshold method {options.threshold_method!r} is not one of {', '.join(METHODS)}")
    if options.resamples < 100:
        raise ConfigError(f"at least 100 bootstrap resamples are needed for a 95% interval, not {options.resamples}")
    if options.calibrate and not options.chooses_thresholds:
        raise ConfigError("--calibrate fits temperatures on validation images: give --subset (and --split) to "
                          "judge a split whose val images are present; without them the bundle's own are used")


def _cache_for(model_dir: Path, meta: BundleMeta, fingerprint: str, rows: list[pd.DataFrame | None], images, csv,
               options: EvaluationOptions) -> Path:
    """The cache the judged (and val) images are read from, with any of them not yet in it added. The run's own
    cache serves its own table; another table's images get a cache of their own."""
    own_table = not (options.table or options.dataset)
    chosen = options.cache or (meta.trained_data.cache if own_table else None)
    cache_dir = cache_location(chosen, meta.preprocessing, model_dir, fingerprint)
    both = pd.concat([r for r in rows if r is not None]).drop_duplicates(IMAGE)
    summary = prepare_cache(both, cache_dir, fingerprint, meta.preprocessing, workers=options.workers,
                            images_dir=str(images), label_table=Path(csv).name, progress=options.progress)
    log.info(summary.text())
    return cache_dir


def _evaluate(model_dir, csv, images, out, options: EvaluationOptions) -> EvaluationMetrics:
    _check_options(options)
    model_dir, out = Path(model_dir), Path(out)
    # The PyTorch model only when it runs: an ONNX runtime reads its own file.
    model, meta = load_bundle(model_dir) if options.runtime == "torch" else (None, read_meta(model_dir))
    table, csv = _judged_table(meta, csv, options)
    table, findings, skipped = _shared_findings(table, list(meta.findings))
    columns = [list(meta.findings).index(name) for name in findings]  # of the model's outputs
    fingerprint = table_fingerprint(table)
    presence = attach_images(table, images)
    log.info(presence.summary())
    chosen_here = options.chooses_thresholds
    selection = _images_to_judge(presence.table, str(images), model_dir, meta, options)
    judged_rows, val_rows = selection.judged, selection.val
    log.info(f"judging {selection.what}: {len(judged_rows):,} images of {judged_rows[PATIENT_ID].nunique():,} patients; "
             + (f"operating points and calibration from {len(val_rows):,} validation images" if val_rows is not None
                else "the bundle's own thresholds and temperatures"))
    # Thresholds chosen on val here, or the bundle's as they are; flip averaging as asked, or as the bundle's were.
    tta = options.tta if chosen_here else options.tta or meta.tta
    if not chosen_here and options.tta and not meta.tta and meta.thresholds:
        log.warning("the bundle's thresholds were chosen without flip averaging; --tta changes what they apply to")

    cache_dir = _cache_for(model_dir, meta, fingerprint, [val_rows, judged_rows], images, csv, options)
    forward = _forward(model_dir, model, meta, options.runtime)
    val = _predict(forward, meta, cache_dir, val_rows, tta, options, findings, columns) \
        if val_rows is not None else None
    check = InputCheck.load(model_dir, meta.input_check) if meta.input_check else None
    test = _predict(forward, meta, cache_dir, judged_rows, tta, options, findings, columns, check)
    left_out = len(judged_rows) - len(test.rows)
    if left_out:
        log.warning(f"{left_out:,} images to judge could not be decoded and are left out (see {cache_dir}/failed.tsv)")

    def logits_of(part: _Judged) -> np.ndarray:
        return average_with_mirror(part.logits, part.flipped) if tta else part.logits

    fitted = (calibration.fit_temperatures(logits_of(val), val.labels, findings)
              if options.calibrate and val is not None else None)
    if fitted is not None:
        temperature = fitted.temperature
        for name, why in fitted.failed.items():
            log.warning(f"calibration of {name}: {why}")
    elif val is not None:
        temperature = None
    else:
        temperature = meta.temperature
    test_p = probabilities(logits_of(test), findings, temperature)
    patients = test.rows[PATIENT_ID].to_numpy()

    measured, boot = finding_metrics(test.labels, test_p, patients, findings, options.resamples, options.seed)
    metrics = EvaluationMetrics.of(measured, subset=selection.what, skipped=skipped)
    if test.verdicts is not None:
        metrics.input_check = _flagged_summary(test.verdicts, test.labels, test_p, findings, metrics.mean_auc)
    else:
        metrics.input_check = InputCheckSummary(available=False)
    val_p = probabilities(logits_of(val), findings, temperature) if val is not None else None
    metrics.operating_points, chosen = _operating_points(model_dir, meta, val, val_p, test, test_p, findings, options)
    raw_p = probabilities(logits_of(test), findings) if temperature is not None else None
    metrics.calibration = _calibration(test, test_p, raw_p, temperature, fitted, findings)
    metrics.subgroups = subgroup_metrics(test.rows, test.labels, test_p, findings, options.resamples, options.seed)
    if options.expert_labels and not set(FINDINGS) <= set(findings):
        metrics.expert = ExpertComparison(n_images=0, note="Google's expert labels judge NIH's findings; this model is "
                                                           "judged on other ones")
    elif options.expert_labels:
        metrics.expert = expert_metrics(test.rows[IMAGE].tolist(), patients, test_p, test.labels, findings,
                                           read_expert_labels(options.expert_labels), options.resamples, options.seed)
    if tta:
        metrics.tta = _tta_comparison(test, findings, temperature, metrics, boot, options)
    metrics.provenance = _provenance(model_dir, meta, csv, images, selection.info, options, left_out, tta)

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / METRICS_FILE, json.dumps(metrics.to_dict(), indent=2) + "\n")
    parts = [(test, test_p)] if val is None else [(val, val_p), (test, test_p)]
    _write_predictions(out / PREDICTIONS_FILE, findings, parts)
    write_report(out, metrics, test.labels, test_p, findings)
    if options.write_bundle and chosen is not None:
        _update_bundle(model_dir, meta, chosen, options.threshold_method, temperature, tta, metrics, out,
                       selection.what)
        _refresh_reference(model_dir, meta, cache_dir, val, findings, metrics, options)
    return metrics


def _refresh_reference(model_dir: Path, meta: BundleMeta, cache_dir: Path, val: _Judged, findings: list[str],
                       metrics: EvaluationMetrics, options: EvaluationOptions) -> None:
    """The bundle's monitoring reference made again on the validation images its thresholds were chosen on, as it
    now predicts (flip averaging, as evaluate set it); not when the bundle was left as it was (another runtime)."""
    if metrics.provenance.runtime != "torch":
        return
    _, loader = judging_loader(cache_dir, val.rows, findings, meta.preprocessing, options.batch_size)
    write_reference_from(model_dir, loader, f"the {len(val.rows):,} validation images the thresholds were chosen on")


def _update_bundle(model_dir: Path, meta: BundleMeta, chosen: Chosen, method: str, temperature: dict | None, tta: bool,
                   metrics: EvaluationMetrics, out: Path, judged: str) -> None:
    """The thresholds and temperatures chosen on the val images into the bundle, with this evaluation's summary
    and a new model card; not when they were chosen on an ONNX runtime's outputs (they belong to the PyTorch
    model)."""
    runtime = metrics.provenance.runtime
    if runtime != "torch":
        log.warning(f"the bundle's thresholds are left as they are: they belong to its PyTorch model, and this "
                    f"evaluation ran {runtime}")
        return
    meta.thresholds = chosen.thresholds[method]
    meta.threshold_method = method
    meta.not_called = dict(chosen.undefined) or None
    meta.operating_points = chosen.thresholds
    meta.temperature = temperature  # None: probabilities are the plain sigmoid
    meta.tta = tta  # thresholds were chosen on (un)averaged predictions: predict must match
    meta.evaluation = LastEvaluation(folder=str(out), mean_auc=metrics.mean_auc, mean_auc_ci95=metrics.mean_auc_ci95,
                                     judged=judged, date=metrics.provenance.date)
    write_meta(model_dir, meta)
    write_model_card(model_dir)


def _operating_points(model_dir: Path, meta: BundleMeta, val: _Judged | None, val_p, test: _Judged, test_p, findings,
                      options: EvaluationOptions) -> tuple[OperatingPoints, Chosen | None]:
    """The operating points part, and the thresholds chosen here (None when the bundle's are used): chosen on
    the val images when there are some, else the bundle's applied to the judged images."""
    if val is not None:
        chosen = choose_thresholds(val.labels, val_p, findings)
        if chosen.undefined:
            log.info(f"{NOT_CALLED} for {len(chosen.undefined)} finding(s): " + "; ".join(
                f"{name}: {why}" for name, why in chosen.undefined.items()))
        return OperatingPoints(
            chosen_on=f"{len(val.rows):,} validation images", bundle_method=options.threshold_method,
            thresholds=chosen.thresholds, undefined=chosen.undefined,
            test=operating_point_table(test.labels, test_p, chosen.thresholds, findings),
            val=operating_point_table(val.labels, val_p, chosen.thresholds, findings),
        ), chosen
    if meta.operating_points:
        stored = meta.operating_points
        return OperatingPoints(
            chosen_on="the run's validation images (the bundle's thresholds)",
            bundle_method=meta.threshold_method or options.threshold_method, thresholds=stored,
            test=operating_point_table(test.labels, test_p, stored, findings),
        ), None
    return OperatingPoints(unavailable=f"{model_dir} has no thresholds yet: run `cxrlearn evaluate --model {model_dir} "
                           "--subset test ...` on the run's own images first, which chooses them on its val split"), None


def _calibration(test: _Judged, test_p, raw_p, temperature: dict | None, fitted, findings) -> calibration.Calibration:
    """The calibration part: ECE per finding of the probabilities judged, and, when they are temperature-scaled,
    of the raw ones (``raw_p``, None without scaling) beside them."""
    part = calibration.Calibration(bins=calibration.DEFAULT_BINS,
                                   test=calibration.calibration_per_finding(test.labels, test_p, findings))
    if temperature is not None:
        part.temperature = temperature
        if fitted is not None:
            part.temperature_failed = fitted.failed
        part.test_uncalibrated = calibration.calibration_per_finding(test.labels, raw_p, findings)
    return part


def _tta_comparison(test: _Judged, findings, temperature, metrics: FindingMetrics, boot, options) -> TtaComparison:
    """Mean AUC with and without flip averaging, and the paired bootstrap interval of the difference."""

    plain_p = probabilities(test.logits, findings, temperature)
    plain, plain_boot = finding_metrics(test.labels, plain_p, test.rows[PATIENT_ID].to_numpy(), findings,
                                        options.resamples, options.seed)
    columns = [findings.index(name) for name in metrics.mean_over]
    # The same seed and patients give the same resamples: the difference is paired.
    difference = boot.mean_auc(columns) - plain_boot.mean_auc(columns)
    interval = percentile_interval(difference)
    delta = metrics.mean_auc - plain.mean_auc
    if interval and interval[0] > 0:
        verdict = "helps"
    elif interval and interval[1] < 0:
        verdict = "hurts"
    else:
        verdict = "no difference the bootstrap can tell from chance"
    return TtaComparison(mean_auc_with_tta=metrics.mean_auc, mean_auc_without_tta=plain.mean_auc, difference=delta,
                         difference_ci95=interval, verdict=verdict, auc_without_tta=plain.auc)


def _provenance(model_dir: Path, meta: BundleMeta, csv, images, split_info: SplitRecord,
                options: EvaluationOptions, left_out: int, tta: bool) -> Provenance:
    return Provenance(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(options.command) if options.command else None,
        bundle=BundleRecord(folder=str(model_dir), backbone=meta.backbone, preprocessing=meta.preprocessing.to_dict(),
                            weights_sha256=file_digest(model_dir / "model.safetensors"),
                            trained_split_sha256=meta.split.sha256 if meta.split else None,
                            weights_source=meta.weights_source, training_versions=meta.versions),
        label_table=FileRecord(file=Path(csv).name, sha256=source_digest(csv)),
        images=str(images),
        split=split_info,
        images_left_out_undecodable=left_out,
        tta=tta,
        runtime=options.runtime,
        runtime_sha256=file_digest(model_dir / ("model.safetensors" if options.runtime == "torch"
                                                 else ONNX_FILES[options.runtime])),
        temperature_scaling=(("the bundle's" if meta.temperature else False) if split_info.all_present
                             else options.calibrate),
        versions=_versions(),
    )


def _versions() -> dict:
    return {**library_versions(), "scikit-learn": sklearn.__version__}


def _write_predictions(path: Path, findings, parts: list[tuple[_Judged, np.ndarray]]) -> None:
    """One row per image: its split (or official-test), probabilities as used, and labels."""
    frames = []
    for part, probs in parts:
        frame = part.rows[[IMAGE, PATIENT_ID, SPLIT]].copy()
        frame = pd.concat([frame, pd.DataFrame(probs, columns=findings, index=frame.index),
                           pd.DataFrame(part.labels, columns=[f"label_{f}" for f in findings],
                                        index=frame.index).astype("Int64")], axis=1)  # blank where unknown
        frames.append(frame)
    pd.concat(frames).to_csv(path, index=False)  # full precision: metrics can be recomputed from it exactly
