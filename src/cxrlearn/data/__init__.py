"""The data layer: NIH's label table, image files, the patient-wise split, statistics."""

from cxrlearn.data.images import attach_images, find_images, load_grayscale
from cxrlearn.data.nih import label_matrix, read_image_list, read_label_table
from cxrlearn.data.split import (
    DEFAULT_RATIOS,
    DEFAULT_SEED,
    SPLITS,
    apply_split,
    make_split,
    read_split_file,
    split_report,
    write_split,
)
from cxrlearn.data.stats import table_stats

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
