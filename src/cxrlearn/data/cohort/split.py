"""A fair, patient-wise, saved train/val/test split.

Kufel et al. 2023 used a "custom split to ensure fair representation" of every
finding, with their seed (:data:`cxrlearn.defaults.SEED`). Random patient-wise splits of ChestX-ray14 leave rare
findings badly off (Hernia by up to ~50% relative at 70/10/20) and the official
test list has Pneumothorax at over twice its overall rate. Here the split is:

* patient-wise: all images of a patient go to one split, so no patient leaks;
* stratified on every finding and on "No Finding", counted in images, so each
  split's prevalence of each is close to the whole table's; and each split's
  share of images is close to its ratio;
* deterministic: the same table, ratios and seed give a byte-identical file.

Algorithm: iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD
2011) over patients, weighing each patient by its image counts, followed by a
greedy local search that moves single patients between splits while that lowers
a cost which grows steeply (8th power) with each relative prevalence deviation
beyond 3% and each share deviation beyond 1 point. The library
``iterative-stratification`` implements only the first step, on items with 0/1
labels; here items are patients carrying counts, and the second step is what
brings the rarest findings (Hernia: 227 images) within tolerance.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cxrlearn import __version__
from cxrlearn._files import file_digest, source_digest, write_atomic
from cxrlearn.data.columns import DATASET, IMAGE, PATIENT_ID, SPLIT, finding_columns, label_values
from cxrlearn.data.sources.nih import read_image_list
from cxrlearn.defaults import RATIOS, SEED
from cxrlearn.errors import DataError
from cxrlearn.findings import FINDINGS, NO_FINDING
from cxrlearn.records import Record

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_RATIOS: tuple[float, float, float] = RATIOS
#: The split seed of Kufel et al. 2023.
DEFAULT_SEED = SEED
SPLIT_COLUMNS = (IMAGE, PATIENT_ID, SPLIT)
#: What the local search aims for; also the bar the tests hold the full table to.
PREVALENCE_TOLERANCE = 0.03  # relative deviation of a finding's prevalence
SHARE_TOLERANCE = 0.01  # absolute deviation of a split's share of images
METHODS = ("stratified", "random")  # the first is the default
#: NIH's strata: its 14 findings, then No Finding. Another table's are its own findings, then No Finding.
STRATA = FINDINGS + (NO_FINDING,)


@dataclass(frozen=True)
class _Patients:
    """Per-patient image counts and positive counts (the findings, then No Finding)."""

    ids: np.ndarray  # (P,) sorted patient ids
    images: np.ndarray  # (P,) images per patient
    counts: np.ndarray  # (P, 15) positive images per stratum
    image_patient: np.ndarray  # (N,) index into ids for each table row


def strata_of(table: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """The table's strata (its findings, then No Finding) and the (N, strata) 0/1 matrix: an unknown label
    counts as not positive, and No Finding is an image with no positive label."""
    findings = finding_columns(table)
    labels = np.nan_to_num(label_values(table, findings), nan=0.0).astype(np.int64)
    return [*findings, NO_FINDING], np.column_stack([labels, labels.sum(axis=1) == 0]).astype(np.int64)


def _patients(table: pd.DataFrame) -> _Patients:
    _, strata = strata_of(table)
    ids, image_patient = np.unique(table[PATIENT_ID].to_numpy(), return_inverse=True)
    images = np.bincount(image_patient, minlength=len(ids))
    counts = np.zeros((len(ids), strata.shape[1]), dtype=np.int64)
    np.add.at(counts, image_patient, strata)
    return _Patients(ids, images, counts, image_patient)


def _check_ratios(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (3,) or not np.all(np.isfinite(r)) or np.any(r < 0) or r.sum() <= 0:
        raise DataError(f"--ratios must be three non-negative numbers for train, val and test; got {list(ratios)}")
    if abs(r.sum() - 1.0) > 1e-6:
        raise DataError(f"--ratios must add up to 1; {' + '.join(map(str, ratios))} = {r.sum():g}")
    return r


def _iterative_stratification(
    images: np.ndarray, counts: np.ndarray, ratios: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Sechidis et al.'s iterative stratification, on patients weighed by image counts."""
    n_patients, n_strata = counts.shape
    demand = ratios[:, None] * counts.sum(axis=0)[None, :].astype(np.float64)
    image_demand = ratios * images.sum()
    assignment = np.full(n_patients, -1, dtype=np.int64)
    open_split = ratios > 0
    while (assignment < 0).any():
        unassigned = assignment < 0
        carriers = (counts[unassigned] > 0).sum(axis=0)
        if not carriers.any():
            break
        # The stratum with the fewest unassigned carrying patients goes first.
        stratum = int(np.argmin(np.where(carriers > 0, carriers, np.iinfo(np.int64).max)))
        patients = np.flatnonzero(unassigned & (counts[:, stratum] > 0))
        # Larger patients first (they are the hard ones to fit), random among equals.
        patients = rng.permutation(patients)
        patients = patients[np.argsort(-counts[patients, stratum], kind="stable")]
        for p in patients:
            score = np.where(open_split, demand[:, stratum], -np.inf)
            best = np.flatnonzero(score == score.max())
            if len(best) > 1:
                tie = image_demand[best]
                best = best[tie == tie.max()]
            split = int(best[0] if len(best) == 1 else rng.choice(best))
            assignment[p] = split
            demand[split] -= counts[p]
            image_demand[split] -= images[p]
    return assignment


