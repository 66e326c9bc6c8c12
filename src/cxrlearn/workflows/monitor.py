"""``cxrlearn monitor``: a prediction log's windows judged against the bundle's reference, with alerts.

Reads the log (:mod:`cxrlearn.monitoring.log`) and the bundle's reference (:mod:`cxrlearn.model.reference`; made
from ``--reference-images`` where the bundle has none), judges each window (:mod:`cxrlearn.monitoring.drift`)
and writes ``monitor.json`` (every window, test, statistic, p-value and alert), ``monitor.md`` and
``monitor.html`` (with the pictures over time). The command exits with status 4 when a window raised an alert,
so that a scheduler can act on it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from cxrlearn._files import write_atomic
from cxrlearn.data.columns import IMAGE, PATIENT_ID
from cxrlearn.data.sources.datasets import read_labels
from cxrlearn.errors import ConfigError
from cxrlearn.evaluation.bootstrap import DEFAULT_SEED
from cxrlearn.evaluation.metrics import finding_metrics
from cxrlearn.evaluation.report import Table, render_html, render_markdown
from cxrlearn.inference import PREDICT_BATCH_SIZE
from cxrlearn.inference.outputs import positive_calls, probabilities
from cxrlearn.inference.predictor import Predictor, find_inputs, prepared_files
from cxrlearn.model.bundle import bundle_digest, read_meta
from cxrlearn.model.reference import PIXEL_STATISTICS, REFERENCE_FILE, Reference
from cxrlearn.monitoring.drift import (ALPHA, CATEGORIES, CUSUM_H, CUSUM_K, KINDS, MIN_WINDOW, CusumAlarm, Sample,
                                       Window, cusum, judge_window, split_windows)
from cxrlearn.monitoring.assess_ai import write_assess_ai
from cxrlearn.monitoring.log import AcquisitionTags, LoggedAnswer, PredictionLog, file_tags

log = logging.getLogger(__name__)

#: The exit status of ``cxrlearn monitor`` when a window raised an alert.
ALERT_STATUS = 4
#: Answers per window when none is given.
DEFAULT_WINDOW = 200
#: Patient resamples for the interval of a window's realised mean AUC (``--labels``).
LABEL_RESAMPLES = 200


@dataclass(frozen=True)
class RealisedAuc:
    """``--labels``: a window's realised AUC on its labelled answers, with the patient bootstrap's 95% interval
    (as ``cxrlearn evaluate`` computes it), and each finding's (None where undefined)."""

    labelled: int
    mean_auc: float | None
    mean_auc_ci95: list[float] | None
    auc: dict[str, float | None]


@dataclass(frozen=True)
class WindowSpec:
    """``--window``: a count of answers (``200``) or a span of time (``14d``, ``12h``)."""

    count: int | None = None
    span: timedelta | None = None

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        text = str(text).strip().lower()
        units = {"d": "days", "h": "hours"}
        try:
            if text[-1:] in units:
                amount = float(text[:-1])
                if amount > 0:
                    return cls(span=timedelta(**{units[text[-1]]: amount}))
            elif int(text) >= 1:
                return cls(count=int(text))
        except ValueError:
            pass
        raise ConfigError(f"--window {text}: a count of answers (200) or a span of time (14d, 12h)")

    def text(self) -> str:
        return f"{self.count} answers" if self.count else f"{self.span} of answers (at least {MIN_WINDOW})"


@dataclass
class MonitorResult:
    """What ``monitor.json`` holds."""

    model: str
    model_sha256: str
    log: str
    reference: str
    reference_images: int
    window: str
    answers: int
    other_models: int
    runtimes: list[str]
    reference_flag_rate: float = 0.0
    alpha: float = ALPHA
    false_alarms: str = ""
    windows: list[Window] = field(default_factory=list)
    slow_drift: list[CusumAlarm] = field(default_factory=list)  # CUSUM alarms across windows
    labels: str | None = None
    realised: list[RealisedAuc | None] = field(default_factory=list)  # per window, with --labels

    @property
    def alerts(self) -> list[tuple[Window, object]]:
        return [(w, t) for w in self.windows for t in w.alerts]


