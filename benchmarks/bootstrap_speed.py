"""Patient-level bootstrap of per-finding AUC at the official test list's scale.

Real labels and patients: NIH's official test list (25,596 images of 2,797 patients)
from the full label table. The scores are synthetic (no model has predicted those
images on this machine): each finding's label plus Gaussian noise, which gives AUCs
in the range of real models. The vectorised bootstrap is set beside the plain loop
of scikit-learn's ``roc_auc_score(sample_weight=...)`` on the first resamples, and
the two are checked to agree.

Usage: python benchmarks/bootstrap_speed.py [--data DIR] [--resamples 1000] [--loop 20]
"""

from __future__ import annotations

import time

import numpy as np
from _common import machine, parser
from sklearn.metrics import roc_auc_score

from cxrlearn.data.columns import label_matrix
from cxrlearn.data.sources.nih import read_image_list, read_label_table
from cxrlearn.evaluation.bootstrap import bootstrap_aucs, resample_counts
from cxrlearn.evaluation.metrics import finding_metrics
from cxrlearn.findings import FINDINGS


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--loop", type=int, default=20, help="resamples for the scikit-learn loop")
    args = p.parse_args()
    table = read_label_table(args.data / "nih" / "Data_Entry_2017_v2020.csv.gz")
    test = table[table["image"].isin(set(read_image_list(args.data / "nih" / "test_list.txt")))]
    labels = label_matrix(test)
    patients = test["patient_id"].to_numpy()
    rng = np.random.default_rng(0)
    scores = (labels + rng.normal(scale=0.8, size=labels.shape)).astype(np.float32)
    print(f"# bootstrap: {len(test):,} images of {test['patient_id'].nunique():,} patients x {labels.shape[1]} findings; "
          f"{machine()}")

    started = time.perf_counter()
    metrics, _ = finding_metrics(labels, scores, patients, FINDINGS, n_resamples=args.resamples)
    whole = time.perf_counter() - started
    print(f"finding_metrics (point AUC, AUC-PR, {args.resamples:,} patient resamples, intervals): {whole:.1f} s; "
          f"mean AUC {metrics.mean_auc:.4f} [{metrics.mean_auc_ci95[0]:.4f}, {metrics.mean_auc_ci95[1]:.4f}]")

    started = time.perf_counter()
    boot = bootstrap_aucs(labels, scores, patients, n_resamples=args.loop, seed=7)
    fast = (time.perf_counter() - started) / args.loop
    _, group = np.unique(patients, return_inverse=True)
    counts = resample_counts(group.max() + 1, args.loop, np.random.default_rng(7))
    started = time.perf_counter()
    slow = np.array([[roc_auc_score(labels[:, f], scores[:, f], sample_weight=counts[r][group]) for f in range(14)]
                     for r in range(args.loop)])
    loop = (time.perf_counter() - started) / args.loop
    print(f"per resample (14 findings): vectorised {1000 * fast:.1f} ms, scikit-learn loop {1000 * loop:.1f} ms "
          f"({loop / fast:.0f}x); max |difference| {np.abs(slow - boot.aucs).max():.1e}")
    print(f"{args.resamples:,} resamples with the scikit-learn loop would take {loop * args.resamples:.0f} s")


if __name__ == "__main__":
    main()
