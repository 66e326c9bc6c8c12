"""Defaults shared across the layers, each written once.

``SEED`` is Kufel et al. 2023's split seed; cxrlearn uses it wherever a seed is not given (the split,
training's randomness, augmentation, the bootstrap), so that a run is reproducible by default.
``RATIOS`` are the custom split's train/val/test proportions (70/10/20). ``IMAGE_SIZE`` is the paper's
backbone's native input size, used by training and ``cxrlearn prepare`` alike unless told otherwise.
"""

import os

SEED = 2137
RATIOS = (0.7, 0.1, 0.2)
#: The network's input side (and the cache's, unless told otherwise): EfficientNet-B1's native resolution.
IMAGE_SIZE = 240


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
