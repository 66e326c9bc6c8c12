"""Training configuration: YAML presets over defaults, overridable from the command line.

A config has five sections (data, model, optim, loss, train). Unknown keys are
errors, so a typo in a preset never silently falls back to a default. The
defaults are Kufel et al. 2023's recipe where the paper gives it; the rest is
documented in ``configs/kufel2023.yaml``.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from lightning.pytorch.strategies import StrategyRegistry

from cxrlearn._files import read_bytes
from cxrlearn.configs import preset, presets
from cxrlearn.data.columns import UNCERTAIN_POLICIES
from cxrlearn.data.preprocessing import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from cxrlearn.data.sources.datasets import READERS as DATASETS
from cxrlearn.defaults import IMAGE_SIZE, RATIOS, SEED, usable_cores
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import ACTIVATIONS, HeadConfig
from cxrlearn.training.losses import LOSSES

#: Lightning's strategies by name (its registry), and auto.
STRATEGIES: tuple[str, ...] = ("auto", *sorted(StrategyRegistry.available_strategies()))

DEFAULTS: dict = {
    "data": {
        "images": None,  # image folder (flat or images_NNN/images/)
        "csv": None,  # NIH's label table; None: as shipped with cxrlearn
        "table": None,  # another label table: the generic format, or a dataset's own files (data.dataset)
        "dataset": None,  # read data.table with this dataset's reader (nih, chexpert, mimic, padchest, vindr)
        "columns": {"image": "image", "patient": "patient", "view": None, "sex": None, "age": None},
        "findings": None,  # the findings to learn (default: every finding of the table)
        "uncertain": "ignore",  # an uncertain (-1) label: ignore (unknown), positive or negative
        "split": None,  # split file; None: make the custom split of the images present
        "ratios": list(RATIOS),
        "split_seed": SEED,
        "cache": None,  # cache folder; None: RUN_DIR/../cache/<table>-<size>
        "cache_size": None,  # side of cached images; None: image_size
        "image_size": IMAGE_SIZE,
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
        "init_from": None,  # a cxrlearn run folder: start from its weights (shared findings keep their head rows)
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
        "seed": SEED,
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


#: What each key means: one line each, shown in docs/config.md (:func:`reference`), which a test keeps
#: complete and in step with this module.
HELP: dict[str, str] = {
    "data.images": "the image folder: flat, or `images_NNN/images/` as NIH's archives unpack (`--images`)",
    "data.csv": "NIH's label table; null: the copy shipped with cxrlearn (`--csv`)",
    "data.table": "another label table: the generic format, or a public dataset's own files with `data.dataset` "
                  "(`--table`)",
    "data.dataset": "read `data.table` with this dataset's reader (`--dataset`)",
    "data.columns.image": "the generic table's image column (`--column image=NAME`)",
    "data.columns.patient": "the generic table's patient column (`--column patient=NAME`)",
    "data.columns.view": "the generic table's view-position column, if any",
    "data.columns.sex": "the generic table's sex column, if any",
    "data.columns.age": "the generic table's age column (years), if any",
    "data.findings": "the table's finding columns to learn, by their names or harmonised names (`--findings`); "
                     "null: every column without a role",
    "data.uncertain": "what an uncertain (-1) label becomes: ignore (unknown), positive or negative (`--uncertain`)",
    "data.split": "a split file (image, patient_id, split); null: the custom split of the images present, saved "
                  "in the run folder (`--split`)",
    "data.ratios": "train, val and test shares of the custom split",
    "data.split_seed": "the custom split's seed (Kufel et al. 2023: 2137)",
    "data.cache": "the preprocessing cache folder, e.g. one `cxrlearn prepare` made (`--cache`); null: "
                  "`RUN/../cache/<table>-<size>`, shared by the runs beside it",
    "data.cache_size": "side of the cached images in pixels; null: `data.image_size`",
    "data.image_size": "side of the network's square input in pixels (`--image-size`)",
    "data.channels": "input channels: 3 (the gray image repeated, for ImageNet weights) or 1",
    "data.batch_size": "images per training step and per process (`--batch-size`)",
    "data.num_workers": "loader processes; auto: one per CPU core, at most 16",
    "data.prepare_workers": "processes decoding images into the cache; null: one per CPU core",
    "model.backbone": "a timm model name (`--backbone`); Kufel et al. 2023: efficientnet_b1",
    "model.weights": "a local file of ImageNet weights for the backbone",
    "model.hub": "try timm's pretrained weights online (3 s probe) before the offline ones",
    "model.head.units": "width of the head's Dense layer",
    "model.head.activation": "the Dense layer's activation",
    "model.head.dropout": "dropout before the last layer",
    "model.drop_path_rate": "stochastic depth in the backbone",
    "model.freeze_bn": "keep the backbone's BatchNorm statistics as pretrained",
    "model.trainable_blocks": "fine-tune only the last N stages of the backbone; null: all of it",
    "model.init_from": "a cxrlearn run folder to start from: its backbone and head, shared findings keeping their "
                       "head rows (`--init-from`)",
    "optim.name": "the optimiser: adam (the paper) or adamw",
    "optim.lr": "learning rate of the head (and of the backbone, times `optim.backbone_lr_scale`)",
    "optim.weight_decay": "weight decay",
    "optim.backbone_lr_scale": "the backbone's learning rate as a share of `optim.lr`",
    "optim.scheduler": "plateau (ReduceLROnPlateau on validation mean AUC, the paper), cosine (with warm-up) or none",
    "optim.plateau_factor": "ReduceLROnPlateau's factor",
    "optim.plateau_patience": "ReduceLROnPlateau's patience, in epochs",
    "optim.warmup_epochs": "linear warm-up of the cosine schedule, in epochs",
    "optim.head_only_epochs": "epochs that train the head alone on a frozen backbone before fine-tuning",
    "optim.unfreeze_warmup": "ramp the backbone's learning rate up over the epoch that unfreezes it",
    "loss.name": "bce (the paper), focal or asymmetric",
    "loss.pos_weight": "weigh each finding's positives by its negatives-to-positives ratio",
    "loss.focal_gamma": "focal loss's gamma",
    "loss.focal_alpha": "focal loss's alpha",
    "loss.asl_gamma_neg": "asymmetric loss's gamma for negatives",
    "loss.asl_gamma_pos": "asymmetric loss's gamma for positives",
    "loss.asl_clip": "asymmetric loss's probability margin for negatives",
    "train.epochs": "the most epochs (`--epochs`)",
    "train.early_stopping_patience": "stop after this many epochs without a better validation mean AUC; 0: never",
    "train.seed": "the training seed: weights of the new layers, augmentation, batch order",
    "train.precision": "32-true, bf16-mixed, 16-mixed, or auto: bf16/fp16 mixed on a GPU, fp32 on a CPU "
                       "(`--precision`)",
    "train.cudnn_benchmark": "let cuDNN time its convolution algorithms at the start",
    "train.channels_last": "NHWC memory layout: faster convolutions on GPUs and oneDNN CPUs",
    "train.accumulate_grad_batches": "batches whose gradients add up to one optimiser step",
    "train.accelerator": "auto, cpu, gpu, cuda or mps (`--accelerator`)",
    "train.devices": "devices per node, or auto (`--devices`)",
    "train.num_nodes": "machines of a multi-node run (`--num-nodes`)",
    "train.strategy": "Lightning's strategy; auto: ddp when devices x nodes > 1",
    "train.tta": "average each image with its mirror when judging",
    "train.limit_train_batches": "train on this many batches (or this share of them) an epoch; null: all",
    "train.deterministic": "deterministic algorithms only (slower)",
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


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: ``1e-4`` and ``3e-4`` are numbers (YAML 1.1, PyYAML's dialect, reads a
    float without a dot as text, and a config then refused the README's own ``--set optim.lr=3e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str):
    """YAML text with :class:`_Loader` (numbers as people write them)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_value(text: str):
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


