"""`cxrlearn linear-probe`: a logistic regression per finding on frozen ImageNet features, as a model bundle.

The baseline every fine-tuning recipe must beat on small data: the backbone's pooled ImageNet features of the
training images, standardised, and one L2-regularised logistic regression per finding (scikit-learn's
``LogisticRegression``, lbfgs). The regularisation strength is chosen by the validation images' mean AUC. The
result is an ordinary bundle, so ``evaluate``, ``compare``, ``predict``, ``serve``, ``export`` and the DICOM
outputs take it as they take a fine-tuned run: its head is the paper's head made affine (Dense with as many
units as findings and no activation, a BatchNorm set to the identity, an identity last layer) holding the
regression's weights with the standardisation folded in.

Steps: the run's table, split and cache as ``train`` makes them; features of every training and validation
image without augmentation; the fits; the bundle with the input check (fitted on the same features) and
``probe.json`` (each strength's validation mean AUC).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cxrlearn._files import write_atomic
from cxrlearn.data.columns import finding_columns
from cxrlearn.data.pipeline.datamodule import ChestXrayDataModule
from cxrlearn.errors import ConfigError, Interrupted
from cxrlearn.evaluation.metrics import auc_per_finding
from cxrlearn.model.classifier import ChestXrayClassifier, HeadConfig
from cxrlearn.model.device import resolve_device
from cxrlearn.model.input_check import MAX_FIT_IMAGES
from cxrlearn.training.config import RunConfig, resolve_workers
from cxrlearn.workflows.train import (open_run_dir, backbone_features, build_model, check_before_work, evenly_spaced,
                                      fit_and_log_check, prepare_data, read_run_labels, run_preprocessing, summarise,
                                      write_run_bundle)

log = logging.getLogger(__name__)

PROBE_FILE = "probe.json"
#: Inverse regularisation strengths tried (scikit-learn's C), on standardised features.
STRENGTHS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
MAX_ITERATIONS = 5000


def probe_config(config: RunConfig, findings: int) -> RunConfig:
    """The run's config with the head a linear probe is: affine, one unit per finding."""
    if config.train.seeds > 1:
        raise ConfigError("train.seeds: a linear probe has no training seed to vary (its fit is deterministic)")
    if config.model.init_from:
        raise ConfigError("model.init_from: a linear probe starts from ImageNet features, not from a run")
    head = HeadConfig(units=findings, activation="linear", dropout=0.0)
    return config.model_copy(update={"model": config.model.model_copy(update={"head": head})})


@dataclass
class ProbeFit:
    """The chosen strength, each strength's validation mean AUC, and the fitted weights (F, D) and biases (F,)
    on the raw (unstandardised) features."""

    strength: float
    val_mean_auc: dict[float, float | None]
    weights: np.ndarray
    biases: np.ndarray


def _fit_one(features: np.ndarray, labels: np.ndarray, strength: float) -> tuple[np.ndarray, float]:
    """One finding's regression on the images whose label is known; a finding with one class only among them
    gets no weights and its prevalence as bias."""
    known = ~np.isnan(labels)
    y = labels[known]
    if y.min() == y.max():
        share = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
        return np.zeros(features.shape[1]), float(np.log(share / (1 - share)))
    fit = LogisticRegression(C=strength, max_iter=MAX_ITERATIONS).fit(features[known], y)
    return fit.coef_[0], float(fit.intercept_[0])


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              findings: list[str], strengths=STRENGTHS) -> ProbeFit:
    """A regression per finding at each strength on the training features; the strength whose validation mean
    AUC is highest is kept, its weights expressed on the raw features."""
    scaler = StandardScaler().fit(train_x)
    train_s, val_s = scaler.transform(train_x), scaler.transform(val_x)
    fits, scores = {}, {}
    for strength in strengths:
        parts = [_fit_one(train_s, train_y[:, i], strength) for i in range(len(findings))]
        weights, biases = np.stack([w for w, _ in parts]), np.array([b for _, b in parts])
        scores[strength] = auc_per_finding(val_y, val_s @ weights.T + biases, findings).mean_auc
        fits[strength] = (weights, biases)
        shown = "undefined" if scores[strength] is None else f"{scores[strength]:.4f}"
        log.info(f"linear probe, C={strength:g}: validation mean AUC {shown}")
    best = max(strengths, key=lambda c: -np.inf if scores[c] is None else scores[c])
    if len(strengths) > 1 and best in (min(strengths), max(strengths)):
        side = "weakest" if best == max(strengths) else "strongest"
        log.warning(f"linear probe: the chosen C={best:g} is the {side} regularisation tried (the edge of "
                    f"{', '.join(f'{c:g}' for c in sorted(strengths))}): a strength beyond it may do better; the "
                    f"choice is not known to be the best")
    weights, biases = fits[best]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    raw_weights = weights / scale  # w·(x - mean)/scale + b = (w/scale)·x + (b - (w/scale)·mean)
    return ProbeFit(best, scores, raw_weights, biases - raw_weights @ scaler.mean_)


