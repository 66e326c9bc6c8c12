"""Safe to leave running in a hospital (issue 32): the instances real modalities send, a destination that refuses
what it is offered, a damaged outbox, two patients behind one SOP Instance UID, results forwarded back, and
DICOMweb archives that misbehave. Each case here once stopped every later result, lost one, or ended in a
traceback. The DICOM peers are real pynetdicom and HTTP servers on loopback; instances are real NIH sample images."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (Comprehensive3DSRStorage, ComprehensiveSRStorage, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, SecondaryCaptureImageStorage, SegmentationStorage, generate_uid)
from pynetdicom import AE, evt

from cxrlearn.cli.main import main
from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.dicom.results import Heatmaps, ResultOptions
from orthanc import free_port
from xray_files import chest_dx


@pytest.fixture(scope="module")
def xrays(data_dir) -> list[np.ndarray]:
    return [load_grayscale(p) for p in sorted((data_dir / "nih-sample" / "images-1024").glob("*.png"))[6:10]]


@pytest.fixture(scope="module")
def predictor(evaluated):
    from cxrlearn.inference.predictor import Predictor

    return Predictor(evaluated[0])


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:  # CI installs dicom3tools (.ci/run): missing is a broken set-up
        pytest.fail("missing dciodvfy: install Debian's dicom3tools (.ci/run does)")
    path = tmp_path / "checked.dcm"
    path.write_bytes(data)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


# What modalities really send: each was enough to stop every later result (the builder raised, the batch was
# retried forever). Each is answered now, with the value left empty or corrected.
ANSWERED = {
    "no PatientID": lambda ds: delattr(ds, "PatientID"),
    "no PatientName": lambda ds: delattr(ds, "PatientName"),
    "no StudyDate": lambda ds: delattr(ds, "StudyDate"),
    "no PatientSex": lambda ds: delattr(ds, "PatientSex"),
    "no Modality": lambda ds: delattr(ds, "Modality"),
    "no AccessionNumber": lambda ds: delattr(ds, "AccessionNumber"),
    "PatientSex X": lambda ds: setattr(ds, "PatientSex", "X"),
    "invalid StudyDate": lambda ds: setattr(ds, "StudyDate", "20261345"),
    "PatientOrientation X\\Y": lambda ds: setattr(ds, "PatientOrientation", ["X", "Y"]),
    "unknown character set": lambda ds: setattr(ds, "SpecificCharacterSet", "ISO_IR 999"),
    "name over 64 characters": lambda ds: setattr(ds, "PatientName", "Long^" + "A" * 80),
    "control characters in the name": lambda ds: setattr(ds, "PatientName", "Tab\tBell\x07^Name"),
    "Latin-1 name": lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 100"),
                                setattr(ds, "PatientName", "Müller^Jörg")),
}
# What no result can truthfully belong to: refused alone, by name, with the reason.
REFUSED = {
    "no SeriesInstanceUID": (lambda ds: delattr(ds, "SeriesInstanceUID"), "has no SeriesInstanceUID"),
    "PatientID over 64 characters": (lambda ds: setattr(ds, "PatientID", "9" * 80), "PatientID"),
    "malformed StudyInstanceUID": (lambda ds: setattr(ds, "StudyInstanceUID", "1.2.abc"), "is not a valid UID"),
}


def test_one_bad_instance_never_blocks_the_others(predictor, xrays, tmp_path):
    from cxrlearn.dicom.outbox import Outbox
    from cxrlearn.dicom.predicting import predict_batch

    outbox = Outbox(tmp_path / "outbox")
    names = {}
    for i, (case, change) in enumerate([*ANSWERED.items(), *((c, v[0]) for c, v in REFUSED.items())]):
        ds = chest_dx(xrays[i % len(xrays)], patient_id=f"P{i}")
        change(ds)
        names[case] = outbox.receive(ds.SOPInstanceUID, _bytes(ds), case).name
    waiting = outbox.waiting()
    assert len(waiting) == len(ANSWERED) + len(REFUSED)
    assert predict_batch(outbox, predictor, waiting) == len(ANSWERED)  # one batch, every good one answered
    assert outbox.waiting() == []
    for case in ANSWERED:
        stem = names[case].removesuffix(".dcm")
        for kind in ("sr", "sc"):
            data = (tmp_path / "outbox" / "outgoing" / f"{stem}.{kind}.dcm").read_bytes()
            assert _dciodvfy_errors(data, tmp_path) == [], case
    for case, (_, reason) in REFUSED.items():
        why = (tmp_path / "outbox" / "refused" / f"{names[case]}.txt").read_text()
        assert names[case] in why and reason in why, (case, why)
        assert (tmp_path / "outbox" / "refused" / names[case]).is_file()  # the instance is kept beside it
    latin = pydicom.dcmread(tmp_path / "outbox" / "outgoing" / names["Latin-1 name"].replace(".dcm", ".sr.dcm"))
    assert str(latin.PatientName) == "Müller^Jörg" and latin.SpecificCharacterSet == "ISO_IR 192"
    sex = pydicom.dcmread(tmp_path / "outbox" / "outgoing" / names["PatientSex X"].replace(".dcm", ".sr.dcm"))
    assert sex.PatientSex == "" and sex.PatientID == f"P{list(ANSWERED).index('PatientSex X')}"


def test_the_outbox_survives_its_own_damage(tmp_path, capsys):
    from cxrlearn.dicom.outbox import Outbox

    root = tmp_path / "outbox"
    outbox = Outbox(root)
    (root / "received" / "1.2.3.dcm").mkdir()  # a folder: listed for ever before
    os.mkfifo(root / "received" / "1.2.4.dcm")  # a FIFO: reading it hung the predictor
    os.mkfifo(root / "outgoing" / "1.2.5.sr.dcm")
    (root / "received" / "1.2.6.dcm").write_bytes(b"a regular file")
    with open(root / "log.jsonl", "a", encoding="utf-8") as log:
        log.write('42\n"text"\nnull\n[1]\n{"event": "sent", "uid": "1.2.7.sr"}\n{"event": "send failed", "why": 5}\n')
    assert [p.name for p in outbox.waiting()] == ["1.2.6.dcm"]
    assert outbox.to_send() == []
    refused = sorted(p.name for p in (root / "refused").iterdir())
    assert refused == ["1.2.3.dcm", "1.2.3.dcm.txt", "1.2.4.dcm", "1.2.4.dcm.txt", "1.2.5.sr.dcm", "1.2.5.sr.dcm.txt"]
    assert "a FIFO, not a DICOM file" in (root / "refused" / "1.2.4.dcm.txt").read_text()
    counts = outbox.counts()
    assert (counts.received, counts.sent, counts.refused, counts.last_failure) == (1, 1, 3, "5")
    assert main(["dicom", "status", "--outbox", str(root)]) == 0
    assert "refused: 3" in capsys.readouterr().out


# ---- the node against a stand-in PACS ---------------------------------------------------------------------------

class StandInPacs:
    """A C-STORE SCP that accepts only the SOP classes it is given (as some PACS do) and keeps what it gets."""

    def __init__(self, port: int, classes, ssl_context=None):
        self.port, self.received, self.ae = port, [], AE(ae_title="PACS")
        for sop_class in classes:
            self.ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server, self.ssl_context = None, ssl_context

    def start(self) -> StandInPacs:
        def stored(event):
            self.received.append(event.dataset)
            return 0x0000

        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.ssl_context,
                                           evt_handlers=[(evt.EVT_C_STORE, stored)])
        return self

    def stop(self) -> None:
        self.server.shutdown()


def _store(port: int, ds, tls_args=None) -> int | None:
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # as a PACS received it: no file meta
        implicit = (getattr(ds, "original_encoding", None) or (True, True))[0]
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRLEARN", tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    except ValueError:  # the node accepted no presentation context for this SOP class
        return None
    finally:
        assoc.release()


def _wait(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


def test_the_node_keeps_patients_apart_never_answers_itself_and_its_sender_never_dies(predictor, xrays, tmp_path):
    from cxrlearn.dicom.node import Destination, Node
    from cxrlearn.dicom.outbox import Outbox

    pacs_port, node_port = free_port(), free_port()
    # A PACS that refuses Comprehensive 3D SR (the first offer) and takes Comprehensive SR and SC, and no
    # segmentation: the node is told so (--heatmap capture).
    pacs = StandInPacs(pacs_port, [ComprehensiveSRStorage, SecondaryCaptureImageStorage]).start()
    outbox = Outbox(tmp_path / "outbox")
    for name, data in (("empty.sr.dcm", b""), ("garbage.sr.dcm", b"not DICOM at all" * 10),
                       ("truncated.sc.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00")):
        (tmp_path / "outbox" / "outgoing" / name).write_bytes(data)
    node = Node(predictor, outbox, Destination("PACS", "127.0.0.1", pacs_port), port=node_port,
                secondary_captures=True, options=ResultOptions(Heatmaps(segmentation=False)))
    node.start()
    try:
        # Two patients' images that carry one SOP Instance UID (a modality's bug): two results each, apart.
        shared = generate_uid()
        first, second = (chest_dx(image, patient_id=pid, accession=acc) for image, pid, acc in
                         ((xrays[0], "ALICE", "A-1"), (xrays[1], "BOB", "B-2")))
        for ds in (first, second):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = shared
            assert _store(node_port, ds) == 0x0000
        _wait(lambda: len(pacs.received) >= 4, 180, "four results in the PACS")
        time.sleep(1.0)
        assert len(pacs.received) == 4
        assert len({str(ds.SOPInstanceUID) for ds in pacs.received}) == 4
        for ds in pacs.received:  # each result is its own patient's, in its own study
            source = first if ds.PatientID == "ALICE" else second
            assert (ds.StudyInstanceUID, ds.AccessionNumber) == (source.StudyInstanceUID, source.AccessionNumber)
        reports = [ds for ds in pacs.received if ds.Modality == "SR"]
        assert {str(ds.SOPClassUID) for ds in reports} == {ComprehensiveSRStorage}  # the fallback the PACS takes
        captures = [ds for ds in pacs.received if ds.Modality != "SR"]
        assert all(ds.SourceImageSequence[0].ReferencedSOPInstanceUID == shared and
                   ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == shared for ds in captures)
        # The damaged outgoing files are set aside, named, and did not stop the sender.
        refused = sorted(p.name for p in (tmp_path / "outbox" / "refused").glob("*.txt"))
        assert refused == ["empty.sr.dcm.txt", "garbage.sr.dcm.txt", "truncated.sc.dcm.txt"]
        assert all(t.is_alive() for t in node._threads)
        # Its own results, forwarded back by a PACS rule: the reports are no class the node takes, and the
        # captures (taken with --secondary-captures) are acknowledged and dropped: never answered, so no loop.
        for ds in reports:
            assert _store(node_port, ds) is None
        for ds in captures:
            assert _store(node_port, ds) == 0x0000
        time.sleep(3.0)
        assert len(pacs.received) == 4 and outbox.waiting() == [] and outbox.to_send() == []
        assert [e["event"] for e in outbox.events()].count("ignored") == 2
    finally:
        node.stop()
        pacs.stop()


def test_secondary_captures_are_answered_only_when_asked(xrays):
    from cxrlearn.dicom.source import check_source

    capture = chest_dx(xrays[0])
    capture.SOPClassUID = SecondaryCaptureImageStorage
    check_source(capture, "sc.dcm", secondary_captures=True)
    with pytest.raises(Exception, match="sc.dcm: SOP class .* is not a radiograph \\(CR, DX\\): no result"):
        check_source(capture, "sc.dcm", secondary_captures=False)


def test_a_destination_that_refuses_every_offer_is_retried_not_fatal(predictor, xrays, tmp_path):
    from cxrlearn.dicom.node import Destination, Node
    from cxrlearn.dicom.outbox import Outbox

    pacs_port, node_port = free_port(), free_port()
    pacs = StandInPacs(pacs_port, [SecondaryCaptureImageStorage]).start()  # takes no SR at all
    outbox = Outbox(tmp_path / "outbox")
    node = Node(predictor, outbox, Destination("PACS", "127.0.0.1", pacs_port), port=node_port)
    node.start()
    try:
        assert _store(node_port, chest_dx(xrays[2], patient_id="CAROL")) == 0x0000
        _wait(lambda: len(pacs.received) >= 1, 180, "the capture in the PACS")
        _wait(lambda: any(e.get("event") == "send failed" and "presentation context" in str(e.get("why"))
                          for e in outbox.events()), 30, "the refused SR logged")
        assert sorted(p.name.split(".")[-2] for p in outbox.to_send()) == ["seg", "sr"]  # kept, and tried again
        assert all(t.is_alive() for t in node._threads)
    finally:
        node.stop()
        pacs.stop()
    # The PACS learns to take Comprehensive 3D SR and segmentations (uncompressed only: the node decompresses the
    # JPEG-LS segmentation for it): the waiting results go, once the node runs again.
    pacs = StandInPacs(pacs_port, [Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage]).start()
    node = Node(predictor, outbox, Destination("PACS", "127.0.0.1", pacs_port), port=node_port)
    node.start()
    try:
        _wait(lambda: {ds.Modality for ds in pacs.received} >= {"SR", "SEG"}, 60, "the SR and SEG in the PACS")
        segmentation = next(ds for ds in pacs.received if ds.Modality == "SEG")
        assert not segmentation.file_meta.TransferSyntaxUID.is_compressed and segmentation.pixel_array.max() == 255
        assert outbox.to_send() == []
    finally:
        node.stop()
        pacs.stop()


def test_dicom_tls_both_ways_and_every_bad_certificate_is_one_line(predictor, xrays, tmp_path):
    """--tls-cert/--tls-key/--tls-ca: a modality with a certificate the CA signed stores over TLS and the results
    reach a TLS PACS; a plain connection and a certificate of another CA get no association, and the node goes
    on; the node's own expired certificate, a key of another certificate and a missing CA are refused before it
    starts; a destination whose certificate another CA signed is named with OpenSSL's reason, its results kept."""
    from cxrlearn.dicom.node import Destination, Node
    from cxrlearn.dicom.outbox import Outbox
    from cxrlearn.dicom.tls import Tls
    from cxrlearn.errors import ConfigError
    from tls_certs import Authority

    (tmp_path / "ca").mkdir()
    (tmp_path / "other").mkdir()
    ca, other = Authority(tmp_path / "ca"), Authority(tmp_path / "other", "other-ca")
    pacs_port, node_port = free_port(), free_port()
    pacs_tls = Tls(*ca.issue("pacs"), ca.path)
    pacs = StandInPacs(pacs_port, [Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage],
                       ssl_context=pacs_tls.server_context()).start()
    node = Node(predictor, Outbox(tmp_path / "outbox"), Destination("PACS", "127.0.0.1", pacs_port), port=node_port,
                tls=Tls.load(*ca.issue("node"), ca.path))
    node.start()
    try:
        modality = Tls(*ca.issue("modality"), ca.path)
        assert _store(node_port, chest_dx(xrays[0], patient_id="TLS-1"),
                      tls_args=(modality.client_context(), "127.0.0.1")) == 0x0000
        _wait(lambda: len(pacs.received) >= 3, 180, "the SR, SEG and SC in the PACS, over TLS")
        assert sorted(ds.Modality for ds in pacs.received) == ["OT", "SEG", "SR"]
        assert _store(node_port, chest_dx(xrays[1])) is None  # no TLS: no association
        stranger = Tls(*other.issue("stranger"), other.path)
        assert _store(node_port, chest_dx(xrays[1]), tls_args=(stranger.client_context(), "127.0.0.1")) is None
        assert all(t.is_alive() for t in node._threads) and len(pacs.received) == 3
    finally:
        node.stop()
        pacs.stop()
    # Refused before the node starts, each in one line naming the file.
    expired = ca.issue("expired", days=-1)
    with pytest.raises(ConfigError, match=r"--tls-cert .*expired\.crt: the certificate expired on \d{4}-\d\d-\d\d"):
        Tls.load(*expired, ca.path)
    with pytest.raises(ConfigError, match="the key does not belong to the certificate"):
        Tls.load(ca.issue("node2")[0], expired[1], ca.path)
    with pytest.raises(ConfigError, match="--tls-ca .*missing.pem: no such file"):
        Tls.load(*ca.issue("node3"), tmp_path / "missing.pem")
    # A destination whose certificate another CA signed: the reason, and the results wait.
    pacs = StandInPacs(pacs_port, [Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage],
                       ssl_context=Tls(*other.issue("impostor"), other.path).server_context()).start()
    outbox = Outbox(tmp_path / "outbox2")
    node = Node(predictor, outbox, Destination("PACS", "127.0.0.1", pacs_port), port=node_port,
                tls=Tls.load(*ca.issue("node4"), ca.path))
    node.start()
    try:
        assert _store(node_port, chest_dx(xrays[2], patient_id="TLS-2"),
                      tls_args=(modality.client_context(), "127.0.0.1")) == 0x0000
        _wait(lambda: outbox.counts().last_failure, 180, "the refused certificate named")
        assert "TLS with 127.0.0.1:" in outbox.counts().last_failure
        assert "certificate verify failed" in outbox.counts().last_failure  # OpenSSL's reason, in one line
        assert pacs.received == [] and len(outbox.to_send()) == 3
    finally:
        node.stop()
        pacs.stop()


