"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("CXRLEARN_DATA", REPO.parent / "shared" / "data")))
    return p


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.1f}/s"
