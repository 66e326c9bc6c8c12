"""Is model B better than model A on the same images? ``compare.json`` (:class:`Comparison`), and its report.

Every model is scored on the same images with the same labels. For each pair (a later model against an earlier
one), per finding and for the mean AUC:

* the difference B - A with its **paired patient-bootstrap** 95% interval: both models' AUCs on the same
  resamples of patients (:func:`cxrlearn.evaluation.paired.paired_difference`), so the interval keeps the
  pairing and a patient's several images travel together;
* **DeLong's test** per finding (:func:`cxrlearn.evaluation.paired.delong`), with **Holm's correction** across
  the findings of the pair: with 14 findings, one p below 0.05 by chance alone is likely, Holm's adjusted
  p-values keep the chance of any false claim at 5%.

A model may be several bundles (the seeds of one recipe): its probabilities are their mean, and each member's own
mean AUC on the same images is reported beside it, so the spread between seeds is seen next to the difference
between models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cxrlearn._files import write_atomic
from cxrlearn.evaluation.bootstrap import BootstrapResult
from cxrlearn.evaluation.metrics import FindingMetrics, auc_per_finding, finding_metrics
from cxrlearn.evaluation.metrics import FEW_CASES
from cxrlearn.evaluation.paired import delong, holm, paired_difference
from cxrlearn.evaluation.report import Table, _ci, _num, _signed_ci, render_html, render_markdown
from cxrlearn.records import Record

COMPARISON_FILE = "compare.json"
FOREST_FIGURE = "forest.png"
#: Panels (pairs) in one row of the forest plot.
FOREST_COLUMNS = 3
#: The level of the tests and intervals (two-sided 5%, 95% intervals).
ALPHA = 0.05
MULTIPLE_COMPARISONS = (
    "Per-finding p-values are DeLong's test (images treated as independent); the Holm-adjusted ones control the "
    "chance of any false difference among a pair's findings at 5%. Only the Holm-adjusted p-values, or the mean "
    "AUC's interval, support a claim; a raw p below 0.05 for one finding among 14 is expected by chance. The "
    "bootstrap intervals resample patients and are not adjusted."
)


class ComparedModel(Record):
    """One model's AUCs on the shared images (patient-bootstrap intervals, the same resamples for every model)."""

    name: str
    folder: str
    members: list[str]  # its bundles: one, or a seeds folder's runs (whose probabilities are averaged)
    auc: dict[str, float | None]
    auc_ci95: dict[str, list[float] | None]
    mean_auc: float | None
    mean_auc_ci95: list[float] | None
    members_mean_auc: list[float | None] = []  # each member's own mean AUC on the shared images (several members)
    members_mean_auc_sd: float | None = None  # their standard deviation (ddof 1)
    members_auc_sd: dict[str, float | None] = {}  # per finding


class FindingDifference(Record):
    """AUC(B) - AUC(A) for one finding: bootstrap interval, DeLong's test, Holm's adjustment."""

    finding: str
    positives: int
    negatives: int | None = None
    #: Fewer than FEW_CASES positives or negatives: marked †, never a claim in the headline, never coloured.
    few_cases: bool = False
    auc_a: float | None
    auc_b: float | None
    difference: float | None
    bootstrap_ci95: list[float] | None
    delong_se: float | None
    delong_ci95: list[float] | None
    delong_p: float | None
    holm_p: float | None


class PairComparison(Record):
    """Model B against model A on the same images."""

    a: str
    b: str
    mean_auc_a: float | None
    mean_auc_b: float | None
    mean_auc_difference: float | None
    mean_auc_difference_ci95: list[float] | None
    verdict: str
    findings: list[FindingDifference]
    better_after_holm: list[str]  # findings where B's AUC is higher, Holm-adjusted p < 0.05 (and enough cases)
    worse_after_holm: list[str]
    few_cases: list[str] = []  # findings left out of the claims: fewer than FEW_CASES positives or negatives


