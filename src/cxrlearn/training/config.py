"""Training configuration: YAML presets over defaults, overridable from the command line.

A config has five sections (data, model, optim, loss, train). Unknown keys are
errors, so a typo in a preset never silently falls back to a default. The
defaults are Kufel et al. 2023's recipe where the paper gives it; the rest is
documented in ``configs/kufel2023.yaml``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import torch
import yaml
from lightning.pytorch.strategies import StrategyRegistry
from pydantic import AfterValidator, BeforeValidator, Field

from cxrlearn._files import read_bytes
from cxrlearn.configs import preset, presets
from cxrlearn.data.columns import UNCERTAIN_POLICIES
from cxrlearn.data.preprocessing import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from cxrlearn.data.sources.datasets import READERS as DATASETS
from cxrlearn.defaults import IMAGE_SIZE, RATIOS, SEED, usable_cores, whole_number
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import HeadConfig
from cxrlearn.settings import Choice, Flag, Real, Settings, Text, Whole, accepts, check, fields_of
from cxrlearn.training.losses import LOSSES

#: Lightning's strategies by name (its registry), and auto.
STRATEGIES: tuple[str, ...] = ("auto", *sorted(StrategyRegistry.available_strategies()))


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


class Columns(Settings):
    """The generic table's columns (a dataset's own reader knows its own)."""

    image: Text = Field("image", description="the generic table's image column (`--column image=NAME`)")
    patient: Text = Field("patient", description="the generic table's patient column (`--column patient=NAME`)")
    view: Text | None = Field(None, description="the generic table's view-position column, if any")
    sex: Text | None = Field(None, description="the generic table's sex column, if any")
    age: Text | None = Field(None, description="the generic table's age column (years), if any")


def _distinct(values: list[str] | None) -> list[str] | None:
    if values is not None and (not values or len(set(values)) != len(values)):
        raise ValueError("not a list of distinct names")
    return values


def _shares(values: list[float]) -> list[float]:
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0 or abs(sum(values) - 1) >= 1e-6:
        raise ValueError("not three shares that sum to 1")
    return values


Size = Annotated[Whole, Field(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)]
Seed = Annotated[Whole, Field(ge=0, le=2**32 - 1)]


class DataConfig(Settings):
    images: Text | None = Field(None, description="the image folder: flat, or `images_NNN/images/` as NIH's archives "
                                "unpack (`--images`)", json_schema_extra={"flag": "--images"})
    csv: Text | None = Field(None, description="NIH's label table; null: the copy shipped with cxrlearn (`--csv`)",
                             json_schema_extra={"flag": "--csv"})
    table: Text | None = Field(None, description="another label table: the generic format, or a public dataset's own "
                               "files with `data.dataset` (`--table`)")
    dataset: Choice(*DATASETS) | None = Field(None, description="read `data.table` with this dataset's reader "
                                              "(`--dataset`)")
    columns: Columns = Columns()
    findings: Annotated[list[Text] | None, AfterValidator(_distinct)] = Field(
        None, description="the table's finding columns to learn, by their names or harmonised names (`--findings`); "
        "null: every column without a role", json_schema_extra={"accepts": "null or a list of distinct finding names"})
    uncertain: Choice(*UNCERTAIN_POLICIES) = Field("ignore", description="what an uncertain (-1) label becomes: "
                                                   "ignore (unknown), positive or negative (`--uncertain`)")
    split: Text | None = Field(None, description="a split file (image, patient_id, split); null: the custom split of "
                               "the images present, saved in the run folder (`--split`)",
                               json_schema_extra={"flag": "--split"})
    ratios: Annotated[list[Annotated[Real, Field(ge=0)]], AfterValidator(_shares)] = Field(
        list(RATIOS), description="train, val and test shares of the custom split",
        json_schema_extra={"accepts": "three numbers >= 0 that sum to 1 (train, val, test)"})
    split_seed: Seed = Field(SEED, description="the custom split's seed (Kufel et al. 2023: 2137)")
    cache: Text | None = Field(None, description="the preprocessing cache folder, e.g. one `cxrlearn prepare` made "
                               "(`--cache`); null: `RUN/../cache/<table>-<size>`, shared by the runs beside it",
                               json_schema_extra={"flag": "--cache"})
    cache_size: Size | None = Field(None, description="side of the cached images in pixels; null: `data.image_size`")
    image_size: Size = Field(IMAGE_SIZE, description="side of the network's square input in pixels (`--image-size`)",
                             json_schema_extra={"flag": "--image-size"})
    channels: Choice(1, 3) = Field(3, description="input channels: 3 (the gray image repeated, for ImageNet weights) "
                                   "or 1")
    batch_size: Whole = Field(32, ge=1, le=65536, description="images per training step and per process "
                              "(`--batch-size`)", json_schema_extra={"flag": "--batch-size"})
    num_workers: Annotated[Whole, Field(ge=0, le=256)] | Choice("auto") = Field(
        4, description="loader processes; auto: one per CPU core, at most 16")
    prepare_workers: Annotated[Whole, Field(ge=1, le=1024)] | None = Field(
        None, description="processes decoding images into the cache; null: one per CPU core")


class ModelConfig(Settings):
    backbone: Text = Field("efficientnet_b1", description="a timm model name (`--backbone`); Kufel et al. 2023: "
                           "efficientnet_b1", json_schema_extra={"flag": "--backbone"})
    weights: Text | None = Field(None, description="a local file of ImageNet weights for the backbone")
    hub: Flag = Field(True, description="try timm's pretrained weights online (3 s probe) before the offline ones")
    head: HeadConfig = HeadConfig()
    drop_path_rate: Real = Field(0.0, ge=0, lt=1, description="stochastic depth in the backbone")
    freeze_bn: Flag = Field(False, description="keep the backbone's BatchNorm statistics as pretrained")
    trainable_blocks: Annotated[Whole, Field(ge=0)] | None = Field(
        None, description="fine-tune only the last N stages of the backbone; null: all of it")
    init_from: Text | None = Field(None, description="a cxrlearn run folder to start from: its backbone and head, "
                                   "shared findings keeping their head rows (`--init-from`)",
                                   json_schema_extra={"flag": "--init-from"})


class OptimConfig(Settings):
    name: Choice("adam", "adamw") = Field("adam", description="the optimiser: adam (the paper) or adamw")
    lr: Real = Field(1.0e-4, gt=0, le=10, description="learning rate of the head (and of the backbone, times "
                     "`optim.backbone_lr_scale`)")
    weight_decay: Real = Field(0.0, ge=0, description="weight decay")
    backbone_lr_scale: Real = Field(1.0, ge=0, description="the backbone's learning rate as a share of `optim.lr`")
    scheduler: Choice("plateau", "cosine", "none") = Field(
        "plateau", description="plateau (ReduceLROnPlateau on validation mean AUC, the paper), cosine (with warm-up) "
        "or none")
    plateau_factor: Real = Field(0.1, gt=0, lt=1, description="ReduceLROnPlateau's factor")
    plateau_patience: Whole = Field(1, ge=0, description="ReduceLROnPlateau's patience, in epochs")
    warmup_epochs: Real = Field(0.0, ge=0, description="linear warm-up of the cosine schedule, in epochs")
    layer_decay: Annotated[Real, Field(gt=0, le=1)] | None = Field(
        None, description="layer-wise learning-rate decay: the backbone's top at its learning rate, each stage "
        "below at this share of the one above, the stem lowest (timm EfficientNets); null: one rate")
    head_only_epochs: Whole = Field(0, ge=0, description="epochs that train the head alone on a frozen backbone "
                                    "before fine-tuning")
    unfreeze_warmup: Flag = Field(True, description="ramp the backbone's learning rate up over the epoch that "
                                  "unfreezes it")


class LossConfig(Settings):
    name: Choice(*LOSSES) = Field("bce", description="bce (the paper), focal or asymmetric")
    pos_weight: Flag = Field(False, description="weigh each finding's positives by its negatives-to-positives ratio")
    focal_gamma: Real = Field(2.0, ge=0, description="focal loss's gamma")
    focal_alpha: Real = Field(0.25, ge=0, le=1, description="focal loss's alpha")
    asl_gamma_neg: Real = Field(4.0, ge=0, description="asymmetric loss's gamma for negatives")
    asl_gamma_pos: Real = Field(0.0, ge=0, description="asymmetric loss's gamma for positives")
    asl_clip: Real = Field(0.05, ge=0, lt=1, description="asymmetric loss's probability margin for negatives")


def _devices(value):
    """``--devices 2`` arrives as text."""
    return whole_number(value) if isinstance(value, str) and whole_number(value) is not None else value


class TrainOptions(Settings):
    epochs: Whole = Field(20, ge=1, le=100_000, description="the most epochs (`--epochs`)",
                          json_schema_extra={"flag": "--epochs"})
    early_stopping_patience: Whole = Field(4, ge=0, description="stop after this many epochs without a better "
                                           "validation mean AUC; 0: never")
    seed: Seed = Field(SEED, description="the training seed: weights of the new layers, augmentation, batch order")
    seeds: Whole = Field(1, ge=1, le=100, description="train this many runs differing only in the training seed (seed, "
                         "seed + 1, …; the same split) into RUN/seed-K/, with their mean and spread in RUN/seeds.json "
                         "(`--seeds`)", json_schema_extra={"flag": "--seeds"})
    ema_decay: Annotated[Real, Field(gt=0, lt=1)] | None = Field(
        None, description="keep an exponential moving average of the weights (this decay per optimiser step; "
        "0.98 averages over about 50 steps), which validation, checkpoints and the bundle use; null: none")
    precision: Choice("32-true", "32", "bf16-mixed", "16-mixed", "auto") = Field(
        "32-true", description="32-true, bf16-mixed, 16-mixed, or auto: bf16/fp16 mixed on a GPU, fp32 on a CPU "
        "(`--precision`)", json_schema_extra={"flag": "--precision"})
    cudnn_benchmark: Flag = Field(False, description="let cuDNN time its convolution algorithms at the start")
    channels_last: Flag = Field(True, description="NHWC memory layout: faster convolutions on GPUs and oneDNN CPUs")
    accumulate_grad_batches: Whole = Field(1, ge=1, description="batches whose gradients add up to one optimiser "
                                           "step")
    accelerator: Choice("auto", "cpu", "gpu", "cuda", "mps") = Field(
        "auto", description="auto, cpu, gpu, cuda or mps (`--accelerator`)", json_schema_extra={"flag": "--accelerator"})
    devices: Annotated[Annotated[Whole, Field(ge=1, le=4096)] | Choice("auto"), BeforeValidator(_devices)] = Field(
        1, description="devices per node, or auto (`--devices`)", json_schema_extra={"flag": "--devices"})
    num_nodes: Whole = Field(1, ge=1, description="machines of a multi-node run (`--num-nodes`)",
                             json_schema_extra={"flag": "--num-nodes"})
    strategy: Choice(*STRATEGIES) = Field("auto", description="Lightning's strategy; auto: ddp when devices x nodes > 1")
    tta: Flag = Field(False, description="average each image with its mirror when judging")
    limit_train_batches: Annotated[Whole, Field(ge=1)] | Annotated[Real, Field(gt=0, le=1)] | None = Field(
        None, description="train on this many batches (or this share of them) an epoch; null: all",
        json_schema_extra={"accepts": "null, a whole number of batches >= 1, or a fraction in (0, 1]"})
    deterministic: Flag = Field(False, description="deterministic algorithms only (slower)")


class RunConfig(Settings):
    """A run's whole configuration, typed: each setting declared once above (type, default, range, help), made by
    :func:`load_config` (every value checked, the key named in errors), written to the run folder and the bundle
    with :meth:`to_dict`, documented in docs/config.md by :func:`reference`."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    train: TrainOptions = TrainOptions()

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> RunConfig:
        """From a nested dict (missing keys take their defaults), validated: :class:`ConfigError` naming the key."""
        return check(cls, config, source)

    def to_dict(self) -> dict:
        return self.model_dump(mode="python")


