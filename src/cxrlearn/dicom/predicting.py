"""The step the DICOM node and the DICOMweb poller share: predict on instances waiting in an outbox's
``received/`` and queue their results in ``outgoing/`` (or refuse them, with the reason).

Each instance stands alone: one that cannot be read, checked (:func:`cxrlearn.dicom.source.reference`), predicted
on or given results goes to ``refused/`` with its reason, and the others of its batch get theirs. Only a fault that
is not the instance's (the disk, the model) leaves the batch waiting."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from cxrlearn.dicom.outbox import Outbox
from cxrlearn.dicom.routing import Accept
from cxrlearn.dicom.results import ResultOptions, not_analysed_file, result_files
from cxrlearn.dicom.source import NotForModel, read_source
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.inference.predictor import Predictor
from cxrlearn.monitoring.log import Answered, PredictionLog, file_tags

log = logging.getLogger("cxrlearn.dicom")


def predict_batch(outbox: Outbox, predictor: Predictor, paths: list[Path], secondary_captures: bool = False,
                  prediction_log: PredictionLog | None = None, command: str = "dicom", accept: Accept = Accept(),
                  options: ResultOptions = ResultOptions()) -> int:
    """Predict on received instances together and queue their results; refuse the ones no result can be made
    for. With ``prediction_log``, every answer is recorded there (as ``command``) before its results are queued: a
    log that cannot be written leaves the batch waiting. ``accept``: the radiographs the model is for
    (:mod:`cxrlearn.dicom.routing`); ``options``: the heatmap objects and codes of the results. The number of
    instances predicted on."""
    sources, decoded, kept, headers = [], [], [], []
    for path in paths:
        try:
            data = path.read_bytes()
            source, pixels = read_source(data, path.name, secondary_captures, accept)
        except NotForModel as err:  # with --not-analysed-report, a report that says so is sent
            said = not_analysed_file(err, path.name, predictor) if options.not_analysed else None
            _refuse(outbox, path, str(err), {"sr": said} if said else None)
            continue
        except DataError as err:
            _refuse(outbox, path, str(err))
            continue
        sources.append(source)
        decoded.append(pixels)
        kept.append(path)
        headers.append(file_tags(io.BytesIO(data)) if prediction_log is not None else (None, None))
    try:
        predictions = predictor.predict(decoded, [p.name for p in kept]) if kept else []
    except (ConfigError, OSError, MemoryError):
        raise  # the model's or the machine's fault: the instances wait
    except Exception:  # noqa: BLE001 - one image the network cannot take: each alone, so only it is refused
        predictions = [_predict_one(outbox, predictor, path, pixels) for path, pixels in zip(kept, decoded)]
    ready = []
    for path, source, pixels, prediction, header in zip(kept, sources, decoded, predictions, headers):
        if prediction is None:
            continue
        try:
            files = result_files(source, pixels, prediction, predictor, path.name, options)
        except DataError as err:
            _refuse(outbox, path, str(err))
            continue
        ready.append((path, prediction, files, Answered(prediction, str(source.SOPInstanceUID), *header)))
    if prediction_log is not None and ready:
        prediction_log.record([answered for *_, answered in ready], predictor, command)
    for path, prediction, files, _ in ready:
        outbox.predicted(path, files)
        log.info("predicted %s: %s", path.name, prediction.input_check)
    return len(ready)


def _predict_one(outbox: Outbox, predictor: Predictor, path: Path, pixels):
    try:
        return predictor.predict([pixels], [path.name])[0]
    except (ConfigError, OSError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - this image's fault alone
        _refuse(outbox, path, f"{path.name}: the model cannot predict on it ({type(err).__name__}: {err})")
        return None


def _refuse(outbox: Outbox, path: Path, why: str, results: dict[str, bytes] | None = None) -> None:
    outbox.refuse(path, why, results)
    log.warning("refused %s", why)
