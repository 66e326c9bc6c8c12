"""How often does the int8 gate refuse an honest int8 file, and how often a harmful one, on small validation sets?

Reads two `cxrlearn evaluate` outputs of one run on the same images (predictions.csv of the float model and of its
int8 file; every labelled row, validation and test alike), draws many validation sets of a given number of
patients from them, and applies each gate of ``export --int8`` (:mod:`cxrlearn.workflows.quantize`) to each draw:

* ``equivalence``: the paired patient bootstrap's 95% interval of mean AUC (int8 - float) lies above -0.005, and no
  finding is significantly worse (DeLong per finding, Holm);
* ``no-loss``: no finding is significantly worse, and the interval's upper bound is above -0.005 (the images do not
  show a loss larger than the allowance).

The "harmful" file is the int8 one with Gaussian noise added to its logits (its mean AUC lower by a few points).

Usage: python benchmarks/int8_gate.py --float EVAL_DIR --int8 EVAL_DIR [--patients 100] [--draws 200]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from _common import machine, parser

from cxrlearn.evaluation.metrics import auc_per_finding
from cxrlearn.findings import FINDINGS
from cxrlearn.model import INT8_MAX_AUC_LOSS
from cxrlearn.workflows.quantize import GATES, gate_figures


def read(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "predictions.csv").set_index("image").sort_index()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--float", dest="fp32", type=Path, required=True)
    p.add_argument("--int8", type=Path, required=True)
    p.add_argument("--patients", type=int, default=100)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--noise", type=float, default=1.0, help="sd of the noise added to the harmful file's logits")
    args = p.parse_args()
    fp32, int8 = read(args.fp32), read(args.int8)
    assert list(fp32.index) == list(int8.index)
    labels = fp32[[f"label_{f}" for f in FINDINGS]].to_numpy(dtype=np.float64)
    a, b = fp32[list(FINDINGS)].to_numpy(), int8[list(FINDINGS)].to_numpy()
    rng = np.random.default_rng(0)
    logits = np.log(np.clip(b, 1e-6, 1 - 1e-6) / np.clip(1 - b, 1e-6, 1))
    harmful = 1 / (1 + np.exp(-(logits + rng.normal(0, args.noise, logits.shape))))
    patients = fp32["patient_id"].to_numpy()
    people = np.unique(patients)
    whole = {name: auc_per_finding(labels, scores, list(FINDINGS)).mean_auc
             for name, scores in (("float", a), ("int8", b), ("harmful", harmful))}
    print(f"# {machine()}; {len(fp32)} images of {len(people)} patients; mean AUC on all of them: "
          + ", ".join(f"{k} {v:.4f}" for k, v in whole.items()))
    refused = {(gate, kind): 0 for gate in GATES for kind in ("int8", "harmful")}
    widths = []
    for _ in range(args.draws):
        chosen = np.isin(patients, rng.choice(people, args.patients, replace=False))
        for kind, scores in (("int8", b), ("harmful", harmful)):
            figures = gate_figures(labels[chosen], a[chosen], scores[chosen], patients[chosen], list(FINDINGS),
                                   resamples=200)
            if kind == "int8" and figures.interval is not None:
                widths.append(figures.interval[1] - figures.interval[0])
            for gate in GATES:
                refused[gate, kind] += not figures.passes(gate, INT8_MAX_AUC_LOSS)
    print(f"validation sets of {args.patients} patients ({args.draws} draws); the interval's median width "
          f"{np.median(widths):.4f}")
    print("| gate | honest int8 refused | harmful int8 refused |")
    print("|---|---|---|")
    for gate in GATES:
        print(f"| {gate} | {refused[gate, 'int8'] / args.draws:.0%} | {refused[gate, 'harmful'] / args.draws:.0%} |")


if __name__ == "__main__":
    main()
