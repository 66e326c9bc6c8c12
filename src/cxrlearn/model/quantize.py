"""Static int8 quantisation of a bundle's ONNX export, with ONNX Runtime (QDQ format).

EfficientNet-Lite was designed to run in int8 (ReLU6, no squeeze-and-excitation), and ONNX Runtime's static
quantisation ships with cxrlearn's dependencies:

- weights int8, symmetric, per output channel; activations uint8, asymmetric, per tensor, their ranges from
  calibration images (a few hundred of the run's own training images) with the MinMax method;
- only the backbone's full (not depthwise) convolutions after the stem are quantised: they hold nearly all of
  its multiply-adds. Kept float, each for a measured reason:

  - the depthwise convolutions: with BatchNorm folded into them, one channel's weights can span a range
    hundreds of times another's, and their per-tensor uint8 inputs lose the small channels. On a run of the
    sample (``tf_efficientnet_lite0``, 64 px) quantising them with the rest moved the pooled features by 60%
    (relative norm) and flipped the input check's verdict on 13% of the validation images; kept float, with
    the stem, 20% and none;
  - the stem, whose input is the normalised image itself;
  - the head: two small dense layers whose output is the logits themselves, and which cost microseconds;
  - the graph's input steps (uint8 to float, mean and std), which are not quantisable operators.
- ``reduce_range`` (7-bit weights) where the CPU lacks VNNI: ONNX Runtime's uint8 x int8 kernels on AVX2 alone
  can saturate (``vpmaddubsw``), and its documentation advises it there.

Whether the result is good enough is judged by :mod:`cxrlearn.workflows.quantize`, on the run's validation
images, before the file is written.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from cxrlearn.model.export import read_contract, write_with_contract

#: A bundle's int8 export, beside ``model.onnx`` (``--runtime onnx-int8``).
INT8_FILE = "model.int8.onnx"
#: The operators quantised: the backbone's convolutions (the head's Gemm stays float), less those :func:`kept_float`.
QUANTISED_OPS = ("Conv",)
#: Calibration images fed per call (memory is calibration batches x activations).
CALIBRATION_BATCH = 16


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); None where it cannot be told or does not apply
    (not Linux, or not x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def kept_float(graph) -> list[str]:
    """The convolutions left in float (module docstring): the stem (the graph's first convolution, ONNX graphs
    being in topological order) and every depthwise one (``group`` > 1)."""
    convs = [node for node in graph.node if node.op_type == "Conv"]
    return [node.name for i, node in enumerate(convs)
            if i == 0 or any(a.name == "group" and a.i > 1 for a in node.attribute)]


def quantise(fp32: Path, out: Path, calibration: np.ndarray, reduce_range: bool) -> Path:
    """Write ``fp32`` (an ONNX export of :func:`cxrlearn.model.export.export_onnx`) as an int8 QDQ model at
    ``out``, calibrated on ``calibration`` (uint8, (N, 1, S, S): the graph's own input), its contract kept and
    the quantisation recorded in it."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // CALIBRATION_BATCH)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": np.ascontiguousarray(batch)}

    staged, prepared = out.with_name(out.name + ".staged"), out.with_name(out.name + ".prepared")
    # ONNX Runtime's advice before quantising: shape inference and graph optimisation (BatchNorm folded into the
    # convolutions, so that it is quantised with them rather than left as float between two QDQ pairs).
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    try:
        model = onnx.load(str(prepared))
        excluded = kept_float(model.graph)
        quantize_static(model, str(staged), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=excluded,
                        calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(staged))
    finally:
        staged.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    contract = read_contract(fp32)
    contract["int8"] = {"format": "QDQ", "weights": "int8, symmetric, per channel", "activations":
                        "uint8, asymmetric, per tensor (MinMax on the calibration images)",
                        "quantised_ops": list(QUANTISED_OPS),
                        "kept_float": f"the stem and {len(excluded) - 1} depthwise convolution(s), the head (Gemm) "
                                      "and the input steps",
                        "reduce_range": reduce_range, "calibration_images": int(len(calibration))}
    return write_with_contract(proto, contract, out)
