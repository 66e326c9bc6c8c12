"""Inference: running a model over images or loaders."""
