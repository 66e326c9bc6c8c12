"""``cxrlearn export --model RUN --int8``: an int8 ONNX model, written only if it answers as the float one does.

1. the float export (:func:`cxrlearn.model.export.export_onnx`) and its int8 quantisation
   (:func:`cxrlearn.model.quantize.quantise`), calibrated on at most ``INT8_CALIBRATION_IMAGES`` of the run's own
   training images (evenly spaced, from the run's cache, as training read them);
2. the int8 file's own input check: the bundle's, its feature part fitted again on the int8 file's features of
   the run's training images and thresholded on its features of the validation images
   (:func:`cxrlearn.model.input_check.refit_features`), saved beside it and named in its contract;
3. both files run through the Predictor (the bundle's temperatures and flip averaging, each its input check) on
   the run's validation images;
4. the paired patient bootstrap of mean AUC, int8 minus float (the same resamples for both: the resamples of
   ``evaluate``'s intervals), and the share of images on which the input check's verdict (ok or flagged) is the
   same;
5. ``RUN/model.int8.onnx`` (and its check) is written only if it passes the gate (:meth:`GateFigures.passes`:
   no finding significantly worse, and the interval reaching above ``-max_auc_loss``, or with ``equivalence``
   lying wholly above it) and the verdicts agree on at least ``min_agreement`` of the images; otherwise nothing
   is written and the figures say why (:meth:`Int8Judgement.advice`: what to do). The gate ``none`` writes it
   whatever they say. The gate and the figures are recorded in the file's contract.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from cxrlearn._files import write_atomic
from cxrlearn.data.cohort.split import SPLITS, read_split_file
from cxrlearn.data.columns import IMAGE, PATIENT_ID, SPLIT
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.pipeline.cache import META as CACHE_META, cache_location, prepare_cache, table_fingerprint
from cxrlearn.data.sources.datasets import read_labels
from cxrlearn.data.pipeline.datamodule import ChestXrayDataModule
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from cxrlearn.evaluation.paired import delong, holm, paired_bootstrap
from cxrlearn.evaluation.metrics import FEW_CASES, auc_per_finding
from cxrlearn.inference.predictor import Predictor
from cxrlearn.model import INT8_CALIBRATION_IMAGES, INT8_GATE, INT8_GATES, INT8_MAX_AUC_LOSS, INT8_MIN_AGREEMENT
from cxrlearn.model.bundle import read_meta
from cxrlearn.model.export import export_onnx, record_export
from cxrlearn.model.input_check import MAX_FIT_IMAGES, InputCheck, refit_features
from cxrlearn.model.quantize import (INT8_CHECK_FILE, INT8_FILE, cpu_has_vnni, quantise, record_judgement,
                                     with_input_check)
from cxrlearn.training.config import RunConfig
from cxrlearn.workflows.train import SPLIT_FILE, evenly_spaced, read_run_labels

log = logging.getLogger(__name__)

#: The working folder of an int8 export, in the bundle's folder (removed when done, or by the next export).
WORK_PREFIX = ".int8-"

#: Images per forward pass while judging.
BATCH = 32
#: The gates ``export --int8`` offers (:meth:`GateFigures.passes`).
GATES = INT8_GATES
#: A finding is significantly worse in int8 when its Holm-adjusted DeLong p-value is below this (and it is lower).
GATE_ALPHA = 0.05


@dataclass(frozen=True)
class GateFigures:
    """What the gate judges: the float and int8 files' mean AUCs, the paired patient bootstrap's 95% interval of
    (int8 - float), and the findings significantly worse in int8 (DeLong per finding with at least ``FEW_CASES``
    positives and negatives, Holm's correction)."""

    mean_auc_float: float | None
    mean_auc_int8: float | None
    interval: list[float] | None  # int8 - float; None where no finding has an AUC
    worse: list[str]

    def passes(self, gate: str, max_auc_loss: float) -> bool:
        """``no-loss``: no finding significantly worse, and the interval reaches above ``-max_auc_loss`` (the
        images show no loss larger than the allowance); ``equivalence``: no finding significantly worse, and the
        whole interval above ``-max_auc_loss`` (they show the loss is smaller); ``none``: always."""
        return gate == "none" or (not self.worse and self.interval_passes(gate, max_auc_loss))

    def interval_passes(self, gate: str, max_auc_loss: float) -> bool:
        """The gate's rule on the interval of mean AUC alone."""
        if self.interval is None:
            return False
        bound = self.interval[0] if gate == "equivalence" else self.interval[1]
        return bound > -max_auc_loss


def gate_figures(labels: np.ndarray, scores_float: np.ndarray, scores_int8: np.ndarray, patients: np.ndarray,
                 findings: list[str], resamples: int = DEFAULT_RESAMPLES) -> GateFigures:
    """:class:`GateFigures` of both files' probabilities on the same labelled images."""
    summaries = [auc_per_finding(labels, scores, findings) for scores in (scores_float, scores_int8)]
    columns = [findings.index(f) for f in summaries[0].mean_over]
    interval = (paired_bootstrap(labels, scores_float, scores_int8, patients, columns, resamples, DEFAULT_SEED)
                .interval() if columns else None)
    counts = [(np.nansum(labels[:, j]), np.sum(labels[:, j] == 0)) for j in range(len(findings))]
    tests = [delong(labels[:, j], scores_float[:, j], scores_int8[:, j]) if min(counts[j]) >= FEW_CASES else None
             for j in range(len(findings))]  # DeLong's normal approximation needs more than a handful of each
    adjusted = holm([None if t is None else t.p_value for t in tests])
    worse = [name for name, t, p in zip(findings, tests, adjusted)
             if t is not None and p is not None and t.difference < 0 and p < GATE_ALPHA]
    return GateFigures(summaries[0].mean_auc, summaries[1].mean_auc, interval, worse)


@dataclass(frozen=True)
class Int8Judgement:
    """What the int8 model did against the float one on the run's validation images."""

    images: int
    patients: int
    figures: GateFigures
    agreement: float | None  # share of images with the same input-check verdict; None: the bundle has no check
    max_auc_loss: float
    min_agreement: float
    reduce_range: bool
    gate: str = INT8_GATE

    @property
    def passed(self) -> bool:
        return self.gate == "none" or (self.figures.passes(self.gate, self.max_auc_loss)
                                       and (self.agreement is None or self.agreement >= self.min_agreement))

    def advice(self) -> str:
        """What to do about a refusal, by what refused it."""
        figures, steps = self.figures, []
        if figures.worse:
            steps.append(f"{', '.join(figures.worse)} lost significantly: calibrate on more training images "
                         f"(--calibration-images, {INT8_CALIBRATION_IMAGES} by default) or keep the float model")
        if not figures.interval_passes(self.gate, self.max_auc_loss):
            relax = ", --gate no-loss asks only that no larger loss be shown" if self.gate == "equivalence" else ""
            steps.append("the loss of mean AUC may be larger than allowed: more validation images narrow the "
                         f"interval; --max-auc-loss sets the allowance{relax}")
        if self.agreement is not None and self.agreement < self.min_agreement:
            steps.append("the input check's verdicts differ: --min-agreement sets the share needed")
        return ("; ".join(steps) + "; --gate none writes it whatever the figures, for you to judge it on a test "
                "set (`cxrlearn evaluate --runtime onnx-int8`)")

    def text(self) -> str:
        def num(value):
            return "—" if value is None else f"{value:.4f}"

        figures = self.figures
        interval = ("no interval (no finding has an AUC on the validation images)" if figures.interval is None
                    else f"95% CI {figures.interval[0]:+.4f} to {figures.interval[1]:+.4f}")
        needed = {"equivalence": "lower bound above", "no-loss": "upper bound above"}.get(self.gate,
                                                                                           "not judged, was")
        worse = (f"significantly worse in int8 (DeLong, Holm): {', '.join(figures.worse)}" if figures.worse
                 else "no finding significantly worse (DeLong, Holm)")
        agreement = ("the bundle has no input check" if self.agreement is None
                     else f"the input check's verdicts agree on {self.agreement:.2%} (needed: "
                          f"{self.min_agreement:.0%})")
        return (f"on {self.images:,} validation images of {self.patients:,} patients: mean AUC float "
                f"{num(figures.mean_auc_float)}, int8 {num(figures.mean_auc_int8)}; int8 - float {interval} "
                f"(gate {self.gate}: {needed} {-self.max_auc_loss:+.4f}); {worse}; {agreement}"
                + ("; weights quantised with reduce_range (this CPU has no VNNI)" if self.reduce_range else ""))


def export_int8(model_dir: str | os.PathLike, max_auc_loss: float = INT8_MAX_AUC_LOSS,
                min_agreement: float = INT8_MIN_AGREEMENT, calibration_images: int = INT8_CALIBRATION_IMAGES,
                resamples: int = DEFAULT_RESAMPLES, progress: bool = True, gate: str = INT8_GATE,
                images: Path | None = None, csv: Path | None = None) -> tuple[Int8Judgement, Path | None]:
    """Quantise the bundle in ``model_dir`` and judge it (module docstring); the judgement, and the path of
    ``model.int8.onnx`` when it passed (None, and nothing written, when it did not)."""
    if gate not in GATES:
        raise ConfigError(f"the int8 gate must be one of {', '.join(GATES)}, not {gate!r}")
    model_dir = Path(model_dir)
    for stale in model_dir.glob(f"{WORK_PREFIX}*"):  # left by an export killed before it could clean up
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            log.info(f"removed {stale}, left by an interrupted export")
    datamodule = _run_data(model_dir, images, csv, progress)
    vnni = cpu_has_vnni()
    reduce_range = vnni is False
    if reduce_range:
        log.warning("this CPU has AVX2 but no VNNI: weights are quantised to 7 bits (reduce_range), as ONNX Runtime "
                    "advises, so that its uint8 x int8 kernels cannot saturate")
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=WORK_PREFIX) as work:
        work = Path(work)
        fp32 = export_onnx(model_dir, work / "model.onnx", record=False)
        int8 = quantise(fp32, work / INT8_FILE, _calibration(datamodule, calibration_images), reduce_range)
        meta = read_meta(model_dir)
        if meta.input_check is not None:  # the int8 file judges inputs by its own features
            with_input_check(int8, _own_check(InputCheck.load(model_dir, meta.input_check), model_dir, int8,
                                              datamodule, progress))
        judgement = _judge(model_dir, fp32, int8, datamodule, max_auc_loss, min_agreement, resamples, reduce_range,
                           progress, gate)
        if not judgement.passed:
            return judgement, None
        record_judgement(int8, gate, judgement.text())
        out = model_dir / INT8_FILE
        if (work / INT8_CHECK_FILE).is_file():  # first the check the file names, then the file
            write_atomic(model_dir / INT8_CHECK_FILE, (work / INT8_CHECK_FILE).read_bytes())
        write_atomic(out, int8.read_bytes())
        record_export(model_dir, out, "onnx-int8")
    return judgement, out


