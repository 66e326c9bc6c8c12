"""The evaluation report: ``report.md`` and ``report.html`` from one list of blocks, and its figures.

Figures (PNG, beside the reports): ``roc_curves.png`` (one panel per finding)
and ``reliability.png`` (reliability diagrams). Published AUCs are printed
beside ours with their data and split, so nobody takes them for a
like-for-like comparison.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from cxrlearn._files import write_atomic
from cxrlearn.evaluation.calibration import Reliability
from cxrlearn.evaluation.metrics import FEW_CASES, FindingMetrics
from cxrlearn.evaluation.operating_points import METHOD_NAMES, METHODS, NOT_CALLED
from cxrlearn.evaluation.published import PUBLISHED, published_auc
from cxrlearn.evaluation.results import EvaluationMetrics
from cxrlearn.findings import FINDINGS

ROC_FIGURE = "roc_curves.png"
RELIABILITY_FIGURE = "reliability.png"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


def _num(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ci(interval) -> str:
    return "—" if not interval else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _ci_marked(interval, positives: int) -> str:
    return _ci(interval) + (" †" if interval and positives < FEW_CASES else "")


def _signed_ci(interval) -> str:
    return "—" if not interval else f"{interval[0]:+.4f} to {interval[1]:+.4f}"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def build_blocks(metrics: EvaluationMetrics, findings: Sequence[str]) -> list[tuple[str, object]]:
    """The report as (kind, content) blocks: h1, h2, p, table, img; one function per section."""
    return [*_summary_blocks(metrics, findings), *_auc_blocks(metrics, findings),
            *_operating_point_blocks(metrics, findings), *_calibration_blocks(metrics, findings),
            *_subgroup_blocks(metrics), *_expert_blocks(metrics), *_input_check_blocks(metrics),
            *_tta_blocks(metrics), *_provenance_blocks(metrics)]


def _summary_blocks(metrics: EvaluationMetrics, findings: Sequence[str]) -> list[tuple[str, object]]:
    """The title, what was judged, and the mean AUC."""
    bundle = metrics.provenance.bundle
    blocks: list[tuple[str, object]] = [
        ("h1", f"cxrlearn evaluation: {bundle.backbone} at {bundle.preprocessing['input_size']} px"),
        ("p", f"Judged on {metrics.subset}: {metrics.n_images:,} images of {metrics.n_patients:,} patients. "
              f"Mean AUC-ROC {_num(metrics.mean_auc)} (95% CI {_ci(metrics.mean_auc_ci95)}) over "
              f"{len(metrics.mean_over)} of {len(findings)} findings."),
        ("p", f"Intervals: percentile bootstrap over patients ({metrics.bootstrap['resamples']:,} resamples, "
              f"seed {metrics.bootstrap['seed']}); a patient's images are resampled together."),
    ]
    if metrics.undefined:
        blocks.append(("p", "No AUC (a finding needs positives and negatives among the judged images): "
                       + "; ".join(f"{k}: {v}" for k, v in metrics.undefined.items()) + "."))
    return blocks


def _auc_blocks(metrics: EvaluationMetrics, findings: Sequence[str]) -> list[tuple[str, object]]:
    """Per-finding AUC with intervals, beside published values for NIH's findings."""
    blocks: list[tuple[str, object]] = []
    # Published values are NIH's 14 findings': beside a model of other findings there is nothing to set.
    sources = list(PUBLISHED) if set(findings) <= set(FINDINGS) else []
    published = {s: published_auc(s) for s in sources}
    partial = any(metrics.known.get(name, metrics.n_images) < metrics.n_images for name in findings)
    rows = [
        [name] + ([f"{metrics.known[name]:,}"] if partial else [])
        + [f"{metrics.positives[name]:,}", _num(metrics.auc[name]),
           _ci_marked(metrics.auc_ci95[name], metrics.positives[name]),
           _num(metrics.auc_pr[name]), _pct(metrics.prevalence[name])]
        + [_num(published[s][name]) for s in sources]
        for name in findings
    ]
    rows.append(["**mean**"] + ([""] if partial else []) + ["", _num(metrics.mean_auc), _ci(metrics.mean_auc_ci95),
                                                             "", ""]
                + [_num(PUBLISHED[s].mean, 4) for s in sources])
    blocks += [
        ("h2", "Per-finding AUC"),
        ("table", Table(["finding"] + (["known labels"] if partial else [])
                        + ["positives", "AUC-ROC", "95% CI", "AUC-PR", "prevalence"] + sources, rows)),
        ("p", f"† fewer than {FEW_CASES} positives: the interval rests on very few images and is unreliable. "
              + ("Published values are context, not a like-for-like target: other data, splits and models. "
                 + " ".join(f"{s}: {PUBLISHED[s].described()}."
                            for s in sources) if sources else "")),
        ("img", (ROC_FIGURE, "ROC curve of each finding on the judged images")),
    ]
    if metrics.skipped:
        blocks.insert(-1, ("p", "Not judged: " + "; ".join(f"{name} ({why})" for name, why in metrics.skipped.items())
                                + ". A finding is judged when the model predicts it and the table labels it, by the "
                                  "same name or the same harmonised name (docs/datasets.md)."))
    if partial:
        blocks.insert(-1, ("p", "Each finding is judged on the images whose label of it is known (the others "
                                "were not labelled for it); its prevalence is over those."))
    return blocks


