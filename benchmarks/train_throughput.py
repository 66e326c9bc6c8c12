"""Training images/s: cxrlearn's Lightning module against a minimal hand-written loop.

Both train the same model (backbone + the paper's head, BCE, Adam) on the same
cached real images with the same augmentation and batch normalisation, for the
same number of steps; the first steps (warm-up, allocation) are not timed. The
difference is the framework's overhead.

Usage: python benchmarks/train_throughput.py [--backbones tf_efficientnet_lite0 efficientnet_b0 efficientnet_b1]
       [--size 224] [--batch-size 16] [--steps 6]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import machine, parser
from torch.utils.data import DataLoader

from cxrlearn.data.cohort.split import make_split
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.cache import prepare_cache, table_fingerprint
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.pipeline.datamodule import ChestXrayDataModule
from cxrlearn.data.pipeline.normalize import BatchTransform
from cxrlearn.data.sources.nih import read_label_table
from cxrlearn.findings import FINDINGS
from cxrlearn.model.backbones import backbone_config
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.training.losses import MultiLabelLoss
from cxrlearn.training.module import ChestXrayModule

WARMUP = 2


class StepTimer(L.Callback):
    def __init__(self):
        self.start = None
        self.images = 0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= WARMUP:
            self.images += len(batch[1])
            self.seconds = time.perf_counter() - self.start


def plain_loop(model, loader, transform, steps, channels_last):
    loss_fn = torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, start = 0, None
    for step, (x, y, _) in enumerate(loader):
        if step == WARMUP:
            start = time.perf_counter()
        x = transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= WARMUP:
            images += len(y)
        if step + 1 == steps + WARMUP:
            break
    return images / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "efficientnet_b0", "efficientnet_b1"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    table = read_label_table(args.data / "nih" / "Data_Entry_2017_v2020.csv.gz")
    present = attach_images(table, args.data / "nih-sample" / "images-256").table
    tmp = Path(tempfile.mkdtemp())
    print(f"# training throughput, {args.size} px, batch {args.batch_size}, {args.steps} timed steps after "
          f"{WARMUP} warm-up, fp32, channels_last; {machine()}")
    print("| backbone | hand-written loop (img/s) | cxrlearn Lightning (img/s) | overhead |")
    print("|---|---|---|---|")
    try:
        fingerprint = table_fingerprint(table)
        prepare_cache(present, tmp / "c", fingerprint, Preprocessing.for_cache(args.size), workers=2, progress=False)
        split = make_split(present)
        for name in args.backbones:
            cfg = backbone_config(name)
            dm = ChestXrayDataModule(tmp / "c", table, split, Preprocessing.for_run(cfg.mean, cfg.std, args.size),
                                     batch_size=args.batch_size,
                                     num_workers=0, seed=1, fingerprint=fingerprint)
            dm.setup()
            plain_rates, lightning_rates = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                torch.manual_seed(0)
                model = ChestXrayClassifier(name)
                train_set = dm.datasets["train"]
                loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                    generator=torch.Generator().manual_seed(1))
                plain_rates.append(plain_loop(model, loader, BatchTransform(cfg.mean, cfg.std), args.steps, True))

                torch.manual_seed(0)
                module = ChestXrayModule(ChestXrayClassifier(name), MultiLabelLoss(), {
                    "name": "adam", "lr": 1e-4, "weight_decay": 0.0, "backbone_lr_scale": 1.0, "scheduler": "none",
                    "head_only_epochs": 0}, list(FINDINGS), channels_last=True)
                timer = StepTimer()
                trainer = L.Trainer(max_epochs=1, limit_train_batches=args.steps + WARMUP, limit_val_batches=0,
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, callbacks=[timer], accelerator="cpu",
                                    use_distributed_sampler=False, num_sanity_val_steps=0)
                trainer.fit(module, datamodule=dm)
                lightning_rates.append(timer.images / timer.seconds)
            plain, light = max(plain_rates), max(lightning_rates)
            print(f"| {name} | {plain:.2f} | {light:.2f} | {100 * (plain - light) / plain:+.1f}% |")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
