"""Into the hospital's workflow: DICOM results (a TID 1500 structured report and a Grad-CAM secondary capture) from
`predict --dicom-out`, and `cxrlearn dicom listen` between a real Orthanc and the model, with the PACS down, the
node killed, and bad instances. DX and CR instances are made from real NIH sample images."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pynetdicom import AE

from cxrlearn.cli.main import main
from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.dicom.outbox import Outbox
from cxrlearn.dicom.results import NOT_FOR_DIAGNOSIS, SCHEME
from cxrlearn.evaluation.operating_points import NOT_CALLED
from orthanc import Orthanc, free_port
from xray_files import chest_dx

TOOLS = ("dciodvfy", "storescu")


def _require_tools():
    missing = [tool for tool in TOOLS if shutil.which(tool) is None] + (
        [] if Path(shutil.which("Orthanc") or "/usr/sbin/Orthanc").exists() else ["Orthanc"])
    if missing:  # CI installs them (.ci/run): a missing one is a broken set-up, not a reason to skip
        pytest.fail(f"missing {', '.join(missing)}: install Debian's orthanc, dcmtk and dicom3tools (.ci/run does)")


@pytest.fixture(scope="module")
def xrays(data_dir) -> list[np.ndarray]:
    """Real sample radiographs at 1,024 px, as decoded grayscale."""
    return [load_grayscale(p) for p in sorted((data_dir / "nih-sample" / "images-1024").glob("*.png"))[:6]]


#: PixelMed's structured report validator (Debian's libpixelmed-java, with a JRE: .ci/run installs both); current
#: JDKs' XPath limits are lifted, as PixelMed's own instructions say.
PIXELMED = ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0",
            "-cp", "/usr/share/java/pixelmed.jar", "com.pixelmed.validate.DicomSRValidator"]


def _pixelmed_sr_errors(path: Path) -> list[str]:
    """PixelMed's errors on a structured report (it must find TID 1500 as the root template)."""
    if shutil.which("java") is None or not Path(PIXELMED[5]).is_file():  # CI installs them: not a reason to skip
        pytest.fail("missing PixelMed's validator: install Debian's libpixelmed-java and default-jre-headless "
                    "(.ci/run does)")
    checked = subprocess.run([*PIXELMED, str(path)], capture_output=True, text=True, timeout=300)
    said = checked.stdout + checked.stderr
    assert "Found Root Template TID_1500" in said, said[-2000:]
    return [line for line in said.splitlines() if line.startswith("Error")]


