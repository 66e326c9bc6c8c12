"""Descriptive statistics of a label table, or of each split of a split file."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field

from cxrlearn.data.columns import AGE, PATIENT_ID, SEX, VIEW, finding_columns, label_values
from cxrlearn.findings import NO_FINDING
from cxrlearn.records import Record

#: Age bands for reports (years, inclusive lower bound).
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("0-17", 0, 17),
    ("18-39", 18, 39),
    ("40-59", 40, 59),
    ("60-79", 60, 79),
    ("80+", 80, 10_000),
)


def age_band(age: pd.Series | np.ndarray) -> np.ndarray:
    """The :data:`AGE_BANDS` name of each age."""
    age = np.asarray(age)
    names = np.full(age.shape, "", dtype=object)
    for name, low, high in AGE_BANDS:
        names[(age >= low) & (age <= high)] = name
    return names


class PerPatient(Record):
    median: float
    mean: float
    max: int


class FindingCount(Record):
    """Images whose label of the finding is known, positives among them, and the prevalence over them."""

    known: int
    positives: int
    prevalence: float | None


class NoFindingCount(Record):
    images: int
    share: float


class SexCounts(Record):
    images: dict[str, int]
    patients: dict[str, int]


class AgeStats(Record):
    mean: float
    sd: float
    median: float
    q1: float
    q3: float
    min: int
    max: int
    bands: dict[str, int]


class TableStats(Record):
    """What ``cxrlearn stats`` prints and writes (``--json``): a table's counts; views, sex and age where the table
    has them."""

    images: int
    patients: int
    images_per_patient: PerPatient
    findings: dict[str, FindingCount]
    no_finding: NoFindingCount = Field(alias=NO_FINDING)
    findings_per_image: dict[str, int]
    co_occurrence: dict[str, dict[str, int]]
    views: dict[str, int] | None = None
    sex: SexCounts | None = None
    age: AgeStats | None = None


def table_stats(table: pd.DataFrame) -> TableStats:
    """Counts per finding (known labels and positives), co-occurrence, patients, views, age and sex of a table.

    A finding's prevalence is over the images whose label for it is known; views, sex and age are given
    where the table has them."""
    findings = finding_columns(table)
    values = label_values(table, findings)
    known = ~np.isnan(values)
    labels = np.nan_to_num(values, nan=0.0).astype(np.int64)
    n = len(table)
    positives = labels.sum(axis=0)
    counted = known.sum(axis=0)
    per_image = labels.sum(axis=1)
    co_occurrence = labels.T @ labels
    images_per_patient = table.groupby(PATIENT_ID).size().to_numpy()
    stats = TableStats(
        images=n, patients=int(table[PATIENT_ID].nunique()),
        images_per_patient=PerPatient(median=float(np.median(images_per_patient)),
                                      mean=round(float(images_per_patient.mean()), 3),
                                      max=int(images_per_patient.max())),
        findings={name: FindingCount(known=int(k), positives=int(p), prevalence=round(float(p) / k, 6) if k else None)
                  for name, k, p in zip(findings, counted, positives)},
        no_finding=NoFindingCount(images=int((per_image == 0).sum()), share=round(float((per_image == 0).mean()), 6)),
        findings_per_image={str(k) if k < 4 else "4+": int(((per_image == k) if k < 4 else (per_image >= 4)).sum())
                            for k in range(5)},
        co_occurrence={a: {b: int(co_occurrence[i, j]) for j, b in enumerate(findings)} for i, a in enumerate(findings)},
    )
    if VIEW in table.columns:
        stats.views = {k: int(v) for k, v in table[VIEW].value_counts().sort_index().items()}
    if SEX in table.columns:
        first_image = table.drop_duplicates(PATIENT_ID)
        stats.sex = SexCounts(images={k: int(v) for k, v in table[SEX].value_counts().sort_index().items()},
                              patients={k: int(v) for k, v in first_image[SEX].value_counts().sort_index().items()})
    age = table[AGE].to_numpy(dtype=float) if AGE in table.columns else np.array([])
    age = age[~np.isnan(age)]
    if len(age):
        bands = age_band(age)
        stats.age = AgeStats(mean=round(float(age.mean()), 2), sd=round(float(age.std()), 2),
                             median=float(np.median(age)), q1=float(np.percentile(age, 25)),
                             q3=float(np.percentile(age, 75)), min=int(age.min()), max=int(age.max()),
                             bands={name: int((bands == name).sum()) for name, _, _ in AGE_BANDS})
    return stats


def format_stats(stats: TableStats, title: str = "table") -> str:
    """A readable summary of :func:`table_stats` for the terminal."""
    n = stats.images
    ipp = stats.images_per_patient
    lines = [
        f"== {title}: {n:,} images of {stats.patients:,} patients "
        f"(images per patient: median {ipp.median:g}, mean {ipp.mean:.2f}, max {ipp.max})",
        f"{'finding':<26}{'known':>10}{'positives':>10}{'prevalence':>12}",
    ]
    for name, entry in stats.findings.items():
        prevalence = "—" if entry.prevalence is None else f"{entry.prevalence:.3%}"
        lines.append(f"{name:<26}{entry.known:>10,}{entry.positives:>10,}{prevalence:>12}")
    nf = stats.no_finding
    lines.append(f"{NO_FINDING:<26}{'':>10}{nf.images:>10,}{nf.share:>12.3%}")
    lines.append("findings per image: " + ", ".join(f"{k}: {v:,}" for k, v in stats.findings_per_image.items()))
    lines.append("co-occurrence (images with both; diagonal = positives; columns numbered as the rows):")
    width = max([len(name) for name in stats.co_occurrence] + [8]) + 4
    lines.append(f"{'':<{width}}" + "".join(f"{i:>7}" for i in range(1, len(stats.co_occurrence) + 1)))
    for i, (a, row) in enumerate(stats.co_occurrence.items(), start=1):
        lines.append(f"{i:>2}. {a:<{width - 4}}" + "".join(f"{v:>7,}" for v in row.values()))
    if stats.views is not None:
        lines.append("views: " + ", ".join(f"{k} {v:,} ({v / n:.1%})" for k, v in stats.views.items()))
    if stats.sex is not None:
        lines.append("sex (images): " + ", ".join(f"{k} {v:,} ({v / n:.1%})" for k, v in stats.sex.images.items())
                     + "; (patients): " + ", ".join(f"{k} {v:,}" for k, v in stats.sex.patients.items()))
    if stats.age is not None:
        age = stats.age
        lines.append(f"age: mean {age.mean:.1f} (sd {age.sd:.1f}), median {age.median:g} [{age.q1:g}-{age.q3:g}], "
                     f"range {age.min}-{age.max}; bands: " + ", ".join(f"{k} {v:,}" for k, v in age.bands.items()))
    return "\n".join(lines)
