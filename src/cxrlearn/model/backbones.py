"""Backbones come from timm by name; their preprocessing facts come from timm too.

timm's ``PretrainedCfg`` carries the mean, std and native input size each set of
weights was trained with. cxrlearn reads them from there and stores them in the
model bundle, so nobody types ImageNet's mean by hand (and the Lite models'
0.5/0.5 is not mistaken for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
from timm.models import get_pretrained_cfg

from cxrlearn.errors import ConfigError


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int  # the input size the pretrained weights were trained at
    interpolation: str


def backbone_config(name: str) -> BackboneConfig:
    """The pretrained configuration timm records for backbone ``name``."""

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[-1]}*")[:5] if "_" in name else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown backbone {name!r}: not a timm model name{hint}")
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"timm has no pretrained configuration for {name!r}")
    return BackboneConfig(
        name=name,
        mean=tuple(float(v) for v in cfg.mean),
        std=tuple(float(v) for v in cfg.std),
        native_size=int(cfg.input_size[-1]),
        interpolation=str(cfg.interpolation),
    )
