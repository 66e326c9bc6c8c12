"""Published per-finding AUC-ROC on ChestX-ray14, for context in reports.

Each comes from another split (and often another label version), so none is a
like-for-like target: reports print each source's data and split beside it.
"""

from __future__ import annotations

import json
from importlib import resources

from cxrlearn.findings import FINDINGS

#: Source -> {model, data, source, auc: {finding: value}, mean}, as ``published.json`` beside this file holds them.
PUBLISHED: dict[str, dict] = json.loads(resources.files(__package__).joinpath("published.json").read_text("utf-8"))


def published_auc(source: str) -> dict[str, float]:
    """``{finding: AUC}`` of one published source, in canonical finding order."""
    values = PUBLISHED[source]["auc"]
    return {name: values[name] for name in FINDINGS}
