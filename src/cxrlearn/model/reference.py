"""What a model's inputs and outputs looked like on the images it was validated on: the reference that a
deployed model is watched against (``cxrlearn monitor``, :mod:`cxrlearn.monitoring`).

Per reference image it keeps what the prediction log keeps per answer (:class:`ImageSummary`), and nothing from
which the image could be rebuilt:

* the logits (probabilities and calls follow from the bundle's temperatures and thresholds at the time of
  judging, so calibrating the bundle later does not leave the reference behind);
* the input check's score and whether it flagged the image;
* pixel statistics of the network's 8-bit input (:data:`PIXEL_STATISTICS`);
* the backbone's pooled features projected on their leading principal components (:class:`Basis`, fitted on
  the reference's own features): a compact picture of what the network saw, as CheXstray's image features.

Training writes it from the run's validation images (``reference.safetensors`` in the bundle);
``cxrlearn monitor --reference-images DIR`` makes one for a bundle without it. It is not part of the bundle's
digest: answers do not depend on it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save
from sklearn.decomposition import PCA

from cxrlearn._files import file_digest, write_atomic
from cxrlearn.errors import ConfigError
from cxrlearn.model.bundle import read_safetensors
from cxrlearn.records import Record

REFERENCE_FILE = "reference.safetensors"
#: Principal components of the pooled features that a summary keeps.
COMPONENTS = 16
#: The percentiles of the 8-bit input's grey levels that a summary keeps, after its mean and spread.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: The names of a summary's pixel statistics, in order.
PIXEL_STATISTICS = ("mean", "std", *(f"p{p}" for p in PERCENTILES))


def pixel_statistics(model_pixels: np.ndarray) -> np.ndarray:
    """(N, S, S) uint8 network inputs -> (N, len(PIXEL_STATISTICS)): mean, standard deviation and percentiles of
    the grey levels."""
    flat = np.asarray(model_pixels, dtype=np.float32).reshape(len(model_pixels), -1)
    return np.column_stack([flat.mean(axis=1), flat.std(axis=1),
                            np.percentile(flat, PERCENTILES, axis=1).T]).astype(np.float32)


@dataclass(frozen=True)
class Basis:
    """The leading principal components of the reference images' pooled features: ``(features - mean) @
    components.T`` is a summary's projection."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D)

    @classmethod
    def fit(cls, features: np.ndarray, components: int = COMPONENTS) -> Basis:
        features = np.asarray(features, dtype=np.float64)
        k = min(components, len(features) - 1, features.shape[1])
        if k < 1:
            raise ConfigError(f"a reference needs at least 2 images, not {len(features)}")
        pca = PCA(n_components=k, svd_solver="full", random_state=0).fit(features)
        return cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32))

    def project(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float64) - self.mean) @ self.components.T.astype(np.float64)
                ).astype(np.float32)


@dataclass(frozen=True)
class ImageSummary:
    """What the prediction log keeps of an image besides the answer: its pixel statistics
    (:data:`PIXEL_STATISTICS`), its features' projection (None without a reference's basis) and the decoded image's
    size (None where unknown)."""

    pixels: tuple[float, ...]
    projection: tuple[float, ...] | None = None
    width: int | None = None
    height: int | None = None


def summaries(model_pixels: np.ndarray, features: np.ndarray | None, basis: Basis | None,
              sizes: Sequence[tuple[int, int] | None]) -> list[ImageSummary]:
    """One :class:`ImageSummary` per (S, S) uint8 network input, with its pooled features' projection where both
    features and a basis are at hand, and its decoded ``(width, height)``."""
    stats = pixel_statistics(model_pixels)
    projected = basis.project(features) if basis is not None and features is not None else None
    return [ImageSummary(tuple(round(float(v), 4) for v in stats[i]),
                         None if projected is None else tuple(round(float(v), 5) for v in projected[i]),
                         *(size if size else (None, None)))
            for i, size in enumerate(sizes)]


class Described(Record):
    """What a reference file's metadata says of it (JSON texts, as safetensors keeps strings)."""

    findings: str = "[]"
    source: str = "unknown images"
    tags: str = "[]"


@dataclass
class Reference:
    """The reference images' summaries and outputs (one row each), their basis, and where they came from."""

    basis: Basis
    findings: tuple[str, ...]
    logits: np.ndarray  # (N, F), flip-averaged where the bundle says so
    projections: np.ndarray  # (N, K)
    pixels: np.ndarray  # (N, len(PIXEL_STATISTICS))
    flagged: np.ndarray  # (N,) bool: the input check flagged it
    input_scores: np.ndarray  # (N,) NaN where not computed
    source: str  # in words: "the run's 250 validation images", "the 400 images in DIR"
    #: Where made from DICOM files: each categorical tag's values and their counts (cxrlearn.monitoring.drift's
    #: CATEGORIES, in order); empty otherwise.
    tag_counts: tuple[dict[str, int], ...] = ()

    def __len__(self) -> int:
        return len(self.logits)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / REFERENCE_FILE
        arrays = {"basis_mean": self.basis.mean, "basis_components": self.basis.components, "logits": self.logits,
                  "projections": self.projections, "pixels": self.pixels,
                  "flagged": self.flagged.astype(np.uint8), "input_scores": self.input_scores}
        described = {"findings": json.dumps(list(self.findings)), "source": self.source,
                     "pixel_statistics": json.dumps(list(PIXEL_STATISTICS)), "tags": json.dumps(list(self.tag_counts))}
        write_atomic(path, save({k: np.ascontiguousarray(v, dtype=np.uint8 if k == "flagged" else np.float32)
                                 for k, v in arrays.items()}, metadata=described))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Reference | None:
        """The bundle's reference, or None where it has none; a damaged one is refused by name."""
        path = Path(folder) / REFERENCE_FILE
        if not path.is_file():
            return None
        arrays = read_safetensors(path, f"{path}: missing", load_file)
        with safe_open(str(path), framework="numpy") as handle:
            described = Described.model_validate(handle.metadata() or {})
        try:
            findings = tuple(json.loads(described.findings))
            tag_counts = tuple(dict(counts) for counts in json.loads(described.tags))
            names = ("basis_mean", "basis_components", "logits", "projections", "pixels", "flagged", "input_scores")
            basis_mean, components, logits, projections, pixels, flagged, scores = (arrays[n] for n in names)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{path}: not a cxrlearn reference ({err}); make it again with `cxrlearn monitor "
                              f"--model {folder} --reference-images DIR`") from None
        n = len(logits)
        if (logits.shape != (n, len(findings)) or projections.shape != (n, components.shape[0])
                or pixels.shape != (n, len(PIXEL_STATISTICS)) or flagged.shape != (n,) or scores.shape != (n,)
                or basis_mean.shape != (components.shape[1],)):
            raise ConfigError(f"{path}: its arrays do not agree in shape (damaged); make it again with `cxrlearn "
                              f"monitor --model {folder} --reference-images DIR`")
        return cls(Basis(basis_mean, components), findings, logits, projections, pixels, flagged.astype(bool),
                   scores, described.source, tag_counts)

    @staticmethod
    def digest(folder: str | os.PathLike) -> str | None:
        path = Path(folder) / REFERENCE_FILE
        return file_digest(path) if path.is_file() else None