@dataclass
class DataConfig:
    images: str | None
    csv: str | None
    table: str | None
    dataset: str | None
    columns: dict
    findings: list[str] | None
    uncertain: str
    split: str | None
    ratios: list[float]
    split_seed: int
    cache: str | None
    cache_size: int | None
    image_size: int
    channels: int
    batch_size: int
    num_workers: int | str
    prepare_workers: int | None


@dataclass
class ModelConfig:
    backbone: str
    weights: str | None
    hub: bool
    head: HeadConfig
    drop_path_rate: float
    freeze_bn: bool
    trainable_blocks: int | None
    init_from: str | None


@dataclass
class OptimConfig:
    name: str
    lr: float
    weight_decay: float
    backbone_lr_scale: float
    scheduler: str
    plateau_factor: float
    plateau_patience: int
    warmup_epochs: float
    head_only_epochs: int
    unfreeze_warmup: bool


@dataclass
class LossConfig:
    name: str
    pos_weight: bool
    focal_gamma: float
    focal_alpha: float
    asl_gamma_neg: float
    asl_gamma_pos: float
    asl_clip: float


@dataclass
class TrainOptions:
    epochs: int
    early_stopping_patience: int
    seed: int
    precision: str
    cudnn_benchmark: bool
    channels_last: bool
    accumulate_grad_batches: int
    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str
    tta: bool
    limit_train_batches: int | float | None
    deterministic: bool


