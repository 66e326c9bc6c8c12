"""Running a classifier over a loader of cached images."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.special import expit
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxrlearn.data.pipeline.normalize import BatchTransform
from cxrlearn.model.classifier import ChestXrayClassifier


def mirror(images):
    """Images mirrored left to right (the last axis): a torch tensor or a NumPy array, (…, H, W)."""
    return images.flip(-1) if isinstance(images, torch.Tensor) else np.ascontiguousarray(images[..., ::-1])


def average_with_mirror(logits, mirrored_logits):
    """Test-time augmentation, the one way cxrlearn does it: the mean of the logits of an image and of its
    mirror."""
    return 0.5 * (logits + mirrored_logits)


def flip_averaged(forward, images):
    """:func:`average_with_mirror` of ``forward`` (images -> logits) on the images and their mirrors."""
    return average_with_mirror(forward(images), forward(mirror(images)))


#: A network on uint8 batches (B, 1, S, S): their pooled features (None where the runtime gives none) and logits.
Forward = Callable[[torch.Tensor], tuple[np.ndarray | None, np.ndarray]]


def torch_forward(model: ChestXrayClassifier, transform: BatchTransform,
                  device: str | torch.device = "cpu", channels_last: bool = False) -> Forward:
    """The :data:`Forward` of a classifier in PyTorch on ``device``, normalising with ``transform``; with
    ``channels_last``, the normalised images in that layout (the model's own must be too)."""
    model = model.to(device).eval()
    transform = transform.to(device)

    @torch.no_grad()
    def forward(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = transform(images.to(device))
        features = model.backbone(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        return features.float().cpu().numpy(), model.head(features).float().cpu().numpy()  # model(x), features kept

    return forward


def predict_logits(
    forward: Forward, loader: DataLoader, tta: bool = False, progress: bool = False, flip: bool = False,
    inspect: Callable[[np.ndarray, np.ndarray | None], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Logits (N, findings), labels (N, findings; NaN where unknown) and names for every batch of ``loader``.

    ``forward``: :func:`torch_forward`, or a :class:`cxrlearn.inference.predictor.Predictor`'s runtime.
    ``tta`` averages the logits of each image and its horizontal mirror;
    ``flip`` gives the mirror's alone (to compare the two). ``inspect``, when given, is called with each
    batch's (B, S, S) uint8 images and the backbone's pooled features of them, from the same pass as the logits
    (the input check needs both).
    """

    logits_out, labels, names = [], [], []
    for images, y, batch_names in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        if flip:
            images = mirror(images)
        features, logits = forward(images)
        if inspect is not None:
            inspect(images[:, 0].numpy(), features)
        if tta:
            logits = average_with_mirror(logits, forward(mirror(images))[1])
        logits_out.append(logits)
        labels.append(y.numpy())
        names.extend(batch_names)
    return np.concatenate(logits_out), np.concatenate(labels), names


def predict_loader(
    model: ChestXrayClassifier, loader: DataLoader, transform: BatchTransform, tta: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities (N, findings), labels (N, findings) and names for every batch of ``loader``."""
    logits, labels, names = predict_logits(torch_forward(model, transform, device), loader, tta=tta)
    return sigmoid(logits), labels, names


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function in float64, without overflow warnings for large negative logits."""

    return expit(np.asarray(logits, dtype=np.float64))
