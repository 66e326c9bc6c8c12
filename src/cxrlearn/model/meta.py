"""What a bundle says about itself (``model.json``), as one typed value: :class:`BundleMeta`.

Read with :meth:`BundleMeta.from_dict`, which checks the type and range of every field prediction
and evaluation read and refuses a damaged or foreign file naming the field; written with
:meth:`BundleMeta.to_dict`. ``format`` is the layout's schema version:

- 2: the preprocessing as one object (:class:`cxrlearn.data.preprocessing.Preprocessing`);
- 1 (before it): ``image_size``, ``normalization`` and ``config.data.cache_size`` apart; read as the
  same preprocessing, so a format-1 bundle predicts as it did.

The records a run keeps for people to read (the training config as run, the data summary, the
metrics, the library versions, the last evaluation) are kept as written: nothing computes with them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import TypeAdapter

from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import HeadConfig
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


@dataclass(frozen=True)
class SplitRecord:
    """The split file a model was trained on, beside the bundle, and its SHA-256."""

    file: str
    sha256: str


@dataclass
class BundleMeta:
    backbone: str
    head: HeadConfig
    in_chans: int
    preprocessing: Preprocessing
    findings: tuple[str, ...]
    #: Per finding: the probability at or above which it is called positive (chosen by evaluation).
    thresholds: dict[str, float | None] = field(default_factory=dict)
    threshold_method: str | None = None
    #: Every method's thresholds and what they gave on validation (chosen by evaluation).
    operating_points: dict | None = None
    #: Per finding: temperature scaling of the logits (``evaluate --calibrate``); None: plain sigmoid.
    temperature: dict[str, float | None] | None = None
    #: Average each prediction with the horizontally flipped image's (set with the thresholds).
    tta: bool = False
    split: SplitRecord | None = None
    weights_source: dict | None = None
    #: The learned input check's description (:mod:`cxrlearn.model.input_check`); None: made without one.
    input_check: dict | None = None
    # Records for people, kept as written.
    config: dict = field(default_factory=dict)
    data: dict | None = None
    metrics: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    evaluation: dict | None = None
    format: int = BUNDLE_FORMAT

    @property
    def trained_data(self) -> dict:
        """The ``data`` section of the training config the bundle records (empty when it records none)."""
        data = self.config.get("data") if isinstance(self.config, dict) else None
        return data if isinstance(data, dict) else {}

    def to_dict(self) -> dict:
        """JSON-ready, in the layout of ``format`` 2."""
        out: dict[str, Any] = {"format": self.format, "backbone": self.backbone,
                               "head": {"units": self.head.units, "activation": self.head.activation,
                                        "dropout": self.head.dropout},
                               "in_chans": self.in_chans, "preprocessing": self.preprocessing.to_dict(),
                               "findings": list(self.findings)}
        for f in fields(self):
            if f.name in out:
                continue
            value = getattr(self, f.name)
            if f.name == "split" and value is not None:
                value = {"file": value.file, "sha256": value.sha256}
            if value is not None or f.name in ("temperature",):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, raw: Any, path: str | os.PathLike = META) -> BundleMeta:
        """Types and ranges of every field; :class:`ConfigError` naming the file and field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a bundle's metadata is a JSON object, not {type(raw).__name__}")
        raw = dict(raw)
        if raw.get("format") not in READABLE_FORMATS or isinstance(raw.get("format"), bool):
            raise ConfigError(f"{path}: bundle format {raw.get('format')!r} is not one this cxrlearn reads "
                              f"({', '.join(map(str, READABLE_FORMATS))}); was it made by a newer version?")
        if raw["format"] == 1:
            raw = _upgrade_format_1(raw, path)
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))} in a format-{raw['format']} "
                              "bundle; was it made by a newer version?")
        for name in ("backbone", "head", "in_chans", "preprocessing", "findings"):
            if name not in raw:
                raise ConfigError(f"{path}: field {name!r} is missing")
        check = _Checker(path)
        check.that(isinstance(raw["backbone"], str) and raw["backbone"], "backbone", "a timm model name", raw["backbone"])
        head = raw["head"]
        check.that(isinstance(head, dict), "head", "an object with units, activation and dropout", head)
        head_config = check_settings(HeadConfig, head, str(path), prefix="head.", field_word=True)
        check.that(_whole(raw["in_chans"]) and raw["in_chans"] in (1, 3), "in_chans", "1 or 3", raw["in_chans"])
        try:
            preprocessing = Preprocessing.from_dict(raw["preprocessing"])
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        if preprocessing.channels != raw["in_chans"]:
            raise ConfigError(f"{path}: preprocessing.channels is {preprocessing.channels} but the network takes "
                              f"{raw['in_chans']} (in_chans)")
        findings = raw["findings"]
        check.that(isinstance(findings, list) and findings and all(isinstance(f, str) and f for f in findings),
                   "findings", "a non-empty list of finding names", findings)
        check.that(len(findings) <= MAX_FINDINGS, "findings", f"at most {MAX_FINDINGS} names",
                   f"a list of {len(findings):,}")
        repeated = sorted({f for f in findings if findings.count(f) > 1})
        if repeated:
            raise ConfigError(f"{path}: field 'findings' names {', '.join(repeated)} more than once")
        _check_per_finding(check, raw, findings, path)
        check.that(isinstance(raw.get("tta", False), bool), "tta", "true or false", raw.get("tta"))
        split = raw.get("split")
        if split is not None:
            check.that(isinstance(split, dict) and isinstance(split.get("file"), str)
                       and isinstance(split.get("sha256"), str), "split", "an object with file and sha256", split)
        for name in ("config", "metrics", "versions", "data", "evaluation", "operating_points", "weights_source",
                     "input_check"):
            value = raw.get(name)
            check.that(value is None or isinstance(value, dict), name, "an object", value)
        for key, value in (raw.get("input_check") or {}).items():  # the numbers the check reads
            if key in ("threshold", "layout_threshold", "percentile"):
                check.that(_number(value), f"input_check.{key}", "a finite number", value)
        meta = cls(
            backbone=raw["backbone"], head=head_config, in_chans=raw["in_chans"], preprocessing=preprocessing,
            findings=tuple(findings), thresholds=dict(raw.get("thresholds") or {}),
            threshold_method=raw.get("threshold_method"), operating_points=raw.get("operating_points"),
            temperature=raw.get("temperature"), tta=raw.get("tta", False),
            split=SplitRecord(split["file"], split["sha256"]) if split else None,
            weights_source=raw.get("weights_source"), input_check=raw.get("input_check"), config=raw.get("config") or {}, data=raw.get("data"),
            metrics=raw.get("metrics") or {}, versions=raw.get("versions") or {}, evaluation=raw.get("evaluation"),
        )
        _check_trained_sizes(meta, path)
        return meta


