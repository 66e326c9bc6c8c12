"""`cxrlearn predict` on a folder of real images against the model alone, side by side in one run.

The model alone: the Predictor's network and input check on batches already decoded and prepared
(``predict_prepared``), the ceiling ``predict`` can reach. Then ``predict_files`` on the same files
(decode, check, resize, predict, in file order) with 0 worker processes (decoding between batches, as before
workers) and with each count given. Images per second; the ratio to the model alone is the goal's (>= 0.8).

Usage: python benchmarks/predict_throughput.py --model RUN_DIR [--runtime torch|onnx|onnx-int8]
       [--images DIR] [--count 320] [--repeat 1] [--batch 16] [--workers 1 2]
"""

from __future__ import annotations

import time
from pathlib import Path

from _common import machine, parser

from cxrlearn.data.decoding.images import load_grayscale_and_colour
from cxrlearn.inference.predictor import Predictor


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--runtime", default="torch")
    p.add_argument("--images", type=Path, help="default: the sample's 256 px images")
    p.add_argument("--count", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="each file this many times (few large images: amortises "
                   "the worker processes' start)")
    args = p.parse_args()
    folder = args.images or args.data / "nih-sample" / "images-256"
    paths = sorted(folder.glob("*.png"))[: args.count] * args.repeat
    predictor = Predictor(args.model, runtime=args.runtime)
    prepared = [predictor.prepare(*load_grayscale_and_colour(path)) for path in paths]
    names = [path.name for path in paths]
    print(f"# predict on {len(paths)} images of {folder.name} ({predictor.meta.backbone} at {predictor.image_size} px, "
          f"runtime {args.runtime}, tta {predictor.tta}, batch {args.batch}); {machine()}")
    predictor.predict_prepared(prepared[: args.batch], names[: args.batch])  # warm-up

    started = time.perf_counter()
    for i in range(0, len(prepared), args.batch):
        predictor.predict_prepared(prepared[i:i + args.batch], names[i:i + args.batch])
    alone = len(prepared) / (time.perf_counter() - started)
    print("| what | images/s | of the model alone |")
    print("|---|---|---|")
    print(f"| the model alone (already decoded and prepared) | {alone:.1f} | 1.00 |")
    for workers in [0, *args.workers]:
        started = time.perf_counter()
        predictions, failures = predictor.predict_files(paths, batch_size=args.batch, progress=False, workers=workers)
        rate = len(predictions) / (time.perf_counter() - started)
        assert len(predictions) == len(paths) and not failures
        print(f"| predict_files, {workers} worker process(es) | {rate:.1f} | {rate / alone:.2f} |")


if __name__ == "__main__":
    main()