def _operating_point_blocks(metrics: EvaluationMetrics, findings: Sequence[str]) -> list[tuple[str, object]]:
    """The bundle's thresholds applied to the judged images, and every rule's."""
    blocks: list[tuple[str, object]] = []
    op = metrics.operating_points
    if op.unavailable:
        blocks += [("h2", "Operating points"), ("p", op.unavailable)]
    else:
        method = op.bundle_method
        why = op.undefined or {}
        rows = [
            [name, _num(op.thresholds[method][name]) if op.thresholds[method][name] is not None
             else f"{NOT_CALLED}" + (f" ({why[name]})" if name in why else "")]
            + ([_pct(p.sensitivity), _pct(p.specificity), _pct(p.ppv), _pct(p.npv)] if p else ["—"] * 4)
            for name, p in op.test[method].items()
        ]
        blocks += [
            ("h2", "Operating points"),
            ("p", f"Thresholds chosen on {op.chosen_on} by {METHOD_NAMES[method]} (stored in the model bundle, "
                  f"used by predict), applied to the judged images:"),
            ("table", Table(["finding", "threshold", "sensitivity", "specificity", "PPV", "NPV"], rows)),
            ("p", "Thresholds of every rule (all in metrics.json with their confusion counts):"),
            ("table", Table(["finding"] + [METHOD_NAMES[m] for m in METHODS],
                            [[name] + [_num(op.thresholds[m][name]) for m in METHODS] for name in findings])),
        ]
    return blocks


def _calibration_blocks(metrics: EvaluationMetrics, findings: Sequence[str]) -> list[tuple[str, object]]:
    """ECE per finding, with and without temperature scaling."""
    blocks: list[tuple[str, object]] = []
    cal = metrics.calibration
    scaled = cal.temperature is not None
    header = ["finding", "ECE (temperature-scaled)", "ECE (raw)", "temperature"] if scaled else ["finding", "ECE"]
    rows = []
    for name in findings:
        row = [name, _num(cal.test[name].ece)]
        if scaled:
            row += [_num(cal.test_uncalibrated[name].ece), _num(cal.temperature[name], 2)]
        rows.append(row)
    failed = cal.temperature_failed or {}
    blocks += [
        ("h2", "Calibration"),
        ("p", f"Expected calibration error over {cal.bins} equal-width bins of predicted probability."),
        ("table", Table(header, rows)),
        *[("p", f"Temperature scaling failed for {name}: {why}.") for name, why in failed.items()],
        ("img", (RELIABILITY_FIGURE, "Reliability diagram of each finding")),
    ]
    return blocks


def _subgroup_blocks(metrics: EvaluationMetrics) -> list[tuple[str, object]]:
    """Mean AUC by sex, age band and view position."""
    blocks: list[tuple[str, object]] = []
    blocks += [
        ("h2", "Subgroups"),
        ("p", "Mean AUC by sex, age band and view position (each over the findings defined in that group)."),
        ("table", Table(["attribute", "group", "images", "patients", "mean AUC", "95% CI", "findings scored"],
                        [[g.attribute, g.group + (" †" if g.few_cases else ""), f"{g.n_images:,}",
                          f"{g.n_patients:,}", _num(g.mean_auc), _ci(g.mean_auc_ci95), str(len(g.mean_over))]
                         for g in metrics.subgroups])),
    ]
    if any(g.few_cases for g in metrics.subgroups):
        blocks.append(("p", f"† no finding with {FEW_CASES} positives in the group: its mean AUC and interval rest on "
                            "too few images to read."))
    return blocks


