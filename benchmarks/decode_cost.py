"""What one full-size PNG costs before the network, step by step, on one core, and what that allows `predict`.

Each step of ``Predictor.prepare(*load_grayscale_and_colour(path))`` timed on its own over the same files (best
of three passes), the old way beside the new where a step changed: Pillow's PNG decoder against OpenCV's (the
same pixels), NumPy's grey-level spread and saturated share against OpenCV's (the same figures). Then the bound
the machine sets: with the network on every core, ``predict`` can reach at most
``network core-ms / (network core-ms + preparation core-ms)`` of the model alone. Last, the same images as JPEG
files, decoded in full and reduced (libjpeg's DCT scaling, as prediction does), and how far the answers move.

Usage: python benchmarks/decode_cost.py --model RUN_DIR [--runtime onnx]
       [--images DIR (default: the sample's 1,024 px PNGs)]
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, parser
from PIL import Image

from cxrlearn.data.decoding.images import colour_spread, decode_grayscale, decode_grayscale_and_colour
from cxrlearn.data.preprocessing import resize_square
from cxrlearn.inference.predictor import Predictor
from cxrlearn.model.input_check import cheap_reasons, grey_spread, layout, saturated_share, upscaled_reason


def best_ms(step, items, passes: int = 3) -> float:
    """The fastest pass's milliseconds per item."""
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        for item in items:
            step(item)
        best = min(best, (time.perf_counter() - started) / len(items) * 1000)
    return best


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L")).copy()


def numpy_figures(pixels: np.ndarray) -> tuple[float, float]:
    return float(np.asarray(pixels, np.float32).std()), float(np.mean((pixels == 0) | (pixels == 255)))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--runtime", default="onnx")
    p.add_argument("--images", type=Path, help="default: the sample's 1,024 px images")
    args = p.parse_args()
    paths = sorted((args.images or args.data / "nih-sample" / "images-1024").glob("*.png"))
    datas = [path.read_bytes() for path in paths]
    decoded = [decode_grayscale(data, str(path)) for data, path in zip(datas, paths)]
    predictor = Predictor(args.model, runtime=args.runtime)
    size = predictor.image_size
    print(f"# {len(paths)} PNGs of {paths[0].parent.name} ({decoded[0].shape[1]} px), to {size} px; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {machine()}")
    rows = [("decode: Pillow (before)", best_ms(pillow_decode, datas)),
            ("decode: cxrlearn, OpenCV's libpng (now)", best_ms(lambda d: decode_grayscale(d, "x"), datas)),
            ("colour spread (thumbnail of the file)", best_ms(colour_spread, datas)),
            ("spread and saturated share: NumPy (before)", best_ms(numpy_figures, decoded)),
            ("spread and saturated share: OpenCV (now)",
             best_ms(lambda x: (grey_spread(x), saturated_share(x)), decoded)),
            ("8x8 layout", best_ms(lambda x: layout(x[None]), decoded)),
            ("enlarged-thumbnail check", best_ms(upscaled_reason, decoded)),
            ("all pixel checks (now)", best_ms(lambda x: cheap_reasons(x, 0.0, size), decoded)),
            (f"resize to {size} px (Lanczos)", best_ms(lambda x: resize_square(x, size, "lanczos"), decoded)),
            ("whole preparation (now)", best_ms(lambda d: predictor.prepare(decode_grayscale(d, "x"),
                                                                            colour_spread(d)), datas))]
    print("| step | ms per image, one core |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    prepared = [predictor.prepare(x, 0.0) for x in decoded[:16]]
    names = [path.name for path in paths[:16]]
    predictor.predict_prepared(prepared, names)  # warm-up
    network = best_ms(lambda _: predictor.predict_prepared(prepared, names), [0]) / len(prepared)
    cores = os.cpu_count() or 1
    preparation = rows[-1][1]
    print(f"network: {network:.2f} ms per image on {cores} cores ({network * cores:.1f} core-ms); preparation "
          f"{preparation:.1f} core-ms; bound on predict: {network * cores / (network * cores + preparation):.2f} "
          f"of the model alone (goal 0.7 needs preparation <= {network * cores * (1 / 0.7 - 1):.1f} core-ms)")
    jpeg_table(predictor, paths)


def jpeg_table(predictor: Predictor, pngs: list[Path], scales: tuple[float, ...] = (1.0, 2.5)) -> None:
    """The same images saved as JPEG (quality 95) at their size and enlarged (a 2,560 px radiograph's bytes):
    preparation decoded in full against reduced (DCT scaling), and how far the answers move, beside how far saving
    the PNG as JPEG moved them."""
    side = predictor.preprocessing.cache_size
    with tempfile.TemporaryDirectory() as work:
        print("\n| JPEG (quality 95) | preparation, full decode (ms) | reduced (ms) | answers moved by reducing, "
              "mean (max) | by saving the PNG as JPEG |\n|---|---|---|---|---|")
        from_png = answers(predictor, [decode_grayscale_and_colour(p.read_bytes(), str(p)) for p in pngs], pngs)
        for scale in scales:
            datas = []
            for png in pngs:
                with Image.open(png) as image:
                    size = round(image.width * scale)
                    out = Path(work) / f"{png.stem}.jpg"
                    image.resize((size, size), Image.Resampling.LANCZOS).save(out, quality=95)
                datas.append(out.read_bytes())
            full = [decode_grayscale_and_colour(d, "x") for d in datas]
            reduced = [decode_grayscale_and_colour(d, "x", side) for d in datas]
            times = [best_ms(lambda d, r=r: predictor.prepare(*decode_grayscale_and_colour(d, "x", r)), datas)
                     for r in (None, side)]
            in_full, in_reduced = answers(predictor, full, pngs), answers(predictor, reduced, pngs)
            moved = np.abs(in_reduced - in_full)
            by_jpeg = f"{np.abs(in_full - from_png).mean():.4f}" if scale == 1 else "-"
            print(f"| {size} px, decoded at {reduced[0].pixels.shape[0]} px | {times[0]:.1f} | {times[1]:.1f} | "
                  f"{moved.mean():.4f} ({moved.max():.4f}) | {by_jpeg} |")


def answers(predictor: Predictor, decoded: list, paths: list[Path]) -> np.ndarray:
    out = predictor.predict_prepared([predictor.prepare(*d) for d in decoded], [p.name for p in paths])
    return np.array([[p.probabilities[f] for f in predictor.findings] for p in out])


if __name__ == "__main__":
    main()
