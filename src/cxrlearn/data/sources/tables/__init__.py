"""NIH ChestX-ray14's own tables, shipped with cxrlearn (see README.md beside this file).

With these, ``--csv`` and the official lists are optional everywhere, and
``cxrlearn download nih`` yields a complete dataset: images and tables.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

LABEL_TABLE = "Data_Entry_2017_v2020.csv.gz"  # NIH's 2020 revision of Data_Entry_2017.csv
TRAIN_VAL_LIST = "train_val_list.txt.gz"
TEST_LIST = "test_list.txt.gz"
BOXES = "BBox_List_2017.csv.gz"
ARCHIVES = "nih_archives.tsv"
#: Every file a complete dataset folder holds beside the images.
DATASET_FILES = (LABEL_TABLE, TRAIN_VAL_LIST, TEST_LIST, BOXES)


def packaged(name: str) -> Path:
    """The path of one of the shipped files."""
    return Path(str(resources.files(__name__).joinpath(name)))


def label_table() -> Path:
    """NIH's label table (2020 revision): the default wherever a label table is asked for."""
    return packaged(LABEL_TABLE)


def test_list() -> Path:
    return packaged(TEST_LIST)


def train_val_list() -> Path:
    return packaged(TRAIN_VAL_LIST)


def boxes() -> Path:
    return packaged(BOXES)
