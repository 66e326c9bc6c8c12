"""Models: timm EfficientNet backbones with the paper's head, their bundle and metadata, and ONNX export."""

#: The ONNX opset export writes by default.
ONNX_OPSET = 18

# The int8 export's gate (``cxrlearn export --int8``, :mod:`cxrlearn.workflows.quantize`), stated here so that the
# CLI's defaults read them without importing torch.
#: The largest loss of mean AUC the int8 model may have: the lower bound of the paired 95% interval of
#: (int8 - float) must be above its negative.
INT8_MAX_AUC_LOSS = 0.005
#: The least share of validation images on which the input check must say the same of both models.
INT8_MIN_AGREEMENT = 0.99
#: Training images the activation ranges are measured on.
INT8_CALIBRATION_IMAGES = 200
