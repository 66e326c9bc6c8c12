"""PyTorch against ONNX Runtime on this CPU: single-image latency and batch throughput.

Both run the same bundle on the same real sample images, preprocessed once (uint8
batches at the model's size), so only the network is timed; flip averaging is off
for both (one forward pass per image). Also checks their probabilities agree.

With ``RUN_DIR/model.int8.onnx`` (``cxrlearn export --int8``), the int8 model too.

Usage: python benchmarks/onnx_latency.py --model RUN_DIR [--onnx FILE] [--batch 32] [--repeats 20]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from _common import machine, parser

from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.inference.predictor import Predictor
from cxrlearn.model.quantize import INT8_FILE


def timed(function, repeats: int) -> list[float]:
    function()  # warm-up
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--onnx", type=Path)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    runtimes = {"torch": Predictor(args.model), "onnx": Predictor(args.model, runtime="onnx", onnx_path=args.onnx)}
    if (args.model / INT8_FILE).is_file():  # made by `cxrlearn export --model RUN --int8`
        runtimes["onnx-int8"] = Predictor(args.model, runtime="onnx-int8")
    for predictor in runtimes.values():
        predictor.tta = False
    paths = sorted((args.data / "nih-sample" / "images-256").glob("*.png"))[: args.batch]
    any_predictor = runtimes["torch"]
    batch = np.stack([any_predictor.model_pixels(load_grayscale(path)) for path in paths])[:, None]
    print(f"# {any_predictor.meta.backbone} at {any_predictor.image_size} px; {machine()}")
    probs = {name: 1 / (1 + np.exp(-pred.logits(batch))) for name, pred in runtimes.items()}
    for name in probs:
        if name != "torch":
            print(f"max |probability difference| {name} - torch over {len(batch)} images: "
                  f"{np.abs(probs['torch'] - probs[name]).max():.2e}")
    print("| runtime | single image p50 (ms) | single image p90 (ms) | batch of "
          f"{len(batch)} (images/s) |")
    print("|---|---|---|---|")
    for name, predictor in runtimes.items():
        single = np.array(timed(lambda: predictor.logits(batch[:1]), args.repeats)) * 1000
        whole = timed(lambda: predictor.logits(batch), max(3, args.repeats // 4))
        print(f"| {name} | {np.percentile(single, 50):.1f} | {np.percentile(single, 90):.1f} | "
              f"{len(batch) / np.median(whole):.1f} |")


if __name__ == "__main__":
    main()