def load_reference(model: Path, reference_images: Sequence[Path] | None, runtime: str = "torch",
                   progress: bool = True) -> Reference:
    """The bundle's reference; made (and saved in the bundle) from ``reference_images`` when given."""
    if reference_images:
        predictor = Predictor(model, runtime=runtime)
        paths, unreadable = find_inputs(reference_images)
        batches = _reference_batches(paths, predictor)
        where = str(reference_images[0]) + (f" and {len(reference_images) - 1:,} other files or folders"
                                            if len(reference_images) > 1 else "")
        reference = predictor.make_reference(batches, f"{len(paths) - len(unreadable):,} images in {where}")
        reference.tag_counts = tag_counts([file_tags(path)[0] for path in paths if path.suffix.lower() == ".dcm"])
        reference.save(model)
        log.info(f"monitoring reference: {len(reference):,} images in {where} ({model / REFERENCE_FILE})")
        return reference
    reference = Reference.load(model)
    if reference is None:
        raise ConfigError(f"{model}: the bundle has no monitoring reference (made by training since cxrlearn learned "
                          f"it); make one with `cxrlearn monitor --model {model} --reference-images DIR ...` from "
                          "images the model is known to be right for, such as its validation images")
    return reference


def write_reference_from(run_dir: Path, loader, source: str) -> Reference:
    """The bundle's reference from a loader of cached images (``(images, labels, names)`` batches of (B, 1, S, S)
    uint8 network inputs), answered as the bundle predicts (its runtime, flip averaging and input check), saved in
    the bundle."""
    predictor = Predictor(run_dir)
    reference = predictor.make_reference(((images[:, 0].numpy(), [None] * len(images)) for images, *_ in loader),
                                         source)
    reference.save(run_dir)
    log.info(f"monitoring reference: the model's answers and summaries of {source} ({run_dir / REFERENCE_FILE})")
    return reference


def tag_counts(tags: Sequence[AcquisitionTags | None]) -> tuple[dict[str, int], ...]:
    """Each categorical tag's (:data:`CATEGORIES`) values and their counts; empty without any DICOM tags."""
    known = [t for t in tags if t is not None]
    if not known:
        return ()
    counts = tuple(Counter(getattr(t, name) for t in known if getattr(t, name) is not None) for name in CATEGORIES)
    return tuple(dict(c) for c in counts)


def _reference_batches(paths: list[Path], predictor: Predictor):
    for batch in prepared_files(paths, predictor.preprocessing, PREDICT_BATCH_SIZE, 0):
        for _, _, why in batch:
            if why is not None:
                log.warning(f"reference: skipped {why}")
        ready = [p for _, p, _ in batch if p is not None]
        if ready:
            yield np.stack([p.pixels for p in ready]), [p.cheap for p in ready]


def reference_sample(reference: Reference, findings: Sequence[str], thresholds: dict | None,
                     temperature: dict | None) -> Sample:
    probs = probabilities(reference.logits, findings, temperature)
    calls = positive_calls(probs, findings, thresholds) if thresholds else None
    return Sample(probs, calls, reference.flagged, reference.pixels, reference.projections)


def log_sample(rows: Sequence[LoggedAnswer], findings: Sequence[str], thresholds: dict | None,
               reference_sha256: str | None) -> Sample:
    """The rows as a :class:`Sample`: pixel statistics where every row has them, projections where every row was
    projected with this reference."""
    index = {name: j for j, name in enumerate(rows[0].findings)} if rows else {}
    probs = np.array([[row.probabilities[index[name]] for name in findings] for row in rows], dtype=np.float64)
    calls = (np.array([[name in (row.positive or ()) for name in findings] for row in rows])
             if thresholds else None)
    pixels = (np.array([row.pixel_statistics for row in rows], dtype=np.float64)
              if all(row.pixel_statistics for row in rows) else None)
    projections = (np.array([row.projection for row in rows], dtype=np.float64)
                   if all(row.projection and row.reference_sha256 == reference_sha256 for row in rows) else None)
    tags = (tuple(tuple(getattr(row.tags, name) for row in rows) for name in CATEGORIES)
            if any(row.tags.modality is not None for row in rows) else None)
    return Sample(probs, calls, np.array([row.flagged for row in rows]), pixels, projections, tags)


