"""Static int8 quantisation of a bundle's ONNX export, with ONNX Runtime (QDQ format).

EfficientNet-Lite was designed to run in int8 (ReLU6, no squeeze-and-excitation), and ONNX Runtime's static
quantisation ships with cxrlearn's dependencies:

- every convolution (the stem and the depthwise ones included), its ReLU6 (``Clip``) and the blocks' residual
  ``Add``: weights int8, symmetric, per output channel; activations uint8, asymmetric, per tensor. ONNX Runtime
  then runs the whole backbone as integer operators (``QLinearConv``, ``QLinearAdd``) in its NHWC layout, with one
  quantisation at the input and one dequantisation before the pooling. Keeping the depthwise convolutions and
  the stem in float, as cxrlearn did before, cost a dequantise, a transpose, a quantise and another transpose
  around each on the widest activations: that file ran at 0.95x the float one's latency, this one at about half
  (docs/benchmarks.md);
- activation ranges from calibration images (a few hundred of the run's own training images) by the 99.99th
  percentile of each tensor's histogram rather than its extremes (MinMax), so that a few outlying activations do
  not take the depthwise convolutions' range from the rest;
- the head (pooling, two small dense layers whose output is the logits themselves) stays float: it costs
  microseconds;
- ``reduce_range`` (7-bit weights) where the CPU lacks VNNI: ONNX Runtime's uint8 x int8 kernels on AVX2 alone
  can saturate (``vpmaddubsw``), and its documentation advises it there.

The int8 file's pooled features are not the float model's, so the input check's feature part is fitted again on
the int8 file's own features (:func:`cxrlearn.model.input_check.refit_features`, by
:mod:`cxrlearn.workflows.quantize`) and travels with it: :data:`INT8_CHECK_FILE`, named with its SHA-256 in the
file's contract (:class:`Int8Record`). Whether the result is good enough is judged by
:mod:`cxrlearn.workflows.quantize`, on the run's validation images, before the file is written.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from cxrlearn._files import file_digest
from cxrlearn.errors import ConfigError
from cxrlearn.model.export import read_contract, write_with_contract
from cxrlearn.model.input_check import InputCheck
from cxrlearn.model.meta import InputCheckFit
from cxrlearn.records import Record

#: A bundle's int8 export, beside ``model.onnx`` (``--runtime onnx-int8``).
INT8_FILE = "model.int8.onnx"
#: The operators quantised: every convolution, its ReLU6 and the residual adds (the head's Gemm stays float).
QUANTISED_OPS = ("Conv", "Clip", "Relu", "Add")
#: Calibration images fed per call; calibration uses whole batches only (ONNX Runtime's histogram collector
#: needs batches of one shape), so at most ``CALIBRATION_BATCH - 1`` of the images given are left out.
CALIBRATION_BATCH = 16
#: Each activation's range: this percentile of its absolute values on the calibration images.
CALIBRATION_PERCENTILE = 99.99
#: The int8 file's own input check (its feature part fitted on the int8 file's features), beside it.
INT8_CHECK_FILE = "input_check.int8.safetensors"
#: The key of :class:`Int8Record` in an int8 file's contract.
INT8_KEY = "int8"


class Int8Record(Record):
    """What an int8 file's contract says of its quantisation (``contract["int8"]``)."""

    format: str = "QDQ"
    weights: str = "int8, symmetric, per channel"
    activations: str = (f"uint8, asymmetric, per tensor ({CALIBRATION_PERCENTILE}th percentile on the calibration "
                        "images)")
    quantised_ops: list[str] = list(QUANTISED_OPS)
    kept_float: str = "the head (pooling, dense layers) and the input steps"
    reduce_range: bool = False
    calibration_images: int = 0
    #: The int8 file's own input check (None: it judges with the float model's, as files made before did).
    input_check: InputCheckFit | None = None
    input_check_sha256: str | None = None
    #: The gate it was written under (:data:`cxrlearn.model.INT8_GATES`) and what it judged on the validation images.
    gate: str | None = None
    judgement: str | None = None

    @classmethod
    def of(cls, contract: dict) -> Int8Record | None:
        """The record in an int8 file's contract; None in a float file's."""
        found = contract.get(INT8_KEY)
        return cls.model_validate(found) if isinstance(found, dict) else None


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


def quantise(fp32: Path, out: Path, calibration: np.ndarray, reduce_range: bool) -> Path:
    """Write ``fp32`` (an ONNX export of :func:`cxrlearn.model.export.export_onnx`) as an int8 QDQ model at
    ``out``, calibrated on ``calibration`` (uint8, (N, 1, S, S): the graph's own input), its contract kept and
    the quantisation recorded in it (:class:`Int8Record`)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    whole = (len(calibration) // CALIBRATION_BATCH) * CALIBRATION_BATCH or len(calibration)
    used = calibration[:whole]

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(used, max(1, len(used) // CALIBRATION_BATCH)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": np.ascontiguousarray(batch)}

    staged, prepared = out.with_name(out.name + ".staged"), out.with_name(out.name + ".prepared")
    # ONNX Runtime's advice before quantising: shape inference and graph optimisation (BatchNorm folded into the
    # convolutions, so that it is quantised with them rather than left as float between two QDQ pairs).
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(onnx.load(str(prepared)), str(staged), Images(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTISED_OPS),
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": CALIBRATION_PERCENTILE})
        proto = onnx.load(str(staged))
    finally:
        staged.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    contract = read_contract(fp32)
    contract.update({INT8_KEY: Int8Record(reduce_range=reduce_range, calibration_images=int(len(used))).model_dump(
        mode="json")})
    return write_with_contract(proto, contract, out)


def _update_record(int8: Path, **changes) -> Path:
    """Set ``changes`` on the :class:`Int8Record` in ``int8``'s contract, and write the file again with it."""
    import onnx

    contract = read_contract(int8)
    record = Int8Record.of(contract).model_copy(update=changes)
    contract.update({INT8_KEY: record.model_dump(mode="json")})
    return write_with_contract(onnx.load(str(int8)), contract, int8)


def with_input_check(int8: Path, check: InputCheck) -> Path:
    """Save ``check`` (the int8 file's own, :data:`INT8_CHECK_FILE`) beside ``int8`` and name it, with its SHA-256,
    in the file's contract."""
    check.save(int8.parent)
    return _update_record(int8, input_check=check.fit, input_check_sha256=file_digest(int8.parent / check.fit.file))


def record_judgement(int8: Path, gate: str, judgement: str) -> Path:
    """Name in the int8 file's contract the gate it passed and the figures it was judged by."""
    return _update_record(int8, gate=gate, judgement=judgement)


def int8_input_check(path: Path, contract: dict) -> InputCheck | None:
    """The input check an int8 file carries (None for a file without one); one changed since is refused."""
    record = Int8Record.of(contract)
    if record is None or record.input_check is None:
        return None
    check_path = path.parent / record.input_check.file
    if not check_path.is_file() or file_digest(check_path) != record.input_check_sha256:
        raise ConfigError(f"{check_path}: the input check of {path.name} is missing or changed since it was "
                          f"exported; export it again (`cxrlearn export --int8`)")
    return InputCheck.load(path.parent, record.input_check)
