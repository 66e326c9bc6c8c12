"""`cxrlearn prepare` throughput on NIH's full-size 1024×1024 PNGs.

Usage: python benchmarks/prepare_throughput.py [--data DIR] [--repeats 3]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from _common import machine, parser

from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.cache import decode_and_resize, prepare_cache, table_fingerprint
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.sources.nih import read_label_table

TOTAL = 112_120


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()
    table = read_label_table(args.data / "nih" / "Data_Entry_2017_v2020.csv.gz")
    present = attach_images(table, args.data / "nih-sample" / "images-1024").table
    print(f"# prepare throughput: {len(present)} full-size images, {args.size} px; {machine()}")

    paths = list(present["path"]) * args.repeats
    decode_and_resize(paths[0], Preprocessing.for_cache(args.size))  # warm the file cache
    start = time.perf_counter()
    for path in paths:
        decode_and_resize(path, Preprocessing.for_cache(args.size))
    per_worker = len(paths) / (time.perf_counter() - start)
    print(f"decode+resize in one process: {per_worker:.1f} images/s ({1000 / per_worker:.1f} ms each)")

    fingerprint = table_fingerprint(table)
    rates = {}
    for workers in (1, 2):
        out = Path(tempfile.mkdtemp())
        try:
            summary = prepare_cache(present, out / "c", fingerprint, Preprocessing.for_cache(args.size), workers=workers,
                                    progress=False)
            rates[workers] = summary.added / summary.seconds
            print(f"cxrlearn prepare --workers {workers}: {rates[workers]:.1f} images/s "
                  f"({rates[workers] / workers:.1f} per worker; includes pool start-up)")
        finally:
            shutil.rmtree(out)
    here = max(rates.values())
    print(f"projected for all {TOTAL:,} images: {TOTAL / here / 60:.0f} min on this machine "
          f"({max(rates)} workers), {TOTAL / (per_worker * 16) / 60:.1f} min on 16 cores "
          f"(16 × the one-process rate; disk permitting)")


if __name__ == "__main__":
    main()
