"""Shared fixtures. The real NIH data lives in ``../shared/data`` beside the checkout
(or wherever ``CXRLEARN_DATA`` points). Tests that need it fail loudly when it is
missing: a silent skip would let CI pass without testing anything real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXRLEARN_DATA", REPO.parent / "shared" / "data")).resolve()


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"shared test data missing: {path} (set CXRLEARN_DATA to the folder holding nih/ and nih-sample/)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def table_path(data_dir) -> Path:
    return _require(data_dir / "nih" / "Data_Entry_2017_v2020.csv.gz")


@pytest.fixture(scope="session")
def nih_table(table_path):
    from cxrlearn.data.sources.nih import read_label_table

    return read_label_table(table_path)


@pytest.fixture(scope="session")
def sample_images(data_dir) -> Path:
    return _require(data_dir / "nih-sample" / "images-256")


@pytest.fixture(scope="session")
def test_list_path(data_dir) -> Path:
    return _require(data_dir / "nih" / "test_list.txt")


@pytest.fixture(scope="session")
def train_val_list_path(data_dir) -> Path:
    return _require(data_dir / "nih" / "train_val_list.txt")


EXPERT = "google2019_nih-chest-xray-labels.csv.gz"


@pytest.fixture(scope="session")
def trained_run(nih_table, table_path, sample_images, data_dir, tmp_path_factory):
    """A small model (64 px, 2 epochs) trained on real sample images, with a split whose test part
    holds every expert-labelled sample image, and whose train part no patient of NIH's official test list."""
    import pandas as pd

    from cxrlearn.data.decoding.images import attach_images
    from cxrlearn.data.sources.expert_labels import read_expert_labels
    from cxrlearn.data.sources.nih import read_image_list
    from cxrlearn.training.config import load_config
    from cxrlearn.workflows.train import train

    root = tmp_path_factory.mktemp("evaluation")
    present = attach_images(nih_table, sample_images).table
    expert_images = set(read_expert_labels(data_dir / "nih" / EXPERT)["image"])
    expert_patients = set(present.loc[present["image"].isin(expert_images), "patient_id"])
    official = set(read_image_list(data_dir / "nih" / "test_list.txt"))
    official_patients = set(present.loc[present["image"].isin(official), "patient_id"])
    rows, counts = [], {"train": 0, "val": 0}
    for patient, group in present.groupby("patient_id", sort=True):
        if patient in expert_patients:
            name = "test"
        elif patient in official_patients:
            name = "val" if counts["val"] < 250 else "test"
        else:
            name = "train" if counts["train"] < 300 else "val" if counts["val"] < 250 else "test"
        counts[name] = counts.get(name, 0) + len(group)
        rows += [(image, patient, name) for image in group["image"]]
    split = root / "split.csv"
    pd.DataFrame(rows, columns=["image", "patient_id", "split"]).to_csv(split, index=False)
    config = load_config(overrides={
        "data": {"images": str(sample_images), "csv": str(table_path), "split": str(split), "image_size": 64,
                 "batch_size": 32, "num_workers": 0, "cache": str(root / "cache")},
        "model": {"backbone": "tf_efficientnet_lite0", "hub": False, "head": {"units": 64, "dropout": 0.1}},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 2, "early_stopping_patience": 0, "seed": 3},
    })
    run = train(config, root / "run", progress=False)
    return run, split


@pytest.fixture(scope="session")
def evaluated(trained_run, table_path, sample_images, data_dir, tmp_path_factory):
    """The trained run evaluated (with flip averaging and temperatures): its bundle now has thresholds."""
    from cxrlearn.workflows.evaluate import EvaluationOptions, evaluate

    run, _ = trained_run
    out = tmp_path_factory.mktemp("eval")
    options = EvaluationOptions(subset="test", expert_labels=str(data_dir / "nih" / EXPERT), resamples=200, tta=True,
                                calibrate=True, progress=False)
    metrics = evaluate(run, table_path, sample_images, out, options)
    return run, out, metrics