class _Cost:
    """The local search's cost of one split's totals, vectorised over candidates.

    Each term is (deviation / tolerance) ** 8, so the worst term dominates and the
    search works on the worst deviation first. A finding's tolerance is 3%, or
    half an image's worth where a split expects so few positives that one image
    moves its prevalence by more (small tables: Hernia has 15 images in the
    sample); otherwise the unavoidable granularity of rare findings would drown
    the split sizes.
    """

    POWER = 8

    def __init__(self, total_images: int, positives: np.ndarray, ratios: np.ndarray):
        self.total_images = float(total_images)
        self.used = positives > 0  # a stratum absent from the table cannot be balanced
        self.prevalence = positives[self.used] / total_images
        self.ratios = ratios
        with np.errstate(divide="ignore"):
            half_image = 0.5 / (ratios[:, None] * positives[None, self.used])
        self.tolerance = np.maximum(PREVALENCE_TOLERANCE, half_image)

    def __call__(self, totals: np.ndarray, split: int) -> np.ndarray:
        """``totals[..., 0]`` images and ``totals[..., 1:]`` positives of a split."""
        n = totals[..., 0]
        positives = totals[..., 1:][..., self.used]
        with np.errstate(divide="ignore", invalid="ignore"):
            prevalence = np.where(n[..., None] > 0, positives / n[..., None], 0.0)
        deviation = prevalence / self.prevalence - 1.0
        share = n / self.total_images - self.ratios[split]
        return ((deviation / self.tolerance[split]) ** self.POWER).sum(axis=-1) + (
            share / SHARE_TOLERANCE
        ) ** self.POWER


def _local_search(
    images: np.ndarray,
    counts: np.ndarray,
    assignment: np.ndarray,
    ratios: np.ndarray,
    max_moves: int = 20000,
) -> np.ndarray:
    """Move single patients between splits while that lowers the cost; best move first.

    A move's gain depends only on the moved patient's counts (images and positives per stratum), and
    most patients share theirs with many others (NIH: 30,805 patients, 6,064 distinct count vectors), so
    each candidate move is scored once per distinct vector present in its split, and the first patient
    (lowest index) with the best one moves: the same moves as scoring every patient, at a fraction of the
    cost on large tables.
    """
    assignment = assignment.copy()
    weights = np.column_stack([images, counts]).astype(np.float64)
    patterns, pattern_of = np.unique(weights, axis=0, return_inverse=True)
    pattern_of = pattern_of.ravel()
    n_splits = len(ratios)
    totals = np.stack([weights[assignment == k].sum(axis=0) for k in range(n_splits)])
    cost = _Cost(int(images.sum()), counts.sum(axis=0), ratios)
    targets = [k for k in range(n_splits) if ratios[k] > 0]
    first = np.full(len(patterns), -1, dtype=np.int64)
    for _ in range(max_moves):
        base = np.array([cost(totals[k], k) for k in range(n_splits)])
        best_gain, best_move = 1e-12 * max(base.sum(), 1.0), None
        for source in targets:
            members = np.flatnonzero(assignment == source)
            if len(members) == 0:
                continue
            # The first member of each count vector present in this split (later writes win: reversed order).
            first.fill(-1)
            first[pattern_of[members[::-1]]] = members[::-1]
            present = np.flatnonzero(first >= 0)
            candidates = first[present]
            order = np.argsort(candidates, kind="stable")  # patient order, as scoring every member would
            present, candidates = present[order], candidates[order]
            moved = patterns[present]
            leave = cost(totals[source] - moved, source) - base[source]
            for target in targets:
                if target == source:
                    continue
                gain = -(leave + cost(totals[target] + moved, target) - base[target])
                i = int(np.argmax(gain))
                if gain[i] > best_gain:
                    best_gain, best_move = gain[i], (candidates[i], source, target)
        if best_move is None:
            break
        patient, source, target = best_move
        assignment[patient] = target
        totals[source] -= weights[patient]
        totals[target] += weights[patient]
    return assignment


