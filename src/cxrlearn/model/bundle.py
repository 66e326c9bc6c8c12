"""The model bundle: everything needed to predict, in a folder, with nothing to unpickle.

``model.safetensors``  the weights (safetensors: tensors only, no code)
``model.json``         backbone, head, input channels, image size, normalisation,
                       finding names, operating thresholds (filled by evaluation),
                       the training config, the split file's hash, a data summary,
                       metrics, weights source and library versions.

At run time the bundle is the one source of truth for these facts: predict and
serve read them from here, never from defaults in code.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from cxrlearn._files import write_atomic
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import ChestXrayClassifier, HeadConfig

WEIGHTS = "model.safetensors"
META = "model.json"
BUNDLE_FORMAT = 1


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
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Weights, then metadata, each written whole or not at all: a killed save never leaves a half bundle.
    temporary = folder / f".{WEIGHTS}.tmp-save"
    save_file(state, str(temporary))
    os.replace(temporary, folder / WEIGHTS)
    full = {"format": BUNDLE_FORMAT, **model.describe(), **meta}
    full.setdefault("thresholds", {})
    full.setdefault("versions", library_versions())
    write_atomic(folder / META, json.dumps(full, indent=2) + "\n")
    return folder


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise ConfigError(f"{folder}: not a cxrlearn model bundle (no {META})")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{path}: bundle format {meta.get('format')} is not {BUNDLE_FORMAT}")
    return meta


def resize_sizes(meta: dict) -> tuple[int, int]:
    """(cache size, input size): an image is resized to the first as the training cache stores
    it (Lanczos), then to the second as the loader does (bilinear; a no-op when equal)."""
    image_size = int(meta["image_size"])
    return int(meta.get("config", {}).get("data", {}).get("cache_size") or image_size), image_size


def input_transform(meta: dict):
    """The bundle's normalisation: uint8 (B, 1, S, S) -> the float input the network was trained on."""
    from cxrlearn.data.augment import BatchTransform

    norm = meta["normalization"]
    return BatchTransform(norm["mean"], norm["std"], channels=meta["in_chans"])


def write_meta(folder: str | os.PathLike, meta: dict) -> None:
    write_atomic(Path(folder) / META, json.dumps(meta, indent=2) + "\n")


def load_bundle(folder: str | os.PathLike) -> tuple[ChestXrayClassifier, dict]:
    """The model (in eval mode, on the CPU) and its metadata."""
    from safetensors.torch import load_file

    meta = read_meta(folder)
    model = ChestXrayClassifier(
        meta["backbone"], HeadConfig(**meta["head"]), num_findings=len(meta["findings"]), in_chans=meta["in_chans"]
    )
    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{folder}: the bundle has no {WEIGHTS}")
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), meta
