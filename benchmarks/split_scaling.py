"""How the fair split scales: NIH's table, and the same table k times over with new patients (a stand-in for
a merged table of several datasets), split with cxrlearn's stratified method; time and balance of each.

Usage: python benchmarks/split_scaling.py [--copies 1 4 9]
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from _common import machine, parser

from cxrlearn.data.cohort.split import PREVALENCE_TOLERANCE, SPLITS, make_split, split_report
from cxrlearn.data.columns import IMAGE, PATIENT_ID
from cxrlearn.data.sources.nih import read_label_table


def copies(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """``table`` k times, each copy with its own images and patients."""
    if k == 1:
        return table
    step = int(table[PATIENT_ID].max()) + 1
    parts = [table.assign(**{IMAGE: table[IMAGE] + (f"#{i}" if i else ""), PATIENT_ID: table[PATIENT_ID] + i * step})
             for i in range(k)]
    return pd.concat(parts, ignore_index=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--copies", type=int, nargs="+", default=[1, 4, 9])
    args = p.parse_args()
    nih = read_label_table(args.data / "nih" / "Data_Entry_2017_v2020.csv.gz")
    print(f"# make_split (stratified, seed 2137); {machine()}")
    print("| images | patients | seconds | worst relative prevalence deviation | worst share deviation (points) |")
    print("| --- | --- | --- | --- | --- |")
    for k in args.copies:
        table = copies(nih, k)
        started = time.perf_counter()
        split = make_split(table)
        seconds = time.perf_counter() - started
        report = split_report(table, split, ratios=(0.7, 0.1, 0.2))
        worst = report.max_relative_deviation
        print(f"| {len(table):,} | {table[PATIENT_ID].nunique():,} | {seconds:.1f} | {worst.value:+.2%} "
              f"({worst.finding}, {worst.split}; target ±{PREVALENCE_TOLERANCE:.0%}) | "
              f"{report.max_share_deviation_points:.2f} |")
        assert set(split["split"]) <= set(SPLITS) and np.all(split.groupby(PATIENT_ID)["split"].nunique() == 1)


if __name__ == "__main__":
    main()
