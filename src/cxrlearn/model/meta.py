"""What a bundle says about itself (``model.json``), as one typed value: :class:`BundleMeta`.

Read with :meth:`BundleMeta.from_dict`, which checks the type and range of every field prediction
and evaluation read and refuses a damaged or foreign file naming the field; written with
:meth:`BundleMeta.to_dict`. ``format`` is the layout's schema version:

- 2: the preprocessing as one object (:class:`cxrlearn.data.preprocessing.Preprocessing`);
- 1 (before it): ``image_size``, ``normalization`` and ``config.data.cache_size`` apart; read as the
  same preprocessing, so a format-1 bundle predicts as it did.

Every field is declared once, below, with its type and range (pydantic): reading validates against it and
:func:`cxrlearn.settings.check` names the first wrong field; ``docs/model.schema.json`` is generated from it.
The records a run keeps (the input check's fit, the data summary, training's metrics, the weights' source, the
last evaluation) are typed records read by attribute, which keep keys a newer cxrlearn added. The training config
as run and the library versions are kept as written: an old run's config is not rewritten to today's keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Annotated, Any

from pydantic import ConfigDict, Field, PlainSerializer, PlainValidator, TypeAdapter, WithJsonSchema
from pydantic.dataclasses import dataclass

from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import HeadConfig
from cxrlearn.records import Record
from cxrlearn.settings import Choice, Flag, Real, Says, Text
from cxrlearn.settings import check as check_settings

META = "model.json"
#: The most findings a bundle may describe (the head's width is bounded by its declaration,
#: :class:`cxrlearn.model.classifier.HeadConfig`: 10^9 units would take gigabytes before any check).
MAX_FINDINGS = 1000
#: The input check's arrays (:mod:`cxrlearn.model.input_check`), beside ``model.json``.
INPUT_CHECK_FILE = "input_check.safetensors"
#: The layout this cxrlearn writes, and those it reads.
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SplitRecord:
    """The split file a model was trained on, beside the bundle, and its SHA-256."""

    file: Text
    sha256: Text


class InputCheckFit(Record):
    """``input_check``: how the learned input check was fitted (:func:`cxrlearn.model.input_check.fit_input_check`);
    its arrays are in :data:`INPUT_CHECK_FILE`."""

    file: str = INPUT_CHECK_FILE
    #: The squared feature distance at the validation percentile: above it, an image is unlike the training ones.
    threshold: Annotated[Real, Field(gt=0)]
    method: str | None = None
    train_images: int | None = None
    val_images: int | None = None
    percentile: Real | None = None
    #: The same, of the layout distance (bundles made before it have none: no turn is then ruled out by it).
    layout_threshold: Real | None = None


class WeightsRecord(Record):
    """Where the backbone's starting weights came from (:class:`cxrlearn.model.pretrained.WeightsSource`)."""

    kind: str | None = None
    detail: Any = None


class SplitAuc(Record):
    """AUC-ROC of one split at the end of training (:class:`cxrlearn.evaluation.metrics.AucSummary`'s fields)."""

    auc: dict[str, float | None] = {}
    mean_auc: float | None = None
    mean_over: list[str] = []
    undefined: dict[str, str] = {}
    n_images: int | None = None


class TrainingMetrics(Record):
    """``metrics``: what training measured (``RUN/metrics.json`` holds the same)."""

    val: SplitAuc | None = None
    test: SplitAuc | None = None
    best_checkpoint: str | None = None
    epochs_run: int | None = None
    seconds: float | None = None

    def measured(self) -> dict[str, SplitAuc]:
        """The splits measured, by name (val, then test)."""
        return {name: part for name, part in (("val", self.val), ("test", self.test)) if part is not None}


class DataRecord(Record):
    """``data``: the images a model was trained on, for people (the model card) and for ``reproduce``."""

    label_table: str | None = None
    images: dict[str, int] = {}
    positives: dict[str, dict[str, int]] = {}
    missing_from_cache: Any = None


