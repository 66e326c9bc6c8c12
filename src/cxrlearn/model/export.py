"""ONNX export of a model bundle, with its preprocessing contract inside the file.

The graph takes what every runtime can make without knowing ImageNet's
statistics: ``image``, uint8 of shape (batch, 1, S, S) — the decoded
grayscale X-ray resized as in training — and returns ``logits`` (batch, findings) and ``features``
(batch, width): the backbone's pooled features, which the input check
(:mod:`cxrlearn.model.input_check`) measures.
Normalisation (the backbone's mean and std, and the gray-to-RGB repeat) is
inside the graph. Sigmoid, temperatures and thresholds stay outside, in
:mod:`cxrlearn.inference.outputs`, so that PyTorch and ONNX Runtime share
them. The batch axis is dynamic.

The file's metadata (``metadata_props``) records the contract as JSON under
``cxrlearn``: input layout, image and resize sizes and methods, normalisation,
finding names, thresholds, temperatures and whether flip averaging is
expected, plus the SHA-256 of the bundle's weights so that a stale export is
refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from cxrlearn._files import file_digest, read_json_object, write_atomic
from cxrlearn.data.pipeline.normalize import normalizer
from cxrlearn.errors import ConfigError
from cxrlearn.model import ONNX_OPSET
from cxrlearn.model.bundle import WEIGHTS, load_bundle
from cxrlearn.records import Record

ONNX_FILE = "model.onnx"  # a bundle's ONNX export, beside model.json

METADATA_KEY = "cxrlearn"


class _WithPreprocessing(nn.Module):
    """uint8 (B, 1, S, S) -> (logits, pooled features): the bundle's normalisation, then the classifier."""

    def __init__(self, model: nn.Module, transform: nn.Module):
        super().__init__()
        self.model = model
        self.transform = transform

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(self.transform(image))
        return self.model.head(features), features


def contract(meta: dict, weights_sha256: str) -> dict:
    """The ONNX file's metadata, written from the bundle's preprocessing and outputs."""

    pre = meta.preprocessing
    return {
        "input": {"name": "image", "dtype": "uint8", "shape": ["batch", 1, pre.input_size, pre.input_size],
                  "meaning": "8-bit grayscale chest X-ray, bone bright (MONOCHROME2), after the preprocessing "
                             "steps but the last (which is inside the graph)"},
        "output": {"name": "logits", "shape": ["batch", len(meta.findings)],
                   "probability": "sigmoid(logit / temperature[finding])"},
        "features": {"name": "features", "meaning": "the backbone's pooled features, for the input check"},
        "preprocessing": pre.steps(),
        "preprocessing_values": pre.to_dict(),
        "image_size": pre.input_size,
        "cache_size": pre.cache_size,
        "findings": list(meta.findings),
        "thresholds": meta.thresholds,
        "threshold_method": meta.threshold_method,
        "temperature": meta.temperature,
        "tta": meta.tta,
        "backbone": meta.backbone,
        "weights_sha256": weights_sha256,
    }


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, opset: int = ONNX_OPSET,
                record: bool = True) -> Path:
    """Write the bundle in ``model_dir`` as one ONNX file at ``out`` (default ``model_dir/model.onnx``, where
    ``cxrlearn predict --runtime onnx`` looks), recorded in the bundle's ``exports.json`` (unless ``record`` is
    false: a working copy); return its path."""
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir / ONNX_FILE
    model, meta = load_bundle(model_dir)
    pre = meta.preprocessing
    wrapper = _WithPreprocessing(model, normalizer(pre)).eval()
    size = pre.input_size
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        wrapper, (example,), input_names=["image"], output_names=["logits", "features"], opset_version=opset, dynamo=True,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}}, external_data=False,
    )
    written = write_with_contract(program.model_proto, contract(meta, file_digest(model_dir / WEIGHTS)), out)
    if record:
        record_export(model_dir, written, "onnx")
    return written


