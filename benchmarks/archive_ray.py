"""`predict --out DIR` locally against `--engine ray` on this machine's cores: one node, then two nodes of a local
cluster (`ray start --head`, `ray start --address`), side by side in one run.

Each engine predicts the same images into a fresh Parquet dataset. "Whole run" counts from the call to its
return (Ray's workers start and import cxrlearn within it); "steady" counts from the first shard written to the
last (shard files are watched as they appear), the rate an archive of hours runs at.

Usage: python benchmarks/archive_ray.py --model RUN_DIR [--runtime onnx] [--images DIR] [--count 1115]
       [--shard-images 64]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from _common import machine, parser

from cxrlearn.inference import predict_workers
from cxrlearn.inference.predictor import Predictor
from cxrlearn.workflows.archive import Inputs, predict_local, predict_on_ray, shard_files


class ShardWatch(threading.Thread):
    """When each shard file appears in ``out``."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out, self.seen, self.stopped = out, {}, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for file in shard_files(self.out) if self.out.is_dir() else []:
                self.seen.setdefault(file.name, time.perf_counter())
            time.sleep(0.05)

    def steady(self, images_per_shard: int) -> float:
        times = sorted(self.seen.values())
        return (len(times) - 1) * images_per_shard / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def timed(run, out: Path, shard_images: int, count: int) -> tuple[float, float]:
    watch = ShardWatch(out)
    watch.start()
    started = time.perf_counter()
    run()
    whole = count / (time.perf_counter() - started)
    time.sleep(0.2)
    watch.stopped.set()
    return whole, watch.steady(shard_images)


def ray_cluster(nodes: int, cpus: int) -> tuple[str, list[str]]:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    per_node = max(1, cpus // nodes)
    subprocess.run([ray, "start", "--head", "--port", "6399", "--num-cpus", str(per_node), "--node-ip-address",
                    "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats"], check=True,
                   capture_output=True, env=env)
    for _ in range(nodes - 1):
        subprocess.run([ray, "start", "--address", "127.0.0.1:6399", "--num-cpus", str(per_node),
                        "--node-ip-address", "127.0.0.1"], check=True, capture_output=True, env=env)
    return "127.0.0.1:6399", [ray, "stop", "--force"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--runtime", default="onnx")
    p.add_argument("--images", type=Path)
    p.add_argument("--count", type=int, default=1115)
    p.add_argument("--shard-images", type=int, default=64)
    args = p.parse_args()
    folder = args.images or args.data / "nih-sample" / "images-256"
    paths = [str(p) for p in sorted(folder.glob("*.png"))[: args.count]]
    inputs = Inputs(paths, [Path(p).name for p in paths])
    cores = os.cpu_count() or 1
    print(f"# {len(paths)} images of {folder.name}, runtime {args.runtime}, shards of {args.shard_images}; {machine()}")
    print("| engine | whole run (img/s) | steady (img/s) | of local, steady |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        predictor = Predictor(args.model, runtime=args.runtime)
        out = Path(work) / "local"
        local = timed(lambda: predict_local(predictor, inputs, out, args.shard_images,
                                            workers=predict_workers(), progress=False),
                      out, args.shard_images, len(paths))
        print(f"| local, {predict_workers()} decoding worker(s) | {local[0]:.1f} | {local[1]:.1f} | 1.00 |")
        for nodes in (1, 2):
            address, stop = ray_cluster(nodes, cores)
            try:
                out = Path(work) / f"ray{nodes}"
                rate = timed(lambda: predict_on_ray(args.model, args.runtime, inputs, out, address,
                                                    shard_images=args.shard_images, progress=False),
                             out, args.shard_images, len(paths))
            finally:
                ray.shutdown()
                subprocess.run(stop, capture_output=True)
            print(f"| ray, {nodes} node(s) of {max(1, cores // nodes)} CPU(s) | {rate[0]:.1f} | {rate[1]:.1f} | "
                  f"{rate[1] / local[1]:.2f} |")


if __name__ == "__main__":
    main()
