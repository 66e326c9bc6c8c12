"""Predicting on image files or uploads with a model bundle, on PyTorch or ONNX Runtime.

Preprocessing is training's: the bundle's :class:`cxrlearn.data.preprocessing.Preprocessing`
(decode, resize as the cache does, resize as the loader does, normalise; the last step inside
the graph for ONNX).
Probabilities use the bundle's temperatures, positive calls its thresholds,
and flip averaging runs when the thresholds were chosen with it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cxrlearn import __version__
from cxrlearn._files import file_digest, utf8, write_atomic
from cxrlearn.data.columns import IMAGE
from cxrlearn.data.decoding.images import IMAGE_SUFFIXES, load_grayscale_and_colour, regular_file
from cxrlearn.data.pipeline.normalize import normalizer
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.inference import PREDICT_BATCH_SIZE, RUNTIMES
from cxrlearn.inference.outputs import positive_calls, probabilities
from cxrlearn.inference.openvino import OpenVinoSession
from cxrlearn.inference.predict import average_with_mirror, flip_averaged, mirror, torch_forward
from cxrlearn.model.bundle import WEIGHTS, bundle_digest, load_bundle, read_meta
from cxrlearn.model.export import ONNX_FILE, check_export, check_onnx_matches_bundle
from cxrlearn.model.quantize import INT8_FILE, int8_input_check
from cxrlearn.model.device import resolve_device
from cxrlearn.model.input_check import UNAVAILABLE, Flag, InputCheck, Verdict, cheap_reasons
from cxrlearn.model.meta import INPUT_CHECK_FILE
from cxrlearn.model.reference import Basis, ImageSummary, Reference, pixel_statistics, summaries


@dataclass(frozen=True)
class Provenance:
    """Which model gave an answer: the bundle's digest (:func:`cxrlearn.model.bundle.bundle_digest`), the runtime
    that ran it (torch, onnx, onnx-int8, openvino, openvino-int8: their probabilities differ), the SHA-256 of the
    file that runtime read (the bundle's weights, or the ONNX file), and the cxrlearn that ran it. Written beside every answer, so a result
    in a spreadsheet, a report or a log can be traced to what computed it."""

    model_sha256: str
    cxrlearn_version: str
    runtime: str = "torch"
    runtime_sha256: str = ""

    def columns(self) -> dict[str, str]:
        return {"model_sha256": self.model_sha256, "runtime": self.runtime, "runtime_sha256": self.runtime_sha256,
                "cxrlearn_version": self.cxrlearn_version}

    @property
    def answer_key(self) -> str:
        """What names this predictor's answers apart (DICOM results' UIDs derive from it): the bundle's digest,
        and for an ONNX runtime, which file ran it (its answers differ from torch's)."""
        if self.runtime == "torch":
            return self.model_sha256
        return f"{self.model_sha256}|{self.runtime}|{self.runtime_sha256}"

    def text(self) -> str:
        """One line, for reports and logs."""
        return (f"model {self.model_sha256} run by {self.runtime} (file {self.runtime_sha256}), "
                f"cxrlearn {self.cxrlearn_version}")


@dataclass
class Prediction:
    image: str
    probabilities: dict[str, float]
    positive: list[str] | None  # None when the bundle has no thresholds
    verdict: Verdict | None = None  # the input check's (cxrlearn.model.input_check); None: the bundle has none
    #: Findings without a threshold in a bundle that has thresholds (too few validation cases to establish one):
    #: a probability, and neither a positive nor a negative call.
    not_called: tuple[str, ...] = ()
    #: What the prediction log keeps of the image (:mod:`cxrlearn.model.reference`), where the predictor was
    #: asked for it (:attr:`Predictor.summarise`).
    summary: ImageSummary | None = None

    @property
    def input_check(self) -> str:
        """``ok``, ``warning: <reason>``, or that the check is unavailable."""
        return self.verdict.text if self.verdict else UNAVAILABLE

    @property
    def input_score(self) -> float | None:
        """The feature distance over its threshold (above 1 is unlike training), where computed."""
        return self.verdict.score if self.verdict else None

    @property
    def flagged(self) -> bool:
        return self.verdict is not None and not self.verdict.ok

    def row(self, findings: Sequence[str], provenance: Provenance | None = None) -> dict:
        """Flat: ``image``, one column per finding, ``positive_findings``, ``not_called`` and one 0/1 column per
        finding (empty where not called), then ``input_check`` and ``input_score``, then the provenance
        (:meth:`Provenance.columns`) when given."""
        out: dict = {IMAGE: self.image, **{name: self.probabilities[name] for name in findings}}
        if self.positive is not None:
            out["positive_findings"] = "|".join(self.positive)
            out["not_called"] = "|".join(self.not_called)
            out.update({f"{name}_positive": "" if name in self.not_called else int(name in self.positive)
                        for name in findings})
        out.update(input_check=self.input_check, input_score=self.input_score)
        if provenance is not None:
            out.update(provenance.columns())
        return out


def prediction_table(predictions: Sequence[Prediction], findings: Sequence[str], provenance: Provenance | None,
                     out: Path | None) -> int:
    """The predictions as ``predict`` writes them: one row each (:meth:`Prediction.row`), JSON when ``out`` ends in
    ``.json``, CSV otherwise, to ``out`` (atomically) or to standard output. A file name that is not UTF-8 is written
    with its odd bytes escaped, and no row is lost. Returns the rows written."""
    rows = [p.row(findings, provenance) for p in predictions]
    for row in rows:
        row[IMAGE] = utf8(row[IMAGE]).decode("utf-8")
    if out is not None and out.suffix.lower() == ".json":
        write_atomic(out, json.dumps(rows, indent=2) + "\n")
        return len(rows)
    text = pd.DataFrame(rows, columns=list(rows[0]) if rows else None).to_csv(index=False, float_format="%.9g")
    if out is not None:
        write_atomic(out, text)
    else:
        sys.stdout.write(text)
    return len(rows)


def find_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named, and the image/DICOM files (:data:`IMAGE_SUFFIXES`) found in folders named (recursively,
    sorted, never into a link loop); and ``(path, why)`` for each one that cannot be read as a file (a link to
    nothing or a loop, a FIFO, a device), named rather than skipped in silence, or read and waited on forever."""
    found: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif os.path.lexists(path):
            candidates = [path]
        else:
            raise DataError(f"{path}: no such file or folder")
        for candidate in candidates:
            kind = regular_file(candidate)
            if kind:
                found.append(candidate)
            elif kind is None:
                unreadable.append((str(candidate), f"{candidate}: a link to nothing, or a link loop"))
            elif not candidate.is_dir():
                unreadable.append((str(candidate), f"{candidate}: not a regular file (a FIFO or a device)"))
    return found, unreadable


@dataclass(frozen=True)
class Prepared:
    """An image ready for the network: its (S, S) uint8 input, and what the cheap checks found in the decoded file
    (:func:`cxrlearn.model.input_check.cheap_reasons`), which the network's input no longer shows."""

    pixels: np.ndarray
    cheap: Flag | None
    size: tuple[int, int] | None = None  # the decoded image's (width, height)


def prepare(preprocessing: Preprocessing, decoded: np.ndarray, colour: float = 0.0,
            size: tuple[int, int] | None = None) -> Prepared:
    """A decoded grayscale image (any size) as the network's input, resized as in training, with the cheap checks'
    finding (``colour``: the file's colour spread; ``size``: the file's own (width, height), where it was decoded
    reduced)."""
    return Prepared(preprocessing.model_pixels(decoded), cheap_reasons(decoded, colour, preprocessing.input_size),
                    size or (int(decoded.shape[-1]), int(decoded.shape[-2])))


#: The file each ONNX runtime reads in a bundle's folder.
ONNX_FILES = {"onnx": ONNX_FILE, "onnx-int8": INT8_FILE, "openvino": ONNX_FILE, "openvino-int8": INT8_FILE}
#: The export each runtime reads, by the runtime ``cxrlearn export`` recorded it for (``RUN/exports.json``).
EXPORTED_FOR = {"onnx": "onnx", "onnx-int8": "onnx-int8", "openvino": "onnx", "openvino-int8": "onnx-int8"}


class Predictor:
    """A model bundle ready to predict: ``Predictor(run_dir).predict([pixels], names)``."""

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "torch", onnx_path: str | os.PathLike | None = None,
                 device: str = "auto", checked: bool = True):
        """``checked``: refuse an ONNX file that is not one ``cxrlearn export`` recorded for the bundle (false only
        for the files an export is judging before it writes them)."""

        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.model_dir = Path(model_dir)
        self.meta = read_meta(self.model_dir)
        self.findings: list[str] = list(self.meta.findings)
        self.preprocessing = self.meta.preprocessing
        self.thresholds: dict = self.meta.thresholds
        self.temperature: dict | None = self.meta.temperature
        self.tta = self.meta.tta
        self.runtime = runtime
        self.device = resolve_device(device)
        self._with_gradients: Predictor | None = self if runtime == "torch" else None
        self.input_check = InputCheck.load(self.model_dir, self.meta.input_check) if self.meta.input_check else None
        #: The bundle's monitoring reference (None without one), whose basis projects the features of summaries.
        self.reference = Reference.load(self.model_dir)
        self.reference_sha256 = Reference.digest(self.model_dir) if self.reference else None
        #: Whether each prediction carries an :class:`ImageSummary` (for the prediction log).
        self.summarise = False
        if runtime == "torch":
            self._load_torch()
            computed_by = file_digest(self.model_dir / WEIGHTS)
        else:
            path = Path(onnx_path) if onnx_path else self.model_dir / ONNX_FILES[runtime]
            computed_by, contract = self._load_onnx(path, checked)
            if EXPORTED_FOR[runtime] == "onnx-int8":  # an int8 file judges with its own features' fit, if it has one
                self.input_check = int8_input_check(path, contract) or self.input_check
        self.provenance = Provenance(bundle_digest(self.model_dir), __version__, runtime, computed_by)
        if self.input_check is not None:
            width = self.input_check.feature_mean.shape[0]
            features = (self.model.backbone.num_features if runtime == "torch"
                        else next((o.shape[-1] for o in self.session.get_outputs() if o.name == "features"), width))
            if width != features:
                raise ConfigError(f"{self.model_dir / INPUT_CHECK_FILE}: the input check describes {width} features, "
                                  f"but {self.meta.backbone} gives {features}: it is another run's")

    def _load_torch(self) -> None:
        self.model, _ = load_bundle(self.model_dir)
        # channels_last: oneDNN's and cuDNN's fast convolution layout (about 2x on a CPU, docs/benchmarks.md).
        self.model.to(self.device, memory_format=torch.channels_last)
        self.transform = normalizer(self.preprocessing).to(self.device)
        self._torch_forward = torch_forward(self.model, self.transform, self.device, channels_last=True)

    def _load_onnx(self, path: Path, checked: bool) -> tuple[str, dict]:
        """The session of ``path`` (ONNX Runtime's, or OpenVINO's); its SHA-256 and its cxrlearn contract."""
        import onnxruntime

        if not path.is_file():
            made_by = "--int8" if EXPORTED_FOR[self.runtime] == "onnx-int8" else f"--format onnx --out {path}"
            raise ConfigError(f"{path}: no ONNX model; make it with `cxrlearn export --model {self.model_dir} "
                              f"{made_by}`")
        if checked:
            digest, contract = check_export(path, self.model_dir, EXPORTED_FOR[self.runtime])
        else:
            contract, digest = check_onnx_matches_bundle(path, self.model_dir), file_digest(path)
        if self.runtime.startswith("openvino"):
            self.session = OpenVinoSession(path)
        else:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return digest, contract

    def with_gradients(self) -> Predictor:
        """This predictor when it runs torch, else the same bundle run by torch on the same device, made once:
        Grad-CAM needs gradients, which an ONNX runtime does not give."""
        if self._with_gradients is None:
            self._with_gradients = Predictor(self.model_dir, device=self.device)
        return self._with_gradients

    # ---- preprocessing ---------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The network's input side, in pixels."""
        return self.preprocessing.input_size

    def model_pixels(self, decoded: np.ndarray) -> np.ndarray:
        """A decoded grayscale image as the model's (S, S) uint8 input, resized as in training."""
        return self.preprocessing.model_pixels(decoded)

    # ---- the network -------------------------------------------------------------------------------------
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        return self.features_and_logits(batch)[1]

    def features_and_logits(self, batch: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """The backbone's pooled features and the logits (features None from an ONNX file exported before they
        were one of its outputs)."""
        if self.runtime != "torch":
            outputs = self.session.run(None, {"image": batch})
            return (outputs[1] if len(outputs) > 1 else None), outputs[0]
        return self._torch_forward(torch.from_numpy(batch))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits (B, F) of a uint8 batch (B, 1, S, S); mirrored and averaged when the bundle says so."""
        return flip_averaged(self._forward, batch) if self.tta else self._forward(batch)

    def _answer(self, batch: np.ndarray, cheap: list[Flag | None]
                ) -> tuple[np.ndarray | None, np.ndarray, list[Verdict | None]]:
        """The pooled features (None where the runtime gives none), logits and input check's verdicts of a batch."""
        features, logits = self.features_and_logits(batch)
        if self.tta:
            logits = average_with_mirror(logits, self._forward(mirror(batch)))
        if self.input_check is None:
            return features, logits, [Verdict(reason, None) if reason else None for reason in cheap]
        return features, logits, self.input_check.judge(batch[:, 0], features, cheap)

    def outputs(self, batch: np.ndarray, cheap: list[Flag | None] | None = None
                ) -> tuple[np.ndarray, list[Verdict | None]]:
        """Probabilities (B, F) of a uint8 batch of network inputs (B, 1, S, S), as predictions give them, and the
        input check's verdicts (``cheap``: reasons found in the files, when known)."""
        _, logits, verdicts = self._answer(batch, cheap or [None] * len(batch))
        return probabilities(logits, self.findings, self.temperature), verdicts

    def prepare(self, decoded: np.ndarray, colour: float = 0.0, size: tuple[int, int] | None = None) -> Prepared:
        """A decoded grayscale image (any size) as the network's input, with the cheap checks' finding."""
        return prepare(self.preprocessing, decoded, colour, size)

    def predict(self, images: Sequence[np.ndarray], names: Sequence[str],
                colours: Sequence[float] | None = None) -> list[Prediction]:
        """Predictions for decoded grayscale images (any size), each with its input check.

        ``colours``: each source file's colour spread (:func:`cxrlearn.data.decoding.images.colour_spread`).
        """
        colours = colours or [0.0] * len(images)
        return self.predict_prepared([self.prepare(image, colour) for image, colour in zip(images, colours)], names)

    def predict_prepared(self, prepared: Sequence[Prepared], names: Sequence[str]) -> list[Prediction]:
        """Predictions for images made ready by :meth:`prepare`, in one forward pass, each with its input check."""
        if not prepared:
            return []
        batch = np.stack([p.pixels for p in prepared])[:, None]
        features, logits, verdicts = self._answer(batch, [p.cheap for p in prepared])
        probs = probabilities(logits, self.findings, self.temperature)
        broken = ~(np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1))
        if broken.any():  # never a blank answer passed off as one: the bundle's numbers are at fault
            raise ConfigError(f"{self.model_dir}: the model gave non-finite outputs for {names[int(np.argmax(broken))]} "
                              "(its weights or preprocessing numbers are damaged): no answer is given")
        calls = positive_calls(probs, self.findings, self.thresholds) if self.thresholds else None
        not_called = tuple(f for f in self.findings if self.thresholds.get(f) is None) if self.thresholds else ()
        summarised = (summaries(batch[:, 0], features, self.reference.basis if self.reference else None,
                                [p.size for p in prepared]) if self.summarise else [None] * len(prepared))
        return [
            Prediction(
                image=name,
                probabilities={f: float(p) for f, p in zip(self.findings, row)},
                positive=None if calls is None else [f for f, c in zip(self.findings, calls[i]) if c],
                verdict=verdict,
                not_called=not_called,
                summary=summary,
            )
            for i, (name, row, verdict, summary) in enumerate(zip(names, probs, verdicts, summarised))
        ]

    def make_reference(self, batches: Iterable[tuple[np.ndarray, list[Flag | None]]], source: str,
                       basis: Basis | None = None) -> Reference:
        """The monitoring reference (:class:`cxrlearn.model.reference.Reference`) of images the model is known to
        be right for, given as batches of (B, S, S) uint8 network inputs with their cheap checks' reasons: their
        logits, input check, pixel statistics and features, projected on a basis fitted to those features (or on
        ``basis``: benchmarks/monitor.py compares one fitted on the training images, and finds it worse)."""
        features, logits, flagged, scores, stats = [], [], [], [], []
        for pixels, cheap in batches:
            batch = np.ascontiguousarray(pixels)[:, None]
            batch_features, batch_logits, verdicts = self._answer(batch, cheap)
            if batch_features is None:
                raise ConfigError(f"{self.model_dir}: the {self.runtime} runtime gives no features (an ONNX file "
                                  "exported before they were an output): make the reference with --runtime torch")
            features.append(batch_features)
            logits.append(batch_logits)
            flagged += [v is not None and not v.ok for v in verdicts]
            scores += [np.nan if v is None or v.score is None else v.score for v in verdicts]
            stats.append(pixel_statistics(pixels))
        if not features:
            raise ConfigError(f"no images to make {self.model_dir}'s reference from")
        everything = np.concatenate(features)
        basis = basis if basis is not None else Basis.fit(everything)
        return Reference(basis, tuple(self.findings), np.concatenate(logits).astype(np.float32),
                         basis.project(everything), np.concatenate(stats), np.array(flagged, dtype=bool),
                         np.array(scores, dtype=np.float32), source)

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = PREDICT_BATCH_SIZE,
                      progress: bool = True, workers: int = 0) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predictions for image files, in their order, and ``(file, error)`` for those that cannot be read; none
        is lost. ``workers`` processes decode and prepare files (:meth:`prepare`) ahead of the network, at most two
        batches each (0: this process does it, between batches)."""

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a whole number >= 1, not {batch_size!r}")
        if not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers must be a whole number >= 0, not {workers!r}")
        paths = [Path(p) for p in paths]
        names = display_names(paths)
        predictions: list[Prediction] = []
        failures: list[tuple[str, str]] = []
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr) as bar:
            for batch in prepared_files(paths, self.preprocessing, batch_size, workers):
                read = [(i, prepared) for i, prepared, _ in batch if prepared is not None]
                failures += [(str(paths[i]), error) for i, _, error in batch if error is not None]
                predictions += self.predict_prepared([p for _, p in read], [names[i] for i, _ in read])
                bar.update(len(batch))
        return predictions, failures


def prepared_files(paths: Sequence[Path], preprocessing: Preprocessing, batch_size: int, workers: int
                   ) -> Iterator[list[tuple[int, Prepared | None, str | None]]]:
    """Batches of image files made ready for the network (read and decoded by ``workers`` processes, or this one):
    ``(index, Prepared, None)`` each, or ``(index, None, why)`` for a file that cannot be read."""
    yield from DataLoader(_PreparedFiles(paths, preprocessing), batch_size=batch_size, num_workers=workers,
                          collate_fn=list, prefetch_factor=2 if workers else None)


class _PreparedFiles(Dataset):
    """Image files as ``(index, Prepared, None)``, or ``(index, None, why)`` for one that cannot be read: what
    :meth:`Predictor.predict_files`' loader workers give (the file's bytes are read and decoded there)."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing):
        self.paths, self.preprocessing = paths, preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Prepared | None, str | None]:
        try:
            decoded = load_grayscale_and_colour(self.paths[i], self.preprocessing.cache_size)
        except DataError as err:
            return i, None, str(err)
        return i, prepare(self.preprocessing, *decoded), None


def display_names(paths: Sequence[Path]) -> list[str]:
    """Each input's file name, or its path where two inputs share a name."""
    counts: dict[str, int] = {}
    for path in paths:
        counts[path.name] = counts.get(path.name, 0) + 1
    return [path.name if counts[path.name] == 1 else str(path) for path in paths]
