"""Peak memory of `cxrlearn serve` under concurrent uploads of large 16-bit PNGs.

A 9000 × 9000 16-bit grayscale PNG of a flat image is a 157 KB file that decodes to 162 MB of pixels.
The service is started in a subprocess on a free 127.0.0.1 port; N clients upload the file at once
(a few rounds); the server's peak resident memory (VmHWM), its resident memory after each round (VmRSS:
bounded if it levels off rather than climbing round after round) and the answers are reported. Traffic goes to
loopback only and stops by itself.

`--pythonpath DIR` runs the service from another checkout's ``src`` (an earlier commit: before/after). `--bits 8
--cam` uploads an 8-bit PNG and asks for its Grad-CAM overlay (``?cam=top``): the attack's 8,000 px case.

Usage: python benchmarks/serve_memory.py --model RUN_DIR [--clients 4] [--rounds 3] [--side 9000] [--bits 16]
       [--cam] [--pythonpath OLD/src]
"""

from __future__ import annotations

import os
import struct
import time
import urllib.error
import urllib.request
import zlib

from _common import machine, parser
from serve_load import in_parallel, multipart, running_service


def flat_png16(side: int, bits: int = 16) -> bytes:
    """A side × side grayscale PNG (16 or 8 bits) of zeros, compressed row by row (no 162 MB buffer here)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + bits // 8 * side)  # filter byte + samples
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, bits, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--side", type=int, default=9000)
    p.add_argument("--bits", type=int, choices=(8, 16), default=16)
    p.add_argument("--cam", action="store_true", help="ask for the Grad-CAM overlay (?cam=top)")
    p.add_argument("--pythonpath", help="run the service from this src folder (another checkout)")
    args = p.parse_args()
    png = flat_png16(args.side, args.bits)
    body, kind = multipart("large16.png", png)
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    with running_service(args.model, env=env) as (server, base):
        idle = memory_kb(server.pid, "VmRSS")
        statuses: list[int] = []
        seconds: list[float] = []

        def upload() -> None:
            request = urllib.request.Request(f"{base}/v1/predict" + ("?cam=top" if args.cam else ""), data=body, method="POST",
                                             headers={"Content-Type": kind})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as err:
                statuses.append(err.code)
            except (urllib.error.URLError, OSError):
                statuses.append(0)
            seconds.append(time.perf_counter() - started)

        after_rounds = []
        for _ in range(args.rounds):
            in_parallel(args.clients, upload)
            after_rounds.append(memory_kb(server.pid, "VmRSS"))
        peak = memory_kb(server.pid, "VmHWM")
        healthy = urllib.request.urlopen(f"{base}/healthz", timeout=10).status == 200
        source = args.pythonpath or "this checkout"
        print(f"# serve memory: {args.clients} concurrent uploads × {args.rounds} rounds of a {args.side}×{args.side} "
              f"{args.bits}-bit PNG ({len(png) / 1e3:,.0f} KB file, {args.side ** 2 * args.bits // 8 / 1e6:,.0f} MB of "
              f"pixels){'; ?cam=top' if args.cam else ''}; "
              f"service from {source}; {machine()}")
        answers = {s: statuses.count(s) for s in sorted(set(statuses))}
        print(f"idle {idle / 1024:,.0f} MB, peak {peak / 1024:,.0f} MB (+{(peak - idle) / 1024:,.0f} MB); answers "
              f"{answers}; slowest answer {max(seconds):.2f} s; healthy after: {healthy}")
        print("resident after each round (MB): " + ", ".join(f"{kb / 1024:,.0f}" for kb in after_rounds))


if __name__ == "__main__":
    main()