def _home_dataset(table: pd.DataFrame) -> pd.Series:
    """Each image's patient's dataset: the one most of the patient's images name (the first by name on a tie)."""
    counts = table.groupby([PATIENT_ID, DATASET], sort=True).size().rename("n").reset_index()
    home = counts.sort_values(["n", DATASET], ascending=[False, True], kind="stable").drop_duplicates(PATIENT_ID)
    return table[PATIENT_ID].map(home.set_index(PATIENT_ID)[DATASET]).rename("home_dataset")


def make_split(
    table: pd.DataFrame,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = DEFAULT_SEED,
    official_test: Iterable[str] | None = None,
    method: str = METHODS[0],
) -> pd.DataFrame:
    """Split a label table patient-wise into train, val and test.

    ``official_test``: image names (NIH's ``test_list.txt``) that form the test set;
    train and val are then made from the other patients, in the proportion of
    their ratios. ``method="random"`` gives a plain random patient-wise split, for
    comparison. Returns a frame ``image, patient_id, split`` sorted by image.
    """
    if method not in METHODS:
        raise DataError(f"unknown split method {method!r}; choose one of {', '.join(METHODS)}")
    r = _check_ratios(ratios)
    if table.empty:
        raise DataError("cannot split an empty table")
    if DATASET in table.columns and table[DATASET].nunique() > 1:
        # Tables of several datasets: each is split on its own, in the ratios, stratified on its own findings.
        # A patient is its patient id alone, whatever the dataset column says: one whose images a table gives
        # to several datasets goes, whole, with the dataset of most of them.
        listed = set(official_test) if official_test is not None else None
        parts = []
        for _, part in table.groupby(_home_dataset(table), sort=True):
            uses_list = listed is not None and part[IMAGE].isin(listed).any()
            own = part[[c for c in part.columns if c != DATASET and not part[c].isna().all()]]
            parts.append(make_split(own, ratios, seed, listed if uses_list else None, method))
        return pd.concat(parts).sort_values(IMAGE, kind="stable").reset_index(drop=True)
    patients = _patients(table)
    rng = np.random.default_rng(seed)
    assignment = np.full(len(patients.ids), -1, dtype=np.int64)
    ratios_to_fill = r

    if official_test is not None:
        in_test = table[IMAGE].isin(set(official_test)).to_numpy()
        if not in_test.any():
            raise DataError("none of the table's images is on the official test list")
        test_patient = np.zeros(len(patients.ids), dtype=bool)
        test_patient[patients.image_patient[in_test]] = True
        straddling = test_patient[patients.image_patient] & ~in_test
        if straddling.any():
            row = int(np.flatnonzero(straddling)[0])
            raise DataError(
                f"patient {table[PATIENT_ID].iloc[row]} has images both on and off the official "
                f"test list (e.g. {table[IMAGE].iloc[row]} is not on it); the list must be patient-wise"
            )
        assignment[test_patient] = SPLITS.index("test")
        if r[0] + r[1] <= 0:
            raise DataError("with --official-test, the train and val ratios cannot both be 0")
        ratios_to_fill = np.array([r[0], r[1], 0.0]) / (r[0] + r[1])

    free = assignment < 0
    if method == "random":
        # Shuffle the patients, lay them end to end by image count, and cut at the
        # ratios; each patient goes where its middle falls.
        order = rng.permutation(np.flatnonzero(free))
        sizes = patients.images[order]
        middle = (np.cumsum(sizes) - 0.5 * sizes) / sizes.sum()
        assignment[order] = np.searchsorted(np.cumsum(ratios_to_fill)[:-1], middle, side="right")
    else:
        sub = np.flatnonzero(free)
        initial = _iterative_stratification(patients.images[sub], patients.counts[sub], ratios_to_fill, rng)
        refined = _local_search(patients.images[sub], patients.counts[sub], initial, ratios_to_fill)
        assignment[sub] = refined

    frame = pd.DataFrame(
        {
            IMAGE: table[IMAGE].to_numpy(),
            PATIENT_ID: table[PATIENT_ID].to_numpy(),
            SPLIT: np.asarray(SPLITS)[assignment[patients.image_patient]],
        }
    )
    return frame.sort_values(IMAGE, kind="stable").reset_index(drop=True)