# ---- the poller against a stand-in DICOMweb archive ---------------------------------------------------------------

def _json_entry(ds) -> dict:
    return {tag: {"vr": "UI", "Value": [str(value)]} for tag, value in
            (("0020000D", ds.StudyInstanceUID), ("0020000E", ds.SeriesInstanceUID), ("00080018", ds.SOPInstanceUID),
             ("00080016", ds.SOPClassUID))}


class Archive:
    """A DICOMweb archive on loopback whose answers each test chooses: ``search`` (a callable of the query's offset
    giving the JSON to answer), ``instances`` (SOP UID -> the dataset WADO-RS returns) and ``store`` (a callable of
    the posted SOP Instance UIDs giving (status, content type, body, extra headers))."""

    def __init__(self):
        self.search = lambda offset: []
        self.instances: dict[str, object] = {}
        self.store = lambda uids: (200, "application/dicom+json", _stow_answer(uids), {})
        self.posted: list[list[str]] = []
        self.requests = 0
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, kind, body: bytes, headers=None):
                self.send_response(status)
                if kind:
                    self.send_header("Content-Type", kind)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                archive.requests += 1
                path, _, query = self.path.partition("?")
                if path.endswith("/instances") and "/series/" not in path:
                    offset = int(dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("offset", 0))
                    return self._answer(200, "application/dicom+json", json.dumps(archive.search(offset)).encode())
                uid = path.rsplit("/", 1)[-1]
                if uid not in archive.instances:
                    return self._answer(404, "text/plain", b"no such instance")
                boundary = "cxrlearn-test-boundary"
                body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + _bytes(archive.instances[uid]) + f"\r\n--{boundary}--\r\n".encode())
                self._answer(200, f'multipart/related; type="application/dicom"; boundary={boundary}', body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def do_POST(self):
                body = self._body()
                boundary = self.headers.get("Content-Type", "").split("boundary=")[-1].strip('"')
                uids = [str(pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1]), force=True).SOPInstanceUID)
                        for part in body.split(f"--{boundary}".encode())[1:-1]]
                archive.posted.append(uids)
                status, kind, answer, headers = archive.store(uids)
                self._answer(status, kind, answer, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _stow_answer(uids) -> bytes:
    return json.dumps({"00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]}}).encode()


@pytest.fixture()
def archive():
    served = Archive()
    yield served
    served.close()


def _poller(predictor, archive, tmp_path):
    from cxrlearn.dicom.outbox import Outbox
    from cxrlearn.dicom.poll import Poller

    return Poller(predictor, Outbox(tmp_path / "outbox"), archive.url)


def test_a_result_leaves_the_outbox_only_when_the_archive_confirms_that_instance(predictor, xrays, archive, tmp_path):
    sources = [chest_dx(xrays[0], patient_id="W-1"), chest_dx(xrays[1], patient_id="W-2")]
    sources[1].PatientSex = "X"  # a value the result builder once refused: every poll then exited 1
    del sources[1].PatientSex
    archive.instances = {str(ds.SOPInstanceUID): ds for ds in sources}
    archive.search = lambda offset: [_json_entry(ds) for ds in sources] if offset == 0 else []
    poller = _poller(predictor, archive, tmp_path)
    for answer in ((200, "text/html", b"<html>stored!</html>", {}), (200, "application/dicom+json", b"", {}),
                   (204, None, b"", {}), (307, "text/plain", b"", {"Location": "http://127.0.0.2:9/elsewhere"})):
        archive.store = lambda uids, answer=answer: answer
        done = poller.run_round()
        assert (done.stored, done.waiting) == (0, 6), answer  # nothing confirmed: everything kept
    assert "HTTP 307 to http://127.0.0.2:9/elsewhere: a redirect, which is not followed" in \
        poller.outbox.counts().last_failure
    assert all(len(posted) == 6 for posted in archive.posted), archive.posted  # never re-posted without its body
    # A partial answer: only the captures confirmed; the reports and segmentations stay.
    archive.store = lambda uids: (200, "application/dicom+json",
                                  _stow_answer([u for u in uids if u in captures]), {})
    captures = {str(pydicom.dcmread(p).SOPInstanceUID) for p in poller.outbox.to_send() if ".sc." in p.name}
    done = poller.run_round()
    assert (done.stored, done.waiting) == (2, 4)
    assert all(".sr." in p.name or ".seg." in p.name for p in poller.outbox.to_send())
    archive.store = lambda uids: (200, "application/dicom+json", _stow_answer(uids), {})
    done = poller.run_round()
    assert (done.stored, done.waiting, done.failure) == (4, 0, None)


@pytest.mark.parametrize("answer", [42, "text", {"0020000D": 5}, [1, 2], [{"0020000D": {"Value": [7]}}],
                                    [{"00080018": "x"}]])
def test_search_answers_of_the_wrong_shape_get_a_line_not_a_traceback(predictor, archive, tmp_path, answer):
    archive.search = lambda offset: answer if offset == 0 else []
    done = _poller(predictor, archive, tmp_path).run_round()
    assert done.found == 0 and done.predicted == 0
    entries = [answer] if isinstance(answer, dict) else answer  # a lone data set is read as a list of one
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        assert done.failure and "where a list of DICOM JSON data sets belongs" in done.failure


def test_endless_paging_is_cut_short_and_said(predictor, archive, tmp_path, monkeypatch):
    import cxrlearn.dicom.poll as poll

    monkeypatch.setattr(poll, "MAX_PAGES", 4)
    archive.search = lambda offset: [{"0020000D": {"Value": ["1.2"]}, "0020000E": {"Value": ["1.3"]},
                                      "00080018": {"Value": [f"1.4.{offset}"]}}]  # a new page, for ever
    done = _poller(predictor, archive, tmp_path).run_round()
    assert done.failure and "did not end within 4 pages" in done.failure
    assert archive.requests <= 2 * 4 + 8  # two searches of four pages, and the (failed) retrievals
    # An archive that ignores the offset (the same page again and again) ends at the first repeat.
    archive.requests = 0
    archive.search = lambda offset: [{"0020000D": {"Value": ["1.2"]}, "0020000E": {"Value": ["1.3"]},
                                      "00080018": {"Value": ["1.4.1"]}}]
    _poller(predictor, archive, tmp_path / "again").run_round()
    assert archive.requests <= 2 * 2 + 1


def test_an_instance_the_archive_swaps_or_cannot_give_is_never_answered(predictor, xrays, archive, tmp_path, capsys):
    asked, other = chest_dx(xrays[0], patient_id="ASKED"), chest_dx(xrays[1], patient_id="OTHER")
    archive.search = lambda offset: [_json_entry(asked)] if offset == 0 else []
    archive.instances = {str(asked.SOPInstanceUID): other}  # the archive answers with another instance
    done = _poller(predictor, archive, tmp_path).run_round()
    assert (done.retrieved, done.predicted, done.waiting) == (0, 0, 0)
    assert done.failure == f"none of the 1 new instance(s) could be retrieved from {archive.url}"
    why = (tmp_path / "outbox" / "refused" / f"{asked.SOPInstanceUID}.txt").read_text()
    assert f"answered with instance {other.SOPInstanceUID} instead" in why
    # Every retrieval failing (404 here) is an exit status, not 0.
    lost = chest_dx(xrays[2], patient_id="LOST")
    archive.search = lambda offset: [_json_entry(lost)] if offset == 0 else []
    assert main(["dicom", "poll", "--model", str(predictor.model_dir), "--url", archive.url, "--outbox",
                 str(tmp_path / "outbox2")]) == 2
    assert "none of the 1 new instance(s) could be retrieved" in capsys.readouterr().err


# ---- predict --dicom-out: each file stands alone ---------------------------------------------------------------

def test_predict_dicom_out_answers_every_file_it_can_and_names_the_others(evaluated, xrays, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (case, change) in enumerate(ANSWERED.items()):
        ds = chest_dx(xrays[i % len(xrays)], patient_id=f"Q{i}")
        change(ds)
        (inputs / f"ok{i:02d}.dcm").write_bytes(_bytes(ds))
    bad = chest_dx(xrays[0], patient_id="9" * 80)
    (inputs / "long-patient-id.dcm").write_bytes(_bytes(bad))
    out = tmp_path / "out"
    assert main(["predict", "--model", str(evaluated[0]), str(inputs), "--dicom-out", str(out), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "long-patient-id.dcm: PatientID" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"ok{i:02d}.{k}.dcm" for i in range(len(ANSWERED))
                                                          for k in ("sc", "seg", "sr"))
    for path in sorted(out.iterdir())[:6]:
        assert _dciodvfy_errors(path.read_bytes(), tmp_path) == [], path.name


# ---- compressed bombs: the codestream's own size, before decoding ------------------------------------------------

def _encapsulated(pixels: np.ndarray, frame: bytes, syntax) -> bytes:
    """A DX holding ``frame`` as its one compressed frame, the header saying ``pixels``' size."""
    from pydicom.encaps import encapsulate

    ds = chest_dx(pixels)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _bytes(ds)


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _j2k(pixels: np.ndarray) -> bytes:
    from openjpeg import encode

    return bytes(encode(pixels, photometric_interpretation=2))  # MONOCHROME2, lossless


def _claiming(frame: bytes, width: int, height: int) -> bytes:
    """The same codestream, its SOF or SIZ marker rewritten to claim width × height."""
    import struct

    data = bytearray(frame)
    at = data.find(b"\xff\x4f\xff\x51")
    if at >= 0:
        data[at + 8:at + 16] = struct.pack(">II", width, height)
        data[at + 16:at + 24] = bytes(8)
        return bytes(data)
    at = max(data.find(bytes([0xFF, sof])) for sof in (0xC0, 0xC1, 0xC2))
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("kind", ["jpeg", "j2k"])
def test_a_compressed_frame_larger_than_its_header_is_refused_before_decoding(xrays, kind):
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    from cxrlearn.data.decoding.images import decode_grayscale
    from cxrlearn.errors import DataError, ImageTooLarge

    pixels = np.ascontiguousarray(xrays[0][::4, ::4])  # a real radiograph, 256 px
    frame, syntax = (_jpeg(pixels), JPEGBaseline8Bit) if kind == "jpeg" else (_j2k(pixels), JPEG2000Lossless)
    honest = decode_grayscale(_encapsulated(pixels, frame, syntax), f"honest.{kind}.dcm")
    assert honest.shape == pixels.shape  # an honest frame still decodes
    with pytest.raises(ImageTooLarge, match=f"bomb.{kind}.dcm: image is implausibly large .*16000×20000"):
        decode_grayscale(_encapsulated(pixels, _claiming(frame, 16000, 20000), syntax), f"bomb.{kind}.dcm")
    with pytest.raises(DataError, match=f"liar.{kind}.dcm: the compressed frame is 512×300 pixels but the DICOM "
                                        "header says 256×256: refused before decoding"):
        decode_grayscale(_encapsulated(pixels, _claiming(frame, 512, 300), syntax), f"liar.{kind}.dcm")


# ---- the node is bounded: associations, idle connections, instance size ---------------------------------------

def _associate(port: int, source: str, ds=None):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    if ds is not None:
        ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="CXRLEARN", bind_address=(source, 0))


def test_the_node_is_bounded_and_one_sender_cannot_shut_out_the_others(predictor, xrays, tmp_path):
    import socket

    from cxrlearn.dicom.node import Bounds, Destination, Node
    from cxrlearn.dicom.outbox import Outbox

    port = free_port()
    bounds = Bounds(max_associations=4, per_host=2, idle_s=2.0, max_instance_bytes=2 * 2**20)
    node = Node(predictor, Outbox(tmp_path / "outbox"), Destination("PACS", "127.0.0.1", free_port()), port=port,
                bounds=bounds)
    node.start()
    try:
        # One address holds its share with half-open connections (no association request): it gets no more ...
        half_open = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.5)
        assert not _associate(port, "127.0.0.1").is_established
        # ... while another sender is served at once.
        other = _associate(port, "127.0.0.2")
        assert other.is_established and other.send_c_echo().Status == 0
        other.release()
        # The half-open connections are closed once idle for 2 s (ARTIM), and the address is served again.
        started = time.monotonic()
        for connection in half_open:
            connection.settimeout(15)
            assert connection.recv(64) == b""
            connection.close()
        assert time.monotonic() - started < 8
        # An association that sends nothing is aborted after the idle time.
        idle = _associate(port, "127.0.0.3")
        assert idle.is_established
        _wait(lambda: not idle.is_established, 15, "the idle association closed by the node")
        # Beyond the node's limit, a sender is told so (A-ASSOCIATE-RJ, local limit exceeded).
        _wait(lambda: not node._server.ae.active_associations, 15, "the node's associations ended")
        held = [_associate(port, f"127.0.0.{4 + i // 2}") for i in range(4)]
        assert all(a.is_established for a in held)
        refused = _associate(port, "127.0.0.9")
        assert refused.is_rejected
        for assoc in held:
            assoc.release()
        # An instance over the size limit is refused with a status (0xA700), from a temporary file, not memory.
        big = chest_dx(np.tile(xrays[0], (2, 2)), patient_id="BIG")  # 2,048 px square: 4 MiB of pixels
        small = chest_dx(xrays[1], patient_id="SMALL")  # 1 MiB
        assoc = _associate(port, "127.0.0.10", big)
        assert assoc.send_c_store(big).Status == 0xA700
        assert assoc.send_c_store(small).Status == 0x0000
        assoc.release()
        assert [p.name.split("_")[0] for p in node.outbox.waiting()] + \
            [e["uid"] for e in node.outbox.events() if e["event"] == "received"] != []
        assert all(t.is_alive() for t in node._threads)
    finally:
        node.stop()


def test_an_answer_trickled_a_byte_at_a_time_is_abandoned_at_its_deadline(predictor, archive, tmp_path, monkeypatch):
    import cxrlearn.dicom.poll as poll

    monkeypatch.setattr(poll, "ANSWER_DEADLINE_S", 2.0)
    handler = archive.server.RequestHandlerClass

    def trickle(self):  # headers at once, then the body a byte every 0.3 s (well within each read's timeout)
        body = json.dumps([]).encode() + b" " * 200
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.3)

    monkeypatch.setattr(handler, "do_GET", trickle)
    started = time.monotonic()
    done = _poller(predictor, archive, tmp_path).run_round()
    assert done.failure == f"cannot search {archive.url}: no whole answer within 2 s"
    assert time.monotonic() - started < 30  # the whole answer would take a minute; dicomweb-client tries 3 times