#: Every setting under its dotted key (``data.image_size``, ``model.head.units``, …).
SETTINGS = fields_of(RunConfig)
#: The CLI flags of ``cxrlearn train`` that set a key, from the declarations (``json_schema_extra["flag"]``).
FLAGS = {field.json_schema_extra["flag"]: key for key, field in SETTINGS.items()
         if isinstance(field.json_schema_extra, dict) and "flag" in field.json_schema_extra}


def defaults() -> dict:
    """The defaults as a nested dict (what a YAML preset overrides)."""
    return RunConfig().to_dict()


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None,
                sets: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file, then ``overrides`` (nested), then ``key.path=value`` strings."""
    config = defaults()
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


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"data.image_size": 240, ...}``: every value of a (nested) config under its dotted key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
        return workers
    return min(16, usable_cores())


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def reference() -> str:
    """docs/config.md: every key with what it accepts, its default and its meaning, from the declarations."""
    values = flatten(defaults())
    lines = ["# Configuration reference", "",
             "Every key of a training config (`cxrlearn train --config FILE`, or `--set KEY=VALUE`), with the values "
             "it accepts, its default and what it means. Presets: `configs/kufel2023.yaml` (the paper's recipe) and "
             "`configs/cpu-sample.yaml`. Generated from `cxrlearn/training/config.py` "
             "(`python -m cxrlearn.training.config > docs/config.md`); a test keeps the two in step.", ""]
    for section in RunConfig.model_fields:
        lines += [f"## {section}", "", "| key | accepts | default | meaning |", "| --- | --- | --- | --- |"]
        for key, field in SETTINGS.items():
            if key.split(".")[0] == section:
                default = values[key]
                shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
                shown = shown.removesuffix("\n...").strip()
                lines.append(f"| `{key}` | {accepts(field)} | `{shown}` | {field.description} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(reference(), end="")