def _check_per_finding(check: _Checker, raw: dict, findings: list[str], path) -> None:
    """``thresholds`` (probabilities) and ``temperature`` (positive numbers): objects keyed by the bundle's findings."""
    for name, positive_only in (("thresholds", False), ("temperature", True)):
        values = raw.get(name)
        if values is None:
            continue
        check.that(isinstance(values, dict), name, "an object keyed by finding name, or null", values)
        for finding, value in values.items():
            if finding not in findings:
                raise ConfigError(f"{path}: field {name!r} names {finding!r}, which is not one of the bundle's "
                                  "findings")
            if value is None:
                continue
            if positive_only:
                check.that(_number(value) and value > 0, f"{name}.{finding}", "a positive number or null", value)
            else:
                check.that(_number(value) and 0 <= value <= 1, f"{name}.{finding}",
                           "a probability in [0, 1] or null", value)


def _check_trained_sizes(meta: BundleMeta, path) -> None:
    """The preprocessing's sizes against the training config's record of them: a file edited by hand is refused."""
    trained = meta.trained_data
    sizes = {"image_size": meta.preprocessing.input_size}
    if trained.get("cache_size"):
        sizes["cache_size"] = meta.preprocessing.cache_size
    for key, value in sizes.items():
        if key in trained and trained[key] != value:
            raise ConfigError(f"{path}: the preprocessing says {value} px but the model was trained at "
                              f"{trained[key]!r} (config.data.{key}): the file has been changed")


class _Checker:
    def __init__(self, path):
        self.path = path

    def that(self, ok, field_name: str, expected: str, value) -> None:
        if not ok:
            raise ConfigError(f"{self.path}: field {field_name!r} must be {expected}, not {value!r}"[:400])


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    schema = TypeAdapter(BundleMeta).json_schema()
    schema["title"] = "cxrlearn model bundle (model.json)"
    return schema


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(json_schema(), indent=1))
