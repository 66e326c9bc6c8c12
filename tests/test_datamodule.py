"""Loaders over the cache: shapes, label alignment, seeded augmentation, eval without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from cxrlearn.data.cohort.split import make_split
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.augment import Augmentation
from cxrlearn.data.pipeline.cache import ImageCache, prepare_cache, table_fingerprint
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.data.pipeline.datamodule import ChestXrayDataModule
from cxrlearn.data.pipeline.normalize import BatchTransform
from cxrlearn.findings import FINDINGS
from cxrlearn.model.backbones import backbone_config

B0 = backbone_config("efficientnet_b0")
PRE = Preprocessing.for_run(B0.mean, B0.std, input_size=256)  # the tests' cache is of 256 px images
AT_224 = Preprocessing.for_run(B0.mean, B0.std, input_size=224, cache_size=256)


@pytest.fixture(scope="module")
def sample(nih_table, sample_images, tmp_path_factory):
    fingerprint = table_fingerprint(nih_table)
    present = attach_images(nih_table, sample_images).table
    out = tmp_path_factory.mktemp("cache") / "c256"
    prepare_cache(present, out, fingerprint, PRE, workers=2, progress=False)
    return out, fingerprint, make_split(present)


def module(nih_table, sample, **options):
    cache, fingerprint, split = sample
    settings = dict(batch_size=16, num_workers=0, seed=2137, fingerprint=fingerprint)
    settings.update(options)
    preprocessing = settings.pop("preprocessing", PRE)
    dm = ChestXrayDataModule(cache, nih_table, split, preprocessing, **settings)
    dm.setup("fit")
    return dm


def first_batch(dm, loader="train"):
    batch = next(iter(getattr(dm, f"{loader}_dataloader")()))
    return dm.on_after_batch_transfer(batch)


def test_normalisation_comes_from_timm():
    assert B0.mean == (0.485, 0.456, 0.406) and B0.std == (0.229, 0.224, 0.225)
    lite = backbone_config("tf_efficientnet_lite0")
    assert lite.mean == (0.5, 0.5, 0.5) and lite.native_size == 224
    assert backbone_config("efficientnet_b1").native_size == 240


def test_eval_batches_are_the_cached_pixels_with_the_table_labels(nih_table, sample):
    dm = module(nih_table, sample)
    cache = ImageCache(sample[0])
    labels = nih_table.set_index("image")[list(FINDINGS)]
    seen = 0
    for batch in dm.val_dataloader():
        images, y, names = dm.on_after_batch_transfer(batch)
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 256, 256)
        assert y.dtype == torch.float32 and y.shape == (len(names), 14)
        np.testing.assert_array_equal(y.numpy(), labels.loc[list(names)].to_numpy(dtype=np.float32))
        # No augmentation in eval: undoing the normalisation gives back the cache's pixels.
        mean = torch.tensor(B0.mean).reshape(1, 3, 1, 1)
        std = torch.tensor(B0.std).reshape(1, 3, 1, 1)
        restored = (images * std + mean) * 255.0
        expected = torch.stack([torch.from_numpy(np.array(cache[n])) for n in names]).float()[:, None]
        assert (restored - expected).abs().max() < 1e-3
        seen += len(names)
    assert seen == (sample[2]["split"] == "val").sum() == len(dm.datasets["val"])


def test_augmentation_is_seeded_and_worker_independent(nih_table, sample):
    a = first_batch(module(nih_table, sample, num_workers=0))
    b = first_batch(module(nih_table, sample, num_workers=2))
    assert a[2] == b[2]
    assert torch.equal(a[0], b[0])
    other = first_batch(module(nih_table, sample, seed=1))
    assert other[2] != a[2]
    dm = module(nih_table, sample)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    next_epoch = dm.on_after_batch_transfer(next(iter(loader)))
    assert not torch.equal(next_epoch[0], a[0])


def test_persistent_workers_augment_each_epoch_as_a_fresh_process_would(nih_table, sample):
    """Workers kept between epochs hold their own copy of the dataset: the epoch must reach them
    with each index, or every epoch after the first would repeat the first's augmentation."""
    def two_epochs(workers):
        dm = module(nih_table, sample, num_workers=workers)
        loader = dm.train_dataloader()
        assert loader.persistent_workers == (workers > 0)
        batches = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            batches.append(dm.on_after_batch_transfer(next(iter(loader))))
        return batches

    plain, persistent = two_epochs(0), two_epochs(2)
    for a, b in zip(plain, persistent):
        assert a[2] == b[2] and torch.equal(a[0], b[0])
    assert not torch.equal(plain[0][0], plain[1][0])


