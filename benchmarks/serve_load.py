"""Load on `cxrlearn serve`: N concurrent clients on loopback for a bounded time.

Starts the service in a subprocess on a free 127.0.0.1 port, then each client posts
real sample X-rays (PNG) to /v1/predict in a loop until the time is up, and reports
throughput, p50/p99 latency and errors. Traffic goes to loopback only and stops by
itself (time- and request-bounded).

Usage: python benchmarks/serve_load.py --model RUN_DIR [--clients 1 4 8] [--seconds 20] [--runtime torch|onnx] [--cam]
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
from _common import machine, parser

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


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--runtime", default="torch")
    p.add_argument("--cam", action="store_true", help="ask for the Grad-CAM overlay too")
    args = p.parse_args()
    images = sorted((args.data / "nih-sample" / "images-256").glob("*.png"))[:32]
    bodies = [multipart(path.name, path.read_bytes()) for path in images]
    with running_service(args.model, ["--runtime", args.runtime]) as (_, base):
        meta = json.loads(urllib.request.urlopen(f"{base}/v1/model").read())
        url = f"{base}/v1/predict" + ("?cam=top" if args.cam else "")
        print(f"# serve load: {meta['backbone']} at {meta['preprocessing']['input_size']} px, runtime {args.runtime}, "
              f"tta {meta['tta']}, cam {args.cam}; {args.seconds:g} s per level; {machine()}")
        print("| clients | requests | throughput (req/s) | p50 (ms) | p99 (ms) | errors |")
        print("|---|---|---|---|---|---|")
        client(url, bodies, time.perf_counter() + 2.0, [], [])  # warm-up
        for clients in args.clients:
            latencies: list[float] = []
            errors: list[str] = []
            stop_at = time.perf_counter() + args.seconds
            started = time.perf_counter()
            in_parallel(clients, client, url, bodies, stop_at, latencies, errors)
            elapsed = time.perf_counter() - started
            ms = np.array(latencies) * 1000
            print(f"| {clients} | {len(latencies):,} | {len(latencies) / elapsed:.1f} | {np.percentile(ms, 50):.0f} | "
                  f"{np.percentile(ms, 99):.0f} | {len(errors)} |")


if __name__ == "__main__":
    main()
