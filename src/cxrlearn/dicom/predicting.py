"""The step the DICOM node and the DICOMweb poller share: predict on instances waiting in an outbox's
``received/`` and queue their results in ``outgoing/`` (or refuse them, with the reason)."""

from __future__ import annotations

import logging
from pathlib import Path

from cxrlearn.dicom.outbox import Outbox
from cxrlearn.dicom.results import dicom_results, read_source
from cxrlearn.errors import DataError
from cxrlearn.inference.predictor import Predictor

log = logging.getLogger("cxrlearn.dicom")


def predict_batch(outbox: Outbox, predictor: Predictor, paths: list[Path]) -> int:
    """Predict on received instances together and queue their results; refuse the ones no result can be made
    for. The number of instances predicted on."""
    sources, decoded, kept = [], [], []
    for path in paths:
        try:
            source, pixels = read_source(path.read_bytes(), path.name)
        except DataError as err:
            outbox.refuse(path, str(err))
            log.warning("refused %s", err)
            continue
        sources.append(source)
        decoded.append(pixels)
        kept.append(path)
    predictions = predictor.predict(decoded, [p.stem for p in kept])
    for path, source, pixels, prediction in zip(kept, sources, decoded, predictions):
        outbox.predicted(path, dicom_results(source, pixels, prediction, predictor).files())
        log.info("predicted %s: %s", path.stem, prediction.input_check)
    return len(kept)
