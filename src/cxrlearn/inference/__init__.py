"""Prediction: the Predictor over a bundle (torch, ONNX Runtime or OpenVINO), what its outputs mean, and Grad-CAM."""

from cxrlearn.defaults import usable_cores

#: The runtimes a Predictor runs a bundle with.
RUNTIMES = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8")
#: Images per batch when predicting files.
PREDICT_BATCH_SIZE = 16
#: Images per shard of a Parquet dataset of predictions: the unit written whole, and redone whole after a failure.
SHARD_IMAGES = 256


def predict_workers() -> int:
    """Processes ``predict`` decodes files in by default: one per core beyond the first (which runs the network's
    batches and feeds it), at most 4; none on one core."""
    return max(0, min(4, usable_cores() - 1))
