"""A real Orthanc (Debian's ``orthanc`` package) for the tests: started on free loopback ports with a temporary
configuration and storage, stopped afterwards. Its REST API is read with urllib."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Orthanc:
    folder: Path
    http_port: int
    dicom_port: int
    modalities: dict
    process: subprocess.Popen | None = None
    ae_title: str = "ORTHANC"
    extra: dict | None = None  # more configuration (a Lua script's path under "LuaScripts", say)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        config = {
            "Name": "cxrlearn-tests", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1",
            "DicomServerEnabled": True, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "DicomModalities": self.modalities, "StableAge": 1, "ConcurrentJobs": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **(self.extra or {}),
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 60 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def request(self, method: str, path: str, body: bytes | None = None, kind: str = "application/json"):
        request = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": kind})
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        return json.loads(data) if data and response.headers.get_content_type() == "application/json" else data

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, dicom: bytes) -> str:
        """Store a DICOM file through REST; its Orthanc instance ID."""
        return self.request("POST", "/instances", dicom, "application/dicom")["ID"]

    def send(self, instance: str, modality: str) -> None:
        """Orthanc sends an instance it holds to a modality it knows (a C-STORE SCU)."""
        self.request("POST", f"/modalities/{modality}/store", json.dumps({"Resources": [instance], "Synchronous": True}).encode())

    def study_instances(self, study_uid: str) -> list[dict]:
        """Every instance of a study, with its main DICOM tags (SOP class, series description, modality)."""
        found = self.request("POST", "/tools/find", json.dumps(
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).encode())
        out = []
        for instance in found:
            tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
            out.append({"id": instance["ID"], **tags})
        return out

    def file(self, instance: str) -> bytes:
        return self.request("GET", f"/instances/{instance}/file")
