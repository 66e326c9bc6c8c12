"""The ``cxrlearn`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in a ``_cmd_*`` function that does no work of its own beyond
reading inputs, calling library functions (the same ones the tests call) and
printing or saving what they return.

Exit statuses: 0 all done; 2 refused (bad input or options: the message names the
file or field, nothing is written); 3 done for every input that could be read, the
others named on stderr and skipped (``predict``, ``check``); 4 an alert (``monitor``); 130 interrupted. An
unexpected failure (a bug) exits 1 with Python's traceback.
"""

from __future__ import annotations

import argparse
import datetime
import contextlib
import errno
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from cxrlearn import __version__
from cxrlearn._files import write_atomic
from cxrlearn.configs import RECIPES
from cxrlearn.data.cohort.split import (
    DEFAULT_RATIOS,
    DEFAULT_SEED,
    METHODS,
    SPLITS,
    apply_split,
    format_split_report,
    read_split_file,
    report_path,
    split_and_save,
)
from cxrlearn.data.cohort.stats import TableStats, format_stats, table_stats
from cxrlearn.data.columns import DATASET, PATH, PATIENT_ID, SPLIT, UNCERTAIN_POLICIES, finding_columns
from cxrlearn.data.decoding.images import attach_images, check_images, find_images
from cxrlearn.data.pipeline.cache import prepare_cache, table_fingerprint
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.sources import tables
from cxrlearn.data.sources.boxes import read_boxes
from cxrlearn.data.sources.datasets import READERS, labels_path, merge_tables, read_labels
from cxrlearn.data.sources.generic import write_table
from cxrlearn.data.sources.download import ALL_PARTS, RETRIES, STALL_TIMEOUT_S, download_nih, parse_parts, read_archives
from cxrlearn.defaults import IMAGE_SIZE, launch_rank, launcher_environment_problems
from cxrlearn.errors import ConfigError, CxrlearnError, DataError, Interrupted
from cxrlearn.inference import PREDICT_BATCH_SIZE, RUNTIMES, SHARD_IMAGES, predict_workers
from cxrlearn.model import (INT8_CALIBRATION_IMAGES, INT8_GATE, INT8_GATES, INT8_MAX_AUC_LOSS, INT8_MIN_AGREEMENT,
                            ONNX_OPSET)
from cxrlearn.serving import (BATCH_WAIT_MS, HOST, MAX_BATCH, MAX_CONNECTIONS, MAX_PER_CLIENT, MAX_UPLOAD_BYTES,
                              PORT, UPLOAD_TIMEOUT_S)
from cxrlearn.workflows import EVALUATE_BATCH_SIZE

EXIT_OK, EXIT_REFUSED, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 2, 3, 130
#: Why an output cannot be written where the user asked: refused by name (exit 2), never a traceback.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT}


class _Stderr(logging.Handler):
    """The library's log records as plain lines on standard error (``warning: `` before warnings), from the
    first process of a DDP run only; written to ``sys.stderr`` as it is at each record. ``timestamps``: each line
    begins with the local time (the service and the DICOM node, whose logs are read days later)."""

    timestamps = False

    def emit(self, record: logging.LogRecord) -> None:
        if launch_rank() != 0:
            return
        message = record.getMessage()
        line = f"warning: {message}" if record.levelno >= logging.WARNING else message
        if self.timestamps:
            when = datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="seconds")
            line = f"{when} {line}"
        print(line, file=sys.stderr, flush=True)


#: The commands that run for days: their log lines carry the time.
LONG_RUNNING = ("serve", "dicom")


