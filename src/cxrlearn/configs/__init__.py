"""Training presets shipped with cxrlearn (also at ``configs/`` in the repository).

``--config kufel2023`` names a preset; ``--config path/to/file.yaml`` a file of your own.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cxrlearn.defaults import SEED


def presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def preset(name: str) -> Path | None:
    """The shipped preset called ``name`` (with or without ``.yaml``), or None."""
    file = resources.files(__name__).joinpath(name if name.endswith(".yaml") else f"{name}.yaml")
    return Path(str(file)) if file.is_file() else None


@dataclass(frozen=True)
class Recipe:
    """A publication `cxrlearn reproduce` can redo: its preset and the published results to set beside ours."""

    config: str  # a preset of cxrlearn.configs
    published: str  # its key in cxrlearn.evaluation.published.PUBLISHED
    official_published: tuple[str, ...]  # published results to set beside an official-test-list evaluation
    citation: str

    def title(self, backbone: str, image_size: int, split_seed: int) -> str:
        """What is reproduced, naming the model actually trained (a ``--set`` may change the paper's)."""
        return f"{self.citation}: {backbone} at {image_size} px, custom patient-wise split, seed {split_seed}"


RECIPES = {
    "kufel2023": Recipe(
        config="kufel2023", published="Kufel 2023", official_published=("Wang 2017",),
        citation="Kufel et al. 2023 (J Pers Med 13:1426)",
    ),
}
