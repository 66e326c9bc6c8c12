"""The model bundle: everything needed to predict, in a folder, with nothing to unpickle.

``model.safetensors``  the weights (safetensors: tensors only, no code)
``model.json``         backbone, head, input channels, the preprocessing (one object:
                       :class:`cxrlearn.data.preprocessing.Preprocessing`), finding names, operating thresholds (filled by evaluation),
                       the training config, the split file's hash, a data summary,
                       metrics, weights source and library versions.

At run time the bundle is the one source of truth for these facts: predict and
serve read them from here, never from defaults in code.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

from cxrlearn._files import write_atomic
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import ChestXrayClassifier, HeadConfig

WEIGHTS = "model.safetensors"
META = "model.json"
#: The layout of model.json. 2: preprocessing as one object (cxrlearn.data.preprocessing). 1 (before it):
#: image_size, normalization and config.data.cache_size apart; still read, as the same preprocessing.
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)


def library_versions() -> dict:
    import lightning
    import numpy
    import timm

    import cxrlearn

    return {
        "cxrlearn": cxrlearn.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def save_bundle(folder: str | os.PathLike, model: ChestXrayClassifier, meta: dict) -> Path:
    """Write the weights and ``model.json`` (``meta`` plus the model's own description)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Weights, then metadata, each written whole or not at all: a killed save never leaves a half bundle.
    write_atomic(folder / WEIGHTS, save(state))
    full = {"format": BUNDLE_FORMAT, **model.describe(), **meta}
    full.setdefault("thresholds", {})
    full.setdefault("versions", library_versions())
    write_atomic(folder / META, json.dumps(full, indent=2) + "\n")
    return folder


def read_meta(folder: str | os.PathLike) -> dict:
    """The bundle's metadata, validated (:func:`validate_meta`): a damaged ``model.json`` is refused with the
    field at fault named, never run with wrong answers."""
    path = Path(folder) / META
    if not path.is_file():
        raise ConfigError(f"{folder}: not a cxrlearn model bundle (no {META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    validate_meta(meta, path)
    return meta


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_meta(meta, path: str | os.PathLike = META) -> None:
    """Types and ranges of every field prediction reads; :class:`ConfigError` naming the file and field."""
    def bad(field: str, expected: str, value) -> ConfigError:
        return ConfigError(f"{path}: field {field!r} must be {expected}, not {value!r}"[:400])

    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: a bundle's metadata is a JSON object, not {type(meta).__name__}")
    if meta.get("format") not in READABLE_FORMATS:
        raise ConfigError(f"{path}: bundle format {meta.get('format')!r} is not one this cxrlearn reads "
                          f"({', '.join(map(str, READABLE_FORMATS))}); was it made by a newer version?")
    if meta["format"] == 1:
        _upgrade_format_1(meta, path)
    for field in ("backbone", "head", "in_chans", "preprocessing", "findings"):
        if field not in meta:
            raise ConfigError(f"{path}: field {field!r} is missing")
    if not isinstance(meta["backbone"], str) or not meta["backbone"]:
        raise bad("backbone", "a timm model name", meta["backbone"])
    head = meta["head"]
    if not isinstance(head, dict) or set(head) != {"units", "activation", "dropout"}:
        raise bad("head", "an object with units, activation and dropout", head)
    if not isinstance(head["units"], int) or isinstance(head["units"], bool) or head["units"] < 1:
        raise bad("head.units", "a whole number >= 1", head["units"])
    if not _number(head["dropout"]) or not 0 <= head["dropout"] < 1:
        raise bad("head.dropout", "a number in [0, 1)", head["dropout"])
    if meta["in_chans"] not in (1, 3) or isinstance(meta["in_chans"], bool):
        raise bad("in_chans", "1 or 3", meta["in_chans"])
    try:
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if preprocessing.channels != meta["in_chans"]:
        raise ConfigError(f"{path}: preprocessing.channels is {preprocessing.channels} but the network takes "
                          f"{meta['in_chans']} (in_chans)")
    trained = _trained_data(meta)
    sizes = {"image_size": preprocessing.input_size}
    if trained.get("cache_size"):
        sizes["cache_size"] = preprocessing.cache_size
    for key, value in sizes.items():
        if key in trained and trained[key] != value:
            raise ConfigError(f"{path}: the preprocessing says {value} px but the model was trained at "
                              f"{trained[key]!r} (config.data.{key}): the file has been changed")
    findings = meta["findings"]
    if not isinstance(findings, list) or not findings or not all(isinstance(f, str) and f for f in findings):
        raise bad("findings", "a non-empty list of finding names", findings)
    repeated = sorted({f for f in findings if findings.count(f) > 1})
    if repeated:
        raise ConfigError(f"{path}: field 'findings' names {', '.join(repeated)} more than once")
    known = set(findings)
    for field in ("thresholds", "temperature"):
        values = meta.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise bad(field, "an object keyed by finding name, or null", values)
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"{path}: field {field!r} names {name!r}, which is not one of the bundle's findings")
            if value is None:
                continue
            if field == "thresholds" and (not _number(value) or not 0 <= value <= 1):
                raise bad(f"thresholds.{name}", "a probability in [0, 1] or null", value)
            if field == "temperature" and (not _number(value) or value <= 0):
                raise bad(f"temperature.{name}", "a positive number or null", value)
    if "tta" in meta and not isinstance(meta["tta"], bool):
        raise bad("tta", "true or false", meta["tta"])


def _trained_data(meta: dict) -> dict:
    """The ``data`` section of the training config the bundle records (empty when it records none)."""
    config = meta.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def _upgrade_format_1(meta: dict, path) -> None:
    """A format-1 bundle (image_size, normalization and config.data.cache_size apart) read as format 2,
    in memory: the same preprocessing, so the same predictions."""
    missing = [f for f in ("image_size", "normalization", "in_chans") if f not in meta]
    if missing:
        raise ConfigError(f"{path}: field {missing[0]!r} is missing (a format-1 bundle)")
    norm, size = meta.pop("normalization"), meta.pop("image_size")
    if not isinstance(norm, dict):
        raise ConfigError(f"{path}: field 'normalization' must be an object with mean and std, not {norm!r}")
    trained = _trained_data(meta)
    meta["preprocessing"] = {"cache_size": trained.get("cache_size") or size, "input_size": size,
                             "channels": meta["in_chans"], "mean": norm.get("mean"), "std": norm.get("std")}
    meta["format"] = BUNDLE_FORMAT


def preprocessing_of(meta: dict) -> Preprocessing:
    """The bundle's preprocessing (:mod:`cxrlearn.data.preprocessing`): what every file becomes before the network."""
    return Preprocessing.from_dict(meta["preprocessing"])


def write_meta(folder: str | os.PathLike, meta: dict) -> None:
    write_atomic(Path(folder) / META, json.dumps(meta, indent=2) + "\n")


def load_bundle(folder: str | os.PathLike) -> tuple[ChestXrayClassifier, dict]:
    """The model (in eval mode, on the CPU) and its metadata."""
    from safetensors.torch import load_file

    meta = read_meta(folder)
    try:
        model = ChestXrayClassifier(
            meta["backbone"], HeadConfig(**meta["head"]), num_findings=len(meta["findings"]), in_chans=meta["in_chans"]
        )
    except ConfigError as err:
        raise ConfigError(f"{Path(folder) / META}: {err}") from None
    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{folder}: the bundle has no {WEIGHTS}")
    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ConfigError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{weights}: the weights do not fit the model that {META} describes "
                          f"({meta['backbone']}, {len(meta['findings'])} findings): {first}") from None
    return model.eval(), meta