def test_augmentation_changes_training_images(nih_table, sample):
    plain = module(nih_table, sample, augmentation=None)
    augmented = module(nih_table, sample)
    x_plain, _, names_plain = first_batch(plain)
    x_aug, _, names_aug = first_batch(augmented)
    assert names_plain == names_aug
    differs = (x_plain - x_aug).abs().flatten(1).mean(1) > 1e-3
    assert differs.float().mean() > 0.9


def test_augmentation_parameters_stay_in_the_papers_ranges():
    aug = Augmentation()
    params = np.array([aug.parameters(2137, 0, i) for i in range(4000)])
    assert 0.27 < params[:, 0].mean() < 0.33  # flip p=0.3
    assert np.abs(params[:, 1]).max() <= 5.0 and np.abs(params[:, 1]).max() > 4.9
    assert params[:, 2].min() >= 0.8 and params[:, 2].max() <= 1.2
    assert aug.parameters(7, 3, 11) == aug.parameters(7, 3, 11)


def test_warp_geometry_on_a_real_image(sample):
    cache = ImageCache(sample[0])
    pixels = np.array(cache.pixels[0])
    aug = Augmentation()
    np.testing.assert_array_equal(aug.apply(pixels, (False, 0.0, 1.0), 256), pixels)
    np.testing.assert_array_equal(aug.apply(pixels, (True, 0.0, 1.0), 256), pixels[:, ::-1])
    # A 90° turn (beyond the paper's range, but exact) shows the rotation's centre and
    # sense: positive angles turn the image counter-clockwise, as in torchvision.
    # (cos 90° is 6e-17 in floating point, so bilinear sampling may round a level off.)
    turned = aug.apply(pixels, (False, 90.0, 1.0), 256).astype(int) - np.rot90(pixels, k=1)
    assert np.abs(turned).max() <= 1 and np.abs(turned).mean() < 0.2
    brighter = aug.apply(pixels, (False, 0.0, 1.2), 256).astype(int)
    np.testing.assert_array_equal(brighter, np.minimum(255, np.round(pixels * 1.2)).astype(int))
    small = aug.apply(pixels, (False, 5.0, 1.0), 224)
    assert small.shape == (224, 224) and small.dtype == np.uint8


def test_one_and_three_channel_normalisation(sample):
    cache = ImageCache(sample[0])
    image = torch.from_numpy(np.array(cache.pixels[:2]))[:, None]
    three = BatchTransform(B0.mean, B0.std, channels=3)(image)
    one = BatchTransform(B0.mean, B0.std, channels=1)(image)
    assert three.shape == (2, 3, 256, 256) and one.shape == (2, 1, 256, 256)
    for c in range(3):
        expected = (image[:, 0].float() / 255 - B0.mean[c]) / B0.std[c]
        assert torch.allclose(three[:, c], expected, atol=1e-5)
    expected = (image[:, 0].float() / 255 - np.mean(B0.mean)) / np.mean(B0.std)
    assert torch.allclose(one[:, 0], expected, atol=1e-5)


def test_image_size_differs_from_the_cache(nih_table, sample):
    x, _, _ = first_batch(module(nih_table, sample, preprocessing=AT_224))
    assert x.shape[1:] == (3, 224, 224)
    x, _, _ = first_batch(module(nih_table, sample, preprocessing=AT_224), loader="val")
    assert x.shape[1:] == (3, 224, 224)


def test_distributed_sampler_shards_the_training_set(nih_table, sample):
    dm = module(nih_table, sample)
    dataset = dm.datasets["train"]
    shards = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=2137)) for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1]) or len(dataset) % 2  # padding repeats one sample when odd
    assert set(shards[0]) | set(shards[1]) == set(range(len(dataset)))


def test_split_images_missing_from_the_cache_are_reported(nih_table, sample, caplog):
    cache, fingerprint, split = sample
    extra = split.copy()
    extra.loc[len(extra)] = ["00030805_000.png", 30805, "test"]
    dm = ChestXrayDataModule(cache, nih_table, extra, PRE, num_workers=0, fingerprint=fingerprint)
    dm.setup()
    assert dm.missing["test"] == 1
    assert "1 test images of the split are not in the cache" in caplog.text
