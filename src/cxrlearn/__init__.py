"""cxrlearn: multi-label chest X-ray classification on NIH ChestX-ray14."""

from cxrlearn.errors import CxrlearnError, DataError
from cxrlearn.findings import FINDINGS, NO_FINDING

__version__ = "0.1.0"

__all__ = ["FINDINGS", "NO_FINDING", "CxrlearnError", "DataError", "__version__"]
