"""The data layer: NIH's label table, image files, the patient-wise split, statistics."""

from cxrlearn.data.cohort.split import (
    DEFAULT_RATIOS,
    DEFAULT_SEED,
    SPLITS,
    apply_split,
    make_split,
    read_split_file,
    split_report,
    write_split,
)
from cxrlearn.data.cohort.stats import table_stats
from cxrlearn.data.columns import label_matrix
from cxrlearn.data.decoding.images import attach_images, find_images, load_grayscale
from cxrlearn.data.sources.nih import read_image_list, read_label_table

__all__ = [
    "DEFAULT_RATIOS",
    "DEFAULT_SEED",
    "SPLITS",
    "apply_split",
    "attach_images",
    "find_images",
    "label_matrix",
    "load_grayscale",
    "make_split",
    "read_image_list",
    "read_label_table",
    "read_split_file",
    "split_report",
    "table_stats",
    "write_split",
]
