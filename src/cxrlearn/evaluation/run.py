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
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrlearn._files import file_digest
from cxrlearn.data.nih import IMAGE, PATIENT_ID, label_matrix
from cxrlearn.data.split import SPLIT
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, percentile_interval
from cxrlearn.evaluation.operating_points import DEFAULT_METHOD, METHODS

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"


@dataclass
class EvaluationOptions:
    split: str | None = None  # split file; default: the run's own
    subset: str = "test"
    official_test: str | None = None  # NIH's test_list.txt: judge its images instead of a subset
    expert_labels: str | None = None  # Google's 2019 expert label file
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    tta: bool = False
    calibrate: bool = False
    threshold_method: str = DEFAULT_METHOD
    cache: str | None = None
    batch_size: int = 64
    workers: int | None = None
    write_bundle: bool = True
    progress: bool = True
    command: list[str] = field(default_factory=list)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class _Judged:
    """One set of images with its rows, labels and logits."""

    rows: pd.DataFrame
    labels: np.ndarray
    logits: np.ndarray
    flipped: np.ndarray | None = None  # logits of the mirrored images (tta)


def _images_to_judge(present: pd.DataFrame, run_dir: Path, meta: dict, options: EvaluationOptions):
    """(val rows, judged rows, description, split info) with the leak check applied."""
    from cxrlearn.data.nih import read_image_list
    from cxrlearn.data.split import SPLITS, apply_split, read_split_file

    run_split = run_dir / meta["split"]["file"]
    if not run_split.is_file():
        raise ConfigError(f"{run_dir}: the bundle's split file {run_split.name} is missing; it is needed to "
                          "check that no training patient is judged")
    if file_digest(run_split) != meta["split"]["sha256"]:
        raise ConfigError(f"{run_split}: changed since training (its SHA-256 differs from the bundle's)")
    trained_on = read_split_file(run_split)
    split_path = Path(options.split) if options.split else run_split
    split = trained_on if split_path == run_split else read_split_file(split_path)
    rows = apply_split(present, split, source=str(split_path))
    val = rows[rows[SPLIT] == "val"]
    if options.official_test:
        listed = set(read_image_list(options.official_test))
        judged = present[present[IMAGE].isin(listed)].assign(**{SPLIT: "official-test"})
        what = f"NIH's official test list ({Path(options.official_test).name}): {len(judged):,} of its {len(listed):,} images present"
        val = val[~val[PATIENT_ID].isin(set(judged[PATIENT_ID]))]
    else:
        if options.subset not in SPLITS:
            raise ConfigError(f"--subset must be one of {', '.join(SPLITS)}, not {options.subset!r}")
        judged = rows[rows[SPLIT] == options.subset]
        what = f"the {options.subset} split of {split_path.name}"
    if judged.empty:
        raise DataError(f"no images to judge: {what} has none among the images present")
    if val.empty:
        raise DataError(f"{split_path}: no validation images present; operating points are chosen on val")
    train_patients = set(trained_on.loc[trained_on[SPLIT] == "train", PATIENT_ID])
    if val[PATIENT_ID].isin(train_patients).any():
        _say(f"warning: validation images of {split_path.name} include patients this model was trained on; "
             "thresholds and temperatures chosen on them will be optimistic")
    leaking = judged[judged[PATIENT_ID].isin(train_patients)]
    if len(leaking):
        raise DataError(
            f"{len(leaking):,} of the {len(judged):,} images to judge ({leaking[PATIENT_ID].nunique():,} patients, "
            f"e.g. {leaking[IMAGE].iloc[0]}) are of patients this model was trained on ({run_split.name}); "
            "their AUC would be inflated. Judge images of other patients (for the official test list, train "
            "with a split made by `cxrlearn split --official-test`)"
        )
    info = {"file": split_path.name, "sha256": file_digest(split_path), "subset": options.subset
            if not options.official_test else None}
    if options.official_test:
        info["official_test"] = {"file": Path(options.official_test).name,
                                 "sha256": file_digest(options.official_test)}
    return val, judged, what, info