@torch.no_grad()
def set_probe_head(model: ChestXrayClassifier, fit: ProbeFit) -> None:
    """The head (Dense → identity activation → BatchNorm → Dropout → Dense) made the regression: the first Dense
    holds its weights, the BatchNorm and the last Dense are set to the identity."""
    dense, _, norm, _, last = model.head
    dense.weight.copy_(torch.from_numpy(fit.weights))
    dense.bias.copy_(torch.from_numpy(fit.biases))
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)  # (x - 0) / sqrt(1 - eps + eps) = x
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    last.weight.copy_(torch.eye(last.weight.shape[0]))
    last.bias.zero_()


def linear_probe(config: RunConfig, run_dir: str | os.PathLike, progress: bool = True,
                 strengths=STRENGTHS) -> Path:
    """Fit the linear probe ``config`` describes (its data, split, backbone and preprocessing) into ``run_dir``;
    return the bundle folder."""
    try:
        return _linear_probe(config, Path(run_dir), progress, strengths)
    except (KeyboardInterrupt, Interrupted) as err:
        raise Interrupted.keeping(err, f"the split and the preprocessing cache made so far ({run_dir})") from None


def _linear_probe(config: RunConfig, run_dir: Path, progress: bool, strengths) -> Path:
    config = probe_config(config, len(finding_columns(read_run_labels(config.data))))
    check_before_work(config)
    open_run_dir(config, run_dir, resume=False)
    started = time.time()
    preprocessing = run_preprocessing(config)
    table, fingerprint, _, split, cache_dir, split_path = prepare_data(config, run_dir, preprocessing, progress)
    findings = finding_columns(table)
    datamodule = ChestXrayDataModule(cache_dir, table, split, preprocessing, findings=findings,
                                     batch_size=config.data.batch_size, num_workers=resolve_workers(config.data.num_workers),
                                     seed=config.train.seed, fingerprint=fingerprint)
    datamodule.setup("fit")
    if not {"train", "val"} <= set(datamodule.datasets):
        raise ConfigError(f"{split_path}: a linear probe needs train and val images (the strength is chosen on val)")
    model, source = build_model(config, findings)
    device = resolve_device()
    log.info(f"linear probe: features of {len(datamodule.datasets['train']):,} training and "
             f"{len(datamodule.datasets['val']):,} validation images ({device})")
    train_layouts, train_x = backbone_features(model, datamodule, "train", device)
    val_layouts, val_x = backbone_features(model, datamodule, "val", device)
    model.cpu()
    fit = fit_probe(train_x, datamodule.datasets["train"].labels, val_x, datamodule.datasets["val"].labels,
                    findings, strengths)
    set_probe_head(model, fit)
    model.eval()
    metrics = summarise(model, datamodule, config.train.tta, findings)
    metrics.seconds = round(time.time() - started, 1)
    chosen_train = evenly_spaced(len(train_x), MAX_FIT_IMAGES)
    chosen_val = evenly_spaced(len(val_x), MAX_FIT_IMAGES)
    check = fit_and_log_check(train_layouts[chosen_train], train_x[chosen_train], val_layouts[chosen_val],
                              val_x[chosen_val])
    source = replace(source, detail=f"{source.detail}; frozen, with a logistic regression per finding on its "
                     f"standardised pooled features (L2, C={fit.strength:g}, chosen on the validation images)")
    write_run_bundle(run_dir, model, config, preprocessing, source, split_path, datamodule, metrics, check, findings)
    write_atomic(run_dir / PROBE_FILE, json.dumps({
        "method": "logistic regression per finding on standardised frozen pooled features (scikit-learn, L2)",
        "chosen_C": fit.strength, "val_mean_auc_by_C": {f"{c:g}": v for c, v in fit.val_mean_auc.items()},
    }, indent=2) + "\n")
    log.info("mean AUC: " + ", ".join(f"{name} {part.mean_auc:.4f}" for name, part in metrics.measured().items()
                                       if part.mean_auc is not None)
             + f"; the model bundle is {run_dir}/model.json + model.safetensors")
    return run_dir
