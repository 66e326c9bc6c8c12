"""Knowing when not to answer: is an input a frontal chest X-ray like the ones the model was trained on?

Three kinds of evidence, each with the reason it gives:

1. **Cheap checks** on the decoded image, before the network (:func:`cheap_reasons`): far below the
   training resolution (small, or enlarged from a thumbnail), strongly non-square, colour, near-constant,
   without any large-scale structure (a texture), saturated.
2. **Layout** (learned): chest X-rays are taken in one pose, so an 8×8 thumbnail of the network's input
   is well described by a Gaussian fitted to the training images (shrunk covariance, Ledoit & Wolf 2004).
   An image that this Gaussian finds more likely *turned* by 90°, 180° or 270°, flipped upside down, or
   with its grey levels inverted, than *as it is*, is flagged with that reason. The test compares the
   image with itself, so it needs no threshold: on the run's validation images the nearest other
   orientation is at least about twice as far as the image's own. The turn is named as the reason only
   when the turned image's layout is as usual as a validation image's (below their 99th percentile) and
   it halves the distance (:data:`TURN_MARGIN`); otherwise the image is unlike a chest X-ray in any
   orientation, and the reason says so.
3. **Features** (learned): the Mahalanobis distance of the backbone's pooled features from their
   distribution on the training images (class-agnostic; Lee et al., NeurIPS 2018, with a shrunk
   covariance), flagged above the 99th percentile of the run's validation images. ``input_score`` is
   this distance over that threshold: 1.0 at the threshold, ``ok`` below it.

The learned parts are fitted at the end of training (:func:`fit_input_check`) and stored in the bundle
(``input_check.safetensors``; its description in ``model.json``). A bundle made before them still
predicts, and says that the check is unavailable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save
from sklearn.covariance import LedoitWolf

from cxrlearn._files import write_atomic
from cxrlearn.errors import ConfigError
from cxrlearn.model.bundle import read_safetensors
from cxrlearn.model.meta import INPUT_CHECK_FILE, InputCheckFit

FILE = INPUT_CHECK_FILE
OK = "ok"
#: The side of the layout thumbnail.
LAYOUT_SIDE = 8
#: The validation percentile the feature distance is thresholded at.
PERCENTILE = 99.0
#: Images (at most) of each split the learned parts are fitted on: enough for a 1,280-wide covariance.
MAX_FIT_IMAGES = 20_000
# Cheap checks: what a chest X-ray never is.
MAX_ASPECT = 2.0  # longer side over shorter side
MIN_STD = 8.0  # grey levels (0-255) over the whole image
MIN_LAYOUT_STD = 12.0  # grey levels over the 8×8 thumbnail (lungs against mediastinum): 21.8 at least on
#                        the 1,115 sample X-rays, 2.5-7.4 on photographs of grass, gravel, brick and the moon
MAX_SATURATED = 0.5  # share of pixels at 0 or 255
MAX_COLOUR = 12.0  # mean absolute difference between colour channels, grey levels
# An image upscaled from a thumbnail, judged on a 256 px view of it. On the 1,115 sample X-rays at 256 px and the
# 48 at 1,024 px none is flagged; of the same images shrunk to 32 px and enlarged back to 256 or 1,024 px (nearest,
# bilinear, bicubic, Lanczos) 99.7-100% are (tests/test_input_check.py).
DETAIL_SIDE = 256
MAX_EQUAL_NEIGHBOURS = 0.75  # share of pixels equal to their neighbour: 0.12-0.67 on X-rays, >= 0.88 enlarged by
#                               repeating pixels (nearest neighbour) from 32 px
MIN_FINE_DETAIL = 1.0  # grey levels lost on going to a quarter of the side and back: 1.29 at least on X-rays,
#                        at most 1.25 on smooth enlargements from 32 px (median 0.6)
MIN_FINE_SHARE = 0.15  # that loss over the loss at a sixteenth of the side: 0.19 at least on X-rays
#: A turn is named as the reason only when it halves the layout distance: turned sample X-rays fit at most 0.39×
#: their distance as they lie (95th percentile), photographs 0.37-1.16× (median 0.7): a picture that merely
#: fits a little better turned is unlike a chest X-ray, not a turned one.
TURN_MARGIN = 0.5

#: The turns the layout test tries, with the reason each gives when it fits better.
TURNS = {
    # Named by how the image lies: one that a quarter turn anticlockwise puts right was turned clockwise.
    "rotated 90° clockwise": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rotated by 180°": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "rotated 90° anticlockwise": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "upside down": lambda a: a[..., ::-1, :],
    "inverted (a negative)": lambda a: 255 - a,
}


class Reason(str, Enum):
    """The kinds of reason an input is flagged for: what code counts and compares (``metrics.json``'s
    ``input_check.reasons`` is keyed by these values), where :class:`Flag` is what a person reads."""

    SMALL = "far below the training resolution"
    NON_SQUARE = "strongly non-square"
    COLOUR = "a colour image"
    CONSTANT = "near-constant"
    TEXTURE = "no large-scale structure, as in a texture"
    SATURATED = "saturated"
    ENLARGED = "enlarged from a small image"
    ROTATED_CLOCKWISE = "looks rotated 90° clockwise"
    ROTATED_180 = "looks rotated by 180°"
    ROTATED_ANTICLOCKWISE = "looks rotated 90° anticlockwise"
    UPSIDE_DOWN = "looks upside down"
    INVERTED = "looks inverted (a negative)"
    NO_ORIENTATION = "unlike a chest X-ray in any orientation"
    UNLIKE_TRAINING = "unlike the training images"


class Flag(str):
    """Why an input was flagged: the text a person reads (a ``str``, as before), with its :class:`Reason`."""

    kind: Reason

    def __new__(cls, kind: Reason, detail: str = "") -> Flag:
        flag = super().__new__(cls, kind.value + detail)
        flag.kind = kind
        return flag

    def __reduce__(self):  # pickles (to loader or decoder processes) as its kind and detail
        return Flag, (self.kind, str(self)[len(self.kind.value):])


@dataclass(frozen=True)
class Verdict:
    """One input's check: ``ok`` or ``warning: <reason>``, and its feature score (None where not computed)."""

    reason: Flag | None
    score: float | None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def text(self) -> str:
        return OK if self.reason is None else f"warning: {self.reason}"