def _run_data(model_dir: Path, images: Path | None = None, csv: Path | None = None,
              progress: bool = True) -> ChestXrayDataModule:
    """The run's own split over its own cache, as training read them (no augmentation). With ``images`` (a run
    copied away from its cache, or to check other copies of its images): the split's training and validation
    images read from that folder into a cache (the run's, where it is here, else one beside the run), with the
    label table ``csv`` (NIH's format) or the run's own."""
    meta = read_meta(model_dir)
    if not meta.config:
        raise ConfigError(f"{model_dir}: the bundle records no training config, so its training and validation "
                          "images are unknown; --int8 needs them")
    config = RunConfig.from_dict(meta.config, f"{model_dir}/model.json (config)")
    split_path = model_dir / SPLIT_FILE
    if not split_path.is_file():
        raise DataError(f"{split_path}: the run's split is missing; --int8 calibrates on its training images and "
                        "judges on its validation images")
    table = read_labels(csv=csv) if csv else read_run_labels(config.data)
    fingerprint = table_fingerprint(table)
    split = read_split_file(split_path)
    cache_dir = cache_location(config.data.cache, meta.preprocessing, model_dir, fingerprint)
    if images is not None:
        if not (cache_dir / CACHE_META).is_file():
            cache_dir = cache_location(None, meta.preprocessing, model_dir, fingerprint)
        wanted = table[table[IMAGE].isin(split.loc[split[SPLIT].isin(SPLITS[:2]), IMAGE])]  # train and val
        present = attach_images(wanted, images)
        log.info(f"int8: {len(present.table):,} of the split's {len(wanted):,} training and validation images are in "
                 f"{images}; into the cache {cache_dir}")
        prepare_cache(present.table, cache_dir, fingerprint, meta.preprocessing, images_dir=str(images),
                      label_table=Path(csv).name if csv else "", progress=progress)
    elif not (cache_dir / CACHE_META).is_file():
        raise DataError(f"{cache_dir}: the run's preprocessing cache is not here (was the run moved or copied?); "
                        f"give its images: `cxrlearn export --model {model_dir} --int8 --images DIR [--csv TABLE]`")
    datamodule = ChestXrayDataModule(cache_dir, table, split, meta.preprocessing,
                                     batch_size=BATCH, num_workers=0, augmentation=None, fingerprint=fingerprint,
                                     findings=list(meta.findings))
    datamodule.setup("validate")
    train, val = (datamodule.datasets.get(name) for name in SPLITS[:2])
    if val is None or train is None:
        raise DataError(f"{model_dir}: no training or no validation images of the run's split are in its cache "
                        f"{cache_dir}")
    log.info(f"int8: calibrating on the run's {len(train):,} training images and judging on its {len(val):,} "
             f"validation images, from {cache_dir}")
    return datamodule


