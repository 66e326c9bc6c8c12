"""Training presets shipped with cxrlearn (also at ``configs/`` in the repository).

``--config kufel2023`` names a preset; ``--config path/to/file.yaml`` a file of your own.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def preset(name: str) -> Path | None:
    """The shipped preset called ``name`` (with or without ``.yaml``), or None."""
    file = resources.files(__name__).joinpath(name if name.endswith(".yaml") else f"{name}.yaml")
    return Path(str(file)) if file.is_file() else None
