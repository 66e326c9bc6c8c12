"""Models: timm EfficientNet backbones with the paper's head, and their metadata."""
