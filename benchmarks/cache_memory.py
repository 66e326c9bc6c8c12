"""Peak resident memory while iterating caches of growing size.

Builds caches of N rows (real sample pixels, tiled) and, in a fresh process for
each, iterates a training DataLoader over every row, reporting the process's
peak RSS (VmHWM). With the cache's per-row page release it stays flat; reading
through a plain ``np.memmap`` (shown for comparison) grows with the cache.

Usage: python benchmarks/cache_memory.py [--data DIR] [--rows 2000 20000]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import machine, parser

CHILD = r"""
import json, sys
import numpy as np
from torch.utils.data import DataLoader
from cxrlearn.data.pipeline.augment import Augmentation
from cxrlearn.data.pipeline.datamodule import CachedXrayDataset
from cxrlearn.data.preprocessing import Preprocessing
folder, mode = sys.argv[1], sys.argv[2]
names = [line.split("\t")[0] for line in open(folder + "/index.tsv")]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024
dataset = CachedXrayDataset(folder, names, np.zeros((len(names), 14)),
                            Preprocessing.for_run((0.5,) * 3, (0.5,) * 3, 224,
                                                  cache_size=int(json.load(open(folder + "/meta.json"))["size"])),
                            Augmentation(),
                            seed=1)
if mode == "np.memmap":
    from cxrlearn.data.pipeline.cache import ImageCache
    cache = ImageCache(folder)
    plain = np.memmap(folder + "/pixels.u8", dtype=np.uint8, mode="r", shape=cache.pixels.shape)
    cache.read = lambda row: np.array(plain[row])
    dataset._cache = cache
start = status("VmRSS")
for batch in DataLoader(dataset, batch_size=64, num_workers=0):
    pass
print(json.dumps({"start_mb": start, "peak_mb": status("VmHWM"), "end_file_mb": status("RssFile")}))
"""


def build(folder: Path, rows: int, source: np.ndarray) -> None:
    folder.mkdir(parents=True)
    size = source.shape[-1]
    (folder / "meta.json").write_text(json.dumps({"format": 1, "size": size, "table_fingerprint": "synthetic"}))
    with open(folder / "pixels.u8", "wb") as handle:
        for i in range(rows):
            handle.write(source[i % len(source)].tobytes())
    (folder / "index.tsv").write_text("".join(f"img{i:07d}.png\t{i}\n" for i in range(rows)))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[2_000, 20_000])
    args = p.parse_args()
    from PIL import Image

    images = sorted((args.data / "nih-sample" / "images-256").glob("*.png"))[:256]
    source = np.stack([np.asarray(Image.open(p)) for p in images])
    print(f"# peak RSS while iterating a cache (256 px rows, batches of 64 at 224 px); {machine()}")
    print("| rows | cache size | reader | RSS at start (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp())
    try:
        for rows in args.rows:
            folder = tmp / f"c{rows}"
            build(folder, rows, source)
            for mode in ("cxrlearn", "np.memmap"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True,
                                     check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {rows:,} | {rows * 65536 / 2**20:,.0f} MB | {mode} | {result['start_mb']} | {result['peak_mb']} |")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