class Comparison(Record):
    """``compare.json``: the models, the images they were compared on, and each pair's differences."""

    judged: str
    n_images: int
    n_patients: int
    findings: list[str]
    mean_over: list[str]
    left_out: dict[str, int]  # per model: images it judged that not every model judged
    bootstrap: dict
    models: list[ComparedModel]
    pairs: list[PairComparison]
    multiple_comparisons: str = MULTIPLE_COMPARISONS
    provenance: dict = {}


@dataclass
class Scored:
    """One model's probabilities on the shared images: its members' (one per bundle), in the images' order."""

    name: str
    folder: str
    members: list[str]
    member_probs: list[np.ndarray]

    @property
    def probs(self) -> np.ndarray:
        """The model's probabilities: its members' mean."""
        return np.mean(self.member_probs, axis=0)


def _spread(labels: np.ndarray, model: Scored, findings: Sequence[str]) -> dict:
    """Each member's own AUCs on the shared images, and their standard deviation, where there are several."""
    if len(model.member_probs) < 2:
        return {}
    summaries = [auc_per_finding(labels, probs, findings) for probs in model.member_probs]
    means = [s.mean_auc for s in summaries]

    def sd(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.std(known, ddof=1)) if len(known) >= 2 else None

    return {"members_mean_auc": means, "members_mean_auc_sd": sd(means),
            "members_auc_sd": {name: sd([s.auc[name] for s in summaries]) for name in findings}}


def _verdict(a: str, b: str, interval: list[float] | None) -> str:
    if interval and interval[0] > 0:
        return f"{b} has the higher mean AUC (the 95% interval of the difference is above 0)"
    if interval and interval[1] < 0:
        return f"{a} has the higher mean AUC (the 95% interval of the difference is below 0)"
    return "no difference in mean AUC that the bootstrap can tell from chance (the interval holds 0)"


def _pair(labels: np.ndarray, findings: Sequence[str], mean_over: Sequence[str], a: Scored, b: Scored,
          measured: dict[str, tuple[FindingMetrics, BootstrapResult]]) -> PairComparison:
    (metrics_a, boot_a), (metrics_b, boot_b) = measured[a.name], measured[b.name]
    columns = [list(findings).index(name) for name in mean_over]
    paired = paired_difference(boot_a, boot_b, columns)
    probs_a, probs_b = a.probs, b.probs
    tests = [delong(labels[:, i], probs_a[:, i], probs_b[:, i]) for i in range(len(findings))]
    adjusted = holm([t.p_value if t else None for t in tests])
    rows = []
    for i, name in enumerate(findings):
        test = tests[i]
        known = labels[:, i][~np.isnan(np.asarray(labels[:, i], dtype=np.float64))]
        positives, negatives = int(known.sum()), int(len(known) - known.sum())
        rows.append(FindingDifference(
            finding=name, positives=positives, negatives=negatives,
            few_cases=positives < FEW_CASES or negatives < FEW_CASES, auc_a=metrics_a.auc[name], auc_b=metrics_b.auc[name],
            difference=test.difference if test else None, bootstrap_ci95=paired.interval(i) if test else None,
            delong_se=test.standard_error if test else None, delong_ci95=test.ci95 if test else None,
            delong_p=test.p_value if test else None, holm_p=adjusted[i]))
    significant = [r for r in rows if r.holm_p is not None and r.holm_p < ALPHA and not r.few_cases]
    interval = paired.interval()
    difference = (metrics_b.mean_auc - metrics_a.mean_auc
                  if metrics_a.mean_auc is not None and metrics_b.mean_auc is not None else None)
    return PairComparison(
        a=a.name, b=b.name, mean_auc_a=metrics_a.mean_auc, mean_auc_b=metrics_b.mean_auc,
        mean_auc_difference=difference, mean_auc_difference_ci95=interval, verdict=_verdict(a.name, b.name, interval),
        findings=rows, better_after_holm=[r.finding for r in significant if r.difference > 0],
        worse_after_holm=[r.finding for r in significant if r.difference < 0],
        few_cases=[r.finding for r in rows if r.few_cases])


