"""A real PostgreSQL server for the tests: a temporary cluster (Debian's `postgresql` package, installed by .ci/run)
made with initdb and started with pg_ctl on a free loopback port, as the operating system's `postgres` user when
the tests run as root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from orthanc import free_port


def _tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:  # CI installs it (.ci/run): missing is a broken set-up, not a reason to skip
        pytest.fail(f"missing {name}: install Debian's postgresql (.ci/run does)")
    return found


class Postgres:
    """``Postgres(folder).start()``; ``url`` reaches its ``postgres`` database as the ``cxrlearn`` role."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.data = folder / "data"
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.user else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")

    def start(self) -> Postgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        self._run(_tool("initdb"), "-D", str(self.data), "-U", "cxrlearn", "--auth=trust", "--no-sync")
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        return self

    def stop(self) -> None:
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://cxrlearn@127.0.0.1:{self.port}/postgres"
