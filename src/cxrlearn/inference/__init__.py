"""Prediction: the Predictor over a bundle (torch or ONNX Runtime), what its outputs mean, and Grad-CAM."""

#: The runtimes a Predictor runs a bundle with.
RUNTIMES = ("torch", "onnx", "onnx-int8")
#: Images per batch when predicting files.
PREDICT_BATCH_SIZE = 16