def compare_scores(labels: np.ndarray, patients: np.ndarray, findings: Sequence[str], models: Sequence[Scored],
                   resamples: int, seed: int, judged: str, left_out: dict[str, int] | None = None) -> Comparison:
    """Every model's AUCs on the same images, and each pair (every later model against every earlier one)."""
    if len(models) < 2:
        raise ValueError("a comparison needs at least two models")
    findings = list(findings)
    measured = {m.name: finding_metrics(labels, m.probs, patients, findings, resamples, seed) for m in models}
    first = measured[models[0].name][0]
    compared = [ComparedModel(name=m.name, folder=m.folder, members=m.members, auc=measured[m.name][0].auc,
                              auc_ci95=measured[m.name][0].auc_ci95, mean_auc=measured[m.name][0].mean_auc,
                              mean_auc_ci95=measured[m.name][0].mean_auc_ci95, **_spread(labels, m, findings))
                for m in models]
    pairs = [_pair(labels, findings, first.mean_over, a, b, measured)
             for i, a in enumerate(models) for b in models[i + 1:]]
    return Comparison(judged=judged, n_images=first.n_images, n_patients=first.n_patients, findings=findings,
                      mean_over=first.mean_over, left_out=left_out or {}, models=compared, pairs=pairs,
                      multiple_comparisons=MULTIPLE_COMPARISONS,
                      bootstrap={"unit": "patient", "resamples": resamples, "seed": seed, "level": 1 - ALPHA,
                                 "method": "percentile, paired (the same resamples for every model)"})


# --- the report -------------------------------------------------------------------------------------------------

def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _model_blocks(comparison: Comparison) -> list[tuple[str, object]]:
    rows = []
    for m in comparison.models:
        spread = ""
        if m.members_mean_auc:
            known = [v for v in m.members_mean_auc if v is not None]
            spread = (f"{len(m.members)} members: {min(known):.3f}–{max(known):.3f}, SD {_num(m.members_mean_auc_sd)}"
                      if known else f"{len(m.members)} members")
        rows.append([f"**{m.name}**", m.folder, _num(m.mean_auc), _ci(m.mean_auc_ci95), spread or "one bundle"])
    return [("table", Table(["model", "folder", "mean AUC", "95% CI (patients)", "its members' mean AUCs"], rows))]


def _pair_blocks(pair: PairComparison) -> list[tuple[str, object]]:
    rows = [[r.finding + (" †" if r.few_cases else ""), str(r.positives), _num(r.auc_a),
             _num(r.auc_b), "—" if r.difference is None else f"{r.difference:+.3f}", _signed_ci(r.bootstrap_ci95),
             _p(r.delong_p),
             _p(r.holm_p) + (" *" if r.holm_p is not None and r.holm_p < ALPHA and not r.few_cases else "")]
            for r in pair.findings]
    rows.append(["**mean AUC**", "", _num(pair.mean_auc_a), _num(pair.mean_auc_b),
                 "—" if pair.mean_auc_difference is None else f"{pair.mean_auc_difference:+.4f}",
                 _signed_ci(pair.mean_auc_difference_ci95), "", ""])
    claims = []
    if pair.better_after_holm:
        claims.append(f"{pair.b} is better for {', '.join(pair.better_after_holm)}")
    if pair.worse_after_holm:
        claims.append(f"{pair.a} is better for {', '.join(pair.worse_after_holm)}")
    return [
        ("h2", f"{pair.b} against {pair.a}"),
        ("p", f"**Mean AUC**: {pair.b} − {pair.a} = {_num(pair.mean_auc_difference, 4)} "
              f"(95% CI {_signed_ci(pair.mean_auc_difference_ci95)}): {pair.verdict}. "
              f"**Per finding, after Holm's correction**: " + ("; ".join(claims) if claims else "no finding differs") + "."),
        ("table", Table(["finding", "positives", f"AUC {pair.a}", f"AUC {pair.b}", "difference",
                         "95% CI (paired bootstrap)", "DeLong p", "Holm p"], rows)),
    ]


