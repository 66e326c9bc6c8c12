"""The input check of a trained bundle: what it flags, and what it costs per image beside the network.

Judged groups: the run's test-split images present in --images (patients the run never saw), the same
images rotated by 90° and 180° and flipped upside down, and scikit-image's sample pictures (photographs,
micrographs, text, textures: none an X-ray) in grayscale. Then, on the test images, the time per image
of each part of the check (pixel checks, the layout test over its five turns, the feature distance) and
of the network's forward pass, in one run, one thread count.

Usage: python benchmarks/input_check.py --model RUN_DIR [--images DIR] [--repeats 3]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import machine, parser
from skimage import color, data as samples

from cxrlearn.data.decoding.images import attach_images, load_grayscale
from cxrlearn.data.sources.nih import read_label_table
from cxrlearn.inference.predictor import Predictor
from cxrlearn.model.input_check import cheap_reasons

PHOTOS = ["camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "clock", "grass",
          "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "retina", "cat", "cell"]


def best_of(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--images", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    images_dir = args.images or args.data / "nih-sample" / "images-256"
    predictor = Predictor(args.model)
    split = pd.read_csv(args.model / predictor.meta.split.file)
    present = attach_images(read_label_table(), images_dir).table
    test = present[present["image"].isin(split.loc[split["split"] == "test", "image"])]
    xrays = [load_grayscale(path) for path in test["path"]]
    photos = []
    for name in PHOTOS:
        image = getattr(samples, name)()
        photos.append((color.rgb2gray(image[..., :3]) * 255).astype(np.uint8) if image.ndim == 3 else image)
    groups = {"test split (other patients)": xrays, "rotated 90°": [np.rot90(a).copy() for a in xrays],
              "rotated 180°": [np.rot90(a, 2).copy() for a in xrays], "upside down": [a[::-1].copy() for a in xrays],
              "scikit-image sample pictures": photos}
    print(f"# input check of {args.model.name} ({predictor.meta.backbone}, {predictor.image_size} px); {machine()}, "
          f"{torch.get_num_threads()} threads")
    print("| images | n | flagged | median input_score |")
    print("| --- | --- | --- | --- |")
    for name, group in groups.items():
        judged = predictor.predict(group, [str(i) for i in range(len(group))])
        flagged = np.mean([j.flagged for j in judged])
        print(f"| {name} | {len(group)} | {flagged:.1%} | {np.median([j.input_score for j in judged]):.2f} |")

    check = predictor.input_check
    batch = np.stack([predictor.model_pixels(a) for a in xrays])[:, None]
    features, _ = predictor.features_and_logits(batch)
    n = len(batch)
    parts = {
        "pixel checks (on the decoded images)": lambda: [cheap_reasons(a) for a in xrays],
        "layout test (8×8 thumbnails, five turns)": lambda: check.turned_reasons(batch[:, 0]),
        "feature distance (Mahalanobis)": lambda: check.scores(features),
        "the network (backbone + head, one pass)": lambda: predictor.features_and_logits(batch),
    }
    print()
    print("| part | ms per image |")
    print("| --- | --- |")
    for name, function in parts.items():
        print(f"| {name} | {1000 * best_of(function, args.repeats) / n:.2f} |")


if __name__ == "__main__":
    main()