def _expert_blocks(metrics: EvaluationMetrics) -> list[tuple[str, object]]:
    """AUC against Google's expert labels, beside NIH's on the same images."""
    blocks: list[tuple[str, object]] = []
    if metrics.expert is not None:
        expert = metrics.expert
        blocks.append(("h2", "Against radiologists' labels (Google 2019)"))
        if expert.n_images == 0:
            blocks.append(("p", expert.note + "."))
        else:
            radiologists, nih = expert.expert, expert.nih
            rows = [
                [name, f"{radiologists.positives[name]}", _num(radiologists.auc[name]),
                 _ci_marked(radiologists.auc_ci95[name], radiologists.positives[name]),
                 f"{nih.positives[name]}", _num(nih.auc[name]), _ci_marked(nih.auc_ci95[name], nih.positives[name]),
                 _pct(expert.agreement[name])]
                for name in radiologists.auc
            ]
            blocks += [
                ("p", f"{expert.n_images} judged images have expert labels. Nodule or mass is scored by the "
                      "larger of the Nodule and Mass probabilities (NIH label: Nodule or Mass). "
                      f"† fewer than {FEW_CASES} positives: unreliable interval."),
                ("table", Table(["finding", "expert positives", "AUC vs expert", "95% CI", "NIH positives",
                                 "AUC vs NIH", "95% CI", "label agreement"], rows)),
            ]
    return blocks


def _input_check_blocks(metrics: EvaluationMetrics) -> list[tuple[str, object]]:
    """How many judged images the input check flagged, and the AUC without them."""
    blocks: list[tuple[str, object]] = []
    check = metrics.input_check
    if check.available:
        reasons = "; ".join(f"{k}: {v:,}" for k, v in (check.reasons or {}).items()) or "none"
        blocks += [
            ("h2", "Input check"),
            ("p", f"Flagged as unlike the training images: {check.flagged:,} of {check.judged:,} judged images "
                  f"({reasons}). Mean AUC-ROC {_num(check.mean_auc_all, 4)} on all of them, "
                  f"{_num(check.mean_auc_unflagged, 4)} without the flagged ones ({check.note})."),
        ]
    elif check.model_fields_set:
        blocks.append(("p", "Input check: unavailable (this bundle was made before cxrlearn learned one)."))
    return blocks


def _tta_blocks(metrics: EvaluationMetrics) -> list[tuple[str, object]]:
    """Flip averaging against none, with the paired interval."""
    blocks: list[tuple[str, object]] = []
    if metrics.tta is not None:
        t = metrics.tta
        blocks += [
            ("h2", "Test-time augmentation"),
            ("p", f"Averaging each image with its mirror: mean AUC {_num(t.mean_auc_with_tta, 4)} against "
                  f"{_num(t.mean_auc_without_tta, 4)} without (difference {t.difference:+.4f}, paired 95% CI "
                  f"{_signed_ci(t.difference_ci95)}): {t.verdict}."),
        ]
    return blocks


def _provenance_blocks(metrics: EvaluationMetrics) -> list[tuple[str, object]]:
    """Where the numbers come from: date, command, bundle, split, table, versions."""
    prov = metrics.provenance
    bundle, split, table = prov.bundle, prov.split, prov.label_table
    blocks = [
        ("h2", "Provenance"),
        ("table", Table(["what", "value"], [
            ["date", prov.date],
            ["command", f"`{prov.command}`" if prov.command else "—"],
            ["model bundle", f"{bundle.folder} (weights SHA-256 {bundle.weights_sha256[:16]}…)"],
            ["runtime", f"{prov.runtime or 'torch'}" + (f" (file SHA-256 {prov.runtime_sha256[:16]}…)"
                                                        if prov.runtime_sha256 else "")],
            ["trained on split", f"SHA-256 {(bundle.trained_split_sha256 or '—')[:16]}…"],
            ["judged split", f"{split.file} (SHA-256 {split.sha256[:16]}…)"
             + (f"; official test list {split.official_test.file}" if split.official_test else "")],
            ["label table", f"{table.file} (SHA-256 {table.sha256[:16]}…)"],
            ["images", prov.images],
            ["left out (undecodable)", str(prov.images_left_out_undecodable)],
            ["versions", ", ".join(f"{k} {v}" for k, v in prov.versions.items())],
        ])),
    ]
    return blocks


