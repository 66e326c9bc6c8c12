"""Training configuration: YAML presets over defaults, overridable from the command line.

A config has five sections (data, model, optim, loss, train). Unknown keys are
errors, so a typo in a preset never silently falls back to a default. The
defaults are Kufel et al. 2023's recipe where the paper gives it; the rest is
documented in ``configs/kufel2023.yaml``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from cxrlearn.errors import ConfigError

DEFAULTS: dict = {
    "data": {
        "images": None,  # image folder (flat or images_NNN/images/)
        "csv": None,  # label table; None: NIH's, as shipped with cxrlearn
        "split": None,  # split file; None: make the custom split of the images present
        "ratios": [0.7, 0.1, 0.2],
        "split_seed": 2137,
        "cache": None,  # cache folder; None: RUN_DIR/../cache/<table>-<size>
        "cache_size": None,  # side of cached images; None: image_size
        "image_size": 240,
        "channels": 3,
        "batch_size": 32,
        "num_workers": 4,  # loader processes; "auto": one per CPU core, at most 16
        "prepare_workers": None,
    },
    "model": {
        "backbone": "efficientnet_b1",
        "weights": None,  # local weights file for the backbone
        "hub": True,  # try timm's pretrained weights online
        "head": {"units": 512, "activation": "relu", "dropout": 0.0},
        "drop_path_rate": 0.0,
        "freeze_bn": False,  # keep the backbone's BatchNorm statistics as pretrained
        "trainable_blocks": None,  # fine-tune only the last N stages (None: the whole backbone)
    },
    "optim": {
        "name": "adam",  # adam (the paper) or adamw
        "lr": 1.0e-4,
        "weight_decay": 0.0,
        "backbone_lr_scale": 1.0,  # backbone lr = lr * this
        "scheduler": "plateau",  # plateau (the paper) or cosine (with warm-up)
        "plateau_factor": 0.1,
        "plateau_patience": 1,
        "warmup_epochs": 0.0,
        "head_only_epochs": 0,  # epochs with the backbone frozen before fine-tuning
        "unfreeze_warmup": True,  # ramp the backbone's lr up over the epoch that unfreezes it
    },
    "loss": {
        "name": "bce",
        "pos_weight": False,
        "focal_gamma": 2.0,
        "focal_alpha": 0.25,
        "asl_gamma_neg": 4.0,
        "asl_gamma_pos": 0.0,
        "asl_clip": 0.05,
    },
    "train": {
        "epochs": 20,
        "early_stopping_patience": 4,
        "seed": 2137,
        "precision": "32-true",  # 32-true, bf16-mixed, 16-mixed, or auto (bf16/fp16 mixed on a GPU, fp32 on a CPU)
        "cudnn_benchmark": False,  # let cuDNN time its convolution algorithms (fixed input size: faster)
        "channels_last": True,  # NHWC: faster convolutions on GPUs and on oneDNN CPUs
        "accumulate_grad_batches": 1,
        "accelerator": "auto",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",  # auto: ddp when devices * num_nodes > 1
        "tta": False,  # average with the horizontally flipped image at evaluation
        "limit_train_batches": None,
        "deterministic": False,
    },
}


def _merge(base: dict, update: dict, where: str = "") -> dict:
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r} (known here: {', '.join(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give it as a mapping")
            _merge(base[key], value, path + ".")
        else:
            base[key] = value
    return base


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None, sets: list[str] = ()) -> dict:
    """Defaults, then the YAML file, then ``overrides`` (nested), then ``key.path=value`` strings."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists() and path.parent == Path("."):
            from cxrlearn.configs import preset, presets

            found = preset(path.name)
            if found is None:
                raise ConfigError(f"{path}: no such config file, nor a preset of cxrlearn's ({', '.join(presets())})")
            path = found
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections")
        _merge(config, loaded)
    if overrides:
        _merge(config, overrides)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        nested: dict = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = _parse_value(value)
        _merge(config, nested)
    _validate(config)
    return config


def _validate(config: dict) -> None:
    data, optim, train = config["data"], config["optim"], config["train"]
    if data["channels"] not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, not {data['channels']}")
    if not 32 <= int(data["image_size"]) <= 2048:
        raise ConfigError(f"data.image_size must be between 32 and 2048, not {data['image_size']}")
    if optim["name"] not in ("adam", "adamw"):
        raise ConfigError(f"optim.name must be adam or adamw, not {optim['name']!r}")
    if optim["scheduler"] not in ("plateau", "cosine", "none"):
        raise ConfigError(f"optim.scheduler must be plateau, cosine or none, not {optim['scheduler']!r}")
    if train["precision"] not in ("32-true", "32", "bf16-mixed", "16-mixed", "auto"):
        raise ConfigError(f"train.precision must be 32-true, bf16-mixed, 16-mixed or auto, not {train['precision']!r}")
    if data["num_workers"] != "auto" and not (isinstance(data["num_workers"], int) and data["num_workers"] >= 0):
        raise ConfigError(f"data.num_workers must be a whole number >= 0 or auto, not {data['num_workers']!r}")
    if int(train["epochs"]) < 1:
        raise ConfigError("train.epochs must be at least 1")


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto``: bf16 mixed precision on a GPU that has it, fp16 mixed on one that has not, fp32 on a CPU."""
    if precision != "auto":
        return precision
    import torch

    if accelerator == "cpu" or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_workers(workers) -> int:
    """``auto``: one loader process per CPU core this process may use, at most 16."""
    if workers != "auto":
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(16, cores)


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
