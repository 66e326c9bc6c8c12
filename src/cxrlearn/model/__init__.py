"""Models: timm EfficientNet backbones with the paper's head, their bundle and metadata, and ONNX export."""

#: The ONNX opset export writes by default.
ONNX_OPSET = 18