def render_markdown(blocks) -> str:
    lines: list[str] = []
    for kind, content in blocks:
        if kind == "h1":
            lines += [f"# {content}", ""]
        elif kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [str(content), ""]
        elif kind == "img":
            lines += [f"![{content[1]}]({content[0]})", ""]
        elif kind == "table":
            lines.append("| " + " | ".join(content.header) + " |")
            lines.append("|" + "|".join("---" for _ in content.header) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in content.rows]
            lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """HTML for the little markdown the blocks use: **bold** and `code`."""
    out = html.escape(text)
    for mark, tag in (("**", "strong"), ("`", "code")):
        parts = out.split(mark)
        out = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(parts))
    return out


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}code{font-size:12px}"""


def render_html(blocks) -> str:
    body: list[str] = []
    title = next((c for k, c in blocks if k == "h1"), "cxrlearn evaluation")
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(str(content))}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(str(content))}</p>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(content[0])}" alt="{html.escape(content[1])}"></p>')
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in content.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in content.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _grid(count: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.1 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return plt, figure, axes.flat


def plot_roc_curves(path: Path, labels: np.ndarray, probs: np.ndarray, findings: Sequence[str], metrics: FindingMetrics) -> None:
    plt, figure, axes = _grid(len(findings))
    for i, (ax, name) in enumerate(zip(axes, findings)):
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls="--")
        if metrics.auc[name] is None:
            ax.text(0.5, 0.5, f"no AUC:\n{metrics.undefined[name]}", ha="center", va="center")
        else:
            known = ~np.isnan(np.asarray(labels[:, i], dtype=np.float64))
            fpr, tpr, _ = roc_curve(labels[known, i], probs[known, i])
            ax.plot(fpr, tpr, color="#1f5fa8", lw=1.5)
            low, high = metrics.auc_ci95[name] or (np.nan, np.nan)
            ax.text(0.97, 0.04, f"AUC {metrics.auc[name]:.3f}\n[{low:.3f}, {high:.3f}]\nn+ = {metrics.positives[name]}",
                    ha="right", va="bottom", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
    figure.suptitle(f"ROC curves, {metrics.n_images:,} images of {metrics.n_patients:,} patients "
                    f"(mean AUC {metrics.mean_auc:.3f})" if metrics.mean_auc is not None else "ROC curves")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_reliability(path: Path, calibration: dict[str, Reliability], findings: Sequence[str]) -> None:
    plt, figure, axes = _grid(len(findings))
    for ax, name in zip(axes, findings):
        entry = calibration[name]
        bins = entry.bins
        centres = (np.arange(bins) + 0.5) / bins
        observed = np.array([np.nan if v is None else v for v in entry.observed_frequency])
        mean_p = np.array([np.nan if v is None else v for v in entry.mean_probability])
        ax.bar(centres, np.nan_to_num(observed), width=1.0 / bins, color="#9cc3e6", edgecolor="#1f5fa8", lw=0.5)
        ax.plot([0, 1], [0, 1], color="#888", lw=0.8, ls="--")
        ax.plot(mean_p, observed, "o", color="#c0392b", ms=3)
        ax.set_title(f"{name}  ECE {entry.ece:.3f}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
    figure.suptitle("Reliability: bars = observed frequency per bin, dots = at the bin's mean prediction")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(out: Path, metrics: EvaluationMetrics, labels: np.ndarray, probs: np.ndarray, findings: Sequence[str]) -> None:
    """``report.md``, ``report.html`` and the figures in ``out``."""
    plot_roc_curves(out / ROC_FIGURE, labels, probs, findings, metrics)
    plot_reliability(out / RELIABILITY_FIGURE, metrics.calibration.test, findings)
    blocks = build_blocks(metrics, findings)
    write_atomic(out / "report.md", render_markdown(blocks))
    write_atomic(out / "report.html", render_html(blocks))