def _calibration(datamodule: ChestXrayDataModule, count: int) -> np.ndarray:
    """At most ``count`` training images, evenly spaced, as the graph's uint8 (N, 1, S, S) input."""
    train = datamodule.datasets["train"]
    return np.stack([train[int(i)][0].numpy() for i in evenly_spaced(len(train), count)])


def _own_check(check: InputCheck, model_dir: Path, int8: Path, datamodule: ChestXrayDataModule,
               progress: bool) -> InputCheck:
    """The bundle's input check with its feature part fitted on the int8 file's own features of the training images
    the float one was fitted on, and thresholded on its features of the validation images (evenly spaced, at most
    ``MAX_FIT_IMAGES`` each)."""
    predictor = Predictor(model_dir, runtime="onnx-int8", onnx_path=int8, checked=False)
    features = {}
    for name in ("train", "val"):
        dataset = datamodule.datasets.get(name)
        loader = DataLoader(Subset(dataset, evenly_spaced(len(dataset), MAX_FIT_IMAGES).tolist()), batch_size=BATCH)
        features[name] = np.concatenate([predictor.features_and_logits(images.numpy())[0] for images, _, _ in
                                         tqdm(loader, desc=f"int8 features, {name}", unit="batch",
                                              disable=not progress)])
    own = refit_features(check, *features.values(), INT8_CHECK_FILE)
    log.info(f"int8 input check: fitted on the int8 file's features of {own.fit.train_images:,} training images, "
             f"threshold at the {own.fit.percentile:g}th percentile of {own.fit.val_images:,} validation images")
    return own


