"""Defaults shared across the layers, each written once.

``SEED`` is Kufel et al. 2023's split seed; cxrlearn uses it wherever a seed is not given (the split,
training's randomness, augmentation, the bootstrap), so that a run is reproducible by default.
``RATIOS`` are the custom split's train/val/test proportions (70/10/20).
"""

import os

SEED = 2137
RATIOS = (0.7, 0.1, 0.2)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
