"""Published per-finding AUC-ROC on ChestX-ray14, for context in reports.

Each comes from another split (and often another label version), so none is a
like-for-like target: reports print each source's data and split beside it.
"""

from __future__ import annotations

from importlib import resources

from pydantic import BaseModel, ConfigDict, TypeAdapter

from cxrlearn.findings import FINDINGS


class Published(BaseModel):
    """One source's published result: the model, the data and split it was judged on, where it is published, the
    AUC per finding and their mean."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    data: str
    source: str
    auc: dict[str, float]
    mean: float

    def described(self) -> str:
        """The model, the data and the source, in a line."""
        return f"{self.model}, {self.data} ({self.source})"


#: Source name -> its result, as ``published.json`` beside this file holds them.
PUBLISHED: dict[str, Published] = TypeAdapter(dict[str, Published]).validate_json(
    resources.files(__package__).joinpath("published.json").read_text("utf-8"))


def published_auc(source: str) -> dict[str, float]:
    """``{finding: AUC}`` of one published source, in canonical finding order."""
    values = PUBLISHED[source].auc
    return {name: values[name] for name in FINDINGS}
