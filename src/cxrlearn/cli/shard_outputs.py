"""``predict --out DIR`` (a Parquet dataset) with ``--dicom-out`` and ``--log``: what each shard's answers also go
to, done where the shard is predicted, in this process or in a Ray actor (a
:class:`cxrlearn.workflows.archive.ShardHook`), before the shard is written.

- ``--dicom-out DIR``: each DICOM input's structured report and heatmaps (as ``predict --dicom-out`` makes them) in
  ``DIR/part-<key>/``, beside the shard of the same key; the DICOM inputs given no result (not for this model, a
  header no result can be made from) in that folder's ``_refused.csv`` with the reason (other inputs get none).
  Results' UIDs are derived from the source and the bundle, so a shard redone after a failure writes the same
  objects again.
- ``--log``: every answer in the prediction log (SQLite file or PostgreSQL), as ``predict --log`` records it. A
  shard redone after a failure between its log entry and its file is logged twice (the log keeps both, with their
  times).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrlearn.inference.predictor import Prediction, Predictor

#: A shard's results folder in ``--dicom-out``, and the file naming the inputs given none.
DICOM_FOLDER_PREFIX, REFUSED_FILE = "part-", "_refused.csv"


def answered_files(read: list[Path], predictions: list[Prediction]) -> list:
    """``predict --log``'s rows: each file's prediction, named by the file, with a DICOM file's tags."""
    from cxrlearn.monitoring.log import Answered, file_tags

    return [Answered(prediction, prediction.image, *(file_tags(path) if path.suffix.lower() in (".dcm", ".dicom")
                                                     else (None, None)))
            for path, prediction in zip(read, predictions)]


@dataclass(frozen=True)
class ShardOutputs:
    """The shard hook of ``--dicom-out`` (with its ``--accept``, ``--heatmap`` and ``--codes``, typed) and
    ``--log`` (module description); picklable, as Ray sends it to the actors."""

    dicom_out: Path | None = None
    accept: object | None = None  # cxrlearn.dicom.routing.Accept (typed there; this layer imports DICOM lazily)
    options: object | None = None  # cxrlearn.dicom.results.ResultOptions
    log: str | None = None  # an SQLite file or a postgresql:// URL
    site_key: Path | None = None

    @property
    def summarise(self) -> bool:
        """Whether the answers need the network's summaries (the prediction log's drift statistics)."""
        return self.log is not None

    def __call__(self, predictor: Predictor, key: str, paths: list[str], predictions: list[Prediction]) -> None:
        files = [Path(p) for p in paths]
        if self.dicom_out is not None:
            self._dicom(predictor, key, files, predictions)
        if self.log is not None:
            from cxrlearn.monitoring.log import PredictionLog

            PredictionLog(self.log, key_file=self.site_key).record(answered_files(files, predictions), predictor,
                                                                  "predict")

    def _dicom(self, predictor: Predictor, key: str, files: list[Path], predictions: list[Prediction]) -> None:
        from cxrlearn.dicom.results import write_dicom_results

        folder = Path(self.dicom_out) / f"{DICOM_FOLDER_PREFIX}{key}"
        written = write_dicom_results(predictor, files, predictions, folder, self.accept, self.options)
        refused = [(str(path), why) for path, why in written.refused]  # inputs that are not DICOM: none expected
        target = folder / REFUSED_FILE
        if refused:
            partial = folder / f".{REFUSED_FILE}.{uuid.uuid4().hex}.partial"
            pd.DataFrame(refused, columns=["path", "reason"]).to_csv(partial, index=False)
            os.replace(partial, target)
        else:
            target.unlink(missing_ok=True)
