"""Which device a model runs on: one rule for training's summaries, evaluation, prediction and the service."""

from __future__ import annotations

import torch

from cxrlearn.errors import ConfigError


def resolve_device(requested: str = "auto") -> str:
    """``auto``: the first CUDA GPU when there is one, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as asked,
    refused (naming what there is) when that GPU is not here."""
    requested = requested.strip().lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    kind, _, index = requested.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= count:
        raise ConfigError(f"device {requested!r}: this machine has {count or 'no'} CUDA GPU{'' if count == 1 else 's'}")
    return requested
