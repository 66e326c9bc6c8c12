"""What ``cxrlearn evaluate`` measured, typed all the way in: :class:`EvaluationMetrics` (``metrics.json``).

Its per-finding results are :class:`~cxrlearn.evaluation.metrics.FindingMetrics`' fields; each further part is a
record (:class:`cxrlearn.records.Record`) of the module that computes it:

============================  ==============================================================================
``operating_points``          :class:`~cxrlearn.evaluation.operating_points.OperatingPoints`
``calibration``               :class:`~cxrlearn.evaluation.calibration.Calibration`
``subgroups``                 :class:`~cxrlearn.evaluation.subgroups.Subgroup`, one per (attribute, group)
``expert``                    :class:`~cxrlearn.evaluation.expert.ExpertComparison`
``tta``                       :class:`TtaComparison` (the paired bootstrap of flip averaging)
``input_check``               :class:`InputCheckSummary` (counts by :class:`~cxrlearn.model.input_check.Reason`)
``provenance``                :class:`Provenance`
============================  ==============================================================================

``metrics.json`` keeps its format: :meth:`EvaluationMetrics.to_dict` writes the same keys as before, and
:meth:`EvaluationMetrics.read` reads files written by earlier versions. Its JSON Schema is published in
``docs/metrics.schema.json`` (:func:`json_schema`; a test keeps the file current).
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError, create_model

from cxrlearn.errors import DataError
from cxrlearn.evaluation.calibration import Calibration
from cxrlearn.evaluation.expert import ExpertComparison
from cxrlearn.evaluation.metrics import FindingMetrics
from cxrlearn.evaluation.operating_points import OperatingPoints
from cxrlearn.evaluation.subgroups import Subgroup
from cxrlearn.model.meta import WeightsRecord
from cxrlearn.records import Record


class TtaComparison(Record):
    """Mean AUC with and without averaging each image with its mirror; the difference with its paired
    patient-bootstrap interval, and what that says."""

    mean_auc_with_tta: float | None
    mean_auc_without_tta: float | None
    difference: float | None
    difference_ci95: list[float] | None
    verdict: str
    auc_without_tta: dict[str, float | None]


class InputCheckSummary(Record):
    """How many judged images the input check flagged, how many per reason (keyed by
    :class:`~cxrlearn.model.input_check.Reason`'s values), and the mean AUC with and without them."""

    available: bool = False
    flagged: int | None = None
    judged: int | None = None
    reasons: dict[str, int] | None = None
    mean_auc_all: float | None = None
    mean_auc_unflagged: float | None = None
    note: str | None = None


class FileRecord(Record):
    file: str
    sha256: str | None = None


class SplitRecord(FileRecord):
    """The split the judged images were chosen by (and NIH's official test list, when it was used)."""

    subset: str | None = None
    all_present: bool | None = None
    official_test: FileRecord | None = None


class BundleRecord(Record):
    folder: str
    backbone: str
    preprocessing: dict[str, Any]
    weights_sha256: str
    trained_split_sha256: str | None = None
    weights_source: WeightsRecord | None = None
    training_versions: dict[str, Any] | None = None


class Provenance(Record):
    """Where the numbers come from: when, by which command, which bundle, split, table and images, and the
    versions of the libraries that computed them."""

    date: str | None = None
    command: str | None = None
    bundle: BundleRecord | None = None
    label_table: FileRecord | None = None
    images: str | None = None
    split: SplitRecord | None = None
    images_left_out_undecodable: int | None = None
    tta: bool | None = None
    runtime: str | None = None  # what ran the network: torch, onnx or onnx-int8 (None: torch, before it was said)
    runtime_sha256: str | None = None  # of the file it ran: the bundle's weights, or the ONNX file
    temperature_scaling: str | bool | None = None
    versions: dict[str, str] | None = None


@dataclass
class EvaluationMetrics(FindingMetrics):
    """Everything ``cxrlearn evaluate`` measured (``metrics.json``; the report is rendered from it)."""

    subset: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # finding -> why it was not judged
    input_check: InputCheckSummary = field(default_factory=InputCheckSummary)
    operating_points: OperatingPoints = field(default_factory=OperatingPoints)
    calibration: Calibration | None = None
    subgroups: list[Subgroup] = field(default_factory=list)
    expert: ExpertComparison | None = None
    tta: TtaComparison | None = None
    provenance: Provenance = field(default_factory=Provenance)

    @classmethod
    def of(cls, measured: FindingMetrics, **parts) -> EvaluationMetrics:
        return cls(**{f.name: getattr(measured, f.name) for f in fields(FindingMetrics)}, **parts)

    def to_dict(self) -> dict:
        """JSON-ready, as ``metrics.json`` has always been laid out (a part not measured, None, left out)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(FindingMetrics)}
        out.update(subset=self.subset, skipped=self.skipped)  # the plain fields, then the records
        for name in PARTS:
            value = getattr(self, name)
            if isinstance(value, list):
                out[name] = [item.to_dict() for item in value]
            elif value is not None:
                out[name] = value.to_dict()
        return out

    @classmethod
    def read(cls, path: str | os.PathLike) -> EvaluationMetrics:
        """A ``metrics.json`` written by :meth:`to_dict` (or an earlier cxrlearn); :class:`DataError` naming the
        file if it is not one."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
            parts = {name: _TYPES[name].validate_python(values.pop(name)) for name in PARTS if name in values}
            return cls(**values, **parts)
        except (OSError, ValueError, TypeError, ValidationError) as err:
            raise DataError(f"{path}: not a metrics.json of cxrlearn evaluate ({err})") from None


#: Every field's type, from the declaration above.
_HINTS = typing.get_type_hints(EvaluationMetrics)
#: The fields that are not records: FindingMetrics' per-finding results, the judged subset, the skipped findings.
_PLAIN = [f.name for f in fields(FindingMetrics)] + ["subset", "skipped"]
#: The parts, each read from ``metrics.json`` by its record type.
PARTS: dict[str, Any] = {f.name: _HINTS[f.name] for f in fields(EvaluationMetrics) if f.name not in _PLAIN}
_TYPES = {name: TypeAdapter(kind) for name, kind in PARTS.items()}


def json_schema() -> dict:
    """The JSON Schema of ``metrics.json`` (``docs/metrics.schema.json``), from the declarations: FindingMetrics'
    fields required, the others with their defaults (a part not measured is null)."""
    required = {f.name for f in fields(FindingMetrics)}
    declared = {f.name: (_HINTS[f.name], ... if f.name in required else None if f.name in PARTS
                         else f.default_factory() if f.default_factory is not MISSING else f.default)
                for f in fields(EvaluationMetrics)}
    model: type[BaseModel] = create_model("EvaluationMetrics", **declared)
    schema = model.model_json_schema()
    schema["title"] = "cxrlearn evaluation (metrics.json)"
    return schema


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(json_schema(), indent=1))
