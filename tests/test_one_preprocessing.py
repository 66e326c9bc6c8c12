"""One Preprocessing for training and inference: a real image reaches the network as the same tensor through the
training path (cache → dataset without augmentation → the DataModule's batch transform) and through the
Predictor, and both follow a change to any preprocessing field."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlearn.data.columns import IMAGE, PATH, finding_columns, label_values
from cxrlearn.data.decoding.images import attach_images, load_grayscale
from cxrlearn.data.pipeline.cache import ImageCache, prepare_cache, table_fingerprint
from cxrlearn.data.pipeline.datamodule import CachedXrayDataset, ChestXrayDataModule
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.errors import DataError
from cxrlearn.inference.predictor import Predictor
from cxrlearn.model.bundle import read_meta


@pytest.fixture(scope="module")
def full_size(nih_table, data_dir):
    """Real 1,024 px sample images (resizing them is real work for both paths), with their labels."""
    present = attach_images(nih_table, data_dir / "nih-sample" / "images-1024").table
    return present.sort_values(IMAGE).head(3).reset_index(drop=True)


def training_path(table, rows, preprocessing: Preprocessing, cache: Path) -> torch.Tensor:
    """The tensors training and evaluation feed the network: the cache, the dataset without augmentation, and the
    DataModule's transform (what ``on_after_batch_transfer`` applies)."""
    prepare_cache(rows, cache, table_fingerprint(table), preprocessing, workers=1, progress=False)
    dataset = CachedXrayDataset(cache, rows[IMAGE].tolist(), label_values(rows, finding_columns(table)), preprocessing)
    split = rows[[IMAGE]].assign(patient_id=rows["patient_id"], split="train")
    datamodule = ChestXrayDataModule(cache, table, split, preprocessing, num_workers=0)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return datamodule.transform(images)


def predictor_path(run: Path, rows) -> torch.Tensor:
    predictor = Predictor(run, device="cpu")
    pixels = np.stack([predictor.model_pixels(load_grayscale(path)) for path in rows[PATH]])
    return predictor.transform(torch.from_numpy(pixels)[:, None])


def test_training_and_the_predictor_feed_the_network_the_same_tensor(trained_run, nih_table, full_size, tmp_path):
    run, _ = trained_run
    preprocessing = read_meta(run).preprocessing
    trained = training_path(nih_table, full_size, preprocessing, tmp_path / "cache")
    served = predictor_path(run, full_size)
    assert trained.shape == served.shape == (3, preprocessing.channels, preprocessing.input_size,
                                             preprocessing.input_size)
    assert torch.equal(trained, served)


@pytest.mark.parametrize("change", [
    {"cache_size": 96, "input_size": 80},  # step 3 resizes (the usual case is a no-op)
    {"cache_resampling": "bilinear"},
    {"input_size": 48, "input_resampling": "lanczos"},
    {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
])
def test_both_paths_follow_a_change_to_the_preprocessing(trained_run, nih_table, full_size, tmp_path, change):
    run, _ = trained_run
    before = read_meta(run).preprocessing
    after = dataclasses.replace(before, **change)
    changed_run = tmp_path / "run"
    shutil.copytree(run, changed_run)
    meta = json.loads((changed_run / "model.json").read_text())
    meta["preprocessing"].update({k: list(v) if isinstance(v, tuple) else v for k, v in change.items()})
    # as a bundle trained with these sizes records them (a bundle whose two records disagree is refused)
    meta["config"]["data"].update(image_size=after.input_size, cache_size=after.cache_size)
    (changed_run / "model.json").write_text(json.dumps(meta))
    assert read_meta(changed_run).preprocessing == after

    trained = training_path(nih_table, full_size, after, tmp_path / "cache")
    served = predictor_path(changed_run, full_size)
    assert trained.shape == served.shape == (3, after.channels, after.input_size, after.input_size)
    assert torch.equal(trained, served)
    unchanged = predictor_path(run, full_size)
    assert unchanged.shape != served.shape or not torch.equal(unchanged, served)


def test_a_cache_made_with_other_steps_is_refused(trained_run, nih_table, full_size, tmp_path):
    run, _ = trained_run
    preprocessing = read_meta(run).preprocessing
    prepare_cache(full_size, tmp_path / "c", table_fingerprint(nih_table), preprocessing, workers=1, progress=False)
    other = dataclasses.replace(preprocessing, cache_resampling="bilinear")
    with pytest.raises(DataError, match="resized with lanczos, not bilinear"):
        prepare_cache(full_size, tmp_path / "c", table_fingerprint(nih_table), other, workers=1, progress=False)
    with pytest.raises(DataError, match="resized with lanczos, not bilinear"):
        ImageCache(tmp_path / "c").check_compatible(table_fingerprint(nih_table), other)
    with pytest.raises(DataError, match="holds 64 px images, but the preprocessing caches at 96 px"):
        CachedXrayDataset(tmp_path / "c", full_size[IMAGE].tolist(), np.zeros((3, 14)),
                          dataclasses.replace(preprocessing, cache_size=96))
