"""Byte-level fuzzing of cxrlearn's decoders for longer than the test suite does (tests/test_fuzz.py).

Mutants of one real radiograph in every format cxrlearn reads (PNG 8/16-bit, TIFF, JPEG, DICOM);
any exception other than cxrlearn's DataError is reported with the seed and case that reproduce it.

Usage: python benchmarks/fuzz_decoders.py [--seconds 90] [--seed 1]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from _common import REPO, machine, parser

sys.path.insert(0, str(REPO / "tests"))  # the fuzzing helpers the test suite uses
os.environ.setdefault("PYTHONWARNINGS", "ignore")

from fuzzing import fuzz, seed_files  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    image = sorted((args.data / "nih-sample" / "images-256").glob("*.png"))[0]
    files = seed_files(Path(image))
    started = time.time()
    counts = fuzz(files, seed=args.seed, seconds=args.seconds)
    took = time.time() - started
    print(f"# decoder fuzzing, seed {args.seed}, {took:.0f} s; {machine()}")
    print(f"{counts['cases']:,} mutants of {len(files)} formats ({', '.join(files)}): {counts['decoded']:,} decoded, "
          f"{counts['refused']:,} refused with DataError, 0 other exceptions ({counts['cases'] / took:,.0f} per second)")


if __name__ == "__main__":
    main()