def _judge(model_dir: Path, fp32: Path, int8: Path, datamodule: ChestXrayDataModule, max_auc_loss: float,
           min_agreement: float, resamples: int, reduce_range: bool, progress: bool, gate: str) -> Int8Judgement:
    """Both models through the Predictor on the validation images, and the paired comparison."""
    models = {"float": Predictor(model_dir, runtime="onnx", onnx_path=fp32, checked=False),
              "int8": Predictor(model_dir, runtime="onnx-int8", onnx_path=int8, checked=False)}
    probs: dict[str, list[np.ndarray]] = {name: [] for name in models}
    flagged: dict[str, list[bool]] = {name: [] for name in models}
    labels = []
    for images, batch_labels, _ in tqdm(datamodule.eval_loader("val"), desc="int8 against float", unit="batch",
                                        disable=not progress):
        batch = images.numpy()
        labels.append(batch_labels.numpy())
        for name, predictor in models.items():
            p, verdicts = predictor.outputs(batch)
            probs[name].append(p)
            flagged[name] += [v is not None and not v.ok for v in verdicts]
    labels_all = np.concatenate(labels)
    findings = models["float"].findings
    val = datamodule.datasets["val"]
    patients = datamodule.table.set_index(IMAGE).loc[val.names, PATIENT_ID].to_numpy()
    figures = gate_figures(labels_all, np.concatenate(probs["float"]), np.concatenate(probs["int8"]), patients,
                           list(findings), resamples)
    has_check = models["float"].input_check is not None
    agreement = (float(np.mean(np.array(flagged["float"]) == np.array(flagged["int8"]))) if has_check else None)
    return Int8Judgement(images=len(labels_all), patients=len(set(patients)), figures=figures, agreement=agreement,
                         max_auc_loss=max_auc_loss, gate=gate,
                         min_agreement=min_agreement, reduce_range=reduce_range)