def _write(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _groups(sr) -> list:
    report = sr.content
    return list(report.get_image_measurement_groups())


def _read_back(sr) -> tuple[dict[str, float], dict[str, str], str]:
    """(probability per finding, call per finding, input check comment) from a structured report; a finding
    without a threshold has its comment ("not called: ...") as its call."""
    probabilities, calls, comment = {}, {}, None
    for group in _groups(sr):
        finding = group.finding_type.meaning
        for item in group[0].ContentSequence:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "NUM" and name == "Probability":
                probabilities[finding] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and finding != "Input check" and name == finding:
                calls[finding] = item.ConceptCodeSequence[0].CodeMeaning
            elif item.ValueType == "TEXT" and name == "Comment" and finding == "Input check":
                comment = item.TextValue
            elif item.ValueType == "TEXT" and name == "Comment":
                calls[finding] = item.TextValue
    return probabilities, calls, comment


# ---- predict --dicom-out ---------------------------------------------------------------------------------------

def test_predict_writes_a_structured_report_and_a_heatmap_per_dicom_input(evaluated, xrays, tmp_path, capsys):
    _require_tools()
    run = evaluated[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    dx = _write(chest_dx(xrays[0], patient_id="P-1", accession="A-1"), inputs / "dx.dcm")
    cr = _write(chest_dx(xrays[1], patient_id="P-2", accession="A-2", modality="CR"), inputs / "cr.dcm")
    Image.fromarray(xrays[2]).save(inputs / "plain.png")
    out = tmp_path / "dicom"
    assert main(["predict", "--model", str(run), str(inputs), "--out", str(tmp_path / "p.csv"), "--dicom-out",
                 str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 input(s) are not DICOM" in err and "plain.png" in err
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.{kind}.dcm" for stem in ("cr", "dx")
                                                     for kind in ("sc", "seg", "sr")]
    rows = pd.read_csv(tmp_path / "p.csv").set_index("image")
    findings = [c for c in rows.columns if c + "_positive" in rows.columns]
    for stem, source_path in (("dx", dx), ("cr", cr)):
        source = pydicom.dcmread(source_path)
        for kind in ("sr", "sc", "seg"):  # dicom3tools' validator: no errors (warnings name the local coding scheme)
            checked = subprocess.run(["dciodvfy", str(out / f"{stem}.{kind}.dcm")], capture_output=True, text=True)
            assert [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")] == []
        # PixelMed's SR validator, as IHE AI Results connectathons run it: no errors (its warnings name the items
        # of the local scheme, which TID 1500 does not list).
        assert _pixelmed_sr_errors(out / f"{stem}.sr.dcm") == []
        sr = hd.sr.srread(out / f"{stem}.sr.dcm")
        assert sr.SeriesDate == sr.ContentDate and sr.SeriesTime  # a PACS lists the series by its date
        # a readable code value (a Long Code Value beyond 16 characters)
        assert "Pleural_Thickening" in {group.finding_type.value for group in _groups(sr)}
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert (sr.PatientID, sr.AccessionNumber) == (source.PatientID, source.AccessionNumber)
        assert sr.VerificationFlag == "UNVERIFIED" and NOT_FOR_DIAGNOSIS in sr.SeriesDescription
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
            .ReferencedSOPInstanceUID == source.SOPInstanceUID
        probabilities, calls, comment = _read_back(sr)
        row = rows.loc[f"{stem}.dcm"]
        assert sorted(probabilities) == sorted(findings)
        assert all(abs(probabilities[f] - row[f]) < 1e-5 for f in findings)
        assert {f for f, call in calls.items() if call == "Present"} == {f for f in findings
                                                                         if row[f + "_positive"] == 1}
        # A finding without a threshold (too few validation cases): its probability, and "not called" in words.
        assert {f for f, call in calls.items() if call == NOT_CALLED} == set(str(row["not_called"]).split("|"))
        assert comment == row["input_check"]
        assert SCHEME in {c.CodingSchemeDesignator for c in sr.CodingSchemeIdentificationSequence}
        sc = pydicom.dcmread(out / f"{stem}.sc.dcm")
        assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
        assert sc.Columns == source.Columns and sc.Rows > source.Rows  # its own resolution, and the caption
        assert NOT_FOR_DIAGNOSIS in sc.SeriesDescription and sc.SeriesDate == sc.ContentDate
        _check_heatmap_segmentation(out / f"{stem}.seg.dcm", source, row, sc, sr)
    # The report as a reader sees it: `dicom render` reads it back (the CSV's figures) and draws it beside its
    # capture; a file that is not a report is one line naming it.
    from cxrlearn.dicom.render import read_report

    content = read_report(out / "dx.sr.dcm")
    row = rows.loc["dx.dcm"]
    assert [f.name for f in content.findings] == findings and content.patient_id == "P-1"
    assert all(abs(f.probability - row[f.name]) < 1e-5 for f in content.findings)
    assert {f.name for f in content.findings if f.call == "Present"} == set(str(row["positive_findings"]).split("|")) - {""}
    assert main(["dicom", "render", str(out), "--out", str(tmp_path / "rendered")]) == 0
    drawn = Image.open(tmp_path / "rendered" / "dx.png")
    assert drawn.size[0] > 1000 and np.asarray(drawn.convert("L")).std() > 20  # a picture, not a blank page
    assert main(["dicom", "render", str(out / "dx.sc.dcm"), "--out", str(tmp_path / "x.png")]) == 2
    assert "dx.sc.dcm: not a TID 1500 structured report" in capsys.readouterr().err
    # The same image through the same model: the same objects, so a PACS stores them once.
    again = tmp_path / "again"
    assert main(["predict", "--model", str(run), str(dx), "--dicom-out", str(again), "--no-progress"]) == 0
    for kind in ("sr", "sc", "seg"):
        assert pydicom.dcmread(again / f"dx.{kind}.dcm").SOPInstanceUID == \
            pydicom.dcmread(out / f"dx.{kind}.dcm").SOPInstanceUID
    # --heatmap chooses the heatmap objects; a bad value is one line.
    for kinds, made in (("capture", ["sc", "sr"]), ("none", ["sr"]), ("segmentation", ["seg", "sr"])):
        chosen = tmp_path / kinds
        assert main(["predict", "--model", str(run), str(dx), "--dicom-out", str(chosen), "--heatmap", kinds,
                     "--no-progress"]) == 0
        assert sorted(p.name for p in chosen.iterdir()) == [f"dx.{kind}.dcm" for kind in made]
    capsys.readouterr()
    assert main(["predict", "--model", str(run), str(dx), "--dicom-out", str(tmp_path / "bad"), "--heatmap",
                 "parametric-map"]) == 2
    assert "--heatmap 'parametric-map': expected segmentation, capture" in capsys.readouterr().err


def _check_heatmap_segmentation(path: Path, source, row, capture, report) -> None:
    """The heatmap segmentation: valid, registered pixel for pixel to the source, one fractional segment per finding
    called present (else the most probable), the first drawn in the capture too, and among the report's evidence."""
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "FRACTIONAL" and (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and NOT_FOR_DIAGNOSIS in seg.SeriesDescription
    assert seg.SeriesDate == seg.ContentDate
    assert [uids[-1] for uids in seg.get_source_image_uids()] == [source.SOPInstanceUID]
    named = [item.SegmentedPropertyTypeCodeSequence[0].CodeValue for item in seg.SegmentSequence]
    called = [f for f in str(row["positive_findings"]).split("|") if f and f != "nan"]
    assert sorted(named) == sorted(called) if called else len(named) == 1
    assert [row[f] for f in named] == sorted((row[f] for f in named), reverse=True)  # most probable first
    assert f"Grad-CAM of {named[0]} " in capture.ImageComments
    pixels = pydicom.dcmread(path).pixel_array  # the stored fractions, 0-255 for Grad-CAM's 0-1
    assert pixels.shape[-2:] == (source.Rows, source.Columns) and pixels.max() == 255 and pixels.min() == 0
    evidence = {item.ReferencedSOPInstanceUID for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}


def test_only_frontal_chest_radiographs_are_answered_and_the_rest_are_refused_with_the_reason(evaluated, xrays,
                                                                                               tmp_path, capsys):
    """Routing by what the study is (cxrlearn.dicom.routing), on real radiographs with their tags changed: a PA
    chest DX and a CR with no body part but a chest study description are answered; a lateral chest, a hand, one
    that names no body part and one whose empty view a description calls lateral are refused, each with its reason;
    --accept any answers them all; a bad --accept is one line."""
    from cxrlearn.dicom.outbox import Outbox
    from cxrlearn.dicom.predicting import predict_batch
    from cxrlearn.dicom.routing import NOT_FOR_THIS_MODEL, Accept
    from cxrlearn.inference.predictor import Predictor

    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = {"pa": {}, "described": {"BodyPartExamined": "", "StudyDescription": "XR CHEST PA"},
             "lateral": {"ViewPosition": "LL"}, "hand": {"BodyPartExamined": "HAND"},
             "unstated": {"BodyPartExamined": ""}, "lat-described": {"ViewPosition": "", "SeriesDescription": "CHEST LAT"}}
    for i, (name, tags) in enumerate(cases.items()):
        ds = chest_dx(xrays[i % len(xrays)], patient_id=f"P-{i}", modality="CR" if name == "described" else "DX")
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        _write(ds, inputs / f"{name}.dcm")
    out = tmp_path / "dicom"
    assert main(["predict", "--model", str(evaluated[0]), str(inputs), "--out", str(tmp_path / "p.csv"),
                 "--dicom-out", str(out), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.sr.dcm")) == ["described.sr.dcm", "pa.sr.dcm"]
    assert len(list(out.iterdir())) == 6  # and their heatmap segmentations and captures
    for name, reason in (("lateral", "lateral view LL"), ("hand", "body part HAND"),
                         ("unstated", "body part not stated"), ("lat-described", "a description says lateral")):
        line = next(line for line in err.splitlines() if f"{name}.dcm:" in line)
        assert NOT_FOR_THIS_MODEL in line and reason in line, line
    every = tmp_path / "every"
    assert main(["predict", "--model", str(evaluated[0]), str(inputs), "--dicom-out", str(every), "--accept", "any",
                 "--no-progress", "--out", str(tmp_path / "q.csv")]) == 0
    assert len(list(every.glob("*.sr.dcm"))) == len(cases)
    assert main(["predict", "--model", str(evaluated[0]), str(inputs), "--dicom-out", str(every), "--accept",
                 "view=PA|AP,bodypart=CHEST"]) == 2
    assert "--accept 'view=PA|AP,bodypart=CHEST': expected any" in capsys.readouterr().err
    assert Accept.parse("view=any") == Accept(views=())
    # The node's and the poller's step: refused to refused/ with the reason, counted apart by `dicom status`.
    outbox = Outbox(tmp_path / "outbox")
    for name in cases:
        (outbox.root / "received" / f"{name}.dcm").write_bytes((inputs / f"{name}.dcm").read_bytes())
    assert predict_batch(outbox, Predictor(evaluated[0]), outbox.waiting(10)) == 2
    assert "lateral view LL" in (outbox.root / "refused" / "lateral.dcm.txt").read_text()
    assert outbox.counts().not_for_model == 4 and outbox.counts().refused == 4
    assert main(["dicom", "status", "--outbox", str(outbox.root)]) == 0
    assert "refused as not for this model, ever (lateral views, other body parts; --accept): 4" in \
        capsys.readouterr().out

    # --not-analysed-report: a refused radiograph gets a report that says so, and why (valid, as PixelMed and
    # dciodvfy judge it); the node queues it and still counts the instance as not for this model.
    said = tmp_path / "said"
    assert main(["predict", "--model", str(evaluated[0]), str(inputs), "--dicom-out", str(said), "--heatmap", "none",
                 "--not-analysed-report", "--no-progress", "--out", str(tmp_path / "r.csv")]) == 3
    assert "a not-analysed report says so" in capsys.readouterr().err
    assert sorted(p.name for p in said.glob("*.sr.dcm")) == sorted(f"{name}.sr.dcm" for name in cases)
    lateral = said / "lateral.sr.dcm"
    assert _pixelmed_sr_errors(lateral) == []
    checked = subprocess.run(["dciodvfy", str(lateral)], capture_output=True, text=True)
    assert [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")] == []
    groups = _groups(hd.sr.srread(lateral))
    assert [g.finding_type.meaning for g in groups] == ["Analysis by the model"]
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in groups[0][0].ContentSequence}
    assert items["Analysis by the model"].ConceptCodeSequence[0].CodeMeaning == "Not analysed"
    assert "lateral view LL" in items["Comment"].TextValue and "Probability" not in items
    from cxrlearn.dicom.results import Heatmaps, ResultOptions

    outbox = Outbox(tmp_path / "outbox2")
    for name in cases:
        (outbox.root / "received" / f"{name}.dcm").write_bytes((inputs / f"{name}.dcm").read_bytes())
    assert predict_batch(outbox, Predictor(evaluated[0]), outbox.waiting(10),
                         options=ResultOptions(Heatmaps(False, False), not_analysed=True)) == 2
    assert len(outbox.to_send()) == len(cases) and outbox.counts().not_for_model == 4


def test_a_site_codes_its_findings_in_snomed_and_a_bad_mapping_is_refused_by_line_before_anything_starts(
        evaluated, xrays, tmp_path, capsys):
    """--codes: the mapped findings carry the site's SNOMED CT codes in the report and the segmentation (PixelMed:
    no errors), the others keep cxrlearn's; a mapping the model cannot use is refused naming the line and the
    field, by predict before it predicts and by the node before it listens."""
    _require_tools()
    run = evaluated[0]
    codes = tmp_path / "codes.csv"
    codes.write_text("finding,scheme,value,meaning\nEffusion,SCT,60046008,Pleural effusion\n"
                     "Pneumothorax,SCT,36118008,Pneumothorax\nCardiomegaly,SCT,8186001,Cardiomegaly\n")
    source = _write(chest_dx(xrays[0], patient_id="P-C"), tmp_path / "dx.dcm")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), str(source), "--dicom-out", str(out), "--codes", str(codes),
                 "--heatmap", "segmentation", "--accept", "any", "--no-progress"]) == 0
    sr = hd.sr.srread(out / "dx.sr.dcm")
    coded = {group.finding_type.value: group.finding_type.scheme_designator for group in _groups(sr)}
    assert {value for value, scheme in coded.items() if scheme == "SCT"} == {"60046008", "36118008", "8186001"}
    assert coded["Pleural_Thickening"] == SCHEME and "Effusion" not in coded
    assert _pixelmed_sr_errors(out / "dx.sr.dcm") == []
    seg = pydicom.dcmread(out / "dx.seg.dcm")
    for item in seg.SegmentSequence:  # a segment of a mapped finding has its code
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert (code.CodingSchemeDesignator == "SCT") == (code.CodeValue in {"60046008", "36118008", "8186001"})
    bad = {"Efusion,SCT,60046008,Pleural effusion": "finding 'Efusion' is not one of the model's",
           "Effusion,SCT,60046009,Pleural effusion": "value '60046009' is not a SCT code: its check digit is wrong",
           "Effusion,ICD10,J90,Pleural effusion": "scheme 'ICD10' is not known",
           "Effusion,RADLEX,12345,Pleural effusion": "value '12345' is not a RADLEX code: a RadLex ID is RID",
           "Effusion,SCT,60046008,": "meaning must be 1 to 64 characters"}
    for row, message in bad.items():
        codes.write_text(f"finding,scheme,value,meaning\nCardiomegaly,SCT,8186001,Cardiomegaly\n{row}\n")
        assert main(["predict", "--model", str(run), str(source), "--dicom-out", str(tmp_path / "o"), "--codes",
                     str(codes), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--codes {codes}, line 3: {message}" in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    codes.write_text("finding,code\nEffusion,60046008\n")
    assert main(["dicom", "listen", "--model", str(run), "--outbox", str(tmp_path / "box"), "--send-to",
                 "PACS@127.0.0.1:1", "--port", str(free_port()), "--codes", str(codes)]) == 2
    assert "expected a CSV with the columns finding, scheme, value, meaning" in capsys.readouterr().err


def test_a_dicom_input_no_result_can_be_made_for_is_named(evaluated, xrays, tmp_path, capsys):
    run = evaluated[0]
    ds = chest_dx(xrays[0])
    del ds.StudyInstanceUID
    path = _write(ds, tmp_path / "nostudy.dcm")
    assert main(["predict", "--model", str(run), str(path), "--dicom-out", str(tmp_path / "o"), "--no-progress"]) == 3
    assert "nostudy.dcm: the DICOM file has no StudyInstanceUID" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []


# ---- the node between Orthanc and the model ---------------------------------------------------------------------

class NodeProcess:
    """`cxrlearn dicom listen` in a subprocess (it can be killed with SIGKILL)."""

    def __init__(self, run: Path, outbox: Path, port: int, orthanc: Orthanc, extra: list[str] | None = None):
        self.command = [sys.executable, "-m", "cxrlearn.cli.main", "dicom", "listen", "--model", str(run),
                        "--outbox", str(outbox), "--port", str(port), "--send-to",
                        f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}", *(extra or [])]
        self.port, self.outbox, self.process = port, outbox, None

    def start(self) -> NodeProcess:
        self.log = open(self.outbox.parent / "node.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.outbox.parent / "node.log").read_text()[-3000:]
            if _echo(self.port):
                return self
            time.sleep(0.3)
        raise AssertionError("the node did not answer a C-ECHO within 120 s")

    def start_without_echo(self) -> NodeProcess:
        """For a node that listens for TLS only: started once its log says it listens."""
        self.log = open(self.outbox.parent / "node.log", "ab")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=self.log,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
        log = self.outbox.parent / "node.log"
        _wait(lambda: self.process.poll() is not None or "(TLS)" in log.read_text(), 120, "the node listening")
        assert self.process.poll() is None, log.read_text()[-3000:]
        return self

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(60)


def _echo(port: int, calling: str = "ORTHANC") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRLEARN")
    if not assoc.is_established:
        return False
    assoc.send_c_echo()
    assoc.release()
    return True


def _store(port: int, ds, calling: str = "ORTHANC") -> int | None:
    """C-STORE one dataset to the node; the status (None: no association)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRLEARN")
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def _wait(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


def _results(orthanc: Orthanc, study_uid: str) -> list[str]:
    """The modalities of a study's instances in Orthanc, sorted (a DX with its SR and SC: DX, OT/SC, SR)."""
    return sorted(i["Modality"] for i in orthanc.study_instances(study_uid))


@pytest.fixture()
def pacs(tmp_path):
    _require_tools()
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(),
                      {"cxrlearn": ["CXRLEARN", "127.0.0.1", node_port]})
    (tmp_path / "orthanc").mkdir()
    orthanc.start()
    yield orthanc, node_port
    orthanc.stop()


def test_orthanc_sends_an_image_and_gets_back_a_report_and_a_heatmap(evaluated, xrays, pacs, tmp_path):
    orthanc, port = pacs
    node = NodeProcess(evaluated[0], tmp_path / "outbox", port, orthanc, ["--allow-ae", "ORTHANC"]).start()
    try:
        source = chest_dx(xrays[0], patient_id="P-7", accession="A-7")
        orthanc.send(orthanc.upload(_write(source, tmp_path / "dx.dcm").read_bytes()), "cxrlearn")
        _wait(lambda: len(_results(orthanc, source.StudyInstanceUID)) >= 4, 120, "the SR, SEG and SC in Orthanc")
        # OT: a secondary capture's modality; SEG: the heatmaps as a segmentation
        assert _results(orthanc, source.StudyInstanceUID) == ["DX", "OT", "SEG", "SR"]
        instances = {i["Modality"]: i for i in orthanc.study_instances(source.StudyInstanceUID)}
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(orthanc.file(instances["SEG"]["id"]))))
        assert seg.SegmentationType == "FRACTIONAL" and seg.number_of_segments >= 1
        assert seg.pixel_array.max() == 255  # JPEG-LS, or decompressed by the node where the PACS refuses it
        assert seg.get_source_image_uids()[0][-1] == source.SOPInstanceUID
        report = pydicom.dcmread(io.BytesIO(orthanc.file(instances["SR"]["id"])))
        sr = hd.sr.Comprehensive3DSR.from_dataset(report)
        probabilities, _, comment = _read_back(sr)
        assert len(probabilities) == 14 and comment and comment.split(":")[0] in ("ok", "warning")
        assert report.PatientID == "P-7" and report.AccessionNumber == "A-7"
        # A calling AE title outside --allow-ae is rejected.
        assert not _echo(port, calling="STRANGER")
        # An instance without pixels gets a failure status; a damaged one is refused in the outbox; the node goes on.
        empty = chest_dx(xrays[1])
        del empty.PixelData
        assert _store(port, empty) == 0xA900
        damaged = chest_dx(xrays[1])
        damaged.PixelData = damaged.PixelData[:1000]
        assert _store(port, damaged) == 0x0000  # acknowledged once on disk; judged by the predictor
        _wait(lambda: list((tmp_path / "outbox" / "refused").glob("*.txt")), 60, "the damaged instance refused")
        status = subprocess.run([sys.executable, "-m", "cxrlearn.cli.main", "dicom", "status", "--outbox",
                                 str(tmp_path / "outbox")], capture_output=True, text=True)
        assert "sent (confirmed): 3" in status.stdout and "refused: 1" in status.stdout
        assert node.process.poll() is None
    finally:
        node.stop()


def test_dicom_tls_round_trip_with_orthanc(evaluated, xrays, tmp_path):
    """A real Orthanc with DICOM TLS on (its own certificate, requiring its peers' to chain to the test's CA) and
    the node started with --tls-cert/--tls-key/--tls-ca: Orthanc sends an image over TLS and gets the results back
    over TLS; storescu without TLS gets no association, and the node's log holds no traceback; an expired
    certificate stops `dicom listen` before it listens, in one line."""
    from tls_certs import Authority

    _require_tools()
    (tmp_path / "ca").mkdir()
    (tmp_path / "orthanc").mkdir()
    ca = Authority(tmp_path / "ca")
    orthanc_cert, orthanc_key = ca.issue("orthanc")
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(),
                      {"cxrlearn": {"AET": "CXRLEARN", "Host": "127.0.0.1", "Port": node_port, "UseDicomTls": True}},
                      extra={"DicomTlsEnabled": True, "DicomTlsCertificate": str(orthanc_cert),
                             "DicomTlsPrivateKey": str(orthanc_key), "DicomTlsTrustedCertificates": str(ca.path),
                             "DicomTlsRemoteCertificateRequired": True}).start()
    node_cert, node_key = ca.issue("node")
    tls = ["--tls-cert", str(node_cert), "--tls-key", str(node_key), "--tls-ca", str(ca.path)]
    node = NodeProcess(evaluated[0], tmp_path / "outbox", node_port, orthanc, tls).start_without_echo()
    try:
        source = chest_dx(xrays[0], patient_id="P-TLS")
        orthanc.send(orthanc.upload(_write(source, tmp_path / "dx.dcm").read_bytes()), "cxrlearn")
        _wait(lambda: len(_results(orthanc, source.StudyInstanceUID)) >= 4, 180, "the results in Orthanc over TLS")
        assert _results(orthanc, source.StudyInstanceUID) == ["DX", "OT", "SEG", "SR"]
        plain = subprocess.run(["storescu", "-to", "5", "-aet", "MODALITY", "-aec", "CXRLEARN", "127.0.0.1",
                                str(node_port), str(tmp_path / "dx.dcm")], capture_output=True, text=True)
        assert plain.returncode != 0  # no TLS, no association
        assert node.process.poll() is None
    finally:
        node.stop()
        orthanc.stop()
    assert "Traceback" not in (tmp_path / "node.log").read_text()
    expired_cert, expired_key = ca.issue("expired", days=-1)
    done = subprocess.run([sys.executable, "-m", "cxrlearn.cli.main", "dicom", "listen", "--model", str(evaluated[0]),
                           "--outbox", str(tmp_path / "outbox"), "--port", str(free_port()), "--send-to",
                           "ORTHANC@127.0.0.1:4242", "--tls-cert", str(expired_cert), "--tls-key", str(expired_key)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the certificate expired on" in done.stderr and "Traceback" not in done.stderr


def test_results_wait_for_a_pacs_that_is_down_and_survive_kill_9(evaluated, xrays, pacs, tmp_path):
    orthanc, port = pacs
    outbox = tmp_path / "outbox"
    node = NodeProcess(evaluated[0], outbox, port, orthanc).start()
    orthanc.stop()  # the PACS goes down
    sources = [chest_dx(image, patient_id=f"P-{i}", accession=f"A-{i}") for i, image in enumerate(xrays[:4])]
    try:
        for ds in sources:  # the modality sends straight to the node (dcmtk's storescu)
            done = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "CXRLEARN", "127.0.0.1", str(port),
                                   str(_write(ds, tmp_path / f"{ds.PatientID}.dcm"))], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        _wait(lambda: len(list((outbox / "outgoing").glob("*.dcm"))) >= 2, 120, "results queued")
    finally:
        node.stop(signal.SIGKILL)  # killed mid-queue: some predicted, maybe some not yet
    assert sorted(p.name for p in (outbox / "received").glob("*.dcm")) + \
        sorted(p.name for p in (outbox / "outgoing").glob("*.sr.dcm")) != []
    orthanc.start()  # the PACS is back, the node restarted: everything arrives, once
    node = NodeProcess(evaluated[0], outbox, port, orthanc).start()
    try:
        for ds in sources:
            _wait(lambda: _results(orthanc, ds.StudyInstanceUID) == ["OT", "SEG", "SR"], 180,
                  f"{ds.PatientID}'s SR, SEG and SC, once each")
        _wait(lambda: not list((outbox / "outgoing").glob("*.dcm")), 60, "the outbox emptied")
        time.sleep(2)  # nothing more arrives
        assert all(_results(orthanc, ds.StudyInstanceUID) == ["OT", "SEG", "SR"] for ds in sources)
        assert len(orthanc.get("/instances")) == 3 * len(sources)
    finally:
        assert node.stop() in (0, 130)


# ---- DICOMweb: `cxrlearn dicom poll` against Orthanc's DICOMweb plugin ----------------------------------------

def test_poll_stores_results_through_dicomweb_once_and_waits_for_an_archive_that_is_down(
        evaluated, xrays, pacs, tmp_path, capsys):
    from cxrlearn.dicom.poll import Poller, parse_since
    from cxrlearn.inference.predictor import Predictor

    orthanc, _ = pacs
    url = orthanc.url + "/dicom-web"
    recent = [chest_dx(xrays[0], patient_id="W-1"), chest_dx(xrays[1], patient_id="W-2", modality="CR")]
    old = chest_dx(xrays[2], patient_id="W-OLD")
    old.StudyDate = "20190301"
    for ds in [*recent, old]:
        orthanc.upload(_write(ds, tmp_path / f"{ds.PatientID}.dcm").read_bytes())
    outbox = tmp_path / "outbox"
    command = ["dicom", "poll", "--model", str(evaluated[0]), "--url", url, "--outbox", str(outbox),
               "--since", "2020-01-01"]

    assert main(command) == 0
    err = capsys.readouterr().err
    assert "round 1: 2 new instance(s), 2 predicted on, 6 result(s) stored, 0 waiting" in err
    assert _results(orthanc, recent[0].StudyInstanceUID) == ["DX", "OT", "SEG", "SR"]
    assert _results(orthanc, recent[1].StudyInstanceUID) == ["CR", "OT", "SEG", "SR"]
    assert _results(orthanc, old.StudyInstanceUID) == ["DX"]  # before --since
    report = next(i for i in orthanc.study_instances(recent[1].StudyInstanceUID) if i["Modality"] == "SR")
    probabilities, _, _ = _read_back(hd.sr.Comprehensive3DSR.from_dataset(
        pydicom.dcmread(io.BytesIO(orthanc.file(report["id"])))))
    assert len(probabilities) == 14

    # A rerun takes nothing again (its own SR, SEG and SC are not radiographs), and stores nothing twice.
    assert main(command) == 0
    assert "round 1: 0 new instance(s), 0 predicted on, 0 result(s) stored, 0 waiting" in capsys.readouterr().err
    assert len(orthanc.get("/instances")) == 9

    # The archive goes down between retrieving and storing: the results wait in the outbox, and are stored once
    # it is back.
    late = chest_dx(xrays[3], patient_id="W-3")
    orthanc.upload(_write(late, tmp_path / "late.dcm").read_bytes())
    poller = Poller(Predictor(evaluated[0]), Outbox(outbox), url, since=parse_since("20200101"))
    for instance in poller.find():
        assert poller.retrieve(instance)
    orthanc.stop()
    down = poller.run_round()
    assert (down.predicted, down.stored, down.waiting) == (1, 0, 3)
    assert down.failure and down.failure.startswith(f"cannot search {url}")
    assert main(command) == 2  # the command says so, exits 2 and keeps them
    assert "3 result(s) wait in" in capsys.readouterr().err
    orthanc.start()
    back = poller.run_round()
    assert (back.found, back.stored, back.waiting, back.failure) == (0, 3, 0, None)
    assert _results(orthanc, late.StudyInstanceUID) == ["DX", "OT", "SEG", "SR"]
    assert len(orthanc.get("/instances")) == 13
    events = [e["event"] for e in Outbox(outbox).events()]
    assert events.count("received") == 3 and events.count("sent") == 9


# ---- issue 32 against a real Orthanc: a rule that forwards everything, and an instance without PatientSex -------

FORWARD_ALL = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   SendToModality(instanceId, 'cxrlearn')
end
"""


def test_a_pacs_rule_that_forwards_everything_makes_no_loop(evaluated, xrays, tmp_path):
    """Orthanc forwards every instance it stores to the node, the node's own results included (a common routing
    rule): each image gets one SR and one SC, and nothing more arrives; an instance without PatientSex is answered
    like the others."""
    _require_tools()
    node_port = free_port()
    (tmp_path / "orthanc").mkdir()
    (tmp_path / "forward.lua").write_text(FORWARD_ALL)
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(), {"cxrlearn": ["CXRLEARN", "127.0.0.1", node_port]},
                      extra={"LuaScripts": [str(tmp_path / "forward.lua")]}).start()
    node = NodeProcess(evaluated[0], tmp_path / "outbox", node_port, orthanc, ["--secondary-captures"]).start()
    try:
        plain = chest_dx(xrays[0], patient_id="LOOP-1")
        unsexed = chest_dx(xrays[1], patient_id="LOOP-2")
        del unsexed.PatientSex
        for ds in (plain, unsexed):
            orthanc.upload(_write(ds, tmp_path / f"{ds.PatientID}.dcm").read_bytes())
        for ds in (plain, unsexed):
            _wait(lambda: len(_results(orthanc, ds.StudyInstanceUID)) >= 4, 180, f"{ds.PatientID}'s SR, SEG and SC")
        time.sleep(15)  # the results were forwarded back to the node: nothing more may come of them
        for ds in (plain, unsexed):
            assert _results(orthanc, ds.StudyInstanceUID) == ["DX", "OT", "SEG", "SR"]
        assert len(orthanc.get("/instances")) == 8
        events = [e["event"] for e in Outbox(tmp_path / "outbox").events()]
        assert events.count("predicted") == 2 and events.count("ignored") >= 2  # the SCs came back and were dropped
    finally:
        node.stop()
        orthanc.stop()