class TrainedWith(Record):
    """The keys of the training config's ``data`` section that later commands read (the whole section is the
    config's, :class:`cxrlearn.training.config.DataConfig`; kept as written)."""

    table: Any = None
    csv: Any = None
    dataset: str | None = None
    columns: Any = None
    findings: Any = None
    uncertain: str = "ignore"
    cache: str | None = None
    image_size: Any = None
    cache_size: Any = None
    split_seed: Any = None
    ratios: Any = None


class MemberRecord(Record):
    """One network of an ensemble bundle (``members``): what it is, and the bundle it was taken from."""

    backbone: str
    head: HeadConfig
    in_chans: int
    folder: str | None = None
    weights_sha256: str | None = None


class LastEvaluation(Record):
    """``evaluation``: the last ``evaluate`` that chose the bundle's thresholds."""

    folder: str | None = None
    mean_auc: float | None = None
    mean_auc_ci95: list[float] | None = None
    judged: str | None = None
    date: str | None = None


def _preprocessing(value: Any) -> Preprocessing:
    """Read through :meth:`Preprocessing.from_dict`, whose own checks name the field."""
    return value if isinstance(value, Preprocessing) else Preprocessing.from_dict(value)


#: The preprocessing, read and written as :class:`Preprocessing` states it.
PreprocessingField = Annotated[
    Preprocessing, PlainValidator(_preprocessing), PlainSerializer(Preprocessing.to_dict),
    WithJsonSchema({"type": "object", "description": "cxrlearn.data.preprocessing.Preprocessing.to_dict()"}),
]
Probability = Annotated[Annotated[Real, Field(ge=0, le=1)] | None, Says("a probability in [0, 1] or null")]
Temperature = Annotated[Annotated[Real, Field(gt=0)] | None, Says("a positive number or null")]


