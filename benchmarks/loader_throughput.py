"""Training-loader throughput: the preprocessing cache against decoding each PNG per sample.

Both deliver the same thing: augmented (flip p=0.3, ±5°, brightness ±0.2),
normalised 3×224×224 float batches of the same 48 full-size NIH images, cycled.
The cached path's workers read uint8 rows and augment them in uint8 (one Pillow
affine warp); its batch normalisation (which runs on the GPU in training) is
timed here on the CPU, in the main process.

Usage: python benchmarks/loader_throughput.py [--data DIR] [--workers 0 2]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from _common import machine, parser
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cxrlearn.data.columns import label_matrix
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.augment import Augmentation
from cxrlearn.data.pipeline.cache import prepare_cache, table_fingerprint
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.pipeline.datamodule import CachedXrayDataset
from cxrlearn.data.pipeline.normalize import BatchTransform
from cxrlearn.data.sources.nih import read_label_table
from cxrlearn.defaults import SEED
from cxrlearn.model.backbones import backbone_config

CFG = backbone_config("efficientnet_b0")


class DecodeEachTime(Dataset):
    """The usual loader: open the full-size PNG, resize and augment per sample."""

    def __init__(self, paths, labels, length):
        self.paths, self.labels, self.length = paths, labels, length
        self.transform = T.Compose([
            T.PILToTensor(),
            T.Resize(224, antialias=True),
            T.RandomHorizontalFlip(0.3),
            T.RandomRotation(5),
            T.ToDtype(torch.float32, scale=True),
            T.ColorJitter(brightness=0.2),
            T.Normalize(CFG.mean, CFG.std),
        ])

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        j = i % len(self.paths)
        image = Image.open(self.paths[j]).convert("RGB")
        return self.transform(image), torch.from_numpy(self.labels[j])


def time_loader(loader, transform=None, min_batches=3):
    batches, images = 0, 0
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for batch in iterator:
        if transform is not None:
            transform(batch[0])
        images += len(batch[1])
        batches += 1
    seconds = time.perf_counter() - start
    assert batches >= min_batches
    return images / seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    table = read_label_table(args.data / "nih" / "Data_Entry_2017_v2020.csv.gz")
    present = attach_images(table, args.data / "nih-sample" / "images-1024").table
    labels = label_matrix(present).astype("float32")
    print(f"# loader throughput, batch {args.batch_size}, 224 px; {machine()}")
    tmp = Path(tempfile.mkdtemp())
    try:
        prepare_cache(present, tmp / "c", table_fingerprint(table), Preprocessing.for_cache(256), workers=2,
                      progress=False)
        cycles = 128
        names = list(present["image"]) * cycles
        cached = CachedXrayDataset(tmp / "c", names, labels.repeat(cycles, axis=0),
                                   Preprocessing.for_run(CFG.mean, CFG.std, 224, cache_size=256), Augmentation(), seed=SEED)
        transform = BatchTransform(CFG.mean, CFG.std, channels=3)
        decode = DecodeEachTime(list(present["path"]), labels, length=len(present) * 4)
        torch.set_num_threads(1)
        rows = []
        for workers in args.workers:
            loader = DataLoader(cached, batch_size=args.batch_size, shuffle=True, num_workers=workers)
            gather = time_loader(loader)
            full = time_loader(loader, transform)
            slow = time_loader(DataLoader(decode, batch_size=16, shuffle=True, num_workers=workers), min_batches=2)
            rows.append((workers, gather, full, slow))
        print("| workers | cache: augmented uint8 batches (img/s) | cache + normalise on CPU (img/s) "
              "| decode PNG per sample (img/s) | speed-up, like for like |")
        print("|---|---|---|---|---|")
        for workers, gather, full, slow in rows:
            print(f"| {workers} | {gather:,.0f} | {full:,.0f} | {slow:,.1f} | {full / slow:,.0f}× |")
        w, gather, full, slow = rows[-1]
        per_worker = gather / max(w, 1)
        print(f"per worker, cache: {per_worker:,.0f} augmented img/s -> ~{16 * per_worker:,.0f} img/s with 16 workers "
              f"(normalisation then runs on the GPU); decode path: {slow / max(w, 1):,.1f} img/s per worker -> "
              f"~{16 * slow / max(w, 1):,.0f} img/s with 16")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
