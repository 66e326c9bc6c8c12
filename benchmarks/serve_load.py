"""Load on `cxrlearn serve`: N concurrent clients on loopback for a bounded time.

Starts the service in a subprocess on a free 127.0.0.1 port, then each client posts
real sample X-rays (PNG) to /v1/predict in a loop until the time is up, and reports
throughput, p50/p99 latency and errors. Traffic goes to loopback only and stops by
itself (time- and request-bounded).

First, offline: the same model in this process on the same images, already decoded, in
batches of --max-batch (the ceiling a service on this device can reach); each level's
throughput is also given as a share of it. With --unbatched, the service is run a second
time with one request per forward pass (--max-batch 1 --batch-wait-ms 0), side by side.

Usage: python benchmarks/serve_load.py --model RUN_DIR [--clients 1 8 32] [--seconds 20] [--runtime torch|onnx]
       [--max-batch 32] [--unbatched] [--cam] [--with-log]
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
from _common import machine, parser

from cxrlearn.data.decoding.images import load_grayscale_and_colour
from cxrlearn.inference.predictor import Predictor
from cxrlearn.serving import MAX_BATCH

MAX_REQUESTS_PER_CLIENT = 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def in_parallel(count: int, target, *args) -> None:
    """Run ``target(*args)`` in ``count`` threads at once and wait for all of them."""
    threads = [threading.Thread(target=target, args=args) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@contextlib.contextmanager
def running_service(model: str, options: list[str] = (), env: dict | None = None):
    """`cxrlearn serve` in a subprocess on a free loopback port, once it answers /healthz: yields (process,
    base URL), and stops it on leaving."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cxrlearn.cli.main", "serve", "--model", model,
                               "--port", str(port), *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not start")
                time.sleep(0.2)
        yield server, base
    finally:
        server.terminate()
        server.wait(timeout=30)


def client(url: str, bodies: list[tuple[bytes, str]], stop_at: float, latencies: list, errors: list) -> None:
    for i in range(MAX_REQUESTS_PER_CLIENT):
        if time.perf_counter() >= stop_at:
            return
        body, kind = bodies[i % len(bodies)]
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": kind})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                json.loads(response.read())
            latencies.append(time.perf_counter() - started)
        except (urllib.error.URLError, OSError, ValueError) as err:
            errors.append(str(err))


def offline_rate(model: str, runtime: str, paths: list, batch: int, seconds: float = 5.0) -> float:
    """Images per second of the model alone on already-decoded images, in batches of ``batch``, for ``seconds``."""
    predictor = Predictor(model, runtime=runtime)
    prepared = [predictor.prepare(*load_grayscale_and_colour(path)) for path in paths]
    prepared = (prepared * (batch // len(prepared) + 1))[:batch]
    names = [str(i) for i in range(len(prepared))]
    predictor.predict_prepared(prepared, names)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += len(predictor.predict_prepared(prepared, names))
    return done / (time.perf_counter() - started)


def load_levels(url: str, bodies, levels: list[int], seconds: float, offline: float, what: str) -> None:
    client(url, bodies, time.perf_counter() + 2.0, [], [])  # warm-up
    for clients in levels:
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.perf_counter() + seconds
        started = time.perf_counter()
        in_parallel(clients, client, url, bodies, stop_at, latencies, errors)
        elapsed = time.perf_counter() - started
        ms = np.array(latencies) * 1000
        rate = len(latencies) / elapsed
        print(f"| {what} | {clients} | {len(latencies):,} | {rate:.1f} | {rate / offline:.2f} | "
              f"{np.percentile(ms, 50):.0f} | {np.percentile(ms, 99):.0f} | {len(errors)} |")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--runtime", default="torch")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH)
    p.add_argument("--unbatched", action="store_true", help="also the service with one request per forward pass")
    p.add_argument("--cam", action="store_true", help="ask for the Grad-CAM overlay too")
    p.add_argument("--with-log", action="store_true", help="also the service with --log, alternated with without")
    args = p.parse_args()
    images = sorted((args.data / "nih-sample" / "images-256").glob("*.png"))[:32]
    bodies = [multipart(path.name, path.read_bytes()) for path in images]
    offline = offline_rate(args.model, args.runtime, images, args.max_batch)
    batched = (f"batched (--max-batch {args.max_batch})", ["--max-batch", str(args.max_batch)])
    settings = [batched]
    if args.unbatched:
        settings.append(("one request per pass", ["--max-batch", "1", "--batch-wait-ms", "0"]))
    folder = tempfile.TemporaryDirectory()
    if args.with_log:  # alternated, so that the machine's drift falls on both alike
        logged = (f"{batched[0]}, --log", [*batched[1], "--log", f"{folder.name}/log.sqlite"])
        settings = [batched, logged, batched, logged]
    header = False
    for what, options in settings:
        with running_service(args.model, ["--runtime", args.runtime, *options]) as (_, base):
            if not header:
                meta = json.loads(urllib.request.urlopen(f"{base}/v1/model").read())
                print(f"# serve load: {meta['backbone']} at {meta['preprocessing']['input_size']} px, runtime "
                      f"{args.runtime}, tta {meta['tta']}, cam {args.cam}; {args.seconds:g} s per level; {machine()}")
                print(f"offline, batches of {args.max_batch} already decoded: {offline:.1f} images/s")
                print("| service | clients | requests | throughput (req/s) | of offline | p50 (ms) | p99 (ms) | errors |")
                print("|---|---|---|---|---|---|---|---|")
                header = True
            url = f"{base}/v1/predict" + ("?cam=top" if args.cam else "")
            load_levels(url, bodies, args.clients, args.seconds, offline, what)


if __name__ == "__main__":
    main()
