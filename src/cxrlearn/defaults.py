"""Defaults shared across the layers, each written once.

``SEED`` is Kufel et al. 2023's split seed; cxrlearn uses it wherever a seed is not given (the split,
training's randomness, augmentation, the bootstrap), so that a run is reproducible by default.
``RATIOS`` are the custom split's train/val/test proportions (70/10/20).
"""

SEED = 2137
RATIOS = (0.7, 0.1, 0.2)
