"""Training data: a map-style dataset over the preprocessing cache, and a Lightning DataModule.

The dataset yields ``(uint8 image (1, H, H), float labels (one per finding, NaN where unknown), image name)``,
augmented for training; the DataModule's ``on_after_batch_transfer`` turns each
batch into ``(normalised float images (B, C, H, H), labels, names)`` on the
training device (see :mod:`cxrlearn.data.pipeline.augment` for why).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cxrlearn.data.cohort.split import SPLIT, SPLITS, apply_split
from cxrlearn.data.columns import IMAGE, finding_columns, label_values
from cxrlearn.data.pipeline.augment import Augmentation
from cxrlearn.data.pipeline.cache import ImageCache, table_fingerprint
from cxrlearn.data.pipeline.normalize import normalizer
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.defaults import SEED
from cxrlearn.errors import DataError

log = logging.getLogger(__name__)


class CachedXrayDataset(Dataset):
    """Images of one split, read from a memory-mapped cache made with ``preprocessing``'s steps 1-2, and brought
    to its input size by step 3 (:meth:`Preprocessing.from_cache`, the predictor's own) or, when training, by
    augmentation's resize.

    The memory map is opened lazily in each process, so the dataset pickles as a
    few arrays (for ``spawn`` workers) rather than as the whole cache.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        names: Sequence[str],
        labels: np.ndarray,
        preprocessing: Preprocessing,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ):
        cache = ImageCache(cache_dir)
        if cache.size != preprocessing.cache_size:
            raise DataError(f"{cache_dir}: the cache holds {cache.size} px images, but the preprocessing caches at "
                            f"{preprocessing.cache_size} px")
        self.preprocessing = preprocessing
        self.cache_dir = str(cache_dir)
        self.names = list(names)
        self.rows = cache.row_of(self.names)
        self.labels = np.ascontiguousarray(labels, dtype=np.float32)
        if len(self.labels) != len(self.names):
            raise ValueError("one label row per image is needed")
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        self._cache: ImageCache | None = None

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on the epoch: call before each epoch's iterator is made."""
        self.epoch = int(epoch)

    @property
    def cache(self) -> ImageCache:
        if self._cache is None:
            self._cache = ImageCache(self.cache_dir)
        return self._cache

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key: int | tuple[int, int]):
        # (index, epoch) from EpochShuffleSampler: the epoch travels with the index, so that
        # persistent workers (which keep their own copy of the dataset) augment by the right epoch.
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        pixels = self.cache.read(self.rows[i])
        if self.augmentation is not None:
            params = self.augmentation.parameters(self.seed, epoch, i)
            pixels = self.augmentation.apply(pixels, params, self.preprocessing.input_size)
        else:
            pixels = np.array(self.preprocessing.from_cache(pixels))  # owned and writable, as the predictor's
        return torch.from_numpy(pixels)[None], torch.from_numpy(self.labels[i]), self.names[i]


class EpochShuffleSampler(DistributedSampler):
    """Shuffles by (seed, epoch), shards across processes, and yields ``(index, epoch)``.

    Lightning calls ``set_epoch`` at each epoch's start; the epoch then travels
    with each index to the dataset (in whichever worker process), so augmentation
    depends on the epoch too, with persistent workers as well. Because the order
    is a function of (seed, epoch) alone, a resumed run sees the same order as an
    uninterrupted one.
    """

    _resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, done: int) -> None:
        """The next iterator of epoch ``epoch`` leaves out its first ``done`` indices (those trained on before
        the run was stopped)."""
        self._resume = (int(epoch), int(done))

    def __iter__(self):
        epoch = self.epoch
        order = iter(super().__iter__())
        if self._resume is not None and self._resume[0] == epoch:
            for _ in range(self._resume[1]):
                next(order, None)
        self._resume = None
        return ((i, epoch) for i in order)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)


class ResumableLoader(DataLoader):
    """The training loader, whose place in its epoch a checkpoint saved between batches keeps (Lightning's
    ``state_dict``/``load_state_dict`` protocol for loaders): a run continued from it goes on with the epoch's next
    batch, as the uninterrupted run did, instead of drawing the epoch's first batches again. ``position`` (epoch,
    batches done) is set while such a checkpoint is written (:class:`cxrlearn.training.stopping.StopBetweenBatches`);
    a checkpoint of a finished epoch keeps no position."""

    position: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        return {} if self.position is None else {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)


