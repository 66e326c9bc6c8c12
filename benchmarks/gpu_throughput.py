"""GPU training speed: the GPU alone, cxrlearn's loader alone, and cxrlearn's Lightning training.

All three use real ChestX-ray14 sample images from cxrlearn's cache (uint8), so the
figures separate what the GPU can do from what the input pipeline and the framework
deliver:

1. the GPU alone: batches already on the GPU, normalised there, channels_last,
   forward + BCE + backward + Adam step, per precision, batch size and backbone;
2. the loader alone: cxrlearn's DataModule (augmentation in worker processes,
   persistent workers), steady state after the first epoch;
3. cxrlearn's training: ChestXrayModule under Lightning with that loader,
   steady state after the first epoch, and its share of (1).

Runs unchanged on any CUDA machine (no network, no pretrained weights needed:
speed does not depend on the weights' values).

Usage: python benchmarks/gpu_throughput.py [--images DIR] [--quick] [--compile]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import machine, parser

from cxrlearn.data.cohort.split import make_split
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.cache import ImageCache, prepare_cache, table_fingerprint
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.pipeline.datamodule import ChestXrayDataModule
from cxrlearn.data.pipeline.normalize import BatchTransform
from cxrlearn.data.sources import tables
from cxrlearn.data.sources.nih import read_label_table
from cxrlearn.defaults import usable_cores
from cxrlearn.findings import FINDINGS
from cxrlearn.model.backbones import backbone_config
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.training.losses import MultiLabelLoss
from cxrlearn.training.module import ChestXrayModule

DEVICE = "cuda"  # --device cpu: a slow smoke run of this script on a machine without a GPU
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
LIGHTNING_PRECISION = {"fp16": "16-mixed", "bf16": "bf16-mixed", "fp32": "32-true"}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gpu_alone(images: torch.Tensor, backbone: str, batch: int, precision: str, cudnn_benchmark: bool,
              compile_model: bool = False, steps: int = 30, warmup: int = 10) -> float:
    """Images/s of training steps on batches already on the GPU."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    cfg = backbone_config(backbone)
    torch.manual_seed(0)
    model = ChestXrayClassifier(backbone).to(DEVICE, memory_format=torch.channels_last).train()
    step_model = torch.compile(model) if compile_model else model
    transform = BatchTransform(cfg.mean, cfg.std).to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(DEVICE, enabled=precision == "fp16" and DEVICE == "cuda")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    labels = (torch.rand(batch, len(FINDINGS), device=DEVICE) < 0.1).float()
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def step():
        index = torch.randint(0, len(images), (batch,), device=DEVICE, generator=generator)
        x = transform(images[index]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(DEVICE, dtype=DTYPES[precision], enabled=DTYPES[precision] is not None):
            loss = loss_fn(step_model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - start)


def loader_alone(dm: ChestXrayDataModule, epochs: int) -> float:
    """Images/s delivered by the training loader (persistent workers), after its first epoch."""
    loader = dm.train_dataloader()
    count, start = 0, None
    for epoch in range(epochs + 1):
        loader.sampler.set_epoch(epoch)
        if epoch == 1:
            start = time.perf_counter()
        for images, labels, _ in loader:
            if epoch >= 1:
                count += len(labels)
    return count / (time.perf_counter() - start)


class EpochTimer(L.Callback):
    """Images/s over the training batches of every epoch after the first."""

    def __init__(self):
        self.images, self.seconds, self._start = 0, 0.0, None

    def on_train_epoch_start(self, trainer, module):
        sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch >= 1:
            self.images += len(batch[1])

    def on_train_epoch_end(self, trainer, module):
        sync()
        if trainer.current_epoch >= 1:
            self.seconds += time.perf_counter() - self._start


def lightning_training(dm: ChestXrayDataModule, backbone: str, precision: str, cudnn_benchmark: bool,
                       epochs: int) -> float:
    torch.manual_seed(0)
    module = ChestXrayModule(ChestXrayClassifier(backbone), MultiLabelLoss(), {
        "name": "adam", "lr": 1e-4, "weight_decay": 0.0, "backbone_lr_scale": 1.0, "scheduler": "none",
        "head_only_epochs": 0}, list(FINDINGS), channels_last=True)
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs + 1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision=LIGHTNING_PRECISION[precision],
                        benchmark=cudnn_benchmark, use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return timer.images / timer.seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=Path, help="image folder (default: DATA/nih-sample/images-256)")
    p.add_argument("--quick", action="store_true", help="fewer settings (a smoke run)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (about a minute of compiling)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU training")
    images_dir = args.images or args.data / "nih-sample" / "images-256"
    table = read_label_table(tables.label_table())
    fingerprint = table_fingerprint(table)
    present = attach_images(table, images_dir).table
    split = make_split(present)
    cores = usable_cores()
    tmp = Path(tempfile.mkdtemp())
    print(f"# GPU training throughput; {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'}; {machine()}; {len(present):,} real sample "
          f"images, {int((split['split'] == 'train').sum()):,} in the train split")
    try:
        caches = {}

        def cache(size: int) -> Path:
            if size not in caches:
                caches[size] = tmp / f"c{size}"
                prepare_cache(present, caches[size], fingerprint, Preprocessing.for_cache(size), workers=cores,
                              progress=False)
            return caches[size]

        def on_gpu(size: int) -> torch.Tensor:
            c = ImageCache(cache(size))
            return torch.from_numpy(c.pixels[: len(c)].copy())[:, None].to(DEVICE)

        print("\n## 1. The GPU alone (batches on the GPU, channels_last, Adam step)\n")
        print("| backbone | px | precision | batch | cudnn.benchmark | compile | img/s |")
        print("|---|---|---|---|---|---|---|")
        grid = [("efficientnet_b1", 240, "fp16", 32, False), ("efficientnet_b1", 240, "fp16", 64, False),
                ("efficientnet_b1", 240, "fp16", 64, True), ("efficientnet_b1", 240, "bf16", 128, False),
                ("efficientnet_b1", 240, "bf16", 128, True), ("efficientnet_b1", 240, "fp32", 128, True),
                ("efficientnet_b0", 224, "bf16", 128, True), ("efficientnet_b3", 300, "bf16", 64, True)]
        if args.quick:
            grid = grid[:1] + grid[4:5]
        for backbone, size, precision, batch, bench in grid:
            rate = gpu_alone(on_gpu(size), backbone, batch, precision, bench)
            print(f"| {backbone} | {size} | {precision} | {batch} | {bench} | no | {rate:,.0f} |", flush=True)
        if args.compile:
            rate = gpu_alone(on_gpu(240), "efficientnet_b1", 128, "bf16", True, compile_model=True)
            print(f"| efficientnet_b1 | 240 | bf16 | 128 | True | default | {rate:,.0f} |", flush=True)

        cfg = backbone_config("efficientnet_b1")

        def datamodule(batch: int, workers: int) -> ChestXrayDataModule:
            dm = ChestXrayDataModule(cache(240), table, split, Preprocessing.for_run(cfg.mean, cfg.std, 240), batch_size=batch,
                                     num_workers=workers, seed=1, fingerprint=fingerprint)
            dm.setup()
            return dm

        print("\n## 2. cxrlearn's loader alone (batch 128, persistent workers, steady state)\n")
        print("| workers | img/s |")
        print("|---|---|")
        for workers in ([8] if args.quick else [w for w in (4, 8, 16) if w <= cores]):
            print(f"| {workers} | {loader_alone(datamodule(128, workers), epochs=3 if args.quick else 10):,.0f} |",
                  flush=True)

        print("\n## 3. cxrlearn's Lightning training (EfficientNet-B1, 240 px, steady state after epoch 1)\n")
        print("| precision | batch | workers | cudnn.benchmark | img/s | share of the GPU alone |")
        print("|---|---|---|---|---|---|")
        settings = [("fp16", 32, 8, False), ("fp16", 64, 8, True), ("bf16", 128, min(16, cores), True)]
        if args.quick:
            settings = settings[-1:]
        for precision, batch, workers, bench in settings:
            rate = lightning_training(datamodule(batch, workers), "efficientnet_b1", precision, bench,
                                      epochs=2 if args.quick else 5)
            alone = gpu_alone(on_gpu(240), "efficientnet_b1", batch, precision, bench)
            print(f"| {precision} | {batch} | {workers} | {bench} | {rate:,.0f} | {100 * rate / alone:.0f}% |",
                  flush=True)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
