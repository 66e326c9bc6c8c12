"""The training pipeline: the memory-mapped preprocessing cache, augmentation, and the Lightning DataModule."""