def build_blocks(comparison: Comparison) -> list[tuple[str, object]]:
    provenance = comparison.provenance
    blocks: list[tuple[str, object]] = [
        ("h1", "Model comparison: " + " · ".join(m.name for m in comparison.models)),
        ("p", f"Judged: {comparison.judged}. **{comparison.n_images:,} images of {comparison.n_patients:,} patients**, "
              f"every model on the same images; mean AUC over {len(comparison.mean_over)} findings. Intervals: "
              f"{comparison.bootstrap['resamples']:,} paired resamples of patients (seed "
              f"{comparison.bootstrap['seed']})."),
    ]
    left = {name: n for name, n in comparison.left_out.items() if n}
    if left:
        blocks.append(("p", "Left out because not every model judged them: "
                       + "; ".join(f"{n:,} images of {name}" for name, n in left.items()) + "."))
    blocks += _model_blocks(comparison)
    blocks.append(("img", (FOREST_FIGURE, "differences in AUC per finding and in mean AUC, with paired intervals")))
    for pair in comparison.pairs:
        blocks += _pair_blocks(pair)
    blocks.append(("p", "* Holm-adjusted p < 0.05. " + comparison.multiple_comparisons
                   + f" † Fewer than {FEW_CASES} positives (or negatives): DeLong's normal approximation and the "
                   "percentile interval are both unreliable; such a finding is left out of the claims and the "
                   "colouring, and its difference read as unknown."))
    if provenance:
        blocks.append(("p", " · ".join(f"{key}: `{value}`" for key, value in provenance.items() if value)))
    return blocks


def plot_forest(path: Path, comparison: Comparison) -> None:
    """One panel per pair: each finding's difference B - A with its paired bootstrap interval, and the mean AUC's;
    findings whose Holm-adjusted p is below 0.05 in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = comparison.pairs
    rows = len(comparison.findings) + 1
    # At most FOREST_COLUMNS panels a row: ten pairs (five models) side by side would be unreadably wide.
    columns = min(len(pairs), FOREST_COLUMNS)
    lines = -(-len(pairs) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, (0.32 * rows + 1.4) * lines + 0.4),
                                squeeze=False, sharey=True, sharex=True, layout="constrained")
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    for ax, pair in zip(axes.flat, pairs):
        entries = [(r.finding + (" †" if r.few_cases else ""), r.difference, r.bootstrap_ci95,
                    None if r.few_cases else r.holm_p, r.few_cases) for r in pair.findings]
        entries.append(("mean AUC", pair.mean_auc_difference, pair.mean_auc_difference_ci95, None, False))
        for y, (name, difference, interval, p, few) in enumerate(reversed(entries)):
            if difference is None:
                continue
            colour = ("#111" if name == "mean AUC" else "#aaa" if few
                      else "#c0392b" if p is not None and p < ALPHA else "#1f5fa8")
            if interval:
                ax.plot(interval, [y, y], color=colour, lw=1.6 if name == "mean AUC" else 1.0)
            ax.plot([difference], [y], "D" if name == "mean AUC" else "o", color=colour, ms=5)
        ax.axvline(0, color="#888", lw=0.8, ls="--")
        ax.set_yticks(range(rows))
        ax.set_yticklabels([e[0] for e in reversed(entries)], fontsize=8)
        ax.set_title(f"{pair.b} − {pair.a}", fontsize=10)
        ax.set_xlabel(f"← {pair.a} better   AUC difference (95% paired patient bootstrap)   {pair.b} better →",
                      fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    figure.suptitle(f"{comparison.n_images:,} images of {comparison.n_patients:,} patients; red: Holm-adjusted "
                    f"DeLong p < 0.05; † grey: fewer than {FEW_CASES} positives or negatives, no claim", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_comparison(out: Path, comparison: Comparison) -> None:
    """``compare.json``, ``compare.md``, ``compare.html`` and the forest plot in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plot_forest(out / FOREST_FIGURE, comparison)
    write_atomic(out / COMPARISON_FILE, json.dumps(comparison.to_dict(), indent=2) + "\n")
    blocks = build_blocks(comparison)
    write_atomic(out / "compare.md", render_markdown(blocks))
    write_atomic(out / "compare.html", render_html(blocks))
