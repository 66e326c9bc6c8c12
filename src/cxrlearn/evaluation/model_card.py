"""The model card (Mitchell et al., FAT* 2019): what a bundle is for, what it was trained and judged on, how
well it did and for whom, how it calls a finding positive, when it says it should not be trusted, and what it
is not. Written from the bundle's own metadata (and its last evaluation's ``metrics.json``) as
``RUN/MODEL_CARD.md``: by ``train``, again by ``evaluate`` when it chooses thresholds; ``cxrlearn card RUN``
prints it.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrlearn._files import write_atomic
from cxrlearn.defaults import ACCEPT_BODY_PARTS, ACCEPT_MODALITIES, ACCEPT_VIEWS
from cxrlearn.errors import DataError
from cxrlearn.evaluation.metrics import FEW_CASES
from cxrlearn.evaluation.operating_points import METHOD_NAMES, MIN_VALIDATION_CASES, NOT_CALLED
from cxrlearn.evaluation.results import EvaluationMetrics
from cxrlearn.model.bundle import bundle_digest, read_meta
from cxrlearn.model.input_check import PERCENTILE
from cxrlearn.model.meta import BundleMeta, DataRecord

CARD = "MODEL_CARD.md"

_NOT_FOR = ("It is **not a medical device** and has not been cleared or approved for clinical use. Its outputs are "
            "not diagnoses: they must not decide, or delay, the care of a patient. It has not been judged on "
            "children, on lateral views, on images from devices or sites unlike its training data, or "
            "prospectively.")

_LIMITATIONS = [
    "NIH ChestX-ray14's labels were mined from radiology reports by natural-language processing (Wang et al., "
    "CVPR 2017), not read from the images; some are wrong, so AUCs measured against them are approximate "
    "(Google's expert labels, where given, are a check).",
    "Thresholds were chosen on validation images of the same data as training; at another hospital the same "
    "threshold gives another sensitivity and specificity: choose them again on local images.",
    "Probabilities are calibrated only where temperatures were fitted, and only for data like the validation "
    "images.",
    "Grad-CAM heatmaps show where the network's evidence lies, not where the finding is.",
    "The input check flags inputs unlike the training images; it cannot catch every input the model should not "
    "answer on, and an unflagged image is not thereby one it answers well.",
]


def _num(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ci(interval) -> str:
    return "—" if not interval else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _or_dash(value) -> str:
    return "—" if value is None else str(value)


def _last_evaluation(meta: BundleMeta) -> EvaluationMetrics | None:
    folder = meta.evaluation.folder if meta.evaluation else None
    if not folder or not (Path(folder) / "metrics.json").is_file():
        return None
    try:
        return EvaluationMetrics.read(Path(folder) / "metrics.json")
    except DataError:
        return None


def model_card(folder: str | os.PathLike) -> str:
    """The card of the bundle in ``folder``, as Markdown."""
    folder = Path(folder)
    meta = read_meta(folder)
    evaluation = _last_evaluation(meta)
    data = meta.data or DataRecord()
    findings = list(meta.findings)
    digest = bundle_digest(folder)
    lines = [f"# Model card: {meta.backbone}, {len(findings)} chest X-ray findings", "",
             f"Bundle `{folder.name}`, SHA-256 `{digest}` (over model.json, the weights and the input "
             "check; every prediction carries it).", "",
             "## Intended use", "",
             "Research on chest radiographs: for each frontal chest X-ray, the probability of each finding below, a "
             "positive call at a threshold chosen on validation images, a Grad-CAM heatmap, and a warning when the "
             "input is unlike the training images. For medical-imaging researchers and hospital imaging teams "
             "studying such models on their own data.", "",
             f"Inputs: the DICOM commands answer only {'/'.join(ACCEPT_MODALITIES)} images whose header says "
             f"{'/'.join(ACCEPT_BODY_PARTS).lower()} (BodyPartExamined, or a description where it is empty) and a "
             f"{'/'.join(ACCEPT_VIEWS)} view; lateral views and other body parts are refused with the reason "
             "(`--accept` changes this).", "", "## What it is not for", "", _NOT_FOR, "",
             "## Training data", ""]
    trained = meta.trained_data
    lines += [f"- Label table: `{data.label_table or 'unknown'}`"
              + (f" (dataset {trained.dataset})" if trained.dataset else ""),
              "- Images per split: " + (", ".join(f"{k} {v:,}" for k, v in data.images.items()) or "unknown"),
              f"- Split: `{meta.split.file}` (SHA-256 `{meta.split.sha256}`)" if meta.split else "- Split: unknown",
              f"- Split seed {_or_dash(trained.split_seed)}, ratios {_or_dash(trained.ratios)} "
              "(patient-wise: no patient in two splits)",
              f"- Input: {meta.preprocessing.input_size} px, {meta.in_chans} channel(s); ImageNet weights from "
              f"{(meta.weights_source.kind if meta.weights_source else None) or 'unknown'}", ""]
    positives = data.positives
    if positives:
        names = list(positives)
        lines += ["| finding | " + " | ".join(f"positives in {n}" for n in names) + " |",
                  "|" + " --- |" * (len(names) + 1)]
        lines += [f"| {f} | " + " | ".join(f"{positives[n].get(f, 0):,}" for n in names) + " |" for f in findings]
        lines.append("")
    lines += _members(meta)
    lines += _performance(meta, evaluation, findings)
    lines += _operating_points(meta, evaluation, findings)
    lines += _input_check(meta, evaluation)
    lines += ["## Known limitations", ""] + [f"- {item}" for item in _LIMITATIONS] + [""]
    versions = ", ".join(f"{k} {v}" for k, v in (meta.versions or {}).items())
    lines += ["## Versions and digests", "", f"- Made with: {versions or 'unknown'}",
              f"- Bundle format {meta.format}; model SHA-256 `{digest}`", ""]
    return "\n".join(lines)


def _performance(meta: BundleMeta, evaluation: EvaluationMetrics | None, findings: list[str]) -> list[str]:
    lines = ["## Performance", ""]
    if evaluation is None:
        measured = meta.metrics.measured()
        if not measured:
            return lines + ["Not evaluated yet: run `cxrlearn evaluate`.", ""]
        names = list(measured)
        lines += ["AUC-ROC at the end of training (no intervals: run `cxrlearn evaluate` for them):", "",
                  "| finding | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
        lines += [f"| {f} | " + " | ".join(_num(measured[n].auc.get(f)) for n in names) + " |" for f in findings]
        lines += ["| **mean** | " + " | ".join(_num(measured[n].mean_auc) for n in names) + " |", ""]
        return lines
    lines += [f"Judged on {evaluation.subset}: {evaluation.n_images:,} images of {evaluation.n_patients:,} patients "
              f"({meta.evaluation.date if meta.evaluation else ''}). Intervals: 95%, bootstrap over patients.", "",
              "| finding | positives | AUC | 95% CI |", "| --- | --- | --- | --- |"]
    lines += [f"| {f} | {evaluation.positives.get(f, 0):,} | {_num(evaluation.auc.get(f))} | "
              f"{_ci(evaluation.auc_ci95.get(f))} |" for f in findings if f in evaluation.auc]
    lines += [f"| **mean** | | **{_num(evaluation.mean_auc)}** | {_ci(evaluation.mean_auc_ci95)} |", ""]
    if evaluation.subgroups:
        lines += ["Subgroups (mean AUC):", "", "| attribute | group | images | mean AUC | 95% CI |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {g.attribute} | {g.group}{' †' if g.few_cases else ''} | {g.n_images:,} | {_num(g.mean_auc)} | "
                  f"{_ci(g.mean_auc_ci95)} |" for g in evaluation.subgroups]
        if any(g.few_cases for g in evaluation.subgroups):
            lines += ["", f"† No finding with {FEW_CASES} positives in the group: too few images to read its mean AUC."]
        lines.append("")
    return lines


def _operating_points(meta: BundleMeta, evaluation: EvaluationMetrics | None, findings: list[str]) -> list[str]:
    lines = ["## Operating points", ""]
    if not meta.thresholds:
        return lines + ["No thresholds yet: `cxrlearn evaluate --subset test` chooses them on validation images.", ""]
    table = (evaluation.operating_points.test or {}) if evaluation else {}
    method = meta.threshold_method or "youden"
    lines += [f"A finding is called positive at or above its threshold, chosen per finding on validation images by "
              f"{METHOD_NAMES.get(method, method)}. A finding with fewer than {MIN_VALIDATION_CASES} validation "
              f"positives or negatives gets no threshold: its probability is given, and it is {NOT_CALLED}"
              + ("; sensitivity and specificity (95% Wilson intervals) on the judged images:" if table else ":"), "",
              "| finding | threshold | sensitivity | specificity |", "| --- | --- | --- | --- |"]
    for f in findings:
        point = (table.get(method) or {}).get(f)
        if meta.thresholds.get(f) is None:
            why = (meta.not_called or {}).get(f, "")
            lines.append(f"| {f} | {NOT_CALLED}{f' ({why})' if why else ''} | — | — |")
            continue
        lines.append(f"| {f} | {_num(meta.thresholds.get(f))} | {_rate(point, 'sensitivity')} | "
                     f"{_rate(point, 'specificity')} |")
    return lines + [""]


def _rate(point, name: str) -> str:
    """A rate and its interval, as the card prints them."""
    if point is None or getattr(point, name) is None:
        return "—"
    interval = getattr(point, f"{name}_ci95", None)
    return _num(getattr(point, name)) + (f" ({_num(interval[0])}-{_num(interval[1])})" if interval else "")


def _input_check(meta: BundleMeta, evaluation: EvaluationMetrics | None) -> list[str]:
    lines = ["## The input check", ""]
    if not meta.input_check:
        return lines + ["This bundle has none: every prediction says `unavailable`.", ""]
    fitted = meta.input_check
    lines += ["Every prediction says whether the input is like the training images: pixel checks (far below the "
              "training resolution, or enlarged from a thumbnail, strongly non-square, colour, near-constant, no large-scale structure, "
              "saturated), the image's layout against "
              "the training images' (turned, upside down or inverted films), and the Mahalanobis distance of the "
              f"backbone's features, flagged above the {fitted.percentile or PERCENTILE:g}th percentile of the "
              "validation images'."]
    check = evaluation.input_check if evaluation else None
    if check is not None and check.available:
        lines.append(f"On the judged images it flagged {check.flagged:,} of {check.judged:,}; mean AUC "
                     f"{_num(check.mean_auc_all)} with them, {_num(check.mean_auc_unflagged)} without.")
    return lines + [""]


def _members(meta: BundleMeta) -> list[str]:
    """An ensemble's members: the bundles it averages, with the SHA-256 of the weights taken from each."""
    if not meta.members:
        return []
    lines = ["## Members", "", f"The mean probability of {len(meta.members)} networks, taken from these bundles:", "",
             "| member | backbone | weights SHA-256 |", "| --- | --- | --- |"]
    lines += [f"| `{m.folder or '—'}` | {m.backbone} | `{m.weights_sha256 or '—'}` |" for m in meta.members]
    return lines + [""]


def write_model_card(folder: str | os.PathLike) -> Path:
    """``folder/MODEL_CARD.md`` from the bundle there."""
    path = Path(folder) / CARD
    write_atomic(path, model_card(folder))
    return path
