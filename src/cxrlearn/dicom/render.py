"""``cxrlearn dicom render``: a structured report drawn as a reader sees it, for the evidence creator's side of a
conformance test (IHE AI Results asks for a rendering to compare a viewer against) and for a team checking what
its viewer shows.

:func:`read_report` reads a TID 1500 report cxrlearn wrote back into typed values (by its content, with highdicom:
the finding groups' probabilities, thresholds and calls, the input check, the algorithm); :func:`render` draws the
heatmap capture beside it (``<name>.sc.dcm`` next to ``<name>.sr.dcm``, as ``predict --dicom-out`` and the node
write them) or, without one, a note that it is missing, the findings table, and the report's marks (UNVERIFIED,
not for diagnostic use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from cxrlearn.dicom.results import INPUT_CHECK, NOT_FOR_DIAGNOSIS, THRESHOLD
from cxrlearn.errors import DataError

#: What a report and its capture are named beside each other.
REPORT_SUFFIX, CAPTURE_SUFFIX = ".sr.dcm", ".sc.dcm"


@dataclass(frozen=True)
class FindingResult:
    name: str
    probability: float | None
    threshold: float | None
    call: str  # Present, Absent, or the report's words for no call ("not called: ...")


@dataclass(frozen=True)
class ReportContent:
    """What a cxrlearn structured report says, as a reader would list it."""

    findings: list[FindingResult]
    input_check: str
    algorithm: str
    patient_id: str
    study_date: str
    accession: str
    verification: str
    series_description: str


def read_report(path: Path) -> ReportContent:
    """A cxrlearn TID 1500 report read back; :class:`DataError` naming the file for anything else."""
    try:
        sr = hd.sr.srread(path)
        groups = list(sr.content.get_image_measurement_groups())
    except Exception as err:  # noqa: BLE001 - pydicom and highdicom raise many types on other files
        raise DataError(f"{path}: not a TID 1500 structured report ({type(err).__name__}: {err})") from None
    findings, check, algorithm = [], "", ""
    for group in groups:
        name = group.finding_type.meaning
        values: dict[str, float] = {}
        call = ""
        for item in group[0].ContentSequence:
            concept = item.ConceptNameCodeSequence[0]
            if item.ValueType == "NUM":
                values[concept.CodeValue] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and concept.CodeMeaning == name:
                call = item.ConceptCodeSequence[0].CodeMeaning
            elif item.ValueType == "TEXT" and concept.CodeMeaning == "Comment":
                call = call or item.TextValue
            elif item.ValueType == "TEXT" and concept.CodeMeaning == "Algorithm Name":
                algorithm = item.TextValue
            elif item.ValueType == "TEXT" and concept.CodeMeaning == "Algorithm Version":
                algorithm = f"{algorithm} {item.TextValue}".strip()
        if group.finding_type.value == INPUT_CHECK.value:
            check = call
            continue
        findings.append(FindingResult(name, values.get(codes.DCM.Probability.value), values.get(THRESHOLD.value),
                                      call))
    header = [str(getattr(sr, keyword, "") or "") for keyword in
              ("PatientID", "StudyDate", "AccessionNumber", "VerificationFlag", "SeriesDescription")]
    return ReportContent(findings, check, algorithm, *header)


def reports_in(source: Path) -> list[Path]:
    """The report ``source`` names, or the reports in the folder it names; refused by name when there is none."""
    if source.is_dir():
        found = sorted(source.glob(f"*{REPORT_SUFFIX}"))
        if not found:
            raise DataError(f"{source}: no structured reports (*{REPORT_SUFFIX}) in this folder")
        return found
    if not source.is_file():
        raise DataError(f"{source}: no such file or folder")
    return [source]


def _capture_pixels(report: Path) -> np.ndarray | None:
    capture = report.with_name(report.name[:-len(REPORT_SUFFIX)] + CAPTURE_SUFFIX)
    if not report.name.endswith(REPORT_SUFFIX) or not capture.is_file():
        return None
    try:
        return pydicom.dcmread(capture).pixel_array
    except Exception:  # noqa: BLE001 - a damaged capture: the report is drawn without it
        return None


def render(report: Path, out: Path) -> Path:
    """``report`` drawn to the PNG ``out`` (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    content = read_report(report)
    picture = _capture_pixels(report)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1, 1.15]})
    if picture is not None:
        left.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
    else:
        left.text(0.5, 0.5, f"no heatmap capture\n(*{CAPTURE_SUFFIX}) beside the report", ha="center", va="center")
    left.axis("off")
    right.axis("off")
    rows = [[f.name, "—" if f.probability is None else f"{f.probability:.3f}",
             "—" if f.threshold is None else f"{f.threshold:.3f}",
             "not called" if f.call.startswith("not called") else f.call[:28]] for f in content.findings]
    table = right.table(cellText=rows, colLabels=["Finding", "Probability", "Threshold", "Call"], loc="upper center",
                        cellLoc="left", colWidths=[0.34, 0.18, 0.18, 0.3])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, _), cell in table.get_celld().items():
        if row > 0 and rows[row - 1][3] == "Present":
            cell.set_facecolor("#fde2e1")
    right.set_title(f"Patient {content.patient_id or '—'}, study {content.study_date or '—'}, accession "
                    f"{content.accession or '—'}", fontsize=10)
    figure.text(0.5, 0.02, f"{content.algorithm} · input check: {content.input_check} · {content.verification} · "
                f"{NOT_FOR_DIAGNOSIS}", ha="center", fontsize=8, wrap=True)
    figure.suptitle(content.series_description or "cxrlearn structured report", fontsize=12)
    figure.tight_layout(rect=(0, 0.05, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    os.replace(partial, out)
    return out