UNAVAILABLE = "unavailable: this bundle has no input check (made before cxrlearn learned one)"


def cheap_reasons(decoded: np.ndarray, colour: float = 0.0, input_size: int | None = None) -> Flag | None:
    """The first reason a decoded 8-bit grayscale image is not a chest X-ray, from its pixels alone, or None.

    ``colour``: the source's mean absolute difference between colour channels (0 for a gray file).
    ``input_size``: the network's input side; an image under half of it is far below the resolution the model
    learned from (a 32 px thumbnail for a 256 px model).
    """
    height, width = decoded.shape[-2:]
    if input_size is not None and min(height, width) < input_size / 2:
        return Flag(Reason.SMALL, f" ({width}×{height} px; the model takes {input_size} px, and details it learned "
                                  "from are not there)")
    if max(height, width) > MAX_ASPECT * min(height, width):
        return Flag(Reason.NON_SQUARE, f" ({width}×{height} px)")
    if colour > MAX_COLOUR:
        return Flag(Reason.COLOUR, f" (channels differ by {colour:.0f} grey levels on average)")
    # OpenCV's passes over the pixels, not NumPy's (a float copy of a 1,024 px image, and two boolean ones): the
    # same figures, exact in float64, in a tenth of the time (tests/test_input_check.py compares them).
    spread = grey_spread(decoded)
    if spread < MIN_STD:
        return Flag(Reason.CONSTANT, f" (grey-level spread {spread:.1f})")
    coarse = float(layout(decoded[None]).std())
    if coarse < MIN_LAYOUT_STD:
        return Flag(Reason.TEXTURE, f" (8×8 grey-level spread {coarse:.1f})")
    saturated = saturated_share(decoded)
    if saturated > MAX_SATURATED:
        return Flag(Reason.SATURATED, f" ({saturated:.0%} of pixels at black or white)")
    if min(height, width) >= DETAIL_SIDE and (input_size is None or input_size >= DETAIL_SIDE / 2):
        return upscaled_reason(decoded)
    return None


def grey_spread(decoded: np.ndarray) -> float:
    """The standard deviation of a uint8 image's grey levels."""
    return float(cv2.meanStdDev(np.ascontiguousarray(decoded))[1][0, 0])


def saturated_share(decoded: np.ndarray) -> float:
    """The share of a uint8 image's pixels at black (0) or white (255)."""
    inside = cv2.countNonZero(cv2.inRange(np.ascontiguousarray(decoded), 1, 254))
    return 1.0 - inside / decoded.size