def split_to_csv(split: pd.DataFrame) -> str:
    """The split file's exact text: ``image,patient_id,split``, one image a line."""
    buffer = io.StringIO()
    split[list(SPLIT_COLUMNS)].to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


def report_path(split_path: str | os.PathLike) -> Path:
    """Where the report of a split file is saved: ``NAME.report.json`` beside it."""
    split_path = Path(split_path)
    return split_path.with_name(split_path.stem + ".report.json")


def write_split(split: pd.DataFrame, path: str | os.PathLike, report: SplitReport | None = None) -> str:
    """Write the split file (and its report beside it); return the file's SHA-256."""
    path = Path(path)
    text = split_to_csv(split)
    write_atomic(path, text)
    if report is not None:
        write_atomic(report_path(path), json.dumps(report.to_dict(), indent=2) + "\n")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_and_save(table: pd.DataFrame, path: str | os.PathLike, label_table: str | os.PathLike,
                   ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = DEFAULT_SEED,
                   official_test_list: str | os.PathLike | None = None,
                   method: str = METHODS[0]) -> tuple[pd.DataFrame, SplitReport, str]:
    """Make the split of ``table`` and save it with its report, whose provenance names the cxrlearn version,
    method, seed and the SHA-256 of the label table (and official test list) it came from — the same for
    ``cxrlearn split``, ``train`` and ``reproduce``. Returns (split, report, the split file's SHA-256)."""

    official = read_image_list(official_test_list) if official_test_list else None
    split = make_split(table, ratios=ratios, seed=seed, official_test=official, method=method)
    about = {"cxrlearn": __version__, "method": method, "seed": seed,
             "label_table": {"file": Path(label_table).name, "sha256": source_digest(label_table)}}
    if official_test_list:
        about["official_test_list"] = {"file": Path(official_test_list).name,
                                       "sha256": file_digest(official_test_list)}
    report = split_report(table, split, ratios=ratios, official_test=official is not None, **about)
    if report.shared_patients:  # never written, never trained on: a split's whole point is that it cannot be
        raise DataError(f"the split would put {report.shared_patients:,} patient(s) in two splits; nothing is "
                        "written")
    return split, report, write_split(split, path, report)


def read_split_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a split file written by :func:`write_split` (or by hand).

    Raises :class:`DataError` naming the file and line for missing columns,
    unknown split names, repeated images and, above all, a patient in two splits.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such split file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a split file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError,
            zlib.error) as err:  # a truncated or damaged .gz is EOFError, OSError or zlib.error
        raise DataError(f"{path}: not a readable split file ({type(err).__name__}: {err})") from None
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; a split file has the columns "
            f"{','.join(SPLIT_COLUMNS)} (found {','.join(frame.columns)})"
        )
    frame = frame[list(SPLIT_COLUMNS)].apply(lambda c: c.str.strip())
    unknown = ~frame[SPLIT].isin(SPLITS)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{path}: line {i + 2}: unknown split {frame[SPLIT].iloc[i]!r} (expected one of {', '.join(SPLITS)})"
        )
    repeated = frame[IMAGE].duplicated(keep=False)
    if repeated.any():
        lines = np.flatnonzero(repeated)[:5] + 2
        raise DataError(
            f"{path}: image {frame[IMAGE][repeated].iloc[0]!r} is listed more than once "
            f"(lines {', '.join(map(str, lines))})"
        )
    if frame[PATIENT_ID].eq("").any():
        i = int(np.flatnonzero(frame[PATIENT_ID].eq(""))[0])
        raise DataError(f"{path}: line {i + 2}: patient_id is empty")
    if frame[PATIENT_ID].str.fullmatch(r"\d+").all():  # NIH's patients are numbers; other tables' any text
        frame[PATIENT_ID] = frame[PATIENT_ID].astype(np.int64)
    splits_of = frame.groupby(PATIENT_ID)[SPLIT].nunique()
    leaking = splits_of[splits_of > 1]
    if len(leaking):
        patient = leaking.index[0]
        rows = frame[frame[PATIENT_ID] == patient]
        where = ", ".join(
            f"{s} (line {i + 2}: {img})" for i, img, s in zip(rows.index, rows[IMAGE], rows[SPLIT])
        )
        raise DataError(
            f"{path}: patient {patient} is in more than one split: {where}; "
            f"{len(leaking)} patient(s) in all are shared between splits, which leaks test patients into training"
        )
    return frame


