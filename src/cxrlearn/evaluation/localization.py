"""Where does the heat land? The pointing game (Zhang et al., ECCV 2016) against NIH's radiologist boxes.

For each box, the Grad-CAM of the box's finding is computed on its image; a
hit is the heatmap's maximum falling inside the box. Beside it stands the
baseline of a pointer that always points at the image centre, since chest
findings cluster there: a heatmap is only informative if it beats that.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from cxrlearn.data.columns import IMAGE
from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.data.sources.boxes import BOX_SPACE, FINDING
from cxrlearn.inference.gradcam import annotated_overlay, heatmaps
from cxrlearn.records import Record


def _inside(x: float, y: float, box) -> bool:
    return box.x <= x <= box.x + box.w and box.y <= y <= box.y + box.h


class Pointed(Record):
    """One box: where the heatmap peaked (in the boxes' 1,024 px space), and whether the peak, and the image's
    centre, fell in the box."""

    image: str
    finding: str
    hit: bool
    centre_hit: bool
    peak: list[float]


class FindingPointing(Record):
    boxes: int
    hits: int
    hit_rate: float
    centre_hit_rate: float


class PointingGame(Record):
    """``pointing_game.json``: hit rates overall and per finding, beside always pointing at the centre."""

    boxes: int
    images: int
    hit_rate: float | None
    centre_hit_rate: float | None
    per_finding: dict[str, FindingPointing]
    boxes_list: list[Pointed]


def pointing_game(predictor, paths: dict[str, Path], boxes: pd.DataFrame, overlays: str | os.PathLike | None = None,
                  progress: bool = True) -> PointingGame:
    """Hit rates per finding and overall for the boxes whose images are in ``paths`` (name -> file)."""

    rows = boxes[boxes[IMAGE].isin(paths)]
    results = []
    for box in tqdm(list(rows.itertuples(index=False)), desc="pointing game", unit="box", disable=not progress,
                    file=sys.stderr):
        name = getattr(box, IMAGE)
        decoded = load_grayscale(paths[name])
        heat = heatmaps(predictor, decoded, [getattr(box, FINDING)])[getattr(box, FINDING)]
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        scale = BOX_SPACE / heat.shape[0]
        x, y = (col + 0.5) * scale, (row + 0.5) * scale
        centre = BOX_SPACE / 2
        results.append(Pointed(image=name, finding=getattr(box, FINDING), hit=bool(_inside(x, y, box)),
                               centre_hit=bool(_inside(centre, centre, box)), peak=[float(x), float(y)]))
        if overlays is not None:
            probability = predictor.predict([decoded], [name])[0].probabilities[getattr(box, FINDING)]
            _save_overlay(Path(overlays), decoded, heat, box, probability, (predictor.thresholds or {}))
    per_finding: dict[str, list[Pointed]] = {}
    for result in results:
        per_finding.setdefault(result.finding, []).append(result)
    return PointingGame(
        boxes=len(results), images=len({r.image for r in results}),
        hit_rate=float(np.mean([r.hit for r in results])) if results else None,
        centre_hit_rate=float(np.mean([r.centre_hit for r in results])) if results else None,
        per_finding={name: FindingPointing(boxes=len(group), hits=sum(r.hit for r in group),
                                           hit_rate=float(np.mean([r.hit for r in group])),
                                           centre_hit_rate=float(np.mean([r.centre_hit for r in group])))
                     for name, group in sorted(per_finding.items())},
        boxes_list=results)


def _save_overlay(folder: Path, decoded: np.ndarray, heat: np.ndarray, box, probability: float,
                  thresholds: dict) -> None:
    """The annotated overlay at the image's own resolution, with the radiologist's box drawn on it."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    finding = getattr(box, FINDING)
    picture = annotated_overlay(decoded, heat, finding, probability, thresholds.get(finding))
    sy, sx = decoded.shape[0] / BOX_SPACE, decoded.shape[1] / BOX_SPACE
    corner = (int(box.x * sx), int(box.y * sy))
    far = (int((box.x + box.w) * sx), int((box.y + box.h) * sy))
    cv2.rectangle(picture, corner, far, (255, 255, 255), max(1, decoded.shape[1] // 256))
    stem = Path(getattr(box, IMAGE)).stem
    Image.fromarray(picture).save(folder / f"{stem}_{finding}.png")
