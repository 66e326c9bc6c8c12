"""Watching a deployed model: what the prediction log costs per answer, and what `cxrlearn monitor` catches.

1. **Cost.** On the same prepared sample images, in one run: the Predictor alone (batches of 1, as the service's
   quietest hour, and of 32), the Predictor with each image summarised for the log (pixel statistics and the
   features' projection), and the log's write alone (one answer per transaction, as the service records; and 32
   per transaction, as a batch of the DICOM node), in milliseconds per answer.
2. **Detection.** The model's training images left out; a reference made from a third of the other patients
   (drawn at random; with --training-basis the features' basis fitted on the run's training images instead of the
   reference's own, to compare), and windows of
   distinct patients (as the monitor judges DICOM answers) drawn from the other two thirds: as they are (the
   false-alarm rate), with a flatter exposure curve (0.6x + 60), with more noise (Gaussian, sd 12 grey levels), at
   a quarter of the resolution (shrunk and enlarged back), inverted, and only films with a finding (a prevalence
   shift). For each window size: the share of windows with an alert; for a stream that changes part way through a
   window, the changed answers before the first alert; and the label-free estimate of each window's mean AUC
   (CBPE) against its realised mean AUC (NIH's labels).

Usage: python benchmarks/monitor.py --model RUN_DIR [--images DIR] [--windows 50,100,200,400] [--draws 100]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from _common import machine, parser
from PIL import Image

from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.inference.predictor import Predictor
from cxrlearn.model.reference import PIXEL_STATISTICS, Basis, Reference
from cxrlearn.monitoring.drift import Sample, expected_auc, window_tests
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


def cost(predictor: Predictor, images: list[np.ndarray], rounds: int = 5) -> None:
    prepared = [predictor.prepare(image) for image in images]
    names = [f"image-{i}" for i in range(len(images))]
    for batch in (1, 32):
        times = {False: [], True: []}
        for _ in range(rounds):  # without and with, alternated: the machine's drift falls on both alike
            for summarise in (False, True):
                predictor.summarise = summarise
                started = time.perf_counter()
                for i in range(0, len(prepared), batch):
                    predictor.predict_prepared(prepared[i:i + batch], names[i:i + batch])
                times[summarise].append(time.perf_counter() - started)
        for summarise in (False, True):
            print(f"predict, batches of {batch:>2}, {'with' if summarise else 'without'} summaries: "
                  f"{per_answer_ms(times[summarise], len(prepared))} per image")
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


def _one_per_patient(rng, pool: np.ndarray, patients: np.ndarray, size: int) -> np.ndarray | None:
    """``size`` rows of ``pool`` of distinct patients, drawn at random (None where the pool has too few patients)."""
    people = np.unique(patients[pool])
    if len(people) < size:
        return None
    chosen = rng.choice(people, size, replace=False)
    return np.array([rng.choice(pool[patients[pool] == person]) for person in chosen])


class Streams:
    """The stream's images as answered, as they are and changed by each :data:`SHIFTS` entry, with the judge."""

    def __init__(self, predictor: Predictor, ref: Sample, stream: list[Path], rng):
        self.predictor, self.ref = predictor, ref
        self.called = ([predictor.thresholds.get(f) is not None for f in predictor.findings] if predictor.thresholds
                       else [False] * len(predictor.findings))
        self.samples = {}
        for shift, change in SHIFTS.items():
            images = [np.clip(change(load_grayscale(p).astype(np.float32), rng), 0, 255).astype(np.uint8)
                      for p in stream]
            self.samples[shift] = _logged(predictor, images)

    def alerts(self, window: Sample) -> bool:
        return any(t.alert for t in window_tests(self.ref, window, self.predictor.findings, self.called,
                                                 PIXEL_STATISTICS))

    def mixed(self, shift: str, clean_rows: np.ndarray, shifted_rows: np.ndarray) -> Sample:
        clean, changed = self.samples["as they are"].take(clean_rows), self.samples[shift].take(shifted_rows)
        return Sample(*(None if getattr(clean, n) is None else np.concatenate([getattr(clean, n), getattr(changed, n)])
                        for n in ("probabilities", "calls", "flagged", "pixels", "projections")))