def apply_split(table: pd.DataFrame, split: pd.DataFrame, source: str = "split file") -> pd.DataFrame:
    """Add the ``split`` column to a label table; rows the split does not list are dropped.

    Raises :class:`DataError` when an image's patient differs between the two,
    which means the split was made from another table.
    """
    merged = table.merge(split, on=IMAGE, how="inner", suffixes=("", "_split"), validate="one_to_one")
    mismatch = merged[PATIENT_ID].astype(str) != merged[f"{PATIENT_ID}_split"].astype(str)
    if mismatch.any():
        row = merged[mismatch].iloc[0]
        raise DataError(
            f"{source}: image {row[IMAGE]} belongs to patient {row[f'{PATIENT_ID}_split']} there "
            f"but to patient {row[PATIENT_ID]} in the label table; was the split made from another table?"
        )
    if merged.empty:
        raise DataError(f"{source}: none of its images is in the label table")
    return merged.drop(columns=f"{PATIENT_ID}_split")


class Counts(Record):
    """Images, patients, and per stratum (finding or No Finding) positives and prevalence."""

    images: int
    patients: int
    positives: dict[str, int]
    prevalence: dict[str, float]


class SplitCounts(Counts):
    """One split's counts, its share of the images, and each stratum's prevalence relative to all rows'
    (split prevalence / overall prevalence - 1)."""

    share: float
    relative_deviation: dict[str, float]


class Worst(Record):
    """The largest relative prevalence deviation: its value, and where."""

    value: float
    split: str | None
    finding: str | None


class Comparison(Record):
    """Splits against all the rows they came from."""

    splits: dict[str, SplitCounts]
    max_relative_deviation: Worst
    ratios: dict[str, float] | None = None
    max_share_deviation_points: float | None = None


class SplitReport(Comparison):
    """``NAME.report.json`` beside a split file: how it was made (``about``: cxrlearn's version, method, seed, the
    label table's and the official list's digests, as extra fields), the whole table's counts, each split's, and
    with the official test list, train and val against their own pool."""

    mode: str
    overall: Counts
    within_train_val: Comparison | None = None
    shared_patients: int = 0


def _compare(strata: np.ndarray, patient_ids: np.ndarray, split_names: np.ndarray, names: Sequence[str],
             stratum_names: Sequence[str]) -> dict:
    """Each named split's counts and prevalence, and its deviation from all rows given."""
    n_total = len(strata)
    reference = strata.sum(axis=0) / n_total
    entries, worst = {}, Worst(value=0.0, split=None, finding=None)
    for name in names:
        rows = split_names == name
        n = int(rows.sum())
        positives = strata[rows].sum(axis=0)
        prevalence = positives / n if n else np.zeros(len(stratum_names))
        with np.errstate(divide="ignore", invalid="ignore"):
            deviation = np.where(reference > 0, prevalence / reference - 1.0, 0.0)
        entries[name] = SplitCounts(
            images=n, patients=int(len(np.unique(patient_ids[rows]))), share=round(n / n_total, 6),
            positives={s: int(v) for s, v in zip(stratum_names, positives)},
            prevalence={s: round(float(v), 6) for s, v in zip(stratum_names, prevalence)},
            relative_deviation={s: round(float(v), 6) for s, v in zip(stratum_names, deviation)},
        )
        i = int(np.argmax(np.abs(deviation)))
        if n and abs(deviation[i]) > abs(worst.value):
            worst = Worst(value=round(float(deviation[i]), 6), split=name, finding=stratum_names[i])
    return Comparison(splits=entries, max_relative_deviation=worst)