def _predict(model, meta: dict, cache_dir: Path, rows: pd.DataFrame, options: EvaluationOptions, device) -> _Judged:
    from torch.utils.data import DataLoader

    from cxrlearn.data.cache import ImageCache
    from cxrlearn.data.datamodule import CachedXrayDataset
    from cxrlearn.inference.predict import predict_logits
    from cxrlearn.model.bundle import input_transform

    cache = ImageCache(cache_dir)
    cached = rows[rows[IMAGE].isin(cache.rows.keys())].reset_index(drop=True)
    dataset = CachedXrayDataset(cache_dir, cached[IMAGE].tolist(), label_matrix(cached), image_size=meta["image_size"])
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=0)
    transform = input_transform(meta)
    logits, labels, _ = predict_logits(model, loader, transform, device=device, progress=options.progress)
    flipped = None
    if options.tta:
        flipped, _, _ = predict_logits(model, loader, transform, device=device, progress=options.progress, flip=True)
    return _Judged(cached, labels, logits, flipped)


def evaluate(model_dir: str | os.PathLike, csv: str | os.PathLike, images: str | os.PathLike,
             out: str | os.PathLike, options: EvaluationOptions | None = None) -> dict:
    """Evaluate the bundle in ``model_dir`` on images of ``images``; write results to ``out``; return the metrics."""
    from cxrlearn.data.cache import prepare_cache, table_fingerprint
    from cxrlearn.data.images import attach_images
    from cxrlearn.data.nih import read_label_table
    from cxrlearn.evaluation import calibration
    from cxrlearn.evaluation.expert import expert_metrics
    from cxrlearn.evaluation.metrics import finding_metrics
    from cxrlearn.evaluation.operating_points import choose_thresholds, operating_point_table
    from cxrlearn.evaluation.report import write_report
    from cxrlearn.evaluation.subgroups import subgroup_metrics
    from cxrlearn.inference.outputs import probabilities
    from cxrlearn.model.bundle import load_bundle, write_meta
    from cxrlearn.training.run import cache_location

    options = options or EvaluationOptions()
    if options.threshold_method not in METHODS:
        raise ConfigError(f"threshold method {options.threshold_method!r} is not one of {', '.join(METHODS)}")
    if options.resamples < 100:
        raise ConfigError(f"at least 100 bootstrap resamples are needed for a 95% interval, not {options.resamples}")
    model_dir, out = Path(model_dir), Path(out)
    model, meta = load_bundle(model_dir)
    findings = list(meta["findings"])
    table = read_label_table(csv)
    fingerprint = table_fingerprint(table)
    presence = attach_images(table, images)
    _say(presence.summary())
    val_rows, judged_rows, what, split_info = _images_to_judge(presence.table, model_dir, meta, options)
    _say(f"judging {what}: {len(judged_rows):,} images of {judged_rows[PATIENT_ID].nunique():,} patients; "
         f"operating points and calibration from {len(val_rows):,} validation images")

    cache_dir, size = cache_location(meta["config"], model_dir, fingerprint)
    if options.cache:
        cache_dir = Path(options.cache)
    both = pd.concat([val_rows, judged_rows]).drop_duplicates(IMAGE)
    summary = prepare_cache(both, cache_dir, fingerprint, size=size, workers=options.workers,
                            images_dir=str(images), label_table=Path(csv).name, progress=options.progress)
    _say(summary.text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    val = _predict(model, meta, cache_dir, val_rows, options, device)
    test = _predict(model, meta, cache_dir, judged_rows, options, device)
    left_out = len(judged_rows) - len(test.rows)
    if left_out:
        _say(f"warning: {left_out:,} images to judge could not be decoded and are left out (see {cache_dir}/failed.tsv)")

    def logits_of(part: _Judged) -> np.ndarray:
        return 0.5 * (part.logits + part.flipped) if options.tta else part.logits

    temperature = calibration.fit_temperatures(logits_of(val), val.labels, findings) if options.calibrate else None
    val_p = probabilities(logits_of(val), findings, temperature)
    test_p = probabilities(logits_of(test), findings, temperature)
    patients = test.rows[PATIENT_ID].to_numpy()

    metrics, boot = finding_metrics(test.labels, test_p, patients, findings, options.resamples, options.seed)
    chosen = choose_thresholds(val.labels, val_p, findings)
    metrics["subset"] = what
    metrics["operating_points"] = {
        "chosen_on": f"{len(val.rows):,} validation images",
        "bundle_method": options.threshold_method,
        "thresholds": chosen["thresholds"],
        "undefined": chosen["undefined"],
        "test": operating_point_table(test.labels, test_p, chosen["thresholds"], findings),
        "val": operating_point_table(val.labels, val_p, chosen["thresholds"], findings),
    }
    metrics["calibration"] = {"bins": calibration.DEFAULT_BINS, "test": calibration.calibration_per_finding(
        test.labels, test_p, findings)}
    if temperature is not None:
        raw = probabilities(logits_of(test), findings)
        metrics["calibration"]["temperature"] = temperature
        metrics["calibration"]["test_uncalibrated"] = calibration.calibration_per_finding(test.labels, raw, findings)
    metrics["subgroups"] = subgroup_metrics(test.rows, test.labels, test_p, findings, options.resamples, options.seed)
    if options.expert_labels:
        from cxrlearn.data.expert_labels import read_expert_labels

        metrics["expert"] = expert_metrics(test.rows[IMAGE].tolist(), patients, test_p, test.labels, findings,
                                           read_expert_labels(options.expert_labels), options.resamples, options.seed)
    if options.tta:
        metrics["tta"] = _tta_comparison(test, findings, temperature, metrics, boot, options)
    metrics["provenance"] = _provenance(model_dir, meta, csv, images, split_info, options, left_out)

    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    _write_predictions(out / PREDICTIONS_FILE, findings, [(val, val_p), (test, test_p)])
    write_report(out, metrics, test.labels, test_p, findings)
    if options.write_bundle:
        meta["thresholds"] = chosen["thresholds"][options.threshold_method]
        meta["threshold_method"] = options.threshold_method
        meta["operating_points"] = chosen["thresholds"]
        meta["temperature"] = temperature  # None: probabilities are the plain sigmoid
        meta["tta"] = options.tta  # thresholds were chosen on (un)averaged predictions: predict must match
        meta["evaluation"] = {"folder": str(out), "mean_auc": metrics["mean_auc"],
                              "mean_auc_ci95": metrics["mean_auc_ci95"], "judged": what,
                              "date": metrics["provenance"]["date"]}
        write_meta(model_dir, meta)
    return metrics


def _tta_comparison(test: _Judged, findings, temperature, metrics: dict, boot, options) -> dict:
    """Mean AUC with and without flip averaging, and the paired bootstrap interval of the difference."""
    from cxrlearn.evaluation.metrics import finding_metrics
    from cxrlearn.inference.outputs import probabilities

    plain_p = probabilities(test.logits, findings, temperature)
    plain, plain_boot = finding_metrics(test.labels, plain_p, test.rows[PATIENT_ID].to_numpy(), findings,
                                        options.resamples, options.seed)
    columns = [findings.index(name) for name in metrics["mean_over"]]
    # The same seed and patients give the same resamples: the difference is paired.
    difference = boot.mean_auc(columns) - plain_boot.mean_auc(columns)
    interval = percentile_interval(difference)
    delta = metrics["mean_auc"] - plain["mean_auc"]
    if interval and interval[0] > 0:
        verdict = "helps"
    elif interval and interval[1] < 0:
        verdict = "hurts"
    else:
        verdict = "no difference the bootstrap can tell from chance"
    return {
        "mean_auc_with_tta": metrics["mean_auc"], "mean_auc_without_tta": plain["mean_auc"],
        "difference": delta, "difference_ci95": interval, "verdict": verdict,
        "auc_without_tta": plain["auc"],
    }


def _provenance(model_dir: Path, meta: dict, csv, images, split_info: dict, options: EvaluationOptions,
                left_out: int) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(options.command) if options.command else None,
        "bundle": {"folder": str(model_dir), "backbone": meta["backbone"], "image_size": meta["image_size"],
                   "weights_sha256": file_digest(model_dir / "model.safetensors"),
                   "trained_split_sha256": meta["split"]["sha256"],
                   "weights_source": meta.get("weights_source"), "training_versions": meta.get("versions")},
        "label_table": {"file": Path(csv).name, "sha256": file_digest(csv)},
        "images": str(images),
        "split": split_info,
        "images_left_out_undecodable": left_out,
        "tta": options.tta,
        "temperature_scaling": options.calibrate,
        "versions": _versions(),
    }


def _versions() -> dict:
    from cxrlearn.model.bundle import library_versions

    import sklearn

    return {**library_versions(), "scikit-learn": sklearn.__version__}


def _write_predictions(path: Path, findings, parts: list[tuple[_Judged, np.ndarray]]) -> None:
    """One row per image: its split (or official-test), probabilities as used, and labels."""
    frames = []
    for part, probs in parts:
        frame = part.rows[[IMAGE, PATIENT_ID, SPLIT]].copy()
        frame = pd.concat([frame, pd.DataFrame(probs, columns=findings, index=frame.index),
                           pd.DataFrame(part.labels.astype(int), columns=[f"label_{f}" for f in findings],
                                        index=frame.index)], axis=1)
        frames.append(frame)
    pd.concat(frames).to_csv(path, index=False)  # full precision: metrics can be recomputed from it exactly
