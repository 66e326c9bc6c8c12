"""A real two-node Ray cluster for the tests: `ray start --head` on a free loopback port and a second node joined
to it with `ray start --address`, one CPU each (Ray is in the dev extra, installed by .ci/run through the lock)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orthanc import free_port


def _ray_command() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:  # the dev extra installs it: missing is a broken set-up, not a reason to skip
        pytest.fail("missing Ray's `ray` command: install cxrlearn[dev] (or cxrlearn[ray])")
    return found


class RayCluster:
    """``RayCluster().start()``; ``address`` is the head's; :meth:`kill_worker_raylet` kills the second node's."""

    def __init__(self):
        self.port, self.worker_port = free_port(), free_port()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray(self, *arguments: str) -> None:
        done = subprocess.run([_ray_command(), *arguments], capture_output=True, text=True, timeout=180, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"ray {' '.join(arguments)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> RayCluster:
        self._ray("start", "--head", "--port", str(self.port), "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                  "--include-dashboard", "false", "--disable-usage-stats")
        self._ray("start", "--address", self.address, "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                  "--node-manager-port", str(self.worker_port))
        return self

    def kill_worker_raylet(self) -> int:
        """``kill -9`` of the second node's raylet (found by its node manager port); its pid."""
        for entry in Path("/proc").iterdir():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "raylet" in command and f"--node_manager_port={self.worker_port}" in command:
                os.kill(int(entry.name), signal.SIGKILL)
                return int(entry.name)
        raise RuntimeError(f"no raylet with node manager port {self.worker_port}")

    def stop(self) -> None:
        subprocess.run([_ray_command(), "stop", "--force"], capture_output=True, timeout=120, env=self.env)