def _detail_lost(view: np.ndarray, factor: int) -> float:
    """Mean grey levels lost on shrinking ``view`` to 1/``factor`` of its side (box) and enlarging it back (bicubic)."""
    image = Image.fromarray(view)
    small = image.resize((view.shape[1] // factor, view.shape[0] // factor), Image.Resampling.BOX)
    return float(np.mean(np.abs(np.asarray(small.resize(image.size, Image.Resampling.BICUBIC), np.float32) - view)))


def upscaled_reason(decoded: np.ndarray) -> Flag | None:
    """Whether an image of at least :data:`DETAIL_SIDE` px is an enlarged thumbnail: its pixels repeat in blocks,
    or a :data:`DETAIL_SIDE` px view of it has almost no detail finer than a quarter of its side."""
    view = np.asarray(Image.fromarray(decoded).resize((DETAIL_SIDE, DETAIL_SIDE), Image.Resampling.BOX))
    wide = view.astype(np.int16)
    equal = (float(np.mean(wide[:, 1:] == wide[:, :-1])) + float(np.mean(wide[1:] == wide[:-1]))) / 2
    fine = _detail_lost(view, 4)
    if equal > MAX_EQUAL_NEIGHBOURS or fine < MIN_FINE_DETAIL or fine < MIN_FINE_SHARE * _detail_lost(view, 16):
        return Flag(Reason.ENLARGED, f" (it has almost no detail finer than {DETAIL_SIDE // 4} px across): far below "
                                     "the training resolution")
    return None


def layout(model_pixels: np.ndarray) -> np.ndarray:
    """(N, S, S) uint8 network inputs -> (N, 64) 8×8 thumbnails (box-averaged grey levels)."""
    side = LAYOUT_SIDE
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(p)).resize((side, side), Image.Resampling.BOX),
                                dtype=np.float64).ravel() for p in model_pixels])