def write_with_contract(proto, terms: dict, out: Path) -> Path:
    """Write the ONNX ``proto`` at ``out`` (atomically) with ``terms`` (:func:`contract`'s, perhaps with more) as
    its only cxrlearn metadata, after ONNX's own check of the model."""
    import onnx

    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(terms)
    proto.producer_name = "cxrlearn"
    onnx.checker.check_model(proto)
    write_atomic(out, proto.SerializeToString())
    return out


def read_contract(path: str | os.PathLike) -> dict:
    """The cxrlearn contract stored in an exported ONNX file."""
    import onnxruntime

    try:
        session_meta = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for damaged files
        raise ConfigError(f"{path}: not a readable ONNX model ({type(err).__name__}: {str(err)[:200]}); export it "
                          "again") from None
    text = session_meta.custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise ConfigError(f"{path}: an ONNX file without cxrlearn's contract (not made by `cxrlearn export`)")
    try:
        contract = json.loads(text)
    except ValueError:
        contract = None
    if not isinstance(contract, dict) or not isinstance(contract.get("weights_sha256"), str):
        raise ConfigError(f"{path}: its cxrlearn contract is damaged; export it again")
    return contract


def check_onnx_matches_bundle(path: str | os.PathLike, model_dir: str | os.PathLike) -> dict:
    """Refuse an ONNX file exported from other weights than the bundle's; return its contract."""

    found = read_contract(path)
    if found["weights_sha256"] != file_digest(Path(model_dir) / WEIGHTS):
        raise ConfigError(f"{path} was exported from other weights than {model_dir}'s; export it again")
    return found


#: The bundle's record of the files exported from it (not part of :func:`cxrlearn.model.bundle.bundle_digest`:
#: exporting does not change the model's name).
EXPORTS_FILE = "exports.json"


class ExportedFile(Record):
    """One file ``cxrlearn export`` wrote from the bundle: its name, SHA-256, and the runtime that reads it."""

    file: str
    sha256: str
    runtime: str  # onnx or onnx-int8


class Exports(Record):
    """``RUN/exports.json``."""

    files: list[ExportedFile] = []


def read_exports(model_dir: str | os.PathLike) -> Exports:
    path = Path(model_dir) / EXPORTS_FILE
    if not path.is_file():
        return Exports()
    return Exports.model_validate(read_json_object(path, ConfigError, "export the bundle's ONNX files again"))


def record_export(model_dir: str | os.PathLike, path: Path, runtime: str) -> str:
    """Record the file ``path``, just written from the bundle in ``model_dir`` for ``runtime``; its SHA-256."""
    digest = file_digest(path)
    name = path.name if path.resolve().parent == Path(model_dir).resolve() else str(path.resolve())
    exports = read_exports(model_dir)
    files = [f for f in exports.files if f.file != name] + [ExportedFile(file=name, sha256=digest, runtime=runtime)]
    write_atomic(Path(model_dir) / EXPORTS_FILE, json.dumps(Exports(files=files).to_dict(), indent=2) + "\n")
    return digest


def check_export(path: str | os.PathLike, model_dir: str | os.PathLike, runtime: str) -> tuple[str, dict]:
    """Refuse an ONNX file that is not one ``cxrlearn export`` wrote from this bundle for ``runtime`` (changed
    since, or another export copied over it: a float file named ``model.int8.onnx``); return its SHA-256, which
    names it beside every answer it gives, and its contract."""
    contract = check_onnx_matches_bundle(path, model_dir)  # first: a stale export is the likelier, and says so
    path, digest = Path(path), file_digest(path)
    recorded = [f for f in read_exports(model_dir).files if f.sha256 == digest]
    if not recorded:
        raise ConfigError(f"{path}: not a file that `cxrlearn export` wrote from {model_dir} (its SHA-256 "
                          f"{digest[:16]}... is not in {Path(model_dir) / EXPORTS_FILE}): it was changed, or made "
                          f"from another bundle; export it again")
    if all(f.runtime != runtime for f in recorded):
        raise ConfigError(f"{path}: this is the bundle's {recorded[0].runtime} export ({recorded[0].file}), not "
                          f"its {runtime} one; export it again")
    return digest, contract
