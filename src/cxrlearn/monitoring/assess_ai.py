"""The prediction log's answers in the columns of the ACR's Assess-AI registry (``cxrlearn monitor --assess-ai``).

Assess-AI (the ACR's National Radiology Data Registry for clinical AI, live since November 2024) compares a site's
AI results with labels drawn from its radiology reports. ACR Connect's import from a local drive takes a CSV file
with the columns of :data:`COLUMNS`, one row per AI result; Assess-AI's use cases are single findings (pleural
effusion, pneumothorax), so each answer gives one row per finding, the finding named in ``Result Indicator``.

What the log does not hold is left empty, never guessed: race and ethnicity (not in a DICOM header), the exam's
name (the log keeps no StudyDescription), and every DICOM field of an answer to an image file. The Patient ID is the
log's keyed hash (:mod:`cxrlearn.monitoring.log`): the log never held the Patient ID itself, and ACR Connect
de-identifies the column in any case; one patient's answers still share it. ``Manufacturer``, ``Model``,
``Software Version`` and ``Platform`` describe the AI: cxrlearn, the bundle's backbone and digest, cxrlearn's
version and the runtime that computed the answer.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from cxrlearn._files import write_atomic
from cxrlearn.monitoring.log import LoggedAnswer

#: The columns of ACR Connect's AI Result import template, in its order.
COLUMNS = ("Patient ID", "Accession Number", "Result Indicator", "AI Result", "Manufacturer", "Model", "Study Date",
           "Software Version", "Platform", "Inference Date", "Age", "Sex", "Race", "Ethnicity", "Exam Name",
           "Modality", "Body Part Examined", "Contrast Indication")
#: ``AI Result`` of each kind of call.
POSITIVE, NEGATIVE, NOT_CALLED = "Positive", "Negative", "Not called"
#: A chest radiograph is taken without contrast.
NO_CONTRAST = "No"


def ai_result(row: LoggedAnswer, finding: str) -> str:
    """The call the answer made on ``finding``: :data:`NOT_CALLED` where the model had no threshold for it."""
    if row.positive is None or finding in row.not_called:
        return NOT_CALLED
    return POSITIVE if finding in row.positive else NEGATIVE


def assess_ai_rows(rows: Sequence[LoggedAnswer], model: str) -> list[tuple[str, ...]]:
    """One row of :data:`COLUMNS` per answer and finding; ``model`` names the AI model (backbone and digest)."""
    out = []
    for row in rows:
        tags = row.tags
        for finding in row.findings:
            out.append(tuple("" if value is None else str(value) for value in (
                row.patient_hash, tags.accession_number, finding, ai_result(row, finding), "cxrlearn", model,
                tags.study_date, row.cxrlearn_version, row.runtime, f"{row.answered_at:%Y%m%d}", tags.patient_age,
                tags.patient_sex, None, None, None, tags.modality, tags.body_part, NO_CONTRAST)))
    return out


def write_assess_ai(rows: Sequence[LoggedAnswer], path: Path, model: str) -> int:
    """Write the answers' Assess-AI rows to ``path`` (CSV, whole or not at all); the number of rows written."""
    lines = assess_ai_rows(rows, model)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(lines)
    write_atomic(path, text.getvalue())
    return len(lines)
