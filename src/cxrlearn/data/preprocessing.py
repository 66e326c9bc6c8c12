"""What an image becomes on its way into the network, stated once.

1. decode to 8-bit grayscale (:func:`cxrlearn.data.decoding.images.decode_grayscale`, whose rules
   :data:`~cxrlearn.data.decoding.images.DECODING` states);
2. resize to ``cache_size`` square with ``cache_resampling`` (Lanczos: antialiased when shrinking, as
   the preprocessing cache stores images);
3. resize to ``input_size`` square with ``input_resampling`` (bilinear; nothing to do when the sizes
   are equal, the usual case);
4. repeat the gray channel to ``channels`` and normalise: ``(pixels / 255 - mean) / std``, with the
   backbone's own mean and std from timm's pretrained configuration.

One :class:`Preprocessing` value holds all of it. It is made once for a run (:meth:`Preprocessing.for_run`),
saved in the model bundle, and read back by the cache (steps 1-2: :meth:`Preprocessing.cached`), the training
dataset and evaluation (step 3: :meth:`Preprocessing.from_cache`, or augmentation's own resize), the DataModule
and the predictor (step 4: :func:`cxrlearn.data.pipeline.normalize.normalizer`), and the ONNX export (whose
metadata is written from :meth:`Preprocessing.steps`); no other module states these facts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from cxrlearn.data.decoding.images import DECODING
from cxrlearn.errors import ConfigError

#: The sides an image may be cached or fed to the network at (training, the cache and bundles alike).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048
#: The resampling filters an image may be resized with, by the name the bundle records.
RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}
CACHE_RESAMPLING = "lanczos"
INPUT_RESAMPLING = "bilinear"


def resize_square(pixels: np.ndarray, size: int, resampling: str) -> np.ndarray:
    """A uint8 image resized to (size, size) with the named filter (returned as is when already that size)."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), RESAMPLING[resampling]), dtype=np.uint8)


#: The ranges a normalisation's mean and std may take (pixels are scaled to 0-1 before it): every timm model's
#: lie well inside them, and numbers outside them (a std of 1e-300, a mean of 1e300) can only give
#: non-finite inputs, hence blank probabilities.
MEAN_RANGE, STD_RANGE = (-1.0, 2.0), (1e-3, 100.0)


@dataclass(frozen=True)
class Preprocessing:
    """Decoded grayscale pixels -> the network's input (module docstring)."""

    cache_size: int
    input_size: int
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cache_resampling: str = CACHE_RESAMPLING
    input_resampling: str = INPUT_RESAMPLING

    def __post_init__(self):
        for name in ("cache_size", "input_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
                raise ConfigError(f"preprocessing.{name} must be a whole number from {MIN_IMAGE_SIZE} to "
                                  f"{MAX_IMAGE_SIZE}, not {value!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ConfigError(f"preprocessing.channels must be 1 or 3, not {self.channels!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
                raise ConfigError(f"preprocessing.{name} must be 3 numbers, not {list(values)!r}")
        low, high = MEAN_RANGE
        if not all(low <= v <= high for v in self.mean):
            raise ConfigError(f"preprocessing.mean must be 3 numbers from {low} to {high} (pixels are scaled to "
                              f"0-1 first), not {list(self.mean)!r}")
        low, high = STD_RANGE
        if not all(low <= v <= high for v in self.std):
            raise ConfigError(f"preprocessing.std must be 3 positive numbers from {low} to {high} (pixels are "
                              f"scaled to 0-1 first), not {list(self.std)!r}")
        for name in ("cache_resampling", "input_resampling"):
            if getattr(self, name) not in RESAMPLING:
                raise ConfigError(f"preprocessing.{name} must be one of {', '.join(RESAMPLING)}, "
                                  f"not {getattr(self, name)!r}")

    @classmethod
    def for_run(cls, mean: Sequence[float], std: Sequence[float], input_size: int, cache_size: int | None = None,
                channels: int = 3) -> Preprocessing:
        """A run's preprocessing: the backbone's mean and std (timm), the run's sizes and channels."""
        return cls(cache_size=int(cache_size or input_size), input_size=int(input_size), channels=int(channels),
                   mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))

    @classmethod
    def for_cache(cls, size: int) -> Preprocessing:
        """What ``cxrlearn prepare`` needs before any backbone is chosen: steps 1-2 at ``size`` px. The cache
        stores pixels before normalisation, so the mean and std here (0.5 and 0.5) are never applied; a run
        reading the cache brings its own (:meth:`for_run`, with the same ``cache_size``)."""
        return cls(cache_size=size, input_size=size, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def same_cache(self, other: Preprocessing) -> bool:
        """Whether a cache made with ``other`` serves this preprocessing (steps 1-2 agree)."""
        return (self.cache_size, self.cache_resampling) == (other.cache_size, other.cache_resampling)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        known = set(cls.__dataclass_fields__)
        if not isinstance(values, dict) or not {"cache_size", "input_size", "channels", "mean", "std"} <= set(values):
            raise ConfigError(f"preprocessing must be an object with cache_size, input_size, channels, mean and std, "
                              f"not {values!r}"[:300])
        unknown = set(values) - known - {"decoding", "scale"}
        if unknown:
            raise ConfigError(f"preprocessing has unknown field(s) {', '.join(sorted(unknown))}")
        fields = {k: v for k, v in values.items() if k in known}
        for name in ("mean", "std"):
            if not isinstance(fields[name], (list, tuple)):
                raise ConfigError(f"preprocessing.{name} must be 3 numbers, not {fields[name]!r}")
            fields[name] = tuple(fields[name])
        return cls(**fields)

    def to_dict(self) -> dict:
        """JSON-ready, with the decoding rules and the scaling written out for a reader of the bundle."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "scale": "pixels / 255",
                "decoding": DECODING}

    def cached(self, decoded: np.ndarray) -> np.ndarray:
        """Step 2: a decoded image as the preprocessing cache stores it."""
        return resize_square(decoded, self.cache_size, self.cache_resampling)

    def model_pixels(self, decoded: np.ndarray) -> np.ndarray:
        """Steps 2-3: a decoded image as the network's (S, S) uint8 input (writable, owned)."""
        return np.array(self.from_cache(self.cached(decoded)))

    def from_cache(self, cached: np.ndarray) -> np.ndarray:
        """Step 3: a cached image at the network's input size."""
        return resize_square(cached, self.input_size, self.input_resampling)

    def steps(self) -> list[str]:
        """The steps in words (the ONNX file's metadata)."""
        return [
            f"decode to 8-bit grayscale ({DECODING})",
            f"resize to {self.cache_size} px square, {self.cache_resampling}",
            f"resize to {self.input_size} px square, {self.input_resampling} (no-op when equal)",
            f"{self.channels} channel(s) of (pixels / 255 - mean) / std, mean {list(self.mean)}, std {list(self.std)}",
        ]