def first_per_patient(rows: Sequence[LoggedAnswer]) -> tuple[list[LoggedAnswer], int]:
    """The window's answers less later ones of a patient already in it (by the keyed patient hash; answers
    without one are all kept), and how many were left out: the tests take a window's images as independent."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row.patient_hash is None or row.patient_hash not in seen:
            kept.append(row)
            if row.patient_hash is not None:
                seen.add(row.patient_hash)
    return kept, len(rows) - len(kept)


def read_outcomes(path: Path):
    """``--labels``: a label table (NIH's format, or the generic one: image, patient_id and a 0/1 column per finding),
    indexed by image name."""
    with open(path, "rb") as handle:
        nih = b"Finding Labels" in handle.read(4096) or path.name.startswith("Data_Entry")
    table = read_labels(csv=path) if nih else read_labels(table=path)
    return table.drop_duplicates(IMAGE).set_index(IMAGE)


def realised_auc(rows: Sequence[LoggedAnswer], outcomes, findings: Sequence[str]) -> RealisedAuc | None:
    """The realised AUC of the rows whose source the label table names; None when none is labelled."""
    labelled = [(i, row.source) for i, row in enumerate(rows) if row.source in outcomes.index]
    if not labelled:
        return None
    named = [name for name in findings if name in outcomes.columns]
    index = {name: j for j, name in enumerate(rows[0].findings)}
    scores = np.array([[rows[i].probabilities[index[name]] for name in named] for i, _ in labelled])
    picked = outcomes.loc[[source for _, source in labelled]]
    labels = picked[named].to_numpy(dtype=np.float64)
    measured, _ = finding_metrics(labels, scores, picked[PATIENT_ID].to_numpy(), named, LABEL_RESAMPLES,
                                  DEFAULT_SEED)
    return RealisedAuc(len(labelled), measured.mean_auc, measured.mean_auc_ci95, dict(measured.auc))


@dataclass(frozen=True)
class Selected:
    """The log's answers that ``cxrlearn monitor`` judges (:func:`select_answers`)."""

    rows: list[LoggedAnswer]
    others: int  # answers of other models left out (0 with --any-model)
    log: str  # the log's name (a database's URL without its password)
    model_sha256: str


def select_answers(model: Path, log_path: str | Path, findings: Sequence[str], since: datetime | None = None,
                   any_model: bool = False) -> Selected:
    """The log's answers since ``since`` of the bundle's model (its digest; every model's with ``any_model``)
    that cover its findings; another model's log is refused unless ``any_model``."""
    prediction_log = PredictionLog(log_path, create=False)
    log_path = prediction_log.name  # a database's URL without its password
    answers = prediction_log.answers(since)
    digest = bundle_digest(model)
    mine = [row for row in answers if row.model_sha256 == digest]
    others = len(answers) - len(mine)
    if others and not any_model:
        seen = sorted({row.model_sha256[:12] for row in answers if row.model_sha256 != digest})
        if not mine:
            raise ConfigError(f"{log_path}: its {len(answers):,} answers are another model's (digest "
                              f"{', '.join(seen)}, this one's is {digest[:12]}); judge them with --any-model")
        log.warning(f"{log_path}: {others:,} answers of other models ({', '.join(seen)}) left out (--any-model "
                    "judges them too)")
    rows = answers if any_model else mine
    rows = [row for row in rows if set(findings) <= set(row.findings)]
    if not rows:
        raise ConfigError(f"{log_path}: no answers of this model to judge" + (f" since {since:%Y-%m-%d}" if since else ""))
    return Selected(rows, others if not any_model else 0, str(log_path), digest)


def monitor(model: Path, log_path: str | Path, out: Path, window: WindowSpec = WindowSpec(count=DEFAULT_WINDOW),
            since: datetime | None = None, any_model: bool = False, reference_images: Sequence[Path] | None = None,
            labels: Path | None = None) -> MonitorResult:
    """Judge the log's windows of ``model``'s answers; write ``out``/monitor.json, .md and .html. With ``labels``
    (a label table naming the answers' images), each window's realised AUC too."""
    meta = read_meta(model)
    findings = list(meta.findings)
    reference = load_reference(model, reference_images)
    outcomes = read_outcomes(labels) if labels else None
    if tuple(reference.findings) != tuple(findings):
        raise ConfigError(f"{model / REFERENCE_FILE}: made for other findings than the bundle's; make it again with "
                          "--reference-images")
    selected = select_answers(model, log_path, findings, since, any_model)
    rows, others, log_path = selected.rows, selected.others, selected.log
    digest = selected.model_sha256
    ref_sha = Reference.digest(model)
    thresholds = meta.thresholds or None
    called = [bool(thresholds) and thresholds.get(name) is not None for name in findings]
    ref = reference_sample(reference, findings, thresholds, meta.temperature)
    result = MonitorResult(str(model), digest, str(log_path), reference.source, len(reference), window.text(),
                           len(rows), others, sorted({row.runtime for row in rows}),
                           float(reference.flagged.mean()))
    bands: dict[int, list] = {}
    for i, picked in enumerate(split_windows([row.answered_at for row in rows], window.count, window.span)):
        window_rows = [rows[k] for k in picked]
        chosen, repeats = first_per_patient(window_rows)
        judged = judge_window(i + 1, [row.answered_at for row in chosen], ref,
                              log_sample(chosen, findings, thresholds, ref_sha), findings, called, PIXEL_STATISTICS,
                              bands, reference.tag_counts, repeats)
        result.windows.append(judged)
        if outcomes is not None:
            result.realised.append(realised_auc(window_rows, outcomes, findings))  # the patient bootstrap's
    result.labels = str(labels) if labels else None
    result.slow_drift, _ = cusum(result.windows)
    tests = max((len(w.tests) for w in result.windows), default=0)
    result.false_alarms = (f"Holm's correction across each window's {tests} tests keeps the chance that a window "
                           f"of independent images like the reference's raises any alert at most {ALPHA:.0%}. One "
                           "patient's follow-up films are alike: a patient's later answers in a window (by the keyed "
                           "patient hash of DICOM inputs) are left out of its tests; answers of image files carry no "
                           "patient, and windows holding many films of one patient raise somewhat more.")
    write_outputs(out, result, findings, called)
    return result


def export_assess_ai(model: Path, log_path: str | Path, path: Path, since: datetime | None = None,
                     any_model: bool = False) -> int:
    """``--assess-ai FILE``: the answers ``monitor`` judges, in the Assess-AI registry's columns
    (:mod:`cxrlearn.monitoring.assess_ai`); the number of rows written."""
    meta = read_meta(model)
    selected = select_answers(model, log_path, meta.findings, since, any_model)
    return write_assess_ai(selected.rows, path, f"{meta.backbone} {selected.model_sha256[:12]}")


# ---- outputs ---------------------------------------------------------------------------------------------
def _plain(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    raise TypeError(type(value).__name__)


def write_outputs(out: Path, result: MonitorResult, findings: Sequence[str], called: Sequence[bool]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = dataclasses.asdict(result)
    record.update(alerts=[{"window": w.index, **dataclasses.asdict(t)} for w, t in result.alerts],
                  kinds=KINDS, cusum=dict(k=CUSUM_K, h=CUSUM_H))
    write_atomic(out / "monitor.json", json.dumps(record, indent=2, default=_plain) + "\n")
    picture = plot_windows(result, findings, called)
    blocks = _blocks(result, findings)
    write_atomic(out / "monitor.md", render_markdown(blocks))
    write_atomic(out / "monitor.png", picture)
    embedded = "data:image/png;base64," + base64.b64encode(picture).decode("ascii")
    write_atomic(out / "monitor.html", render_html([blocks[0], ("img", (embedded, "the windows over time")),
                                                    *blocks[1:]]))


def _blocks(result: MonitorResult, findings: Sequence[str]) -> list[tuple[str, object]]:
    alerts = result.alerts
    blocks: list[tuple[str, object]] = [
        ("h1", "cxrlearn monitor"),
        ("p", f"**{len(alerts)} alert(s)** in {sum(w.judged for w in result.windows)} judged window(s) of "
              f"{result.window}; {result.answers:,} answers of model `{result.model_sha256[:16]}` "
              f"(runtimes: {', '.join(result.runtimes)}) from `{result.log}`, against the reference of "
              f"{result.reference} ({result.reference_images:,})."),
        ("p", result.false_alarms),
        ("p", "Slow drift (CUSUM of each kind's window scores): " + ("; ".join(a.describe() for a in result.slow_drift)
                                                                      or "none") + "."),
    ]
    if result.other_models:
        blocks.append(("p", f"{result.other_models:,} answers of other models were left out (--any-model judges "
                            "them too)."))
    rows = []
    for i, w in enumerate(result.windows):
        low = [e.finding for e in w.estimated_auc if e.outside and e.estimate < e.band[0]]
        realised = result.realised[i] if result.realised else None
        rows.append([str(w.index), f"{w.first:%Y-%m-%d %H:%M}", f"{w.last:%Y-%m-%d %H:%M}",
                     str(w.answers) + (f" ({w.repeats} later films of its patients, not tested)" if w.repeats else ""),
                     f"{w.flag_rate:.1%}", f"{w.drift_score:.1f}" if w.judged else "-",
                     "; ".join([*(t.describe() for t in w.alerts), *w.unseen]) or (w.note or "none"),
                     ", ".join(low) or "-"]
                    + ([_realised_text(realised)] if result.labels else []))
    blocks += [("h2", "Windows"),
               ("table", Table(["window", "from", "to", "answers", "flagged", "drift score", "alerts",
                                "estimated AUC below its band"] + (["realised mean AUC (labelled)"]
                                                                   if result.labels else []), rows)),
               ("p", "The drift score is -log10 of the window's smallest Holm-adjusted p-value: above 1.3 is an "
                     "alert. The estimated AUC is label-free (CBPE: the AUC expected if each label were drawn with "
                     "its calibrated probability); its band is the 95% range of that estimate on the reference at "
                     "the window's size.")]
    blocks += [("h2", "What is tested"),
               ("table", Table(["kind", "what it watches"], [[k, v] for k, v in KINDS.items()]))]
    return blocks


def _realised_text(realised: RealisedAuc | None) -> str:
    if realised is None or realised.mean_auc is None:
        return "-" if realised is None else f"undefined ({realised.labelled})"
    low, high = realised.mean_auc_ci95 or (float("nan"), float("nan"))
    return f"{realised.mean_auc:.3f} ({low:.3f}-{high:.3f}; {realised.labelled})"


def plot_windows(result: MonitorResult, findings: Sequence[str], called: Sequence[bool]) -> bytes:
    """Over the windows: each finding's label-free AUC estimate (and the realised mean AUC, with ``--labels``), the
    flag rate against the reference's, and each kind of test's drift score against the alert line. PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = [w for w in result.windows if w.judged]
    x = [w.index for w in judged]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for j, name in enumerate(findings):
        values = [e.estimate for e in (w.estimated_auc[j] for w in judged)]
        ax.plot(x, [np.nan if v is None else v for v in values], marker=".", lw=1, label=name)
    if result.realised:
        realised = [result.realised[w.index - 1] for w in judged]
        ax.plot(x, [np.nan if r is None or r.mean_auc is None else r.mean_auc for r in realised], color="black",
                lw=2, marker="s", label="realised mean AUC")
    ax.set(title="estimated AUC (label-free)", xlabel="window", ylim=(0.3, 1.0))
    ax.legend(fontsize=6, ncol=2)
    axes[1].plot(x, [w.flag_rate for w in judged], marker="o", color="#b35806", label="window")
    axes[1].axhline(result.reference_flag_rate, color="#888", ls="--", lw=1, label="reference")
    axes[1].set(title="input check's flag rate", xlabel="window",
                ylim=(0, 1.1 * max([0.1] + [w.flag_rate for w in judged])))
    axes[1].legend(fontsize=8)
    ceiling = 20.0
    for kind, colour in zip(KINDS, ("#4575b4", "#91bfdb", "#d73027", "#fc8d59", "#1a9850")):
        scores = [min(ceiling, w.drift_score_of(kind)) for w in judged]
        if any(w.tests_of(kind) for w in judged):
            axes[2].plot(x, scores, marker="o", lw=1, color=colour, label=kind)
    axes[2].axhline(-np.log10(ALPHA), color="#d7301f", ls="--", lw=1, label="alert")
    axes[2].set(title=f"drift score by kind (-log10 Holm p, at most {ceiling:g})", xlabel="window", ylim=(0, ceiling + 1))
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def parse_since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text}: a date (2026-11-30) or a time (2026-11-30T08:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
