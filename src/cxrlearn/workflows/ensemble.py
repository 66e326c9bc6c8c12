"""`cxrlearn ensemble`: several runs as one model bundle that averages their probabilities.

1. the members: bundles of the same findings, input channels and preprocessing, trained on one split (the
   same split file: the ensemble's leak check is then every member's); a seeds folder
   (``train --seeds N``) stands for its runs;
2. one network (:class:`cxrlearn.model.ensemble.EnsembleClassifier`) holding every member's weights, in one
   ``model.safetensors``;
3. on the members' data (their label table, split and preprocessing cache, as the first member's config
   records them, or ``images``/``csv`` given here): the AUCs on val and test, and the input check, fitted on
   the ensemble's pooled features;
4. thresholds chosen on the shared validation images and a report on the test images: ``evaluate --subset
   test`` into ``OUT/evaluation``.

The ensemble averages what the members' networks give: a member's own flip averaging and temperatures
(``evaluate --tta --calibrate`` on it) are not carried over; ``evaluate --tta --calibrate`` on the ensemble
chooses its own.

The bundle then works wherever a bundle does: evaluate, compare, predict, serve, export (one ONNX graph), the
DICOM outputs; Grad-CAM shows the mean of the members' heatmaps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cxrlearn._files import file_digest
from cxrlearn.data.columns import finding_columns
from cxrlearn.data.pipeline.cache import cache_location, table_fingerprint
from cxrlearn.data.pipeline.datamodule import ChestXrayDataModule
from cxrlearn.errors import ConfigError
from cxrlearn.model.bundle import WEIGHTS, load_bundle, read_meta
from cxrlearn.model.device import resolve_device
from cxrlearn.model.ensemble import EnsembleClassifier
from cxrlearn.model.meta import BundleMeta, MemberRecord
from cxrlearn.model.pretrained import WeightsSource
from cxrlearn.training.config import RunConfig, resolve_workers
from cxrlearn.workflows.compare import members_of
from cxrlearn.workflows.evaluate import EvaluationOptions, evaluate
from cxrlearn.workflows.train import fit_check, open_run_dir, prepare_data, read_run_labels, summarise, write_run_bundle

log = logging.getLogger(__name__)

EVALUATION_FOLDER = "evaluation"


def _check_members(folders: list[Path], metas: list[BundleMeta]) -> None:
    """Members one network can average: the same findings, input and preprocessing, trained on one split."""
    first, head = metas[0], folders[0]
    for folder, meta in zip(folders[1:], metas[1:]):
        differences = [what for what, same in (
            ("findings", meta.findings == first.findings),
            ("preprocessing (input size, channels, normalisation)",
             meta.preprocessing.to_dict() == first.preprocessing.to_dict()),
            ("split file", meta.split is not None and first.split is not None
             and meta.split.sha256 == first.split.sha256),
        ) if not same]
        if differences:
            raise ConfigError(f"{folder} cannot join {head} in one ensemble: their {', '.join(differences)} differ. "
                              "Members share the findings, the preprocessing and the split (so that thresholds "
                              "are chosen, and images judged, on patients none of them trained on)")
    nested = next((f for f, m in zip(folders, metas) if m.members), None)
    if nested is not None:
        raise ConfigError(f"{nested} is an ensemble already: give its members instead")


def _ensemble_config(first: Path, meta: BundleMeta, images, csv) -> RunConfig:
    """The first member's config, reading its split and its cache (and ``images``/``csv`` where given)."""
    data = dict(meta.config.get("data") or {})
    if images:
        data["images"] = str(images)
    if csv:
        data["csv"], data["table"], data["dataset"] = str(csv), None, None
    data["split"] = str(first / meta.split.file)
    config = RunConfig.from_dict({**meta.config, "data": data}, f"{first}/model.json's config")
    fingerprint = table_fingerprint(read_run_labels(config.data))
    data["cache"] = str(cache_location(meta.trained_data.cache if not csv else None, meta.preprocessing, first,
                                       fingerprint))
    return RunConfig.from_dict({**meta.config, "data": data}, f"{first}/model.json's config")


def make_ensemble(runs: list[str | os.PathLike], out: str | os.PathLike, images: str | os.PathLike | None = None,
                  csv: str | os.PathLike | None = None, progress: bool = True, resamples: int | None = None) -> Path:
    """The ensemble bundle of ``runs`` (bundles or seeds folders) in ``out``, with thresholds chosen on the shared
    validation images; return ``out``."""
    folders = [bundle for run in runs for bundle in members_of(Path(run))]
    if len(folders) < 2:
        raise ConfigError("an ensemble needs at least two bundles")
    metas = [read_meta(folder) for folder in folders]
    _check_members(folders, metas)
    carried = [str(f) for f, m in zip(folders, metas) if m.tta or m.temperature is not None]
    if carried:
        log.info("the ensemble averages its members' networks: the flip averaging and temperatures of "
                 f"{', '.join(carried)} are not carried over (evaluate --tta --calibrate on the ensemble chooses its own)")
    out = Path(out)
    config = _ensemble_config(folders[0], metas[0], images, csv)
    open_run_dir(config, out, resume=False)
    model = EnsembleClassifier([load_bundle(folder)[0] for folder in folders])
    preprocessing = metas[0].preprocessing
    table, fingerprint, _, split, cache_dir, split_path = prepare_data(config, out, preprocessing, progress)
    findings = finding_columns(table)
    if tuple(findings) != tuple(metas[0].findings):
        raise ConfigError(f"the label table gives the findings {findings}; the members predict {list(metas[0].findings)}")
    datamodule = ChestXrayDataModule(cache_dir, table, split, preprocessing, findings=findings,
                                     batch_size=config.data.batch_size, num_workers=resolve_workers(config.data.num_workers),
                                     seed=config.train.seed, fingerprint=fingerprint)
    datamodule.setup("fit")
    metrics = summarise(model, datamodule, False, findings)
    check = fit_check(model, datamodule, resolve_device())
    members = [MemberRecord(backbone=m.backbone, head=m.head, in_chans=m.in_chans, folder=str(folder),
                            weights_sha256=file_digest(folder / WEIGHTS)) for folder, m in zip(folders, metas)]
    source = WeightsSource("ensemble", "the mean probability of " + ", ".join(str(f) for f in folders))
    write_run_bundle(out, model, config, preprocessing, source, split_path, datamodule, metrics, check, findings,
                     members=members)
    log.info("mean AUC: " + ", ".join(f"{name} {part.mean_auc:.4f}" for name, part in metrics.measured().items()
                                       if part.mean_auc is not None) + f"; choosing thresholds on the val images")
    options = EvaluationOptions(subset="test", progress=progress, command=["cxrlearn", "ensemble"])
    if resamples:
        options.resamples = resamples
    evaluate(out, csv, config.data.images, out / EVALUATION_FOLDER, options)
    return out
