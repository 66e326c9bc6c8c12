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
    from cxrlearn.data.nih import read_label_table

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