def _show_library_log(timestamps: bool = False) -> None:
    logger = logging.getLogger("cxrlearn")
    handler = next((h for h in logger.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        logger.addHandler(handler)
    handler.timestamps = timestamps
    logger.setLevel(logging.INFO)


def _want_folder(path: Path | None, option: str) -> None:
    """Refuse, before any work, a path that must be a folder but names a file."""
    if path is not None and path.exists() and not path.is_dir():
        raise DataError(f"{option} {path} is a file; a folder is needed here")


def _want_file(path: Path | None, option: str) -> None:
    """Refuse, before any work, a path that must be a file but names a folder."""
    if path is not None and path.is_dir():
        raise DataError(f"{option} {path} is a folder; name the file to write")


def _pairs(items: list[str] | None, option: str, form: str) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` options as a dict; one without ``=`` or a value is refused, naming the option."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise DataError(f"{option} {item!r}: expected {form}")
        out[key.strip()] = value.strip()
    return out


def _columns(items: list[str] | None) -> dict[str, str]:
    """``--column image=Path --column patient=mrn`` as ``{"image": "Path", "patient": "mrn"}``."""
    return _pairs(items, "--column", "ROLE=COLUMN (roles: image, patient, view, sex, age)")


def _findings(args: argparse.Namespace) -> list[str] | None:
    """``--findings A,B`` as a list (None when not given)."""
    if not getattr(args, "findings", None):
        return None
    names = [name.strip() for name in args.findings.split(",") if name.strip()]
    if not names:
        raise DataError(f"--findings {args.findings!r}: name at least one finding column")
    return names


def _labels(args: argparse.Namespace):
    """The label table the options name, and its file: --table/--dataset (another table), else NIH's (--csv or
    the shipped one)."""
    table = read_labels(args.table, args.dataset, _columns(args.column), _findings(args), args.uncertain,
                        csv=args.csv)
    return table, labels_path(args.table, args.csv)


def _load_table(args: argparse.Namespace, images: Path | None):
    """The label table, restricted to the images present when a folder is given, and its file or folder."""
    table, source = _labels(args)
    print(f"{source.name}: {len(table):,} images of {table['patient_id'].nunique():,} patients", file=sys.stderr)
    if images is None:
        return table, source
    presence = attach_images(table, images)
    print(presence.summary(), file=sys.stderr)
    return presence.table, source


def _cmd_split(args: argparse.Namespace) -> int:
    _want_file(args.out, "--out")
    table, source = _load_table(args, args.images)
    _, report, digest = split_and_save(table, args.out, source, ratios=args.ratios, seed=args.seed,
                                       official_test_list=args.official_test, method=args.method)
    print(format_split_report(report))
    print(f"wrote {args.out} (sha256 {digest[:12]}…) and {report_path(args.out)}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    _want_file(args.json, "--json")
    table, source = _load_table(args, args.images)
    if args.split:  # "all" is then the split's images, which its parts add up to
        table = apply_split(table, read_split_file(args.split), source=str(args.split))
    result: dict[str, TableStats] = {"all": table_stats(table)}
    if DATASET in table and table[DATASET].nunique() > 1:  # a merged table: each dataset's own counts too
        for name, part in table.groupby(DATASET, sort=False):
            result[f"dataset {name}"] = table_stats(part)
    if args.split:
        for name in SPLITS:
            part = table[table[SPLIT] == name]
            if len(part):
                result[name] = table_stats(part)
    for name, stats in result.items():
        print(format_stats(stats, title=source.name if len(result) == 1 else name))
        print()
    if args.json:
        write_atomic(args.json, json.dumps({name: stats.to_dict() for name, stats in result.items()}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    _want_file(args.out, "--out")
    folders = _pairs(args.image_folder, "--image-folder", "NAME=FOLDER")  # refused before any table is read
    parts = {}
    for spec in args.sources:
        name, _, path = spec.partition("=")
        name = name.strip()
        if not name or (not path and name != "nih"):
            raise DataError(f"{spec!r}: expected NAME=PATH (a dataset's label files, or a table in the generic "
                            "format), or nih alone for the shipped NIH table")
        if name in parts:
            raise DataError(f"{name!r} is given twice: name each part once")
        dataset = name if name in READERS else None
        parts[name] = read_labels(Path(path) if path else None, dataset, _columns(args.column),
                                  None if dataset else _findings(args), args.uncertain)
        print(f"{name}: {len(parts[name]):,} images of {parts[name][PATIENT_ID].nunique():,} patients, "
              f"{len(finding_columns(parts[name]))} findings", file=sys.stderr)
    merged = merge_tables(parts, folders)
    write_table(merged, args.out)
    findings = finding_columns(merged)
    print(f"wrote {args.out}: {len(merged):,} images of {merged[PATIENT_ID].nunique():,} patients, "
          f"{len(findings)} findings")
    for finding in findings:
        lacking = [name for name, part in merged.groupby(DATASET, sort=False) if part[finding].isna().all()]
        if lacking:
            print(f"  {finding}: unknown in {', '.join(lacking)}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    _want_file(args.report, "--report")
    table, _ = _load_table(args, args.images)
    failures = check_images(list(table[PATH]))
    for path, message in failures:
        print(message, file=sys.stderr)
    if args.report:
        write_atomic(args.report, "".join(f"{Path(p).name}\t{m}\n" for p, m in failures))
    print(f"{len(table) - len(failures):,} images decode; {len(failures):,} cannot be used")
    return EXIT_SKIPPED if failures else EXIT_OK


def _cmd_prepare(args: argparse.Namespace) -> int:
    _want_folder(args.out, "--out")
    table, source = _labels(args)
    presence = attach_images(table, args.images)
    print(presence.summary(), file=sys.stderr)
    summary = prepare_cache(
        presence.table,
        args.out,
        table_fingerprint(table),
        Preprocessing.for_cache(args.size),
        workers=args.workers,
        images_dir=str(args.images),
        label_table=Path(source).name,
    )
    print(summary.text())
    if summary.failed:
        print(f"the images that could not be used are listed in {args.out / 'failed.tsv'}")
    print(f"train on it with: cxrlearn train ... --images {args.images} --cache {args.out}"
          + ("" if args.size == IMAGE_SIZE else f" --set data.cache_size={args.size}"))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    archives = read_archives(args.archives)
    parts = parse_parts(args.parts, len(archives))
    extracted = download_nih(
        args.to, parts, archives, keep_archives=args.keep_archives, retries=args.retries, timeout=args.timeout
    )
    print(f"{sum(extracted.values()):,} files from {len(extracted)} archive(s) are in {args.to}")
    return 0


def _run_config(args: argparse.Namespace):
    """The run's config: the preset or file, then the flags the config's declarations name (those this command
    has), then --set."""
    from cxrlearn.training.config import FLAGS, load_config

    overrides: dict = {"data": {}, "model": {}, "train": {}}
    for flag, key in FLAGS.items():  # the flags the config's declarations name, each setting one key
        value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if value is not None:
            section, name = key.split(".")
            overrides[section][name] = str(value) if isinstance(value, Path) else value
    if args.table or args.dataset:
        overrides["data"].update(table=str(args.table) if args.table else None, dataset=args.dataset,
                                 uncertain=args.uncertain)
        overrides["data"]["columns"] = _columns(args.column)
    if args.findings:
        overrides["data"]["findings"] = _findings(args)
    _want_folder(args.out, "--out")
    return load_config(args.config, overrides, args.set)


def _cmd_train(args: argparse.Namespace) -> int:
    from cxrlearn.workflows.train import train

    train(_run_config(args), args.out, resume=args.resume, progress=not args.no_progress, tracking=args.mlflow)
    return 0


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    from cxrlearn.workflows.probe import PROBE_FILE, linear_probe

    run = linear_probe(_run_config(args), args.out, progress=not args.no_progress)
    print(f"wrote the linear probe's bundle to {run} (each strength's validation AUC in {run / PROBE_FILE}); judge it "
          f"with `cxrlearn evaluate --model {run} --subset test ...` or `cxrlearn compare`")
    return 0


def _evaluation_options(args: argparse.Namespace, **more):
    """EvaluationOptions from the judging options evaluate and compare share, and ``more`` of evaluate's own."""
    from cxrlearn.workflows.evaluate import EvaluationOptions

    return EvaluationOptions(
        split=args.split, subset=args.subset, official_test=args.official_test, resamples=args.resamples,
        seed=args.seed, tta=args.tta, cache=args.cache, batch_size=args.batch_size, workers=args.workers,
        progress=not args.no_progress, command=["cxrlearn", *sys.argv[1:]],
        table=str(args.table) if args.table else None, dataset=args.dataset, columns=_columns(args.column),
        uncertain=args.uncertain, findings=_findings(args), runtime=args.runtime, **more,
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cxrlearn.workflows.evaluate import evaluate
    from cxrlearn.workflows.tracking import check_tracking, log_evaluation

    options = _evaluation_options(args, expert_labels=args.expert_labels, calibrate=args.calibrate,
                                  threshold_method=args.threshold_method, write_bundle=not args.no_bundle_update)
    _want_folder(args.out, "--out")
    check_tracking(args.mlflow)
    metrics = evaluate(args.model, args.csv, args.images, args.out, options)
    if args.mlflow:
        run_id = log_evaluation(args.mlflow, args.model, metrics, args.out)
        print(f"MLflow: logged the evaluation to run {run_id} ({args.mlflow})")
    low, high = metrics.mean_auc_ci95 or (float("nan"), float("nan"))
    print(f"mean AUC {metrics.mean_auc:.4f} (95% CI {low:.4f}-{high:.4f}) over {len(metrics.mean_over)} findings, "
          f"{metrics.n_images:,} images of {metrics.n_patients:,} patients")
    if metrics.tta is not None:
        print(f"test-time augmentation: {metrics.tta.difference:+.4f} mean AUC ({metrics.tta.verdict})")
    check = metrics.input_check
    if check.available:
        without = check.mean_auc_unflagged
        print(f"input check: {check.flagged:,} of {check.judged:,} judged images flagged"
              + (f"; mean AUC without them {without:.4f}" if without is not None else ""))
    chosen = (metrics.operating_points.val is not None and not args.no_bundle_update
              and metrics.provenance.runtime == "torch")  # another runtime's leave the bundle as it was
    print(f"wrote {args.out}/report.html, report.md, metrics.json, predictions.csv"
          + (f"; thresholds ({args.threshold_method}) into {args.model}/model.json" if chosen else ""))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from cxrlearn.evaluation.metrics import FEW_CASES
    from cxrlearn.workflows.compare import compare

    _want_folder(args.out, "--out")
    comparison = compare(args.models, args.csv, args.images, args.out, _evaluation_options(args))
    print(f"{comparison.n_images:,} images of {comparison.n_patients:,} patients judged by every model")
    for model in comparison.models:
        low, high = model.mean_auc_ci95 or (float("nan"), float("nan"))
        spread = (f"; its {len(model.members)} members {min(v for v in model.members_mean_auc if v is not None):.4f}-"
                  f"{max(v for v in model.members_mean_auc if v is not None):.4f}"
                  if model.members_mean_auc and any(v is not None for v in model.members_mean_auc) else "")
        print(f"{model.name}: mean AUC {model.mean_auc:.4f} (95% CI {low:.4f}-{high:.4f}){spread}")
    for pair in comparison.pairs:
        low, high = pair.mean_auc_difference_ci95 or (float("nan"), float("nan"))
        print(f"{pair.b} - {pair.a}: {pair.mean_auc_difference:+.4f} mean AUC (95% CI {low:+.4f} to {high:+.4f}): "
              f"{pair.verdict}")
        for side, names in ((pair.b, pair.better_after_holm), (pair.a, pair.worse_after_holm)):
            if names:
                print(f"  {side} better after Holm's correction: {', '.join(names)}")
        if pair.few_cases:
            print(f"  no claim on {', '.join(pair.few_cases)} † (fewer than {FEW_CASES} positives or negatives)")
    print(f"wrote {args.out}/compare.html, compare.md, compare.json, forest.png")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from cxrlearn.workflows.ensemble import EVALUATION_FOLDER, make_ensemble

    _want_folder(args.out, "--out")
    from cxrlearn.model.bundle import read_meta

    out = make_ensemble(args.runs, args.out, images=args.images, csv=args.csv, progress=not args.no_progress)
    for split in ("val", "test"):  # the members' own AUCs on the same split's images, beside the ensemble's
        own = getattr(read_meta(out).metrics, split, None)
        members = [(run, getattr(read_meta(run).metrics, split, None)) for run in args.runs]
        if own is not None and own.mean_auc is not None:
            print(f"{split} mean AUC: ensemble {own.mean_auc:.4f}; members " + ", ".join(
                f"{Path(run).name} {part.mean_auc:.4f}" if part is not None and part.mean_auc is not None
                else f"{Path(run).name} —" for run, part in members))
    print(f"wrote the ensemble bundle to {out}: thresholds chosen on the members' validation images, its test "
          f"report in {out / EVALUATION_FOLDER}/report.html")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from cxrlearn.workflows.reproduce import REPORT_MD, ReproduceOptions, reproduce

    options = ReproduceOptions(out=args.out, data=args.data, parts=args.parts, images=args.images,
                               official=args.official, sets=args.set, progress=not args.no_progress,
                               command=["cxrlearn", *sys.argv[1:]])
    report = reproduce(args.recipe, options)
    for name, result in report.results.items():
        low, high = result.mean_auc_ci95 or (None, None)
        print(f"{name}: mean AUC {result.mean_auc:.4f}" + (f" (95% CI {low:.4f}-{high:.4f})" if low else "")
              + f" on {result.n_images:,} images; published: "
              + ", ".join(f"{s} {v:.4f}" for s, v in result.published_mean.items()))
    print(f"wrote {args.out / REPORT_MD}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cxrlearn.cli.shard_outputs import answered_files
    from cxrlearn.inference.overlays import write_overlays
    from cxrlearn.inference.predictor import Predictor, find_inputs, prediction_table
    from cxrlearn.workflows.archive import wants_dataset

    if wants_dataset(args.out, args.engine):
        return _predict_dataset(args)
    if args.engine != "local" or args.manifest:
        raise ConfigError(f"{'--manifest' if args.manifest else '--engine ray'} writes a Parquet dataset: give "
                          "--out DIR (a folder, or a name ending .parquet)")
    if not args.inputs:
        raise ConfigError("predict: name the image files or folders to predict (or --manifest TABLE)")
    paths, unreadable = find_inputs(args.inputs)
    if not paths:
        raise DataError(f"no image or DICOM files in {', '.join(map(str, args.inputs))}")
    predictor = Predictor(args.model, runtime=args.runtime, onnx_path=args.onnx, device=args.device)
    if not predictor.thresholds:
        print(f"warning: {args.model} has no thresholds yet (run `cxrlearn evaluate`): no positive calls",
              file=sys.stderr)
    _want_file(args.out, "--out")
    _want_folder(args.cam, "--cam")
    _want_folder(args.dicom_out, "--dicom-out")
    dicom = (_accept(args), _result_options(args, predictor)) if args.dicom_out else None  # refused before predicting
    prediction_log = _open_log(args)
    predictor.summarise = prediction_log is not None
    predictions, failures = predictor.predict_files(paths, batch_size=args.batch_size, progress=not args.no_progress,
                                                    workers=predict_workers() if args.workers is None else args.workers)
    failures = unreadable + failures
    for _, message in failures:
        print(f"cxrlearn predict: skipped {message}", file=sys.stderr)
    failed = {path for path, _ in failures}
    read = [p for p in paths if str(p) not in failed]  # read[i] is the file predictions[i] was made from
    if prediction_log is not None and predictions:
        prediction_log.record(answered_files(read, predictions), predictor, "predict")
        print(f"recorded {len(predictions):,} answer(s) in the prediction log {args.log}", file=sys.stderr)
    if args.strict:
        for prediction in predictions:
            if prediction.flagged:
                print(f"cxrlearn predict: {prediction.image}: refused (--strict): "
                      f"{prediction.verdict.reason}", file=sys.stderr)
        kept = [(path, p) for path, p in zip(read, predictions) if not p.flagged]
        refused = len(predictions) - len(kept)
        read, predictions = [path for path, _ in kept], [p for _, p in kept]
    else:
        refused = 0
    if predictor.input_check is None:
        print(f"warning: {args.model} has no input check: input_check says 'unavailable'", file=sys.stderr)
    if not predictions:
        kept = f"; {args.out} is left as it was" if args.out and args.out.exists() else ""
        why = f"could be read or passed the input check (--strict refused {refused})" if refused else "could be read"
        raise DataError(f"none of the {len(paths):,} input file(s) {why}{kept}")
    rows_written = prediction_table(predictions, predictor.findings, predictor.provenance, args.out)
    if args.cam:
        chosen = [f.strip() for f in args.cam_findings.split(",")] if args.cam_findings else None
        written = write_overlays(predictor, read, predictions, args.cam, chosen)
        print(f"wrote {len(written):,} Grad-CAM overlays to {args.cam}", file=sys.stderr)
    if dicom:
        failures = failures + _write_dicom_results(predictor, read, predictions, args.dicom_out, *dicom)
    if args.out:
        print(f"wrote {rows_written:,} predictions to {args.out}" + (f"; {len(failures)} file(s) skipped" if failures else "")
              + (f"; {refused} refused by --strict" if refused else ""), file=sys.stderr)
    return EXIT_SKIPPED if failures or refused else EXIT_OK


def _predict_dataset(args: argparse.Namespace) -> int:
    """``predict --out DIR``: the Parquet dataset (:mod:`cxrlearn.workflows.archive`), locally or on Ray, with the
    DICOM results and the prediction log per shard (:mod:`cxrlearn.cli.shard_outputs`)."""
    from cxrlearn.inference.predictor import Predictor
    from cxrlearn.workflows.archive import inputs_from, predict_local, predict_on_ray, read_manifest

    unsupported = [option for option, value in (("--cam", args.cam), ("--strict", args.strict),
                                                ("--onnx", args.onnx)) if value]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)}: not with a Parquet dataset's --out yet (write a CSV instead)")
    if bool(args.manifest) == bool(args.inputs):
        raise ConfigError("predict: give either image files and folders or --manifest TABLE")
    if args.out.exists() and not args.out.is_dir():
        raise DataError(f"--out {args.out} is a file; a Parquet dataset is a folder")
    inputs, unreadable = (read_manifest(args.manifest), []) if args.manifest else inputs_from(args.inputs)
    for _, message in unreadable:
        print(f"cxrlearn predict: skipped {message}", file=sys.stderr)
    if not inputs.paths:
        raise DataError(f"no image or DICOM files in {', '.join(map(str, args.inputs))}")
    predictor = Predictor(args.model, runtime=args.runtime, device=args.device)
    hook = _shard_outputs(args, predictor)
    if args.engine == "ray":
        summary = predict_on_ray(args.model, args.runtime, inputs, args.out, args.address, args.actors,
                                 args.shard_images, args.batch_size, progress=not args.no_progress, hook=hook)
    else:
        summary = predict_local(predictor, inputs, args.out, args.shard_images, args.batch_size,
                                predict_workers() if args.workers is None else args.workers,
                                progress=not args.no_progress, hook=hook)
    print(f"cxrlearn predict: {summary.text(args.out)}", file=sys.stderr)
    if args.dicom_out:
        print(f"cxrlearn predict: DICOM results in {args.dicom_out}/part-<shard>/ (inputs given none: "
              f"{args.dicom_out}/part-*/_refused.csv)", file=sys.stderr)
    return EXIT_SKIPPED if summary.failed or unreadable else EXIT_OK


def _shard_outputs(args: argparse.Namespace, predictor):
    """``--dicom-out`` and ``--log`` for a Parquet dataset: every option checked here, before any shard."""
    from cxrlearn.cli.shard_outputs import ShardOutputs

    if not (args.dicom_out or args.log):
        return None
    _want_folder(args.dicom_out, "--dicom-out")
    if args.log:
        _open_log(args)  # a log that cannot be written is said now, not in a worker
    dicom = (_accept(args), _result_options(args, predictor)) if args.dicom_out else (None, None)
    return ShardOutputs(args.dicom_out, *dicom, log=args.log, site_key=args.site_key)


def _open_log(args: argparse.Namespace, default: Path | None = None):
    """``--log``'s prediction log, ``default`` where it is not given, None where neither is: opened before any work,
    so that a log that cannot be written is said at once."""
    target = args.log or default
    if target is None:
        return None
    from cxrlearn.monitoring.log import PredictionLog

    return PredictionLog(target, key_file=args.site_key)


def _write_dicom_results(predictor, read: list[Path], predictions: list, out: Path, accept, options
                         ) -> list[tuple[str, str]]:
    """``predict --dicom-out``: a structured report and its heatmaps (``options``) per DICOM input the model is
    for (``accept``); the refused ones."""
    from cxrlearn.dicom.results import write_dicom_results

    written = write_dicom_results(predictor, read, predictions, out, accept, options)
    if written.not_dicom:
        print(f"cxrlearn predict: {len(written.not_dicom):,} input(s) are not DICOM and get no DICOM output "
              f"(the first: {written.not_dicom[0]})", file=sys.stderr)
    for _, message in written.refused:
        print(f"cxrlearn predict: no DICOM output for {message}", file=sys.stderr)
    reports = sum(path.name.endswith(".sr.dcm") for path in written.files)
    print(f"wrote {reports:,} structured report(s) and {len(written.files) - reports:,} heatmap object(s) to {out}",
          file=sys.stderr)
    return [(str(path), message) for path, message in written.refused]


def _cmd_dicom_listen(args: argparse.Namespace) -> int:
    from cxrlearn.dicom.node import Bounds, Destination, Node
    from cxrlearn.dicom.outbox import Outbox
    from cxrlearn.dicom.tls import Tls
    from cxrlearn.inference.predictor import Predictor

    destination = Destination.parse(args.send_to)
    tls = Tls.load(args.tls_cert, args.tls_key, args.tls_ca)
    _want_folder(args.outbox, "--outbox")
    predictor = Predictor(args.model, runtime=args.runtime, device=args.device)
    outbox = Outbox(args.outbox)
    bounds = Bounds(max_associations=args.max_associations, per_host=min(args.per_host, args.max_associations),
                    idle_s=args.idle_timeout, max_instance_bytes=args.max_instance_mb * 2**20)
    node = Node(predictor, outbox, destination, ae_title=args.ae_title, host=args.host, port=args.port,
                allow_ae=args.allow_ae, secondary_captures=args.secondary_captures, bounds=bounds,
                prediction_log=_node_log(args), accept=_accept(args), options=_result_options(args, predictor),
                tls=tls)
    try:
        node.start()
    except OSError as err:
        raise DataError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    counts = outbox.counts()
    print(f"cxrlearn dicom listen: {args.ae_title} on {args.host}:{args.port}{' (TLS)' if tls else ''}, results to "
          f"{destination}{' (TLS)' if tls else ''}; outbox "
          f"{args.outbox} ({counts.received} waiting to be predicted on, {counts.outgoing} to send)", file=sys.stderr,
          flush=True)
    try:
        while True:
            time.sleep(1.0)
    except (KeyboardInterrupt, Interrupted) as err:
        node.stop()
        counts = outbox.counts()
        raise Interrupted.keeping(err, f"the outbox {args.outbox} ({counts.received} waiting to be predicted on, "
                                       f"{counts.outgoing} to send)") from None


def _cmd_dicom_poll(args: argparse.Namespace) -> int:
    from cxrlearn.dicom.outbox import Outbox
    from cxrlearn.dicom.poll import Poller, check_url, parse_since, read_token
    from cxrlearn.inference.predictor import Predictor

    url = check_url(args.url)
    since = parse_since(args.since) if args.since else None
    token = read_token(args.token_file) if args.token_file else None
    _want_folder(args.outbox, "--outbox")
    predictor = Predictor(args.model, runtime=args.runtime, device=args.device)
    poller = Poller(predictor, Outbox(args.outbox), url, since=since, token=token, prediction_log=_node_log(args),
                    accept=_accept(args), options=_result_options(args, predictor))
    rounds = 0
    try:
        while True:
            rounds += 1
            done = poller.run_round()
            print(f"cxrlearn dicom poll: round {rounds}: {done.found} new instance(s), {done.predicted} predicted on, "
                  f"{done.stored} result(s) stored, {done.waiting} waiting" +
                  (f"; {done.failure}" if done.failure else ""), file=sys.stderr, flush=True)
            if args.interval is None:
                if done.failure or done.waiting:
                    left = (f"{done.waiting} result(s) wait in {args.outbox}; run again to send them" if done.waiting
                            else "run again when it answers")
                    raise DataError(f"{done.failure or 'the archive did not take every result'}: {left}")
                return 0
            time.sleep(args.interval)
    except (KeyboardInterrupt, Interrupted) as err:
        raise Interrupted.keeping(err, f"the outbox {args.outbox} ({len(poller.outbox.to_send())} result(s) to "
                                       "store)") from None


def _node_log(args: argparse.Namespace):
    """The DICOM node's or poller's prediction log: ``--log``, by default ``predictions.sqlite`` in the outbox."""
    from cxrlearn.monitoring.log import NODE_LOG

    return _open_log(args, args.outbox / NODE_LOG)


def _cmd_dicom_render(args: argparse.Namespace) -> int:
    from cxrlearn.dicom.render import REPORT_SUFFIX, render, reports_in

    reports = reports_in(args.report)
    if args.report.is_dir():
        args.out.mkdir(parents=True, exist_ok=True)
        targets = [args.out / (r.name[:-len(REPORT_SUFFIX)] + ".png") for r in reports]
    else:
        targets = [args.out]
    for report, target in zip(reports, targets):
        print(f"wrote {render(report, target)}", file=sys.stderr)
    return EXIT_OK


def _cmd_dicom_status(args: argparse.Namespace) -> int:
    from cxrlearn.dicom.outbox import Outbox

    if not args.outbox.is_dir():
        raise DataError(f"--outbox {args.outbox}: no such folder")
    counts = Outbox(args.outbox, create=False).counts()
    print(f"waiting to be predicted on: {counts.received}\nwaiting to be sent: {counts.outgoing}\n"
          f"sent (confirmed): {counts.sent}\nrefused: {counts.refused}\nrefused as not for this model, ever "
          f"(lateral views, other body parts; --accept): {counts.not_for_model}")
    if counts.last_failure:
        print(f"last send failed: {counts.last_failure} (retrying)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cxrlearn.model.export import export_onnx

    if (args.images or args.csv) and not args.int8:
        raise DataError("--images and --csv go with --int8 (the images it calibrates on and judges with)")
    if args.int8:
        from cxrlearn.workflows.quantize import export_int8  # the run's data and training config: only for --int8

        judgement, out = export_int8(args.model, max_auc_loss=args.max_auc_loss, min_agreement=args.min_agreement,
                                     calibration_images=args.calibration_images, progress=not args.no_progress,
                                     gate=args.gate, images=args.images, csv=args.csv)
        if out is None:
            print(f"cxrlearn export: refused to write the int8 model: {judgement.text()}. What to do: "
                  f"{judgement.advice()}", file=sys.stderr)
            return EXIT_REFUSED
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; predict, serve with --runtime onnx-int8): "
              f"{judgement.text()}")
        return EXIT_OK
    _want_file(args.out, "--out")
    out = export_onnx(args.model, args.out, opset=args.opset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): input 'image' uint8 (batch, 1, S, S), "
          "outputs 'logits' and 'features'")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from cxrlearn.serving.app import serve

    serve(args.model, host=args.host, port=args.port, runtime=args.runtime, max_upload_bytes=args.max_upload_mb * 2**20,
          decoders=args.decoders, upload_timeout_s=args.upload_timeout, limit_concurrency=args.max_connections,
          strict=args.strict, device=args.device, api_key_file=args.api_key_file, max_batch=args.max_batch,
          batch_wait_ms=args.batch_wait_ms, max_per_client=args.max_per_client,
          prediction_log=_open_log(args))
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from cxrlearn.evaluation.model_card import model_card

    sys.stdout.write(model_card(args.model))
    return 0


def _cmd_localize(args: argparse.Namespace) -> int:
    from cxrlearn.evaluation.localization import pointing_game
    from cxrlearn.inference.predictor import Predictor

    result = pointing_game(Predictor(args.model), find_images(args.images), read_boxes(args.boxes),
                           overlays=args.out / "overlays", progress=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "pointing_game.json", json.dumps(result.to_dict(), indent=2) + "\n")
    if not result.boxes:
        print("none of the boxed images is in the image folder")
        return 1
    print(f"pointing game: {result.hit_rate:.1%} of {result.boxes} boxes on {result.images} images "
          f"(always pointing at the centre: {result.centre_hit_rate:.1%})")
    for name, entry in result.per_finding.items():
        print(f"  {name:<20} {entry.hits:>3}/{entry.boxes:<3} {entry.hit_rate:6.1%}   centre {entry.centre_hit_rate:6.1%}")
    print(f"wrote {args.out}/pointing_game.json and overlays (heatmap with the radiologist's box)")
    return 0


def _bounded_int(low: int, high: int, what: str):
    """An argparse type: a whole number in [low, high], refused with a one-line message otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not {what} between {low} and {high}")
        return value
    return parse


def _number_of(unit: str, low: float, high: float, low_allowed: bool):
    """An argparse type: a number of ``unit`` up to ``high``, above ``low`` (or from it, with ``low_allowed``),
    refused with a one-line message otherwise (also -1, nan and inf)."""
    bounds = f"from {low:g} to {high:g}" if low_allowed else f"over {low:g} and at most {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not (low <= value if low_allowed else low < value) or not value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is not a number of {unit} {bounds}")
        return value
    return parse


#: Seconds, over 0 and at most an hour; milliseconds of a wait, from 0 to a second.
_seconds = _number_of("seconds", 0, 3600, low_allowed=False)
_milliseconds = _number_of("milliseconds", 0, 1000, low_allowed=True)


def _ratios(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", type=Path, help="another label table: the generic format (CSV or Parquet: image, "
                        "patient and one column per finding holding 1, 0, blank or -1), or with --dataset a "
                        "public dataset's own label file or folder")
    parser.add_argument("--dataset", choices=sorted(READERS), help="read --table with this dataset's reader")
    _add_reading_options(parser)


def _add_reading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--column", action="append", metavar="ROLE=NAME",
                        help="the generic table's column for a role: image, patient, view, sex or age "
                             "(default image=image, patient=patient; view, sex, age when so named)")
    parser.add_argument("--uncertain", choices=list(UNCERTAIN_POLICIES), default="ignore",
                        help="what an uncertain (-1) label becomes: ignore (unknown), positive or negative")
    parser.add_argument("--findings", metavar="A,B,...",
                        help="the table's finding columns, comma-separated (default: every column that is not the "
                             "image, patient, view, sex or age); the other columns (an accession, a site) are ignored "
                             "(merge: the generic-format tables' columns)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrlearn",
        description="Train, evaluate and serve chest X-ray classifiers: NIH ChestX-ray14's 14 findings by default, "
        "or the findings of your own table or another public dataset.",
    )
    parser.add_argument("--version", action="version", version=f"cxrlearn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    table_args = argparse.ArgumentParser(add_help=False)
    table_args.add_argument("--csv", type=Path, help="NIH label table (Data_Entry_2017*.csv[.gz]); "
                            "default: the copy of NIH's 2020 table shipped with cxrlearn")
    _add_table_options(table_args)

    _add_data_commands(commands, table_args)
    _add_training_commands(commands, table_args)
    _add_comparison_commands(commands, table_args)
    _add_model_commands(commands)
    _add_dicom_commands(commands)
    _add_monitor_command(commands)
    _add_inspection_commands(commands, table_args)
    _describe_from_help(parser)
    return parser


def _describe_from_help(parser: argparse.ArgumentParser) -> None:
    """Every command's --help opens with a description: its own, or else its one-line help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe_from_help(sub)


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--runtime and --device, as every command that runs a model bundle takes them."""
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="what runs the network: the bundle in PyTorch (default), or the ONNX file `cxrlearn "
                             "export` wrote into the bundle, on ONNX Runtime (onnx: float; onnx-int8: int8, whose "
                             "probabilities differ a little) or OpenVINO (openvino, openvino-int8: the same files; "
                             "pip install 'cxrlearn[openvino]'); every answer names the runtime and its file's SHA-256")
    parser.add_argument("--device", default="auto", help="where the torch model (and Grad-CAM's, with --runtime onnx) "
                        "runs: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")


def _add_dicom_result_options(parser: argparse.ArgumentParser) -> None:
    """--accept and --heatmap, as every command that writes DICOM results takes them (cxrlearn.dicom.routing,
    cxrlearn.dicom.results.Heatmaps)."""
    parser.add_argument("--accept", metavar="RULE",
                        help="the radiographs the model answers, by their header: modality=CR|DX,body=CHEST,view=PA|AP "
                             "(the default; a field left out keeps it, field=any accepts anything), or any; others "
                             "get no result and are refused with the reason (lateral views, other body parts)")
    parser.add_argument("--heatmap", metavar="KINDS",
                        help="the Grad-CAM heatmaps sent with each report: segmentation (a fractional DICOM "
                             "segmentation, one segment per finding called present, that a viewer can switch on and "
                             "off), capture (a secondary capture every PACS shows), both (the default: "
                             "segmentation,capture) or none")
    parser.add_argument("--not-analysed-report", action="store_true",
                        help="for a radiograph --accept refuses, send a structured report that says it was not "
                             "analysed and why (default: no result; the instance is refused with the reason)")
    parser.add_argument("--codes", metavar="CSV", type=Path,
                        help="the site's codes for the findings (columns finding,scheme,value,meaning; SNOMED CT as "
                             "SCT, RadLex as RADLEX): checked before anything starts; findings left out keep "
                             "cxrlearn's own codes (99CXRLEARN)")


def _accept(args: argparse.Namespace):
    from cxrlearn.dicom.routing import Accept

    return Accept.parse(args.accept)


def _result_options(args: argparse.Namespace, predictor):
    """--heatmap and --codes, checked against the model before anything is predicted or a node starts."""
    from cxrlearn.dicom.codes import FindingCodes
    from cxrlearn.dicom.results import Heatmaps, ResultOptions

    codes = FindingCodes.read(args.codes, predictor.findings) if args.codes else FindingCodes()
    return ResultOptions(Heatmaps.parse(args.heatmap), codes, args.not_analysed_report)


def _add_log_options(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--log and --site-key, as every command that answers takes them (cxrlearn.monitoring.log)."""
    parser.add_argument("--log", metavar="LOG",
                        help="record every answer in this prediction log (an SQLite file, or postgresql://USER@HOST/DB "
                             "with cxrlearn[postgres]; `cxrlearn monitor` judges it): probabilities, calls, the input "
                             "check, image summaries and DICOM tags, never pixels or names"
                             + (f" (default: {default})" if default else ""))
    parser.add_argument("--site-key", type=Path, metavar="FILE",
                        help="the key Patient IDs are hashed with in the log (HMAC-SHA-256; for a file, default "
                             "LOG.key, made once; for a database, required: the same file on every node)")


def _add_data_commands(commands, table_args: argparse.ArgumentParser) -> None:
    """split, stats, merge, prepare, download: tables, splits and the image cache."""
    split = commands.add_parser(
        "split", parents=[table_args], help="make a fair patient-wise train/val/test split",
        description="Patient-wise train/val/test split, stratified on every finding and on No Finding. "
        "Writes FILE (image,patient_id,split) and FILE's report as NAME.report.json beside it.",
    )
    split.add_argument("--out", type=Path, required=True, help="split file to write (CSV)")
    split.add_argument("--ratios", type=_ratios, nargs=3, default=list(DEFAULT_RATIOS), metavar=("TRAIN", "VAL", "TEST"),
                       help="the share of images in each part (default %(default)s)")
    split.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %(default)s, as Kufel et al. 2023)")
    split.add_argument("--official-test", type=Path, nargs="?", const=tables.test_list(), metavar="LIST",
                       help="use NIH's official test list as the test set (default LIST: the shipped test_list.txt)")
    split.add_argument("--images", type=Path, help="split only the images present in this folder")
    split.add_argument("--method", choices=METHODS, default=METHODS[0], help="'random' is a baseline for comparison")
    split.set_defaults(run=_cmd_split)

    stats = commands.add_parser(
        "stats", parents=[table_args], help="counts per finding, co-occurrence, patients, views, age and sex"
    )
    stats.add_argument("--split", type=Path, help="split file: give the statistics of each split")
    stats.add_argument("--images", type=Path, help="only the images present in this folder")
    stats.add_argument("--json", type=Path, help="also save the statistics as JSON")
    stats.set_defaults(run=_cmd_stats)

    merge = commands.add_parser(
        "merge", help="merge the label tables of several datasets into one table for --table",
        description="One table (generic format) from several: each SOURCE is NAME=PATH, a dataset cxrlearn reads "
        f"({', '.join(sorted(READERS))}) and its label file or folder, or any other name and a table in the "
        "generic format (--column names its columns); 'nih' alone is the shipped NIH table. Findings are "
        "harmonised; a finding a dataset lacks is unknown there, never negative; patient ids are prefixed by "
        "the dataset. The split then splits each dataset on its own.",
    )
    merge.add_argument("sources", nargs="+", metavar="SOURCE", help="NAME=PATH, or nih")
    merge.add_argument("--out", type=Path, required=True, help="table to write (.parquet, .csv or .csv.gz)")
    merge.add_argument("--image-folder", action="append", metavar="NAME=FOLDER",
                       help="put NAME's relative image paths under FOLDER, a folder of the image folder that "
                            "training reads (--images); file names (NIH's) are found as NIH's archives unpack there")
    _add_reading_options(merge)
    merge.set_defaults(run=_cmd_merge)

    prepare = commands.add_parser(
        "prepare",
        parents=[table_args],
        help="decode and resize every present image once into a memory-mapped cache",
    )
    prepare.add_argument("--images", type=Path, required=True, help="image folder (flat or as the NIH archives unpack)")
    prepare.add_argument("--size", type=int, default=IMAGE_SIZE,
                         help="side of the square images (default %(default)s: training's default input size)")
    prepare.add_argument("--out", type=Path, required=True, help="cache folder (created, or resumed)")
    prepare.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU core)")
    prepare.set_defaults(run=_cmd_prepare)

    download = commands.add_parser("download", help="download and unpack the NIH ChestX-ray14 images")
    download.add_argument("dataset", choices=["nih"], help="which dataset (nih: the 12 official archives)")
    download.add_argument("--to", type=Path, required=True, help="folder to unpack images_001/images/… into")
    download.add_argument("--parts", default=ALL_PARTS, help="archives to fetch, e.g. 1 or 1-3,7 (default %(default)s)")
    download.add_argument("--archives", type=Path, help="archive list (archive, url, md5); default: cxrlearn's copy of NIH's")
    download.add_argument("--keep-archives", action="store_true", help="keep the .tar.gz files after unpacking")
    download.add_argument("--retries", type=_bounded_int(0, 100, "a count"), default=RETRIES,
                          help="tries per archive after a failure (default %(default)s)")
    download.add_argument("--timeout", type=_seconds, default=STALL_TIMEOUT_S,
                          help="seconds without data before a retry (default %(default)s)")
    download.set_defaults(run=_cmd_download)


def _run_arguments() -> argparse.ArgumentParser:
    """What a run is made of, as train and linear-probe take it: the config, the data, the backbone, the folder."""
    run_args = argparse.ArgumentParser(add_help=False)
    run_args.add_argument("--config", type=Path, help="YAML config (e.g. configs/kufel2023.yaml)")
    run_args.add_argument("--images", type=Path, help="image folder")
    run_args.add_argument("--csv", type=Path, help="NIH label table")
    _add_table_options(run_args)
    run_args.add_argument("--split", type=Path, help="split file; default: the custom split of the images present")
    run_args.add_argument("--cache", type=Path, metavar="DIR",
                          help="preprocessing cache (one `cxrlearn prepare` made, or a new folder; data.cache); "
                               "default: RUN/../cache/<table>-<size>, shared by the runs beside it")
    run_args.add_argument("--backbone", help="timm backbone name, e.g. efficientnet_b1")
    run_args.add_argument("--image-size", type=int, help="the network's input side in pixels (data.image_size)")
    run_args.add_argument("--batch-size", type=int, help="images per training batch (data.batch_size)")
    run_args.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="any config value, e.g. optim.lr=3e-4")
    run_args.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, logs and the model bundle")
    run_args.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    return run_args


def _add_training_commands(commands, table_args: argparse.ArgumentParser) -> None:
    """train and evaluate."""
    run_args = _run_arguments()
    train = commands.add_parser(
        "train", parents=[run_args],
        help="train a classifier: split, cache, fine-tune, and write the model bundle",
        description="Train from a YAML config (configs/*.yaml); options override the config.",
    )
    train.add_argument("--init-from", type=Path, metavar="RUN",
                       help="start from this cxrlearn run's backbone and head (shared findings keep their head rows)")
    train.add_argument("--epochs", type=int, help="epochs to train at most (train.epochs)")
    train.add_argument("--seeds", type=int, metavar="N",
                       help="train N runs differing only in the training seed (the same split) into OUT/seed-K/, "
                            "with their mean and spread in OUT/seeds.json; `compare` takes OUT as one model")
    train.add_argument("--devices", help="devices per node (e.g. 1, 2 or auto)")
    train.add_argument("--num-nodes", type=int, help="machines of a multi-node run (train.num_nodes)")
    train.add_argument("--accelerator", help="auto, cpu or gpu")
    train.add_argument("--precision", help="32-true, bf16-mixed or 16-mixed")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    train.add_argument("--mlflow", metavar="URI", help="log parameters, per-epoch metrics, the split's digest and the "
                       "bundle to MLflow (file:./mlruns, or a tracking server's URL); needs cxrlearn[mlflow]")
    train.set_defaults(run=_cmd_train)

    probe = commands.add_parser(
        "linear-probe", parents=[run_args],
        help="the small-data baseline: a logistic regression per finding on frozen ImageNet features, as a bundle",
        description="The backbone's pooled ImageNet features of the training and validation images (the run's "
        "split, cache and preprocessing, as train makes them), and an L2 logistic regression per finding on the "
        "standardised features, its strength chosen by the validation mean AUC. Writes an ordinary model bundle "
        "(evaluate, compare, predict, serve and export take it) and OUT/probe.json.")
    probe.set_defaults(run=_cmd_linear_probe)

    from cxrlearn.evaluation.operating_points import DEFAULT_METHOD
    from cxrlearn.evaluation.operating_points import METHODS as THRESHOLD_METHODS

    evaluate = commands.add_parser(
        "evaluate", parents=[table_args],
        help="per-finding AUC with patient-level CIs, operating points, calibration, subgroups, and a report",
        description="Judge a trained model on labelled images: every image of --images that the label table labels "
        "(external validation: images of the run's train or val patients are refused, and the bundle's own "
        "thresholds and temperatures are applied as they are); or, with --subset (and the run's split or "
        "--split), that split's subset, choosing thresholds (and with --calibrate temperatures) on its val "
        "images and storing them in the bundle; or NIH's official test list (--official-test).",
    )
    evaluate.add_argument("--model", type=Path, required=True, help="run folder holding model.json + model.safetensors")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for metrics.json, predictions.csv and the report")
    _add_judging_options(evaluate)
    evaluate.add_argument("--expert-labels", type=Path, help="Google's 2019 expert labels (google2019_nih-chest-xray-labels.csv.gz)")
    evaluate.add_argument("--calibrate", action="store_true", help="fit a temperature per finding on val (stored in the bundle)")
    evaluate.add_argument("--threshold-method", choices=THRESHOLD_METHODS, default=DEFAULT_METHOD,
                          help="which operating point the bundle's thresholds use (default %(default)s)")
    evaluate.add_argument("--no-bundle-update", action="store_true", help="do not write thresholds into the bundle")
    evaluate.add_argument("--mlflow", metavar="URI", help="log the mean and per-finding AUCs and the report into the "
                          "run's MLflow run (the one `train --mlflow URI` made; else a new one); needs cxrlearn[mlflow]")
    evaluate.set_defaults(run=_cmd_evaluate)


def _add_comparison_commands(commands, table_args: argparse.ArgumentParser) -> None:
    """compare and ensemble: several runs at once."""
    compare = commands.add_parser(
        "compare", parents=[table_args],
        help="is model B better than model A? paired tests on the same images, a report and a forest plot",
        description="Evaluate each model (a bundle, or a folder of seeds from `train --seeds N`: the mean of its "
        "members' probabilities) on the same images, as evaluate does (no bundle is changed), and compare them on "
        "the images all of them judged: per finding and for the mean AUC, the difference with a paired patient-"
        "bootstrap 95% interval, DeLong's test and Holm's correction across findings. Writes OUT/compare.json, "
        "compare.md, compare.html and forest.png, and each model's evaluation under OUT/models/.")
    compare.add_argument("models", nargs="+", type=Path, metavar="RUN", help="two or more runs (or seeds folders); "
                         "each later one is compared with each earlier one")
    compare.add_argument("--out", type=Path, required=True, help="folder for the comparison")
    _add_judging_options(compare)
    compare.set_defaults(run=_cmd_compare)

    ensemble = commands.add_parser(
        "ensemble", help="several runs as one bundle that averages their probabilities",
        description="One model bundle holding every member's network (bundles of the same findings and "
        "preprocessing, trained on one split; a seeds folder stands for its runs), averaging their probabilities. "
        "Its input check is fitted and its thresholds chosen on the members' own training and validation images "
        "(their table, split and cache), and it is judged on their test images (OUT/evaluation). It works "
        "wherever a bundle does: evaluate, compare, predict, serve, export, DICOM.")
    ensemble.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="two or more runs (or seeds folders)")
    ensemble.add_argument("--out", type=Path, required=True, help="folder for the ensemble's bundle")
    ensemble.add_argument("--images", type=Path, help="image folder (default: the first member's, as its config says)")
    ensemble.add_argument("--csv", type=Path, help="NIH label table (default: the first member's)")
    ensemble.add_argument("--no-progress", action="store_true", help="no progress bars")
    ensemble.set_defaults(run=_cmd_ensemble)


def _add_judging_options(parser: argparse.ArgumentParser) -> None:
    """What evaluate and compare judge, and how: the images, the subset, the bootstrap, the runtime."""
    from cxrlearn.evaluation.bootstrap import DEFAULT_RESAMPLES
    from cxrlearn.evaluation.bootstrap import DEFAULT_SEED as BOOTSTRAP_SEED

    parser.add_argument("--images", type=Path, required=True, help="image folder (flat or as the NIH archives unpack)")
    parser.add_argument("--split", type=Path, help="split file to judge a subset of (default with --subset: the run's own)")
    parser.add_argument("--subset", help="which split of --split to judge, e.g. test; without --split and --subset, "
                        "every labelled image in --images is judged (none may be of the run's train or val patients)")
    parser.add_argument("--official-test", type=Path, nargs="?", const=tables.test_list(), metavar="LIST",
                        help="judge the images of NIH's official test list (default LIST: the shipped test_list.txt)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--seed", type=int, default=BOOTSTRAP_SEED, help="bootstrap seed (default %(default)s)")
    parser.add_argument("--tta", action="store_true", help="average each image with its mirror, and report whether it helps")
    parser.add_argument("--cache", type=Path, help="preprocessing cache (default: the run's)")
    parser.add_argument("--batch-size", type=_bounded_int(1, 4096, "a batch size"), default=EVALUATE_BATCH_SIZE,
                        help="images per forward pass (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="processes decoding images into the cache")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="what runs the network: the bundle in PyTorch, or its ONNX export on ONNX Runtime (onnx, "
                        "onnx-int8) or OpenVINO (openvino, openvino-int8), made by `cxrlearn export`; the bundle's "
                        "thresholds are then not updated")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_export_command(commands) -> None:
    """export: ONNX, and int8 ONNX behind its accuracy gate."""
    export = commands.add_parser(
        "export", help="export a model bundle to ONNX (preprocessing contract inside)",
        description="Write the bundle as one ONNX file (uint8 image in; logits and pooled features out; the "
        "preprocessing contract in its metadata), or with --int8 an int8 one judged against the float model first. "
        "Each file written is recorded in RUN/exports.json, and every ONNX runtime checks its file against it.")
    export.add_argument("--model", type=Path, required=True, help="run folder holding the model bundle")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="the exported format (ONNX)")
    export.add_argument("--out", type=Path, help="ONNX file to write (default: RUN_DIR/model.onnx, where "
                        "predict --runtime onnx and serve --runtime onnx look)")
    export.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset (default %(default)s)")
    export.add_argument("--int8", action="store_true",
                        help="instead, quantise to int8 (RUN_DIR/model.int8.onnx, for --runtime onnx-int8; "
                             "model.onnx is not written), calibrated on the run's training images; written only if, "
                             "on its validation images, it keeps the mean AUC (paired patient bootstrap) and the "
                             "input check's verdicts")
    export.add_argument("--max-auc-loss", type=float, default=INT8_MAX_AUC_LOSS, metavar="X",
                        help="--int8: the largest loss of mean AUC allowed (default %(default)s): the 95%% interval of "
                             "(int8 - float) must reach above -X (--gate no-loss) or lie wholly above it (equivalence)")
    export.add_argument("--gate", choices=INT8_GATES, default=INT8_GATE,
                        help="--int8: no-loss (default): written unless the validation images show a loss of mean AUC "
                             "larger than --max-auc-loss or a finding significantly worse (DeLong, Holm); "
                             "equivalence: only if they show the loss is smaller (needs thousands of images); "
                             "none: written whatever the figures (printed and recorded in the file)")
    export.add_argument("--min-agreement", type=float, default=INT8_MIN_AGREEMENT, metavar="F",
                        help="--int8: the least share of validation images with the same input-check verdict "
                             "(default %(default)s)")
    export.add_argument("--images", type=Path, metavar="DIR",
                        help="--int8: read the run's training and validation images from DIR (a run copied away from "
                             "its preprocessing cache); they are decoded into a cache beside the run")
    export.add_argument("--csv", type=Path, metavar="TABLE",
                        help="--int8 with --images: NIH's label table for them (default: the run's own)")
    export.add_argument("--calibration-images", type=int, default=INT8_CALIBRATION_IMAGES, metavar="N",
                        help="--int8: training images the activation ranges are measured on (default %(default)s)")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(run=_cmd_export)


def _add_model_commands(commands) -> None:
    """reproduce, predict, export, serve: using a model bundle."""
    reproduce = commands.add_parser(
        "reproduce", help="a published result from nothing: download, split, prepare, train, evaluate, compare",
        description="Download NIH's images (or use --images), make the recipe's split, prepare the cache, train, "
        "evaluate, and write OUT/reproduction.md beside the paper's per-finding values. Rerun the same command "
        "after an interruption to continue at the first unfinished stage.")
    reproduce.add_argument("recipe", choices=sorted(RECIPES), help="which publication")
    reproduce.add_argument("--out", type=Path, required=True, help="folder for everything the reproduction makes")
    reproduce.add_argument("--data", type=Path, help="where to download and unpack the images (default OUT/data)")
    reproduce.add_argument("--parts", default=ALL_PARTS, help="which of NIH's 12 archives (default %(default)s)")
    reproduce.add_argument("--images", type=Path, help="images already on disk: no download")
    reproduce.add_argument("--official", action="store_true",
                           help="also train on a split that keeps NIH's official test list out, and judge that list")
    reproduce.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override the recipe's config, e.g. train.epochs=5")
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bars")
    reproduce.set_defaults(run=_cmd_reproduce)
    _add_predict_command(commands)
    _add_export_command(commands)
    _add_serve_command(commands)


def _add_predict_command(commands) -> None:
    predict = commands.add_parser(
        "predict", help="probabilities and positive findings for X-ray files or folders (PNG, JPEG, TIFF, DICOM)",
        description="One row per image: image; one probability per finding of the model; positive_findings and "
        "not_called (findings without a threshold, |-separated); one <finding>_positive column each (1 or 0 at the "
        "bundle's thresholds, empty where not called); input_check and input_score; model_sha256, runtime, "
        "runtime_sha256 and cxrlearn_version. Unreadable files are reported and skipped (exit status 3); when none "
        "can be read nothing is written (exit status 2).",
    )
    predict.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="image files and folders")
    predict.add_argument("--model", type=Path, required=True, help="run folder holding the model bundle")
    predict.add_argument("--out", type=Path, help="FILE.csv or FILE.json (default: CSV on standard output); or a "
                         "folder (one that exists, or a name ending .parquet; always with --engine ray): a Parquet "
                         "dataset written shard by shard, which a rerun completes, predicting each image once")
    predict.add_argument("--manifest", type=Path, metavar="TABLE",
                         help="inputs from a CSV or Parquet table's 'path' column (paths or file:// URIs); its other "
                              "columns are carried to the Parquet output")
    predict.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="local (default), or ray: decoding as Ray Data tasks and the model in an actor pool on "
                              "a Ray cluster (pip install 'cxrlearn[ray]'); needs --out DIR")
    predict.add_argument("--address", metavar="ADDR",
                         help="--engine ray: the cluster (host:port of `ray start --head`, or auto; default: a new "
                              "local one)")
    predict.add_argument("--actors", type=_bounded_int(1, 4096, "a count"),
                         help="--engine ray: models loaded at once (default: one per node)")
    predict.add_argument("--shard-images", type=_bounded_int(1, 1_000_000, "a count"), default=SHARD_IMAGES,
                         help="Parquet output: images per shard, the unit written whole (default %(default)s)")
    predict.add_argument("--cam", type=Path, metavar="DIR", help="write Grad-CAM overlays here")
    predict.add_argument("--dicom-out", type=Path, metavar="DIR",
                         help="for each DICOM input, a structured report (TID 1500) and a Grad-CAM secondary capture "
                              "in its study, written here as DICOM files (not for diagnostic use)")
    predict.add_argument("--cam-findings", help="findings for --cam, comma-separated (default: the positive ones, else the top one)")
    _add_runtime_options(predict)
    predict.add_argument("--onnx", type=Path, help="ONNX file for --runtime onnx (default: RUN_DIR/model.onnx)")
    predict.add_argument("--batch-size", type=_bounded_int(1, 4096, "a batch size"), default=PREDICT_BATCH_SIZE,
                         help="images per forward pass (default %(default)s)")
    predict.add_argument("--workers", type=_bounded_int(0, 64, "a count"),
                         help="processes decoding and preparing images ahead of the network (0: this one; default: "
                              "one per core beyond the first, at most 4)")
    predict.add_argument("--strict", action="store_true",
                         help="refuse inputs the input check flags (not a frontal chest X-ray like the training "
                              "images), naming the reason, instead of predicting with a warning")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_log_options(predict)
    _add_dicom_result_options(predict)
    predict.set_defaults(run=_cmd_predict)


def _add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve", help="HTTP service and web page for a model bundle",
        description="POST /v1/predict (multipart 'file'; ?cam=top or a finding adds Grad-CAM), GET /v1/model, "
        "GET /healthz, and a web page at /. Requests share batched forward passes; every answer names the model, "
        "the runtime and its file, and a request id.")
    serve.add_argument("--model", type=Path, required=True, help="run folder holding the model bundle")
    serve.add_argument("--strict", action="store_true",
                       help="answer 422 (naming the reason) to inputs the input check flags, instead of a warning")
    serve.add_argument("--host", default=HOST, help="address to listen on (default %(default)s: this machine only)")
    serve.add_argument("--port", type=_bounded_int(1, 65535, "a TCP port"), default=PORT, help="TCP port (default %(default)s)")
    _add_runtime_options(serve)
    serve.add_argument("--max-upload-mb", type=_bounded_int(1, 1024, "megabytes"), default=MAX_UPLOAD_BYTES // 2**20,
                       help="the largest upload accepted, in MiB (default %(default)s)")
    serve.add_argument("--upload-timeout", type=float, default=UPLOAD_TIMEOUT_S,
                       help="seconds an upload may take to arrive whole (default %(default)s)")
    serve.add_argument("--decoders", type=_bounded_int(1, 64, "a count"),
                       help="images decoded at once (default: one per core, at most 4)")
    serve.add_argument("--api-key-file", type=Path, metavar="FILE",
                       help="require the key on FILE's first line on /v1/ (Authorization: Bearer KEY or X-API-Key); "
                            "the page asks for it once")
    serve.add_argument("--max-connections", type=_bounded_int(1, 10_000, "a count"), default=MAX_CONNECTIONS,
                       help="connections served at once; more are answered 503 (default %(default)s)")
    serve.add_argument("--max-per-client", type=_bounded_int(1, 10_000, "a count"), default=MAX_PER_CLIENT,
                       help="connections one client address may hold; more are closed at once (default %(default)s; "
                            "behind a reverse proxy, raise it to --max-connections)")
    serve.add_argument("--max-batch", type=_bounded_int(1, 1024, "a batch size"), default=MAX_BATCH,
                       help="most images in one forward pass, from requests that arrive together (default %(default)s)")
    serve.add_argument("--batch-wait-ms", type=_milliseconds, default=BATCH_WAIT_MS,
                       help="milliseconds a request waits for others to share its forward pass (default %(default)s; "
                            "0 with --max-batch 1: one request per pass)")
    _add_log_options(serve)
    serve.set_defaults(run=_cmd_serve)


def _add_monitor_command(commands) -> None:
    monitor = commands.add_parser(
        "monitor", help="judge a prediction log against the model's reference: drift and label-free performance",
        description="Each window of the log's answers is tested against the answers and image summaries of the "
        "bundle's reference images (its validation images): each finding's probabilities and positive rate, the "
        "input check's flag rate, pixel statistics and the backbone's features, with Holm's correction across a "
        "window's tests (at most 5% false alarms per window), and each finding's AUC estimated without labels. "
        "Writes OUT/monitor.json, monitor.md and monitor.html; exit status 4 when a window raised an alert.")
    monitor.add_argument("--model", type=Path, required=True, help="run folder holding the model bundle")
    monitor.add_argument("--log", required=True, metavar="LOG", help="the prediction log (predict --log, serve "
                         "--log, the DICOM node's OUTBOX/predictions.sqlite; or a postgresql:// URL)")
    monitor.add_argument("--out", type=Path, required=True, help="folder for monitor.json, monitor.md, monitor.html")
    monitor.add_argument("--window", default="200", help="answers per window (200), or a span of time (14d, 12h) "
                         "of at least 30 answers (default %(default)s)")
    monitor.add_argument("--since", help="judge answers from this date or time on (2026-11-30, 2026-11-30T08:00)")
    monitor.add_argument("--any-model", action="store_true",
                         help="judge answers of other models (other digests) in the log too")
    monitor.add_argument("--labels", type=Path, metavar="TABLE",
                         help="a label table naming the answers' images (NIH's format, or image, patient_id and a 0/1 "
                              "column per finding): each window's realised AUC with its patient-bootstrap interval")
    monitor.add_argument("--reference-images", type=Path, nargs="+", metavar="DIR",
                         help="make the bundle's reference from these images (files or folders) first: for a bundle "
                              "without one, or to refresh it")
    monitor.add_argument("--assess-ai", type=Path, metavar="FILE",
                         help="also write the judged answers as a CSV file in the columns of the ACR's Assess-AI "
                              "registry (ACR Connect's AI Result import): one row per answer and finding")
    monitor.set_defaults(run=_cmd_monitor)


def _cmd_monitor(args: argparse.Namespace) -> int:
    from cxrlearn.workflows.monitor import ALERT_STATUS, WindowSpec, export_assess_ai, monitor, parse_since

    window = WindowSpec.parse(args.window)
    since = parse_since(args.since) if args.since else None
    _want_folder(args.out, "--out")
    _want_file(args.assess_ai, "--assess-ai")
    result = monitor(args.model, args.log, args.out, window, since, args.any_model, args.reference_images,
                     args.labels)
    judged = [w for w in result.windows if w.judged]
    if args.assess_ai:
        written = export_assess_ai(args.model, args.log, args.assess_ai, since, args.any_model)
        print(f"wrote {written:,} Assess-AI rows ({result.answers:,} answers, one row per finding) to {args.assess_ai}")
    for w in result.windows:
        said = "; ".join([*(t.describe() for t in w.alerts), *w.unseen]) or w.note or "no alert"
        realised = result.realised[w.index - 1] if result.realised else None
        if realised is not None and realised.mean_auc is not None:
            said += f"; realised mean AUC {realised.mean_auc:.3f} on {realised.labelled} labelled"
        print(f"window {w.index} ({w.answers} answers, {w.first:%Y-%m-%d %H:%M} to {w.last:%Y-%m-%d %H:%M}): {said}")
    for alarm in result.slow_drift:
        print(alarm.describe())
    alerts = result.alerts
    print(f"{len(alerts)} alert(s) in {len(judged)} judged window(s) of {result.answers:,} answers"
          + (f", {len(result.slow_drift)} slow drift(s)" if result.slow_drift else "")
          + f"; wrote {args.out}/monitor.json, monitor.md, monitor.html")
    return ALERT_STATUS if alerts or result.slow_drift else EXIT_OK


def _add_dicom_commands(commands) -> None:
    """dicom listen, poll and status: the hospital's workflow."""
    dicom = commands.add_parser("dicom", help="a DICOM node: results as structured reports and heatmaps to a PACS")
    dicom_commands = dicom.add_subparsers(dest="dicom_command", required=True, metavar="COMMAND")
    listen = dicom_commands.add_parser(
        "listen", help="receive CR/DX images (C-STORE), predict, send a structured report and a heatmap on",
        description="A C-STORE SCP that acknowledges each instance once it is on disk, predicts in the background "
                    "and sends the results to --send-to by C-STORE; what is not yet confirmed waits in --outbox "
                    "and is retried, also after a restart.")
    listen.add_argument("--model", type=Path, required=True, help="run folder holding the model bundle")
    listen.add_argument("--send-to", required=True, metavar="AE@HOST:PORT", help="where results go (a PACS)")
    listen.add_argument("--outbox", type=Path, default=Path("cxrlearn-outbox"),
                        help="folder of received instances and unsent results (default %(default)s)")
    listen.add_argument("--ae-title", default="CXRLEARN", help="this node's AE title (default %(default)s)")
    listen.add_argument("--host", default=HOST, help="address to listen on (default %(default)s: this machine only)")
    listen.add_argument("--port", type=_bounded_int(1, 65535, "a TCP port"), default=11112,
                        help="TCP port (default %(default)s)")
    listen.add_argument("--allow-ae", action="append", metavar="NAME",
                        help="accept associations only from this calling AE title (repeat for several)")
    listen.add_argument("--max-associations", type=_bounded_int(1, 1000, "a number of associations"), default=10,
                        help="associations at once; a sender beyond them is rejected (default %(default)s)")
    listen.add_argument("--per-host", type=_bounded_int(1, 1000, "a number of associations"), default=4,
                        help="associations one address may hold at once (default %(default)s)")
    listen.add_argument("--idle-timeout", type=_seconds, default=30.0, metavar="S",
                        help="close a connection or association that sends nothing for S seconds (default %(default)s)")
    listen.add_argument("--max-instance-mb", type=_bounded_int(1, 65536, "megabytes"), default=256, metavar="MB",
                        help="refuse (status 0xA700) an instance larger than MB megabytes (default %(default)s)")
    listen.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="DICOM TLS: the node's certificate; with --tls-key it listens for TLS only and sends over "
                             "TLS (checked before it starts: an expired certificate or another's key is refused)")
    listen.add_argument("--tls-key", type=Path, metavar="PEM", help="DICOM TLS: the certificate's private key")
    listen.add_argument("--tls-ca", type=Path, metavar="PEM",
                        help="DICOM TLS: the CA certificates peers must chain to; callers must then present a "
                             "certificate (mutual authentication) and the destination's must name its host "
                             "(default: the system's CAs for the destination, no certificate asked of callers)")
    listen.add_argument("--secondary-captures", action="store_true",
                        help="answer secondary captures too (default: CR and DX only; cxrlearn's own results are "
                             "never answered)")
    _add_runtime_options(listen)
    _add_log_options(listen, "OUTBOX/predictions.sqlite")
    _add_dicom_result_options(listen)
    listen.set_defaults(run=_cmd_dicom_listen)
    poll = dicom_commands.add_parser(
        "poll", help="find new CR/DX images in a DICOMweb archive, predict, store a structured report and a heatmap",
        description="Each round: QIDO-RS finds CR and DX instances this outbox has not taken, WADO-RS retrieves "
                    "them, the model predicts, STOW-RS stores each one's structured report and heatmap capture in "
                    "the archive. What the outbox took is never taken again, so reruns do not duplicate. Without "
                    "--interval: one round, exiting with status 2 when results remain unsent.")
    poll.add_argument("--model", type=Path, required=True, help="run folder holding the model bundle")
    poll.add_argument("--url", required=True, help="the archive's DICOMweb root, as http://HOST:PORT/dicom-web")
    poll.add_argument("--since", metavar="DATE", help="only studies dated on or after DATE (YYYY-MM-DD)")
    poll.add_argument("--interval", type=_seconds, metavar="S",
                      help="poll every S seconds until stopped (default: one round)")
    poll.add_argument("--outbox", type=Path, default=Path("cxrlearn-outbox"),
                      help="folder of retrieved instances, unsent results and the log (default %(default)s)")
    poll.add_argument("--token-file", type=Path, metavar="FILE",
                      help="send FILE's first line as a bearer token (Authorization: Bearer ...)")
    _add_runtime_options(poll)
    _add_log_options(poll, "OUTBOX/predictions.sqlite")
    _add_dicom_result_options(poll)
    poll.set_defaults(run=_cmd_dicom_poll)
    status = dicom_commands.add_parser(
        "status", help="what a node's outbox holds: queued, sent, refused",
        description="Count what a `dicom listen` or `dicom poll` outbox holds: instances waiting to be predicted on, "
        "results waiting to be sent, results sent and confirmed, files refused, and the last failed send. Reads "
        "only; a folder that is not an outbox is refused.")
    status.add_argument("--outbox", type=Path, default=Path("cxrlearn-outbox"), help="the outbox folder "
                        "(default %(default)s)")
    status.set_defaults(run=_cmd_dicom_status)
    render = dicom_commands.add_parser(
        "render", help="draw structured reports as a reader sees them (PNG)",
        description="Draw each cxrlearn structured report (a .sr.dcm file, or every one in a folder) as a reader "
        "sees it: the heatmap capture written beside it (.sc.dcm), the findings with probability, threshold and call, "
        "the input check and the report's marks; for the evidence creator's side of a conformance test, or to check "
        "what a viewer shows.")
    render.add_argument("report", type=Path, metavar="SR_OR_DIR", help="a structured report, or a folder of them")
    render.add_argument("--out", type=Path, required=True,
                        help="the PNG to write (a folder, one PNG per report, when SR_OR_DIR is a folder)")
    render.set_defaults(run=_cmd_dicom_render)


def _add_inspection_commands(commands, table_args: argparse.ArgumentParser) -> None:
    """card, localize, check: reading a bundle, heatmaps against boxes, images."""
    card = commands.add_parser("card", help="print a model bundle's model card (RUN/MODEL_CARD.md)",
                               description="The model card, from the bundle's own metadata and last evaluation: "
                               "intended use, training data, per-finding AUC with intervals, subgroups, operating "
                               "points, the input check, limitations, versions and digests.")
    card.add_argument("model", type=Path, metavar="RUN", help="run folder holding the model bundle")
    card.set_defaults(run=_cmd_card)

    localize = commands.add_parser(
        "localize", help="pointing game: does the Grad-CAM peak fall in the radiologists' boxes?")
    localize.add_argument("--model", type=Path, required=True, help="run folder holding the model bundle")
    localize.add_argument("--images", type=Path, required=True, help="image folder")
    localize.add_argument("--boxes", type=Path, default=tables.boxes(),
                          help="NIH's BBox_List_2017.csv(.gz) (default: the copy shipped with cxrlearn)")
    localize.add_argument("--out", type=Path, required=True, help="folder for pointing_game.json and overlays")
    localize.add_argument("--no-progress", action="store_true", help="no progress bar")
    localize.set_defaults(run=_cmd_localize)

    check = commands.add_parser("check", parents=[table_args], help="decode every present image and list those that fail")
    check.add_argument("--images", type=Path, required=True, help="image folder (flat or as the NIH archives unpack)")
    check.add_argument("--report", type=Path, help="write the failures here (image<TAB>reason)")
    check.set_defaults(run=_cmd_check)


@contextlib.contextmanager
def _signals_interrupt():
    """Ctrl-C (SIGINT), SIGTERM (how SLURM and Kubernetes stop a job) and SIGUSR1 raise :class:`Interrupted` in this
    process, so that the work in progress can keep what it has (Lightning turns a plain KeyboardInterrupt into
    exit status 1). Processes forked from this one (data loader workers) ignore them: this one stops them."""
    main_pid = os.getpid()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(number, frame):
        if os.getpid() == main_pid:
            raise Interrupted(signal.Signals(number).name)

    # SIGUSR1: SLURM's warning before a job's time runs out (sbatch --signal=USR1@90), after which train keeps its
    # progress and asks SLURM to requeue the job (README: "On a cluster").
    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _continue_command(argv: list[str], resume: str) -> str:
    """The command that continues interrupted work: this one again, with ``resume``'s option added if asked."""
    words = ["cxrlearn", *argv]
    if resume and resume not in words:
        words.append(resume)
    return shlex.join(words)


def _check_launcher_environment() -> None:
    """Launchers' whole numbers (RANK, SLURM_RESTART_COUNT, ...) checked before Lightning is imported: it reads
    RANK as it loads, and stops with a traceback on one that is not a number."""
    if problems := launcher_environment_problems():
        raise ConfigError(f"the environment's {', '.join(problems)}: not a whole number, as torchrun and SLURM set "
                          f"{'it' if len(problems) == 1 else 'them'}; correct or unset "
                          f"{'it' if len(problems) == 1 else 'them'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_library_log(timestamps=args.command in LONG_RUNNING)
    if "csv" in args and args.csv is None and args.command not in ("train", "evaluate", "export"):
        args.csv = tables.label_table()
    try:
        _check_launcher_environment()
        with _signals_interrupt():
            return args.run(args)
    except CxrlearnError as err:
        print(f"cxrlearn {args.command}: error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as err:
        if err.errno not in _UNWRITABLE:
            raise
        where = err.filename or "an output file"
        advice = ("free some space, or choose an output path on another disk" if err.errno in (errno.ENOSPC, errno.EDQUOT)
                  else "choose another output path, or one you may write")
        print(f"cxrlearn {args.command}: error: cannot write {where}: {err.strerror} ({advice})", file=sys.stderr)
        return EXIT_REFUSED
    except (KeyboardInterrupt, Interrupted) as err:
        kept = getattr(err, "kept", "")
        resume = getattr(err, "resume", "")
        words = list(argv) if argv is not None else sys.argv[1:]
        what = f"kept {kept}; continue with: {_continue_command(words, resume)}" if kept else "nothing to keep"
        print(f"cxrlearn {args.command}: interrupted ({getattr(err, 'signal_name', 'SIGINT')}): {what}",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
