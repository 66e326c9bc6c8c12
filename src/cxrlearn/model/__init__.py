"""Models: timm EfficientNet backbones with the paper's head, their bundle and metadata, and ONNX export."""

#: The ONNX opset export writes by default.
ONNX_OPSET = 18

# The int8 export's gate (``cxrlearn export --int8``, :mod:`cxrlearn.workflows.quantize`), stated here so that the
# CLI's defaults read them without importing torch.
#: The largest loss of mean AUC the int8 model may have, by the gate (:data:`INT8_GATES`).
INT8_MAX_AUC_LOSS = 0.005
#: The gates: ``no-loss`` (the paired 95% interval of mean AUC, int8 - float, reaches above ``-INT8_MAX_AUC_LOSS``:
#: the validation images show no larger loss) and ``equivalence`` (the whole interval above it: they show the loss
#: is smaller, which needs thousands of validation images); both refuse a finding significantly worse in int8.
#: ``none`` writes the file whatever the figures say (they are printed and recorded in its contract), for a model
#: its owner judges on a test set of their own (``evaluate --runtime onnx-int8``).
INT8_GATES = ("no-loss", "equivalence", "none")
#: The default gate: ``equivalence`` refused 97% of honest int8 files on sample-sized validation sets
#: (docs/benchmarks.md).
INT8_GATE = "no-loss"
#: The least share of validation images on which the input check must say the same of both models.
INT8_MIN_AGREEMENT = 0.99
#: Training images the activation ranges are measured on.
INT8_CALIBRATION_IMAGES = 200
