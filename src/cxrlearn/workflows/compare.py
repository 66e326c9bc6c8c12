"""`cxrlearn compare`: is model B better than model A on the same images?

1. each model is evaluated as ``cxrlearn evaluate`` would (its bundle left as it is), into
   ``OUT/models/<name>/``: the same leak check, so an image of a patient any model trained on is refused
   (with ``--subset``, each model judges its split's subset, and only images in every model's subset are
   compared);
2. the models' ``predictions.csv`` are joined on the image: only images every model judged are compared, and
   their labels must agree;
3. a folder of seeds (``cxrlearn train --seeds N``: ``RUN/seed-K/``) is one model, the mean of its members'
   probabilities, with each member's own mean AUC reported beside it;
4. :func:`cxrlearn.evaluation.comparison.compare_scores`: per-model AUCs, and for each pair the paired patient
   bootstrap and DeLong's test with Holm's correction; ``compare.json``, ``compare.md``, ``compare.html`` and
   ``forest.png`` in ``OUT``.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlearn.data.cohort.split import SPLIT
from cxrlearn.data.columns import IMAGE, PATIENT_ID
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.evaluation.comparison import Comparison, Scored, compare_scores, write_comparison
from cxrlearn.model.meta import META
from cxrlearn.workflows.evaluate import PREDICTIONS_FILE, EvaluationOptions, evaluate

log = logging.getLogger(__name__)

MODELS_FOLDER = "models"
LABEL = "label_"


def members_of(folder: Path) -> list[Path]:
    """The bundles a model is: the folder itself, or a seeds folder's ``seed-K`` runs (in K's order)."""
    if (folder / META).is_file():
        return [folder]
    seeds = [p for p in folder.glob("seed-*") if re.fullmatch(r"seed-\d+", p.name) and (p / META).is_file()]
    if seeds:
        return sorted(seeds, key=lambda p: int(p.name.removeprefix("seed-")))
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    raise ConfigError(f"{folder}: neither a model bundle ({META}) nor a folder of seeds (seed-K/{META}, "
                      "as `cxrlearn train --seeds N` makes)")


def model_names(folders: list[Path]) -> list[str]:
    """Short names for the report: each folder's name, or its last two parts where names repeat, numbered
    if they still do."""
    names = [f.resolve().name for f in folders]
    if len(set(names)) < len(names):
        names = [f"{f.resolve().parent.name}/{f.resolve().name}" for f in folders]
    if len(set(names)) < len(names):
        names = [f"{name} ({i + 1})" for i, name in enumerate(names)]
    return names


def _judged_rows(path: Path, judged_split: str) -> pd.DataFrame:
    # Patient ids as evaluate held them (NIH's are numbers): the bootstrap draws patients in their sorted order, so
    # the same ids give evaluate's own resamples.
    frame = pd.read_csv(path, dtype={IMAGE: str})
    return frame[frame[SPLIT].astype(str) == judged_split].drop_duplicates(IMAGE).set_index(IMAGE)


def _findings_of(frame: pd.DataFrame) -> list[str]:
    return [c.removeprefix(LABEL) for c in frame.columns if c.startswith(LABEL)]


def _joined(frames: dict[tuple[str, str], pd.DataFrame]) -> tuple[list[str], list[str], dict[str, int]]:
    """The images every member of every model judged (sorted), the findings all of them are judged on (in the
    first's order), and per model how many of its images are left out."""
    shared = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    if not shared:
        raise DataError("no image was judged by every model: they judged different images (another split's "
                        "subset each?); compare them on a folder or split they can all be judged on")
    findings = _findings_of(next(iter(frames.values())))
    findings = [name for name in findings if all(name in _findings_of(f) for f in frames.values())]
    left_out: dict[str, int] = {}
    for (name, _), frame in frames.items():
        left_out[name] = max(left_out.get(name, 0), len(frame) - len(shared))
    return shared, findings, left_out


def _check_labels(frames: dict[tuple[str, str], pd.DataFrame], images: list[str], findings: list[str]) -> np.ndarray:
    """The labels of the shared images, the same in every model's evaluation (a model judged with another label
    table would be scored against other answers)."""
    columns = [LABEL + name for name in findings]
    (first_key, first), *rest = frames.items()
    labels = first.loc[images, columns].to_numpy(dtype=np.float64)
    for key, frame in rest:
        other = frame.loc[images, columns].to_numpy(dtype=np.float64)
        if not np.array_equal(labels, other, equal_nan=True):
            row, col = np.argwhere(~((labels == other) | (np.isnan(labels) & np.isnan(other))))[0]
            raise DataError(f"{key[1]} was judged with other labels than {first_key[1]} ({images[row]}: "
                            f"{findings[col]} is {other[row, col]} against {labels[row, col]}); compare models on "
                            "one label table (--csv or --table)")
    return labels


def _refuse_out_in_a_model(out: Path, folders: list[Path]) -> None:
    """``--out`` neither a model's folder nor inside one, nor another model bundle: the comparison writes
    models/, predictions and a report there, which would mix with (or overwrite) a model's own files."""
    resolved = out.resolve()
    for folder in folders:
        model = folder.resolve()
        if resolved == model or model in resolved.parents:
            raise ConfigError(f"--out {out}: inside the compared model {folder}; write the comparison elsewhere")
    if (out / META).is_file():
        raise ConfigError(f"--out {out}: a model bundle's folder (it has {META}); write the comparison elsewhere")


def compare(models: list[str | os.PathLike], csv: str | os.PathLike | None, images: str | os.PathLike,
            out: str | os.PathLike, options: EvaluationOptions | None = None) -> Comparison:
    """Compare the models (bundles or seeds folders) on the images of ``images`` they can all be judged on;
    write the comparison to ``out`` and return it. ``options`` are ``evaluate``'s (what is judged, the
    bootstrap's resamples and seed, flip averaging, another label table); no bundle is changed."""
    options = replace(options or EvaluationOptions(), write_bundle=False)
    folders = [Path(m) for m in models]
    if len(folders) < 2:
        raise ConfigError("compare needs at least two models")
    out = Path(out)
    _refuse_out_in_a_model(out, folders)
    names = model_names(folders)
    members = {name: members_of(folder) for name, folder in zip(names, folders)}
    frames: dict[tuple[str, str], pd.DataFrame] = {}
    judged = None
    for name, bundles in members.items():
        for bundle in bundles:
            where = out / MODELS_FOLDER / name.replace("/", "-") / (bundle.name if len(bundles) > 1 else "")
            log.info(f"{name}: evaluating {bundle} into {where}")
            metrics = evaluate(bundle, csv, images, where, options)
            judged = judged or metrics.subset
            frames[(name, str(bundle))] = _judged_rows(where / PREDICTIONS_FILE, options.judged_split)

    shared, findings, left_out = _joined(frames)
    labels = _check_labels(frames, shared, findings)
    first = next(iter(frames.values()))
    patients = first.loc[shared, PATIENT_ID].to_numpy()
    scored = [Scored(name=name, folder=str(folder), members=[str(b) for b in members[name]],
                     member_probs=[frames[(name, str(b))].loc[shared, findings].to_numpy(dtype=np.float64)
                                   for b in members[name]])
              for name, folder in zip(names, folders)]
    if any(left_out.values()):
        log.warning("compared on the images every model judged; left out: "
                    + "; ".join(f"{n:,} of {name}'s" for name, n in left_out.items() if n))
    comparison = compare_scores(labels, patients, findings, scored, options.resamples, options.seed,
                                judged=f"{judged} (the images every model judged)", left_out=left_out)
    comparison.provenance = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(options.command) if options.command else None,
        "images": str(images), "label_table": Path(csv).name if csv else options.table,
        "tta": options.tta, "runtime": options.runtime,
    }
    write_comparison(out, comparison)
    return comparison
