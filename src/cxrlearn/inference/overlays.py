"""Grad-CAM overlays of predictions, written as PNG files: which findings, from which network, under which names."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.errors import DataError
from cxrlearn.inference.gradcam import annotated_overlay, heatmaps
from cxrlearn.inference.predictor import Prediction, Predictor


def distinct_names(paths: list[Path]) -> dict[Path, str]:
    """A file name stem for each path, distinct across them: the stem alone where that is unique, else
    prefixed by as many parent folders as it takes (``a/x.png`` and ``b/x.png`` -> ``a__x``, ``b__x``)."""
    names, depth = {}, 0
    pending = list(paths)
    while pending:
        candidates = {p: "__".join([*p.parent.parts[len(p.parent.parts) - depth:], p.stem] if depth else [p.stem])
                      for p in pending}
        counts: dict[str, int] = {}
        for name in candidates.values():
            counts[name] = counts.get(name, 0) + 1
        taken = set(names.values())
        still = []
        for p, name in candidates.items():
            if counts[name] == 1 and name not in taken or depth >= len(p.parent.parts):
                names[p] = name if name not in taken else f"{name}__{len(names)}"
            else:
                still.append(p)
        pending, depth = still, depth + 1
    return names


def write_overlays(predictor: Predictor, paths: Sequence[Path], predictions: Sequence[Prediction], out: Path,
                   findings: Sequence[str] | None = None) -> list[Path]:
    """One overlay per image and finding, ``out/<name>_<finding>.png``, at the image's own resolution with the
    finding, probability, threshold and a colour scale written on it: the given findings, else the image's
    positive ones, else its most probable. ``paths[i]`` is the file ``predictions[i]`` was made from.

    Grad-CAM needs gradients, so an ONNX predictor's overlays come from the same bundle run by torch.
    """
    unknown = [f for f in findings or [] if f not in predictor.findings]
    if unknown:
        raise DataError(f"--cam-findings: unknown finding(s) {', '.join(unknown)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = distinct_names([Path(p) for p in paths])
    written = []
    for path, prediction in zip(paths, predictions):
        chosen = list(findings or prediction.positive or [max(prediction.probabilities, key=prediction.probabilities.get)])
        decoded = load_grayscale(path)
        for finding, heat in heatmaps(predictor, decoded, chosen).items():
            target = out / f"{stems[Path(path)]}_{finding}.png"
            picture = annotated_overlay(decoded, heat, finding, prediction.probabilities[finding],
                                        (predictor.thresholds or {}).get(finding))
            Image.fromarray(picture).save(target)
            written.append(target)
    return written