@dataclass(config=ConfigDict(extra="forbid", validate_assignment=True))
class BundleMeta:
    """``model.json``, declared once: every field's type and range; :meth:`from_dict` reads, :meth:`to_dict`
    writes."""

    backbone: Annotated[Text, Says("a timm model name")]
    head: HeadConfig
    in_chans: Annotated[Choice(1, 3), Says("1 or 3")]
    preprocessing: PreprocessingField
    findings: Annotated[tuple[Text, ...], Field(min_length=1, max_length=MAX_FINDINGS),
                        Says(f"at most {MAX_FINDINGS} finding names, and at least one")]
    #: Per finding: the probability at or above which it is called positive (chosen by evaluation).
    thresholds: dict[str, Probability] = Field(default_factory=dict)
    threshold_method: str | None = None
    #: Findings without a threshold, and why (too few validation positives or negatives): not called.
    not_called: dict[str, str] | None = None
    #: Every method's thresholds and what they gave on validation (chosen by evaluation).
    operating_points: dict[str, Any] | None = None
    #: Per finding: temperature scaling of the logits (``evaluate --calibrate``); None: plain sigmoid.
    temperature: dict[str, Temperature] | None = None
    #: Average each prediction with the horizontally flipped image's (set with the thresholds).
    tta: Flag = False
    split: SplitRecord | None = None
    weights_source: WeightsRecord | None = None
    #: The learned input check's description (:mod:`cxrlearn.model.input_check`); None: made without one.
    input_check: InputCheckFit | None = None
    # Records for people, kept as written.
    config: dict[str, Any] = Field(default_factory=dict)
    data: DataRecord | None = None
    metrics: TrainingMetrics = Field(default_factory=TrainingMetrics)
    versions: dict[str, Any] = Field(default_factory=dict)
    evaluation: LastEvaluation | None = None
    #: An ensemble's networks (:mod:`cxrlearn.model.ensemble`: their probabilities averaged); None: one network,
    #: ``backbone`` and ``head``.
    members: list[MemberRecord] | None = None
    format: Choice(*READABLE_FORMATS) = BUNDLE_FORMAT

    @property
    def trained_data(self) -> TrainedWith:
        """The ``data`` section of the training config the bundle records (empty when it records none)."""
        data = self.config.get("data")
        return TrainedWith.model_validate(data if isinstance(data, dict) else {})

    def to_dict(self) -> dict:
        """JSON-ready, in the layout of ``format`` 2 (fields that are None left out, but ``temperature``)."""
        written = _ADAPTER.dump_python(self, exclude_unset=True, by_alias=True)
        written = {"format": written.pop("format"), **written, "findings": list(self.findings)}
        return {k: v for k, v in written.items() if v is not None or k == "temperature"}

    @classmethod
    def from_dict(cls, raw: Any, path: str | os.PathLike = META) -> BundleMeta:
        """Types and ranges of every field; :class:`ConfigError` naming the file and field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a bundle's metadata is a JSON object, not {type(raw).__name__}")
        version = raw.get("format")
        if version not in READABLE_FORMATS or isinstance(version, bool):
            raise ConfigError(f"{path}: bundle format {version!r} is not one this cxrlearn reads "
                              f"({', '.join(map(str, READABLE_FORMATS))}); was it made by a newer version?")
        raw = _upgrade_format_1(dict(raw), path) if version == 1 else raw
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))} in a format-{version} "
                              "bundle; was it made by a newer version?")
        meta = check_settings(cls, raw, str(path), field_word=True)
        meta.check_consistent(path)
        return meta

    def check_consistent(self, path: str | os.PathLike = META) -> None:
        """What one field's type cannot say: fields that must agree with each other."""
        if self.preprocessing.channels != self.in_chans:
            raise ConfigError(f"{path}: preprocessing.channels is {self.preprocessing.channels} but the network "
                              f"takes {self.in_chans} (in_chans)")
        repeated = sorted({f for f in self.findings if self.findings.count(f) > 1})
        if repeated:
            raise ConfigError(f"{path}: field 'findings' names {', '.join(repeated)} more than once")
        for name, per_finding in (("thresholds", self.thresholds), ("temperature", self.temperature or {})):
            for finding in per_finding:
                if finding not in self.findings:
                    raise ConfigError(f"{path}: field {name!r} names {finding!r}, which is not one of the "
                                      "bundle's findings")
        trained = self.trained_data
        sizes = {"image_size": self.preprocessing.input_size}
        if trained.cache_size:
            sizes["cache_size"] = self.preprocessing.cache_size
        for key, value in sizes.items():
            if key in trained.model_fields_set and getattr(trained, key) != value:
                raise ConfigError(f"{path}: the preprocessing says {value} px but the model was trained at "
                                  f"{getattr(trained, key)!r} (config.data.{key}): the file has been changed")


_ADAPTER = TypeAdapter(BundleMeta)


def _upgrade_format_1(raw: dict, path) -> dict:
    """A format-1 bundle's fields in the layout of format 2: the same preprocessing, so the same predictions."""
    missing = [f for f in ("image_size", "normalization", "in_chans") if f not in raw]
    if missing:
        raise ConfigError(f"{path}: field {missing[0]!r} is missing (a format-1 bundle)")
    norm, size = raw.pop("normalization"), raw.pop("image_size")
    if not isinstance(norm, dict):
        raise ConfigError(f"{path}: field 'normalization' must be an object with mean and std, not {norm!r}")
    config = raw.get("config")
    trained = config.get("data") if isinstance(config, dict) and isinstance(config.get("data"), dict) else {}
    raw["preprocessing"] = {"cache_size": trained.get("cache_size") or size, "input_size": size,
                            "channels": raw["in_chans"], "mean": norm.get("mean"), "std": norm.get("std")}
    raw["format"] = BUNDLE_FORMAT
    return raw


def json_schema() -> dict:
    """The JSON Schema of ``model.json`` (``docs/model.schema.json``), from :class:`BundleMeta`'s declaration."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "cxrlearn model bundle (model.json)"
    return schema


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(json_schema(), indent=1))
