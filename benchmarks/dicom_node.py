"""Throughput of `cxrlearn dicom listen` (receive -> predict -> send) beside predicting alone, in one run.

N DX instances made from real 1,024 px sample images are sent by C-STORE to a node on loopback, whose results go
to a C-STORE sink (pynetdicom, in this process, counting what arrives); the time runs from the first send to the
last result confirmed. Beside it, on the same images: the Predictor alone (decoded images, batched), and the
Predictor plus making the structured report and the Grad-CAM secondary capture (what `predict --dicom-out` does
after predicting). With ``--orthanc`` (Debian's orthanc and orthanc-dicomweb installed): the same instances
stored in an Orthanc started on free loopback ports, then one ``dicom poll`` round (QIDO-RS, WADO-RS, predict,
STOW-RS) timed from search to the last result stored.

Usage: python benchmarks/dicom_node.py --model RUN_DIR --images-1024 DIR [--count 24] [--orthanc]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import machine, parser
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, evt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from orthanc import Orthanc, free_port  # noqa: E402  (the tests' Orthanc: temporary configuration and storage)
from xray_files import chest_dx  # noqa: E402  (the tests' DX maker: real pixels, a modality's attributes)

from cxrlearn.data.decoding.images import load_grayscale  # noqa: E402
from cxrlearn.dicom.node import Destination, Node  # noqa: E402
from cxrlearn.dicom.outbox import Outbox  # noqa: E402
from cxrlearn.dicom.poll import Poller  # noqa: E402
from cxrlearn.dicom.results import to_bytes  # noqa: E402
from cxrlearn.dicom.results import Heatmaps, ResultOptions, dicom_results  # noqa: E402
from cxrlearn.inference.predictor import Predictor  # noqa: E402

#: The results as they were before the segmentation (the figures in docs/benchmarks.md before 2026-12-03).
CAPTURE_ONLY = ResultOptions(Heatmaps(segmentation=False))


def sink(port: int, arrived: list, done: threading.Event, expected: int):
    ae = AE(ae_title="SINK")
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class)

    def on_store(event):
        arrived.append(time.perf_counter())
        if len(arrived) >= expected:
            done.set()
        return 0x0000

    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def poll_round(predictor: Predictor, sources: list) -> tuple[float, int]:
    """One ``dicom poll`` round against a fresh Orthanc holding ``sources``: (seconds, results stored)."""
    with tempfile.TemporaryDirectory() as folder:
        orthanc = Orthanc(Path(folder) / "orthanc", free_port(), free_port(), {})
        orthanc.folder.mkdir()
        orthanc.start()
        try:
            for ds in sources:
                orthanc.upload(to_bytes(ds))
            poller = Poller(predictor, Outbox(Path(folder) / "outbox"), orthanc.url + "/dicom-web")
            started = time.perf_counter()
            done = poller.run_round()
            return time.perf_counter() - started, done.stored
        finally:
            orthanc.stop()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--images-1024", required=True, type=Path)
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--orthanc", action="store_true", help="also time one `dicom poll` round through Orthanc's DICOMweb")
    args = p.parse_args()
    files = sorted(args.images_1024.glob("*.png"))
    images = [load_grayscale(f) for f in (files * (args.count // len(files) + 1))[:args.count]]
    sources = [chest_dx(image, patient_id=f"P{i}") for i, image in enumerate(images)]
    predictor = Predictor(args.model, device="cpu")

    started = time.perf_counter()
    predictions = []
    for start in range(0, len(images), 16):
        predictions += predictor.predict(images[start:start + 16], [str(i) for i in range(start, start + 16)])
    alone = time.perf_counter() - started
    started = time.perf_counter()
    for source, image, prediction in zip(sources, images, predictions):
        dicom_results(source, image, prediction, predictor, CAPTURE_ONLY).files()
    results = time.perf_counter() - started
    started = time.perf_counter()
    for source, image, prediction in zip(sources, images, predictions):
        dicom_results(source, image, prediction, predictor).files()
    with_segmentation = time.perf_counter() - started

    arrived: list[float] = []
    done = threading.Event()
    server = sink(11990, arrived, done, 2 * len(sources))
    with tempfile.TemporaryDirectory() as folder:
        node = Node(predictor, Outbox(folder), Destination("SINK", "127.0.0.1", 11990), port=11991,
                    options=CAPTURE_ONLY)  # as recorded: the sink takes the report and the capture
        node.start()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(sources[0].SOPClassUID)
        started = time.perf_counter()
        assoc = ae.associate("127.0.0.1", 11991, ae_title="CXRLEARN")
        for ds in sources:
            assoc.send_c_store(ds)
        assoc.release()
        received = time.perf_counter() - started
        done.wait(600)
        through = arrived[-1] - started if arrived else float("nan")
        node.stop()
    server.shutdown()
    n = len(sources)
    print(f"# DICOM node: {n} DX of 1,024 px (real sample images), model {Path(args.model).name} "
          f"({predictor.meta.backbone}, {predictor.image_size} px); {machine()}")
    print(f"predict alone (batches of 16):             {n / alone:6.1f} images/s")
    print(f"report + heatmap capture (after predict):  {n / results:6.1f} images/s")
    print(f"+ heatmap segmentation (the default):     {n / with_segmentation:6.1f} images/s")
    print(f"node, receive -> predict -> send:          {n / through:6.1f} images/s "
          f"({len(arrived)} results confirmed; all {n} received in {received:.1f} s)")
    if args.orthanc:
        seconds, stored = poll_round(predictor, sources)
        print(f"poll, QIDO -> WADO -> predict -> STOW:     {n / seconds:6.1f} images/s ({stored} results stored)")


if __name__ == "__main__":
    main()
