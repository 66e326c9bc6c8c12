"""``cxrlearn dicom listen``: a DICOM node that answers radiographs with a structured report and a heatmap.

Three parts, each in its own thread, joined by the on-disk :class:`cxrlearn.dicom.outbox.Outbox`:

1. a C-STORE SCP (pynetdicom) for CR and DX images (and secondary captures with ``secondary_captures``): an
   instance is written to ``received/`` (synced) and only then acknowledged with success; an instance without
   pixels, or one that cannot be stored, gets a failure status; calling AE titles outside ``--allow-ae`` are
   rejected; cxrlearn's own results sent back to it (a PACS rule that forwards everything) are acknowledged and
   dropped, never answered, so no loop can start;
2. the predictor: takes what is waiting (at most a batch), predicts with one model, writes each image's
   structured report and secondary capture (:mod:`cxrlearn.dicom.results`) to ``outgoing/``; an instance no
   result can be made for goes to ``refused/`` with the reason, alone, and the node goes on
   (:mod:`cxrlearn.dicom.predicting`);
3. the sender: a C-STORE SCU that sends each result to the destination and removes it only on a success (or
   warning) status; while the destination is down, or refuses what is offered, it retries with back-off (1 s,
   doubling, at most :data:`MAX_BACKOFF_S`). A structured report goes as Comprehensive 3D SR, or as Comprehensive
   SR where the destination accepts only that (its content has no 3D coordinates); an outgoing file that is not
   DICOM is set aside in ``refused/`` with the reason. Nothing a file or a destination does ends the thread.

Started again after any stop, the node finds its unfinished work in the outbox.

The node is bounded (:class:`Bounds`): at most ``max_associations`` at once (a sender beyond them is rejected with
A-ASSOCIATE-RJ "local limit exceeded"), at most ``per_host`` of them from one address (so that one sender, or one
attacker, cannot hold them all; further connections from it are closed at once), a connection that sends no
association request, or an association that sends nothing, for ``idle_s`` seconds is closed (ARTIM and network
timeouts), PDUs of at most :data:`MAX_PDU_BYTES` are asked for, and an instance is received into a temporary file,
not memory, and refused with status 0xA700 (out of resources) when it is over ``max_instance_bytes``.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import dcmread
from pydicom.uid import (Comprehensive3DSRStorage, ComprehensiveSRStorage, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage, SegmentationStorage)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from cxrlearn._files import remove_stale_temporaries
from cxrlearn.dicom.outbox import OUTGOING, RECEIVED, REFUSED, Outbox, safe_uid
from cxrlearn.dicom.predicting import predict_batch
from cxrlearn.dicom.routing import Accept
from cxrlearn.dicom.results import ResultOptions
from cxrlearn.dicom.tls import Tls
from cxrlearn.dicom.source import RADIOGRAPH_CLASSES, SOURCE_CLASSES, made_by_cxrlearn, patient_key
from cxrlearn.errors import ConfigError
from cxrlearn.inference.predictor import Predictor
from cxrlearn.monitoring.log import PredictionLog

log = logging.getLogger("cxrlearn.dicom")

#: C-STORE statuses (PS3.4 Annex B.2.3).
SUCCESS, OUT_OF_RESOURCES, DATA_SET_MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
#: Warnings that still mean "stored" (coercion, elements discarded, data set does not match SOP class).
STORED_WITH_WARNING = {0xB000, 0xB006, 0xB007}
MAX_BACKOFF_S = 60.0
#: Images predicted on together, at most.
NODE_BATCH = 16
TIMEOUT_S = 30
#: The largest PDU the node asks senders for (PS3.8 9.3.1; 0 would mean any size).
MAX_PDU_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Bounds:
    """How much of the node one sender, or all of them, may hold (see the module's description)."""

    max_associations: int = 10
    per_host: int = 4
    idle_s: float = 30.0
    max_instance_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class Destination:
    """Where results go: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"([^@\s]{1,16})@([^:\s]+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise ConfigError(f"--send-to {text!r}: expected AE@HOST:PORT, as ORTHANC@127.0.0.1:4242")
        return cls(match.group(1), match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Node:
    """The three parts over one outbox; :meth:`start`, then :meth:`stop`."""

    def __init__(self, predictor: Predictor, outbox: Outbox, destination: Destination, ae_title: str = "CXRLEARN",
                 host: str = "127.0.0.1", port: int = 11112, allow_ae: list[str] | None = None,
                 batch: int = NODE_BATCH, secondary_captures: bool = False, bounds: Bounds = Bounds(),
                 prediction_log: PredictionLog | None = None, accept: Accept = Accept(),
                 options: ResultOptions = ResultOptions(), tls: Tls | None = None):
        self.predictor, self.outbox, self.destination, self.bounds = predictor, outbox, destination, bounds
        self.accept, self.options, self.tls = accept, options, tls
        self.prediction_log = prediction_log
        if prediction_log is not None:
            predictor.summarise = True
        self.ae_title, self.host, self.port, self.batch = ae_title, host, port, batch
        self.secondary_captures = secondary_captures
        self.allow_ae = list(allow_ae or [])
        predictor.with_gradients()  # Grad-CAM's torch model, loaded before the first instance
        self._stopping = threading.Event()
        # One wake-up per worker: a received instance wakes the predictor, a queued result the sender.
        self._received, self._results = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        for name in (RECEIVED, OUTGOING, REFUSED):
            remove_stale_temporaries(self.outbox.root / name)
        ae = AE(ae_title=self.ae_title)
        for sop_class in SOURCE_CLASSES if self.secondary_captures else RADIOGRAPH_CLASSES:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        if self.allow_ae:
            ae.require_calling_aet = self.allow_ae
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = self.bounds.max_associations
        ae.acse_timeout = ae.network_timeout = self.bounds.idle_s  # ARTIM, and an association that sends nothing
        _config.STORE_RECV_CHUNKED_DATASET = True  # an instance arrives in a temporary file, not in memory
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._server.verify_request = self._admit
        if self.tls is not None:
            self._tls_context = self.tls.server_context()
            self._server.get_request = self._accept_tls
        for target, name in ((self._predict_loop, "cxrlearn-predict"), (self._send_loop, "cxrlearn-send")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._received.set()  # what a previous run left
        self._results.set()

    def stop(self) -> None:
        self._stopping.set()
        self._received.set()
        self._results.set()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join(timeout=TIMEOUT_S)

    # ---- 1. receiving ---------------------------------------------------------------------------------
    def _accept_tls(self):
        """A connection wrapped in TLS without its handshake, which the association's own thread then does on
        its first read (within ``idle_s``): a caller that never finishes one holds no more than its association,
        never the listening loop."""
        client, address = self._server.socket.accept()
        client.settimeout(self.bounds.idle_s)
        return self._tls_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    def _admit(self, request, address) -> bool:
        """A new connection from ``address``, unless that address already holds ``per_host`` associations."""
        host = address[0] if isinstance(address, tuple) else str(address)
        live = sum(1 for assoc in self._server.ae.active_associations
                   if assoc.is_acceptor and assoc.requestor.address == host)
        if live >= self.bounds.per_host:
            log.warning("closed a connection from %s: it already holds %d association(s), the most one address may",
                        host, live)
            return False
        return True

    def _on_store(self, event) -> int:
        try:
            uid = safe_uid(event.request.AffectedSOPInstanceUID)
        except ValueError as err:
            log.warning("refused a C-STORE from %s: %s", event.assoc.requestor.ae_title, err)
            return CANNOT_UNDERSTAND
        try:
            path = event.dataset_path
            size = path.stat().st_size
            if size > self.bounds.max_instance_bytes:
                log.warning("refused %s from %s: %s bytes, over the limit of %s", uid, event.assoc.requestor.ae_title,
                            f"{size:,}", f"{self.bounds.max_instance_bytes:,}")
                return OUT_OF_RESOURCES
            data = path.read_bytes()  # the file once; the data set parsed from it, its pixels left unread
            dataset = dcmread(io.BytesIO(data), defer_size=4096)
            has_pixels = "PixelData" in dataset
            own = made_by_cxrlearn(dataset)
            key = patient_key(dataset)
        except Exception as err:  # noqa: BLE001 - a sender's damaged data set: a failure status, not a crash
            log.warning("refused %s: its data set cannot be read (%s)", uid, err)
            return CANNOT_UNDERSTAND
        if own:  # cxrlearn's own result, forwarded back: acknowledged (no retries) and never answered
            self.outbox.ignore(uid, "a result cxrlearn made itself")
            log.info("ignored %s from %s: a result cxrlearn made itself", uid, event.assoc.requestor.ae_title)
            return SUCCESS
        if not has_pixels:
            log.warning("refused %s: it has no pixel data", uid)
            return DATA_SET_MISMATCH
        try:
            self.outbox.receive(uid, data, key)
        except OSError as err:
            log.error("could not store %s: %s", uid, err)
            return OUT_OF_RESOURCES
        self._received.set()
        return SUCCESS

    # ---- 2. predicting --------------------------------------------------------------------------------
    def _predict_loop(self) -> None:
        while not self._stopping.is_set():
            waiting = self.outbox.waiting(self.batch)
            if not waiting:
                self._received.wait(1.0)
                self._received.clear()
                continue
            try:
                self.predict_batch(waiting)
            except Exception as err:  # noqa: BLE001 - the node keeps running; the instances stay queued
                log.exception("predicting %s failed (%s: %s); they stay in %s", ", ".join(p.name for p in waiting),
                              type(err).__name__, err, self.outbox.root / RECEIVED)
                self._stopping.wait(5.0)

    def predict_batch(self, paths: list[Path]) -> None:
        """Predict on received instances together, and queue their results (or refuse them, each alone)."""
        predict_batch(self.outbox, self.predictor, paths, self.secondary_captures, self.prediction_log,
                      "dicom listen", self.accept, self.options)
        self._results.set()

    # ---- 3. sending -----------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            pending = self.outbox.to_send()
            if not pending:
                self._results.wait(1.0)
                self._results.clear()
                continue
            try:
                confirmed = self.send(pending)
            except Exception as err:  # noqa: BLE001 - the sender never dies: logged, and tried again
                log.exception("sending failed (%s: %s); the results stay in %s", type(err).__name__, err,
                              self.outbox.root / OUTGOING)
                confirmed = False
            if confirmed:
                backoff = 1.0
            else:
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def send(self, results: list[Path]) -> bool:
        """Send results over one association, reading each only when its turn comes (a queue that grew while the
        destination was down is never held in memory whole); True when all were confirmed."""
        assoc, accepted, confirmed = None, {}, True
        try:
            for result in results:
                if self._stopping.is_set():
                    return False
                read = self.outbox.take_result(result)
                if read is None:
                    continue
                ds, stamp = read
                if assoc is None:
                    problem = self.tls and self.tls.handshake_problem(self.destination.host, self.destination.port)
                    if problem:  # the destination's certificate (or ours) refused: named, and tried again later
                        self._failed(result, problem)
                        return False
                    assoc = self._associate()
                    if not assoc.is_established:
                        self._failed(result, "no association (the destination is down or refused this node)")
                        return False
                    accepted = _accepted_syntaxes(assoc.accepted_contexts)
                if not assoc.is_established:
                    return False
                ds = _as_accepted(ds, accepted)
                if ds is None:
                    confirmed = False
                    self._failed(result, f"the destination accepts no presentation context for its SOP class "
                                         f"({', '.join(sorted(accepted)) or 'none'} accepted)")
                    continue
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code == SUCCESS or code in STORED_WITH_WARNING:
                    self.outbox.sent(result, str(self.destination), stamp)
                    log.info("sent %s to %s", result.name, self.destination)
                else:
                    confirmed = False
                    self._failed(result, "no answer" if code is None else f"status 0x{code:04X}")
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
        return confirmed

    def _associate(self):
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        for sop_class in (Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # The heatmap segmentation as written (JPEG-LS lossless), or decompressed for a destination without it.
        ae.add_requested_context(SegmentationStorage, [JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls_args = None if self.tls is None else (self.tls.client_context(), self.destination.host)
        return ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title,
                            tls_args=tls_args)

    def _failed(self, result: Path, why: str) -> None:
        self.outbox.send_failed(result, str(self.destination), why)
        log.warning("could not send %s to %s: %s (tried again)", result.name, self.destination, why)


def _accepted_syntaxes(contexts) -> dict[str, set[str]]:
    """The transfer syntaxes an association accepted, by SOP class."""
    accepted: dict[str, set[str]] = {}
    for context in contexts:
        accepted.setdefault(str(context.abstract_syntax), set()).add(str(context.transfer_syntax[0]))
    return accepted


def _as_accepted(ds: Dataset, accepted: dict[str, set[str]]) -> Dataset | None:
    """``ds`` in a SOP class and transfer syntax the destination accepted: itself (decompressed where only an
    uncompressed syntax was accepted), or a Comprehensive 3D SR as Comprehensive SR (the same content: cxrlearn's
    reports hold no 3D coordinates); None when the destination accepts neither."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if str(ds.SOPClassUID) in accepted:
        if ds.file_meta.TransferSyntaxUID.is_compressed and syntax not in accepted[str(ds.SOPClassUID)]:
            ds.decompress()
        return ds
    if str(ds.SOPClassUID) == Comprehensive3DSRStorage and ComprehensiveSRStorage in accepted:
        ds.SOPClassUID = ComprehensiveSRStorage
        ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
        return ds
    return None
