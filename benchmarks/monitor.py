"""Watching a deployed model: what the prediction log costs per answer, and what `cxrlearn monitor` catches.

1. **Cost.** On the same prepared sample images, in one run: the Predictor alone (batches of 1, as the service's
   quietest hour, and of 32), the Predictor with each image summarised for the log (pixel statistics and the
   features' projection), and the log's write alone (one answer per transaction, as the service records; and 32
   per transaction, as a batch of the DICOM node), in milliseconds per answer.
2. **Detection.** A reference made from half of the sample's patients (drawn at random), and streams of the other
   half's images: as they are (the false-alarm rate over many windows), with a flatter exposure curve (0.6x + 60),
   with more noise (Gaussian, sd 12 grey levels), at a quarter of the resolution (shrunk and enlarged back), and
   inverted. For each window size: the share of windows with an alert.

Usage: python benchmarks/monitor.py --model RUN_DIR [--images DIR] [--windows 50,100,200] [--draws 100]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from _common import machine, parser
from PIL import Image

from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.inference.predictor import Predictor
from cxrlearn.model.reference import PIXEL_STATISTICS, Reference
from cxrlearn.monitoring.drift import Sample, window_tests
from cxrlearn.monitoring.log import Answered, PredictionLog

SHIFTS = {
    "as they are": lambda p, rng: p,
    "flatter exposure (0.6x + 60)": lambda p, rng: 0.6 * p + 60,
    "noise (sd 12 grey levels)": lambda p, rng: p + rng.normal(0, 12, p.shape),
    "quarter resolution": lambda p, rng: np.asarray(Image.fromarray(p.astype(np.uint8)).resize(
        (p.shape[1] // 4, p.shape[0] // 4), Image.Resampling.BOX).resize(p.shape[::-1], Image.Resampling.BICUBIC),
        dtype=np.float32),
    "inverted": lambda p, rng: 255 - p,
}


def per_answer_ms(seconds: list[float], answers: int) -> str:
    return f"{1000 * statistics.median(seconds) / answers:.2f} ms"


def cost(predictor: Predictor, images: list[np.ndarray], rounds: int = 3) -> None:
    prepared = [predictor.prepare(image) for image in images]
    names = [f"image-{i}" for i in range(len(images))]
    for batch in (1, 32):
        for summarise in (False, True):
            predictor.summarise = summarise
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                for i in range(0, len(prepared), batch):
                    predictor.predict_prepared(prepared[i:i + batch], names[i:i + batch])
                times.append(time.perf_counter() - started)
            print(f"predict, batches of {batch:>2}, {'with' if summarise else 'without'} summaries: "
                  f"{per_answer_ms(times, len(prepared))} per image")
    predictor.summarise = True
    predictions = predictor.predict_prepared(prepared[:32], names[:32])
    with tempfile.TemporaryDirectory() as folder:
        log = PredictionLog(Path(folder) / "log.sqlite")
        me = SimpleNamespace(provenance=predictor.provenance, reference_sha256=predictor.reference_sha256,
                             findings=predictor.findings)
        for per_transaction in (1, 32):
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                for _ in range(10):
                    for i in range(0, 32, per_transaction):
                        log.record([Answered(p, p.image) for p in predictions[i:i + per_transaction]], me, "bench")
                times.append(time.perf_counter() - started)
            print(f"log write, {per_transaction:>2} answer(s) per transaction: {per_answer_ms(times, 320)} per answer")


def detection(model: Path, paths: list[Path], windows: list[int], draws: int) -> None:
    rng = np.random.default_rng(0)
    patients = np.array([path.name[:8] for path in paths])
    people = rng.permutation(np.unique(patients))
    half = np.isin(patients, people[: len(people) // 2])
    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "bundle"
        shutil.copytree(model, bundle)
        predictor = Predictor(bundle)
        reference_paths = [p for p, h in zip(paths, half) if h]
        batches = ((np.stack([predictor.prepare(load_grayscale(p)).pixels for p in reference_paths[i:i + 32]]),
                    [None] * len(reference_paths[i:i + 32])) for i in range(0, len(reference_paths), 32))
        reference = predictor.make_reference(batches, "half of the sample's patients")
        reference.save(bundle)
        predictor = Predictor(bundle)
        predictor.summarise = True
        ref = _sample(reference, predictor)
        stream = [p for p, h in zip(paths, half) if not h]
        called = [predictor.thresholds.get(f) is not None for f in predictor.findings] if predictor.thresholds \
            else [False] * len(predictor.findings)
        print(f"reference: {len(reference)} images; stream: {len(stream)} images of other patients")
        for shift, change in SHIFTS.items():
            images = [np.clip(change(load_grayscale(p).astype(np.float32), rng), 0, 255).astype(np.uint8)
                      for p in stream]
            logged = _logged(predictor, images)
            shares = []
            for size in windows:
                alerted = 0
                for _ in range(draws):
                    rows = rng.choice(len(images), size, replace=False)
                    alerted += any(t.alert for t in window_tests(ref, logged.take(rows), predictor.findings,
                                                                 called, PIXEL_STATISTICS))
                shares.append(f"{size}: {alerted / draws:.0%}")
            print(f"{shift:<30} windows with an alert ({draws} windows each) - " + ", ".join(shares))


def _sample(reference: Reference, predictor: Predictor) -> Sample:
    from cxrlearn.workflows.monitor import reference_sample

    return reference_sample(reference, predictor.findings, predictor.thresholds or None, predictor.temperature)


def _logged(predictor: Predictor, images: list[np.ndarray]) -> Sample:
    predictions = []
    for i in range(0, len(images), 32):
        predictions += predictor.predict(images[i:i + 32], [str(k) for k in range(i, i + len(images[i:i + 32]))])
    probs = np.array([[p.probabilities[f] for f in predictor.findings] for p in predictions])
    calls = (np.array([[f in p.positive for f in predictor.findings] for p in predictions])
             if predictor.thresholds else None)
    return Sample(probs, calls, np.array([p.flagged for p in predictions]),
                  np.array([p.summary.pixels for p in predictions]), np.array([p.summary.projection for p in predictions]))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--images", type=Path)
    p.add_argument("--windows", default="50,100,200")
    p.add_argument("--draws", type=int, default=100)
    args = p.parse_args()
    images = args.images or args.data / "nih-sample" / "images-256"
    paths = sorted(images.glob("*.png"))
    print(f"# {machine()}")
    predictor = Predictor(args.model)
    cost(predictor, [load_grayscale(path) for path in paths[:64]])
    detection(args.model, paths, [int(w) for w in args.windows.split(",")], args.draws)


if __name__ == "__main__":
    main()