def split_report(
    table: pd.DataFrame,
    split: pd.DataFrame,
    ratios: Sequence[float] | None = None,
    official_test: bool = False,
    **about,
) -> SplitReport:
    """Images, patients and per-finding prevalence of each split, beside the whole table's.

    ``relative_deviation`` of a finding in a split is (split prevalence / overall
    prevalence) - 1. With ``official_test``, train and val are also compared with
    the train+val pool they were stratified in (``within_train_val``), since the
    official test list itself is far from the table's prevalence. ``about`` is
    stored as is (seed, method, source…).
    """
    table = apply_split(table, split)
    names, strata = strata_of(table)
    patient_ids = table[PATIENT_ID].to_numpy()
    split_names = table[SPLIT].to_numpy()
    n_total = len(table)

    overall = Counts(images=n_total, patients=int(len(np.unique(patient_ids))),
                     positives={s: int(v) for s, v in zip(names, strata.sum(axis=0))},
                     prevalence={s: round(float(v), 6) for s, v in zip(names, strata.mean(axis=0))})
    compared = _compare(strata, patient_ids, split_names, SPLITS, names)
    report = SplitReport(**about, mode="official-test" if official_test else "custom", overall=overall,
                         splits=compared.splits, max_relative_deviation=compared.max_relative_deviation)
    if ratios is not None:
        report.ratios = dict(zip(SPLITS, map(float, ratios)))
    if ratios is not None and not official_test:
        share = max(abs(report.splits[name].share - r) for name, r in zip(SPLITS, ratios))
        report.max_share_deviation_points = round(100 * share, 4)
    if official_test:
        pool = split_names != "test"
        within = _compare(strata[pool], patient_ids[pool], split_names[pool], SPLITS[:2], names)
        if ratios is not None:
            wanted = np.asarray(ratios[:2], dtype=float) / sum(ratios[:2])
            share = max(abs(within.splits[n].share - r) for n, r in zip(SPLITS[:2], wanted))
            within.ratios = dict(zip(SPLITS[:2], map(float, wanted.round(6))))
            within.max_share_deviation_points = round(100 * share, 4)
        report.within_train_val = within
    by_patient = table.groupby(PATIENT_ID)[SPLIT].nunique()
    report.shared_patients = int((by_patient > 1).sum())
    return report


def format_split_report(report: SplitReport) -> str:
    """The report as a plain-text table for the terminal."""
    def table(title: str, overall: Counts, splits: dict[str, SplitCounts], worst: Worst) -> list[str]:
        lines = [f"{title:<20}{'all':>12}" + "".join(f"{name:>24}" for name in splits)]
        lines.append(f"{'images':<20}{overall.images:>12,}"
                     + "".join(f"{s.images:>14,} ({s.share:6.2%} )" for s in splits.values()))
        lines.append(f"{'patients':<20}{overall.patients:>12,}" + "".join(f"{s.patients:>24,}" for s in splits.values()))
        lines.append("prevalence (relative deviation)")
        for stratum, prevalence in overall.prevalence.items():
            row = f"  {stratum:<18}{prevalence:>12.3%}"
            for s in splits.values():
                row += f"{s.prevalence[stratum]:>14.3%} ({s.relative_deviation[stratum]:+6.1%})"
            lines.append(row)
        lines.append(f"largest relative prevalence deviation: {worst.value:+.2%} ({worst.finding} in {worst.split})")
        return lines

    lines = table(f"split ({report.mode})", report.overall, report.splits, report.max_relative_deviation)
    if report.max_share_deviation_points is not None:
        lines.append(f"largest share deviation from the ratios: {report.max_share_deviation_points:.2f} points")
    within = report.within_train_val
    if within is not None:
        parts = within.splits.values()
        images = sum(s.images for s in parts)
        positives = {k: sum(s.positives[k] for s in parts) for k in report.overall.prevalence}
        pool = Counts(images=images, patients=sum(s.patients for s in parts), positives=positives,
                      prevalence={k: v / max(1, images) for k, v in positives.items()})
        lines.append("")
        lines += table("train+val pool", pool, within.splits, within.max_relative_deviation)
        if within.max_share_deviation_points is not None:
            lines.append(f"largest share deviation within the pool: {within.max_share_deviation_points:.2f} points")
    lines.append(f"patients in more than one split: {report.shared_patients}")
    return "\n".join(lines)