def _in_order(dataset: CachedXrayDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Every image of ``dataset`` once, in order: how images are predicted on for judging."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


def judging_loader(cache_dir: str | os.PathLike, rows: pd.DataFrame, findings: Sequence[str],
                   preprocessing: Preprocessing, batch_size: int, num_workers: int = 0
                   ) -> tuple[pd.DataFrame, DataLoader]:
    """The ``rows`` whose images the cache holds (in their order), and a loader of them without augmentation, as
    :meth:`ChestXrayDataModule.eval_loader` serves a split: what evaluation predicts on, for any rows."""
    cache = ImageCache(cache_dir)
    cached = rows[rows[IMAGE].isin(cache.rows.keys())].reset_index(drop=True)
    dataset = CachedXrayDataset(cache_dir, cached[IMAGE].tolist(), label_values(cached, list(findings)), preprocessing)
    return cached, _in_order(dataset, batch_size, num_workers)


class ChestXrayDataModule(L.LightningDataModule):
    """Split-aware loaders over a preprocessing cache.

    ``table``: the whole label table as read (its fingerprint must match the
    cache's); ``split``: a frame ``image, patient_id, split`` from
    :func:`~cxrlearn.data.cohort.split.make_split` or a split file; ``preprocessing``: the run's (the one its
    bundle records, :meth:`Preprocessing.for_run`), which the cache must have been made with.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        table: pd.DataFrame,
        split: pd.DataFrame,
        preprocessing: Preprocessing,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = SEED,
        augmentation: Augmentation | None = Augmentation(),
        fingerprint: str | None = None,
        findings: Sequence[str] | None = None,
    ):
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.table = table
        self.findings = list(findings or finding_columns(table))
        self.split = split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.augmentation = augmentation
        self.preprocessing = preprocessing
        self.transform = normalizer(preprocessing)
        self.fingerprint = fingerprint
        self.datasets: dict[str, CachedXrayDataset] = {}
        self.missing: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        cache = ImageCache(self.cache_dir)
        cache.check_compatible(self.fingerprint or table_fingerprint(self.table), self.preprocessing)
        rows = apply_split(self.table, self.split)
        for name in SPLITS:
            part = rows[rows[SPLIT] == name]
            cached = part[IMAGE].isin(cache.rows.keys()).to_numpy()
            self.missing[name] = int((~cached).sum())
            if self.missing[name]:
                log.warning(f"{self.missing[name]:,} {name} images of the split are not in the cache "
                            f"{self.cache_dir} (not present or not decodable) and are left out")
            part = part[cached]
            if part.empty:
                continue
            self.datasets[name] = CachedXrayDataset(
                self.cache_dir,
                part[IMAGE].tolist(),
                label_values(part, self.findings),  # NaN where a label is unknown
                self.preprocessing,
                augmentation=self.augmentation if name == "train" else None,
                seed=self.seed,
            )
        if "train" not in self.datasets:
            raise DataError(f"no training images of the split are in the cache {self.cache_dir}")

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def eval_loader(self, name: str) -> DataLoader:
        """All of one split's images in order, in this process alone (for summaries and tests)."""
        if name not in self.datasets:
            raise DataError(f"the split has no {name} images in the cache")
        return _in_order(self.datasets[name], self.batch_size, self.num_workers)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        """Samplers are made here, not by Lightning (use_distributed_sampler=False):
        training shards with :class:`EpochShuffleSampler`; evaluation shards without
        padding, so that AUC under DDP is over exactly the split's images."""
        if name not in self.datasets:
            raise DataError(f"the split has no {name} images in the cache")
        dataset = self.datasets[name]
        world, rank = self._world()
        if shuffle:
            sampler = EpochShuffleSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
            # The epoch the loader starts in, set before its first iterator is made: worker processes prefetch
            # as soon as it is, and Lightning makes it before it sets the epoch, which a resumed run then
            # shuffled and augmented as the epoch before (so a continued run differed from an uninterrupted one
            # with loader workers). The value is the one Lightning itself sets at each epoch's start.
            trainer = getattr(self, "trainer", None)
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0)
        elif world > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        else:
            sampler = None
        # A training batch of one image cannot pass the head's BatchNorm (it needs two values per channel): a
        # training set of k x batch + 1 images drops its last, single image each epoch (another one each epoch,
        # as the order is reshuffled). Evaluation keeps every image.
        lone_last = shuffle and len(sampler) % self.batch_size == 1
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            # Kept between epochs (the epoch travels with each index): re-making them each
            # epoch costs seconds, which dominate short epochs on a fast GPU.
            persistent_workers=self.num_workers > 0,
            drop_last=lone_last,
            # Its own generator: making an iterator then draws nothing from the global RNG,
            # so dropout draws after a resume are those of an uninterrupted run.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        images, labels, names = batch
        self.transform.to(images.device)
        return self.transform(images), labels, names