@dataclass
class RunConfig:
    """A run's whole configuration, typed: made by :func:`load_config` (every value checked), written to the
    run folder and the bundle with :meth:`to_dict`. The defaults live in :data:`DEFAULTS`, with their reasons."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    loss: LossConfig
    train: TrainOptions

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> RunConfig:
        """From a complete nested dict (defaults merged in), validated: :class:`ConfigError` naming the key."""
        _validate(config, source)
        model = dict(config["model"], head=HeadConfig(**config["model"]["head"]))
        return cls(DataConfig(**config["data"]), ModelConfig(**model), OptimConfig(**config["optim"]),
                   LossConfig(**config["loss"]), TrainOptions(**config["train"]))

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None,
                sets: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file, then ``overrides`` (nested), then ``key.path=value`` strings."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists() and path.parent == Path("."):

            found = preset(path.name)
            if found is None:
                raise ConfigError(f"{path}: no such config file, nor a preset of cxrlearn's ({', '.join(presets())})")
            path = found
        data = read_bytes(path, "config file", ConfigError)
        try:
            loaded = load_yaml(data.decode("utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
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
    return RunConfig.from_dict(config, str(path) if path is not None else "config")


def _whole(low=None, high=None, allow=()):
    """A rule: a whole number (not a bool, not 2.7) in [low, high], or one of ``allow``."""
    def rule(value):
        if value in allow and not isinstance(value, bool):
            return True
        return (isinstance(value, int) and not isinstance(value, bool)
                and (low is None or value >= low) and (high is None or value <= high))
    span = (f" from {low} to {high}" if high is not None else f" >= {low}" if low is not None else "")
    extra = "".join(f" or {a}" for a in allow)
    return rule, f"a whole number{span}{extra}"


def _real(low=None, high=None, low_open=False, high_open=False):
    def rule(value):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        return high is None or (value < high if high_open else value <= high)
    span = ("" if low is None else f" {'>' if low_open else '>='} {low}") + (
        "" if high is None else f"{' and' if low is not None else ''} {'<' if high_open else '<='} {high}")
    return rule, f"a {'finite ' if high is None else ''}number{span}"


def _one_of(*choices):
    return (lambda value: value in choices and not isinstance(value, bool)), "one of " + ", ".join(map(str, choices))


def _optional(rule_and_text):
    rule, text = rule_and_text
    return (lambda value: value is None or rule(value)), f"null or {text}"


_BOOL = ((lambda value: isinstance(value, bool)), "true or false")
_TEXT = ((lambda value: isinstance(value, str) and value != ""), "a non-empty text")


def _ratios_rule(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
            and sum(value) > 0 and abs(sum(value) - 1) < 1e-6)


def _schema() -> dict:
    """Every config value's rule: type and range, checked on load with the key named."""

    size = _whole(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    return {
        "data.images": _optional(_TEXT), "data.csv": _optional(_TEXT), "data.split": _optional(_TEXT),
        "data.table": _optional(_TEXT), "data.dataset": _optional(_one_of(*DATASETS)),
        "data.columns.image": _TEXT, "data.columns.patient": _TEXT, "data.columns.view": _optional(_TEXT),
        "data.columns.sex": _optional(_TEXT), "data.columns.age": _optional(_TEXT),
        "data.findings": (lambda v: v is None or (isinstance(v, list) and len(v) > 0
                                                  and all(isinstance(f, str) and f for f in v)
                                                  and len(set(v)) == len(v)),
                          "null or a list of distinct finding names"),
        "data.uncertain": _one_of(*UNCERTAIN_POLICIES),
        "data.ratios": (_ratios_rule, "three numbers >= 0 that sum to 1 (train, val, test)"),
        "data.split_seed": _whole(0, 2**32 - 1), "data.cache": _optional(_TEXT), "data.cache_size": _optional(size),
        "data.image_size": size, "data.channels": _one_of(1, 3), "data.batch_size": _whole(1, 65536),
        "data.num_workers": _whole(0, 256, allow=("auto",)), "data.prepare_workers": _optional(_whole(1, 1024)),
        "model.backbone": _TEXT, "model.weights": _optional(_TEXT), "model.hub": _BOOL,
        "model.head.units": _whole(1, 65536), "model.head.activation": _one_of(*ACTIVATIONS),
        "model.head.dropout": _real(0, 1, high_open=True), "model.drop_path_rate": _real(0, 1, high_open=True),
        "model.freeze_bn": _BOOL, "model.trainable_blocks": _optional(_whole(0)), "model.init_from": _optional(_TEXT),
        "optim.name": _one_of("adam", "adamw"), "optim.lr": _real(0, 10, low_open=True),
        "optim.weight_decay": _real(0), "optim.backbone_lr_scale": _real(0),
        "optim.scheduler": _one_of("plateau", "cosine", "none"), "optim.plateau_factor": _real(0, 1, True, True),
        "optim.plateau_patience": _whole(0), "optim.warmup_epochs": _real(0), "optim.head_only_epochs": _whole(0),
        "optim.unfreeze_warmup": _BOOL,
        "loss.name": _one_of(*LOSSES), "loss.pos_weight": _BOOL, "loss.focal_gamma": _real(0),
        "loss.focal_alpha": _real(0, 1), "loss.asl_gamma_neg": _real(0), "loss.asl_gamma_pos": _real(0),
        "loss.asl_clip": _real(0, 1, high_open=True),
        "train.epochs": _whole(1, 100_000), "train.early_stopping_patience": _whole(0),
        "train.seed": _whole(0, 2**32 - 1),
        "train.precision": _one_of("32-true", "32", "bf16-mixed", "16-mixed", "auto"),
        "train.cudnn_benchmark": _BOOL, "train.channels_last": _BOOL, "train.accumulate_grad_batches": _whole(1),
        "train.accelerator": _one_of("auto", "cpu", "gpu", "cuda", "mps"),
        "train.devices": _whole(1, 4096, allow=("auto",)), "train.num_nodes": _whole(1),
        "train.strategy": _one_of(*STRATEGIES), "train.tta": _BOOL,
        "train.limit_train_batches": (lambda v: v is None or _whole(1)[0](v) or _real(0, 1, low_open=True)[0](v),
                                      "null, a whole number of batches >= 1, or a fraction in (0, 1]"),
        "train.deterministic": _BOOL,
    }


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"data.image_size": 240, ...}``: every value of a (nested) config under its dotted key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _validate(config: dict, source: str = "config") -> None:
    """Check every value's type and range; :class:`ConfigError` naming the file and key, before any work starts."""
    values = flatten(config)
    for key, (rule, expected) in _schema().items():
        value = values[key]
        if key == "train.devices" and isinstance(value, str) and value.isdigit():
            value = int(value)  # --devices 2 arrives as text
        if not rule(value):
            raise ConfigError(f"{source}: {key} must be {expected}, not {value!r}")


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto``: bf16 mixed precision on a GPU that has it, fp16 mixed on one that has not, fp32 on a CPU."""
    if precision != "auto":
        return precision

    if accelerator == "cpu" or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_workers(workers) -> int:
    """``auto``: one loader process per CPU core this process may use, at most 16."""
    if workers != "auto":
        return int(workers)
    return min(16, usable_cores())


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def reference() -> str:
    """docs/config.md: every key with its type and range, default and meaning, from :data:`DEFAULTS`, the
    rules that validate a config and :data:`HELP`."""
    defaults, rules = flatten(DEFAULTS), _schema()
    lines = ["# Configuration reference", "",
             "Every key of a training config (`cxrlearn train --config FILE`, or `--set KEY=VALUE`), with the values "
             "it accepts, its default and what it means. Presets: `configs/kufel2023.yaml` (the paper's recipe) and "
             "`configs/cpu-sample.yaml`. Generated from `cxrlearn/training/config.py` "
             "(`python -m cxrlearn.training.config > docs/config.md`); a test keeps the two in step.", ""]
    for section in DEFAULTS:
        lines += [f"## {section}", "", "| key | accepts | default | meaning |", "| --- | --- | --- | --- |"]
        for key, default in defaults.items():
            if key.split(".")[0] == section:
                shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
                shown = shown.removesuffix("\n...").strip()
                lines.append(f"| `{key}` | {rules[key][1]} | `{shown}` | {HELP[key]} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(reference(), end="")
