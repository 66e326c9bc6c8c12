"""The model bundle: everything needed to predict, in a folder, with nothing to unpickle.

``model.safetensors``  the weights (safetensors: tensors only, no code)
``model.json``         :class:`cxrlearn.model.meta.BundleMeta`: backbone, head, input channels, the
                       preprocessing, finding names, operating thresholds (filled by evaluation),
                       the training config, the split file's hash, a data summary,
                       metrics, weights source and library versions.

At run time the bundle is the one source of truth for these facts: predict and
serve read them from here, never from defaults in code.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

import cxrlearn
from cxrlearn._files import file_digest, write_atomic
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.model.ensemble import EnsembleClassifier
from cxrlearn.model.meta import INPUT_CHECK_FILE as CHECK_FILE
from cxrlearn.model.meta import META, BundleMeta

WEIGHTS = "model.safetensors"
#: A bundle's model.json is tens of kilobytes (a large evaluation record included); more is not one of ours.
MAX_META_BYTES = 16 * 2**20


def library_versions() -> dict:
    """The versions of the libraries a bundle was made with (read from the installed packages' metadata)."""
    return {"cxrlearn": cxrlearn.__version__, "torch": torch.__version__,
            **{name: version(name) for name in ("timm", "lightning", "numpy")},
            "python": platform.python_version()}


def bundle_digest(folder: str | os.PathLike) -> str:
    """The SHA-256 that names this bundle's answers: over ``model.json`` (thresholds, temperatures,
    preprocessing), the weights and the input check, so any change to what a prediction depends on changes it.
    Written beside every prediction (with cxrlearn's version), so a result can be traced to its model."""
    folder = Path(folder)
    lines = "".join(f"{name}\t{file_digest(folder / name)}\n" for name in (META, WEIGHTS, CHECK_FILE)
                    if (folder / name).is_file())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _architecture(model: ChestXrayClassifier | EnsembleClassifier) -> list[tuple]:
    networks = model.members if isinstance(model, EnsembleClassifier) else [model]
    return [(m.backbone_name, m.head_config, m.in_chans, m.num_findings) for m in networks]


def _described(meta: BundleMeta) -> list[tuple]:
    if meta.members:
        return [(m.backbone, m.head, m.in_chans, len(meta.findings)) for m in meta.members]
    return [(meta.backbone, meta.head, meta.in_chans, len(meta.findings))]


def build_network(meta: BundleMeta) -> ChestXrayClassifier | EnsembleClassifier:
    """The network ``meta`` describes, with fresh weights: one classifier, or an ensemble of its ``members``."""
    networks = [ChestXrayClassifier(backbone, head, num_findings=findings, in_chans=in_chans)
                for backbone, head, in_chans, findings in _described(meta)]
    return EnsembleClassifier(networks) if meta.members else networks[0]


def save_bundle(folder: str | os.PathLike, model: ChestXrayClassifier | EnsembleClassifier, meta: BundleMeta) -> Path:
    """Write the weights and ``model.json``; the model must be the one ``meta`` describes."""
    if _architecture(model) != _described(meta):
        raise ConfigError(f"the model ({_architecture(model)}) is not the one the metadata describes")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not meta.versions:
        meta.versions = library_versions()
    # Weights, then metadata, each written whole or not at all: a killed save never leaves a half bundle.
    write_atomic(folder / WEIGHTS, save(state))
    write_meta(folder, meta)
    return folder


def read_meta(folder: str | os.PathLike) -> BundleMeta:
    """The bundle's metadata, validated (:meth:`BundleMeta.from_dict`): a damaged ``model.json`` is refused
    with the field at fault named, never run with wrong answers."""
    path = Path(folder) / META
    if not path.is_file():
        raise ConfigError(f"{folder}: not a cxrlearn model bundle (no {META})")
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a bundle's metadata is at most "
                              f"{MAX_META_BYTES:,}: this is not one cxrlearn wrote")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except (ValueError, RecursionError) as err:  # a 5,000-digit number; nesting 100,000 deep
        raise ConfigError(f"{path}: not JSON cxrlearn reads ({type(err).__name__}: {str(err)[:120]})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    return BundleMeta.from_dict(raw, path)


def write_meta(folder: str | os.PathLike, meta: BundleMeta) -> None:
    write_atomic(Path(folder) / META, json.dumps(meta.to_dict(), indent=2) + "\n")


def read_safetensors(path: Path, missing: str, loader: Callable[[str], dict]) -> dict:
    """A safetensors file of the bundle read with ``loader`` (torch's or NumPy's), or :class:`ConfigError`:
    ``missing`` when it is absent, the file and the reason when it is damaged."""
    if not path.is_file():
        raise ConfigError(missing)
    try:
        return loader(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ConfigError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def _check_weights_fit(meta: BundleMeta, weights: Path, folder) -> None:
    """The weights file's tensor names and shapes (read from its header) against the model ``meta`` describes,
    built without memory (PyTorch's meta device): a mismatch is refused before anything is allocated."""
    if not weights.is_file():
        raise ConfigError(f"{folder}: the bundle has no {WEIGHTS}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ConfigError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    try:
        with torch.device("meta"):
            skeleton = build_network(meta)
    except ConfigError as err:
        raise ConfigError(f"{Path(folder) / META}: {err}") from None
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    if stored != expected:
        name = next(iter(sorted(set(stored) ^ set(expected))), None) or next(
            n for n in sorted(expected) if stored[n] != expected[n])
        raise ConfigError(f"{weights}: the weights do not fit the model that {META} describes ({meta.backbone}, "
                          f"{len(meta.findings)} findings): {name} is {stored.get(name, 'missing')} in the file, "
                          f"{expected.get(name, 'absent')} in the model")


def load_bundle(folder: str | os.PathLike) -> tuple[ChestXrayClassifier | EnsembleClassifier, BundleMeta]:
    """The model (in eval mode, on the CPU) and its metadata."""
    meta = read_meta(folder)
    weights = Path(folder) / WEIGHTS
    _check_weights_fit(meta, weights, folder)  # before the model takes any memory (a ViT-Huge takes 3 GB)
    try:
        model = build_network(meta)
    except ConfigError as err:
        raise ConfigError(f"{Path(folder) / META}: {err}") from None
    state = read_safetensors(weights, f"{folder}: the bundle has no {WEIGHTS}", load_file)
    damaged = next((name for name, tensor in state.items()
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if damaged is not None:
        raise ConfigError(f"{weights}: {damaged} holds non-finite numbers (NaN or infinity): the weights are damaged")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{weights}: the weights do not fit the model that {META} describes "
                          f"({meta.backbone}, {len(meta.findings)} findings): {first}") from None
    return model.eval(), meta
