"""OpenVINO as a runtime (``--runtime openvino`` and ``openvino-int8``): the bundle's ONNX exports, compiled by
OpenVINO for the CPU, behind the part of ONNX Runtime's ``InferenceSession`` the Predictor uses.

OpenVINO is an optional extra (``pip install 'cxrlearn[openvino]'``), imported only here, when chosen. Its CPU
plugin would run float layers in bf16 on CPUs that have it (Sapphire Rapids, Granite Rapids) unless told: the
precision is set explicitly to f32 (:data:`PRECISION`), so that ``openvino`` answers as ``onnx`` does on any CPU
and ``openvino-int8`` runs the int8 file's integer layers as integers and the rest (the head) in f32.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrlearn.errors import ConfigError

#: The precision of OpenVINO's float layers, set rather than left to the CPU's own (bf16 where it has it).
PRECISION = "f32"


@dataclass(frozen=True)
class Output:
    """An output's name and shape, as ONNX Runtime's ``NodeArg`` gives them (None for a dynamic size)."""

    name: str
    shape: tuple[int | None, ...]


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO for the CPU: ``run(None, {"image": batch})`` returns its outputs in the
    file's order, as ONNX Runtime's session does. One inference at a time (an infer request is not shared between
    threads)."""

    def __init__(self, path: Path, threads: int | None = None):
        try:
            import openvino
        except ImportError:
            raise ConfigError("--runtime openvino needs OpenVINO: pip install 'cxrlearn[openvino]'") from None
        core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": PRECISION}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as err:  # noqa: BLE001 - OpenVINO raises its own types for files it cannot compile
            raise ConfigError(f"{path}: OpenVINO cannot run it ({type(err).__name__}: {str(err)[:200]})") from None
        self._ports = list(self.compiled.outputs)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin took: f32, or not
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def get_outputs(self) -> list[Output]:
        return [Output(port.get_any_name(), tuple(None if d.is_dynamic else d.get_length()
                                                  for d in port.get_partial_shape())) for port in self._ports]

    def run(self, names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            results = self._request.infer(feed)
            return [np.array(results[port], dtype=np.float32) for port in self._ports]