def detection(model: Path, paths: list[Path], windows: list[int], draws: int, outcomes, training_basis: bool = False
              ) -> None:
    """The share of windows alerted, per stream and window size; the delay to the first alert; CBPE's error."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "bundle"
        shutil.copytree(model, bundle)
        predictor = Predictor(bundle)
        split = pd.read_csv(bundle / "split.csv")
        trained = [p for p in paths if p.name in set(split.loc[split["split"] == "train", "image"])]
        paths = [p for p in paths if p not in trained]  # the model's training images are in neither
        patients = np.array([path.name[:8] for path in paths])
        people = rng.permutation(np.unique(patients))
        in_reference = np.isin(patients, people[: len(people) // 3])
        reference_paths = [p for p, r in zip(paths, in_reference) if r]
        basis = None  # as cxrlearn does: fitted on the reference's own images
        if training_basis:  # for comparison: fitted on the run's training images
            basis = Basis.fit(np.concatenate([predictor.features_and_logits(b[:, None])[0]
                                              for b in _batches(predictor, trained)]))
        reference = predictor.make_reference(((b, [None] * len(b)) for b in _batches(predictor, reference_paths)),
                                             "a third of the sample's patients", basis)
        reference.save(bundle)
        predictor = Predictor(bundle)
        predictor.summarise = True
        stream = [p for p, r in zip(paths, in_reference) if not r]
        patients = np.array([p.name[:8] for p in stream])
        fitted_on = "the run's training images" if training_basis else "them"
        print(f"reference: {len(reference)} images of {len(people) // 3} patients (feature basis fitted on "
              f"{fitted_on}); "
              f"stream: {len(stream)} images of {len(np.unique(patients))} other patients; windows of distinct "
              f"patients, {draws} per size")
        streams = Streams(predictor, _sample(reference, predictor), stream, rng)
        sick = np.array([outcomes.loc[p.name, list(predictor.findings)].sum() > 0 for p in stream])
        pools = {shift: np.arange(len(stream)) for shift in SHIFTS}
        pools["prevalence: only films with a finding"] = np.flatnonzero(sick)
        print(f"prevalence: {sick.mean():.0%} of the stream's films have a finding")
        for shift, pool in pools.items():
            source = shift if shift in SHIFTS else "as they are"
            shares = []
            for size in windows:
                picks = [_one_per_patient(rng, pool, patients, size) for _ in range(draws)]
                if picks[0] is None:
                    shares.append(f"{size}: -")
                    continue
                alerted = sum(streams.alerts(streams.samples[source].take(rows)) for rows in picks)
                shares.append(f"{size}: {alerted / draws:.0%}")
            print(f"{shift:<40} windows with an alert - " + ", ".join(shares))
        delays(streams, patients, windows, max(draws // 2, 10), rng)
        cbpe_error(streams, pools, patients, stream, outcomes, max(windows), draws, rng)


def delays(streams: Streams, patients: np.ndarray, windows: list[int], draws: int, rng) -> None:
    """A stream that changes part way through a window: how many changed answers pass before a window alerts."""
    everyone = np.arange(len(patients))
    for shift in [s for s in SHIFTS if s != "as they are"]:
        said = []
        for size in windows:
            found = []
            for _ in range(draws):
                changed = int(rng.integers(1, size + 1))  # changed answers in the window the change falls in
                delay = None
                for j in range(6):
                    rows = _one_per_patient(rng, everyone, patients, size)
                    clean = size - changed if j == 0 else 0
                    if streams.alerts(streams.mixed(shift, rows[:clean], rows[clean:])):
                        delay = changed + j * size
                        break
                found.append(delay)
            caught = [d for d in found if d is not None]
            said.append(f"{size}: median {statistics.median(caught):.0f}" if caught else f"{size}: never")
            if len(caught) < len(found):
                said[-1] += f" ({len(found) - len(caught)} of {len(found)} not within 6 windows)"
        print(f"delay to the first alert, {shift:<28} (changed answers) - " + ", ".join(said))


def cbpe_error(streams: Streams, pools: dict, patients: np.ndarray, stream: list[Path], outcomes, size: int,
               draws: int, rng) -> None:
    """The label-free estimate of each window's mean AUC (CBPE) against its realised mean AUC."""
    from sklearn.metrics import roc_auc_score

    findings = list(streams.predictor.findings)
    truth = outcomes.loc[[p.name for p in stream], findings].to_numpy()
    for shift, pool in pools.items():
        source = streams.samples[shift if shift in SHIFTS else "as they are"]
        size_here = min(size, len(np.unique(patients[pool])))
        errors = []
        for _ in range(draws):
            rows = _one_per_patient(rng, pool, patients, size_here)
            probs, labels = source.probabilities[rows], truth[rows]
            both = [j for j in range(len(findings)) if 0 < labels[:, j].sum() < len(rows)]
            estimated = np.mean([expected_auc(probs[:, j]) for j in both])
            realised = np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in both])
            errors.append(estimated - realised)
        errors = np.array(errors)
        print(f"CBPE, windows of {size_here}, {shift:<40} estimated - realised mean AUC: mean {errors.mean():+.3f}, "
              f"mean absolute {np.abs(errors).mean():.3f}")


def _batches(predictor: Predictor, paths: list[Path], size: int = 32):
    for i in range(0, len(paths), size):
        yield np.stack([predictor.prepare(load_grayscale(p)).pixels for p in paths[i:i + size]])


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
    p.add_argument("--windows", default="50,100,200,400")
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--training-basis", action="store_true",
                   help="fit the feature basis on the run's training images instead of the reference's (to compare)")
    args = p.parse_args()
    images = args.images or args.data / "nih-sample" / "images-256"
    paths = sorted(images.glob("*.png"))
    print(f"# {machine()}")
    predictor = Predictor(args.model)
    cost(predictor, [load_grayscale(path) for path in paths[:64]])
    from cxrlearn.workflows.monitor import read_outcomes

    outcomes = read_outcomes(args.data / "nih" / "Data_Entry_2017_v2020.csv.gz")
    detection(args.model, paths, [int(w) for w in args.windows.split(",")], args.draws, outcomes,
              args.training_basis)


if __name__ == "__main__":
    main()
