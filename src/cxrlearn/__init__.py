"""cxrlearn: multi-label chest X-ray classification on NIH ChestX-ray14.

The public API, for use from Python (the ``cxrlearn`` command is a thin layer over it)::

    from cxrlearn import Predictor, evaluate, load_bundle, make_split, read_label_table, train

Names beyond the core (findings, errors) are imported on first use, so that ``import cxrlearn`` stays
light and needs neither torch nor the optional DICOM and serving dependencies.
"""

from importlib import import_module

from cxrlearn.errors import ConfigError, CxrlearnError, DataError, ImageTooLarge
from cxrlearn.findings import FINDINGS, NO_FINDING

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {
    "read_label_table": "cxrlearn.data.sources.nih",
    "read_labels": "cxrlearn.data.sources.datasets",
    "merge_tables": "cxrlearn.data.sources.datasets",
    "write_table": "cxrlearn.data.sources.generic",
    "make_split": "cxrlearn.data.cohort.split",
    "read_split_file": "cxrlearn.data.cohort.split",
    "load_grayscale": "cxrlearn.data.decoding.images",
    "load_bundle": "cxrlearn.model.bundle",
    "Predictor": "cxrlearn.inference.predictor",
    "load_config": "cxrlearn.training.config",
    "train": "cxrlearn.workflows.train",
    "evaluate": "cxrlearn.workflows.evaluate",
    "EvaluationOptions": "cxrlearn.workflows.evaluate",
    "compare": "cxrlearn.workflows.compare",
    "make_ensemble": "cxrlearn.workflows.ensemble",
    "linear_probe": "cxrlearn.workflows.probe",
    "reproduce": "cxrlearn.workflows.reproduce",
    "ReproduceOptions": "cxrlearn.workflows.reproduce",
}

__all__ = ["FINDINGS", "NO_FINDING", "CxrlearnError", "DataError", "ConfigError", "ImageTooLarge", "__version__",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxrlearn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