def _gaussian(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fitted = LedoitWolf().fit(np.asarray(samples, dtype=np.float64))
    return fitted.location_.astype(np.float32), fitted.precision_.astype(np.float32)


def _distance(samples: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances of the rows of ``samples``."""
    centred = np.asarray(samples, dtype=np.float64) - mean
    return ((centred @ precision.astype(np.float64)) * centred).sum(axis=1)  # a matrix product: BLAS


@dataclass
class InputCheck:
    layout_mean: np.ndarray
    layout_precision: np.ndarray
    feature_mean: np.ndarray
    feature_precision: np.ndarray
    #: How it was fitted, and its thresholds: what ``model.json`` says of it (the arrays are in :data:`FILE`).
    fit: InputCheckFit

    @property
    def threshold(self) -> float:
        return self.fit.threshold

    def save(self, folder: str | os.PathLike) -> None:
        """Its arrays in ``folder`` / ``fit.file`` (:data:`FILE`, or an int8 file's own)."""
        arrays = {"layout_mean": self.layout_mean, "layout_precision": self.layout_precision,
                  "feature_mean": self.feature_mean, "feature_precision": self.feature_precision}
        write_atomic(Path(folder) / _file_name(self.fit),
                     save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}))

    @classmethod
    def load(cls, folder: str | os.PathLike, described: InputCheckFit) -> InputCheck:
        name = _file_name(described)
        path = Path(folder) / name
        arrays = read_safetensors(path, f"{folder}: an input check is described but {name} is missing", load_file)
        side = LAYOUT_SIDE * LAYOUT_SIDE
        width = arrays.get("feature_mean", np.zeros(0)).shape[0]
        shapes = {"layout_mean": (side,), "layout_precision": (side, side), "feature_mean": (width,),
                  "feature_precision": (width, width)}
        for name, shape in shapes.items():
            if name not in arrays or arrays[name].shape != shape or not np.isfinite(arrays[name]).all():
                raise ConfigError(f"{path}: {name} is missing, damaged or not {shape}")
        return cls(arrays["layout_mean"], arrays["layout_precision"], arrays["feature_mean"],
                   arrays["feature_precision"], described)

    # ---- judging ------------------------------------------------------------------------------------
    def turned_reasons(self, model_pixels: np.ndarray) -> list[Flag | None]:
        """Per image: the turn (or inversion) under which it fits the training layout better than as it is."""
        own = _distance(layout(model_pixels), self.layout_mean, self.layout_precision)
        best = np.full(len(own), np.inf)
        turns: list[str | None] = [None] * len(own)
        for reason, turn in TURNS.items():
            turned = _distance(layout(turn(model_pixels)), self.layout_mean, self.layout_precision)
            for i in np.flatnonzero((turned < own) & (turned < best)):
                best[i], turns[i] = turned[i], reason
        usual = self.fit.layout_threshold or np.inf
        return [None if turn is None
                else Flag(Reason(f"looks {turn}"), ": it fits the training images better put right")
                if best[i] <= usual and best[i] <= TURN_MARGIN * own[i]
                else Flag(Reason.NO_ORIENTATION, " (its layout fits none)")
                for i, turn in enumerate(turns)]

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Feature distance over the threshold: above 1 is unlike the training images."""
        return _distance(features, self.feature_mean, self.feature_precision) / self.threshold

    def judge(self, model_pixels: np.ndarray, features: np.ndarray | None, cheap: list[Flag | None] | None = None
              ) -> list[Verdict]:
        """Verdicts for (N, S, S) uint8 network inputs and their (N, D) pooled features (None where the runtime
        gives none, as an ONNX file exported before they were an output: the other checks only)."""
        turned = self.turned_reasons(model_pixels)
        scores = self.scores(features) if features is not None else [None] * len(turned)
        cheap = cheap or [None] * len(turned)
        verdicts = []
        for first, turn, score in zip(cheap, turned, scores):
            unusual = score is not None and score > 1
            reason = first or turn or (Flag(Reason.UNLIKE_TRAINING, f" (feature distance {score:.1f}× the threshold)")
                                       if unusual else None)
            verdicts.append(Verdict(reason, None if score is None else round(float(score), 4)))
        return verdicts


def _file_name(fit: InputCheckFit) -> str:
    """The file an input check's arrays are in: a plain name in the bundle's folder, never a path."""
    if not fit.file or Path(fit.file).name != fit.file or fit.file.startswith("."):
        raise ConfigError(f"an input check's file must be a plain name in the bundle's folder, not {fit.file!r}")
    return fit.file


def refit_features(check: InputCheck, train_features: np.ndarray, val_features: np.ndarray, file: str
                   ) -> InputCheck:
    """``check`` with its feature part fitted again on another runtime's pooled features of the training images,
    and its threshold at the same percentile of that runtime's validation features (an int8 file's own features
    are not the float model's); the layout part, which reads pixels alone, is kept. Saved as ``file``."""
    if len(train_features) < 2 or len(val_features) < 1:
        raise ConfigError("the input check needs at least 2 training images and 1 validation image")
    feature_mean, feature_precision = _gaussian(train_features)
    percentile = check.fit.percentile or PERCENTILE
    threshold = float(np.percentile(_distance(val_features, feature_mean, feature_precision), percentile))
    fit = check.fit.model_copy(update={"file": file, "threshold": threshold, "train_images": len(train_features),
                                       "val_images": len(val_features), "percentile": percentile})
    return InputCheck(check.layout_mean, check.layout_precision, feature_mean, feature_precision, fit)


def fit_input_check(train_layouts: np.ndarray, train_features: np.ndarray, val_features: np.ndarray,
                    val_layouts: np.ndarray | None = None) -> InputCheck:
    """The learned parts from the training images' layouts (:func:`layout` of their network inputs) and
    pooled features; the thresholds from the validation images' features (and layouts)."""
    if len(train_features) < 2 or len(val_features) < 1:
        raise ConfigError("the input check needs at least 2 training images and 1 validation image")
    layout_mean, layout_precision = _gaussian(train_layouts)
    feature_mean, feature_precision = _gaussian(train_features)
    threshold = float(np.percentile(_distance(val_features, feature_mean, feature_precision), PERCENTILE))
    fit = InputCheckFit(
        file=FILE, threshold=threshold, train_images=len(train_features), val_images=len(val_features),
        method="Mahalanobis distance of pooled backbone features (Ledoit-Wolf shrunk covariance), 8x8 layout "
               "Gaussian for orientation and inversion, and pixel checks", percentile=PERCENTILE)
    if val_layouts is not None:
        fit.layout_threshold = float(np.percentile(_distance(val_layouts, layout_mean, layout_precision), PERCENTILE))
    return InputCheck(layout_mean, layout_precision, feature_mean, feature_precision, fit)
