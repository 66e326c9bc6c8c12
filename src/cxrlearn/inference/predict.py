"""Running a classifier over a loader of cached images."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrlearn.data.augment import BatchTransform
from cxrlearn.model.classifier import ChestXrayClassifier


@torch.no_grad()
def predict_loader(
    model: ChestXrayClassifier, loader: DataLoader, transform: BatchTransform, tta: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities (N, 14), labels (N, 14) and names for every batch of ``loader``.

    ``tta`` averages the logits of each image and its horizontal mirror.
    """
    model = model.to(device).eval()
    transform = transform.to(device)
    probabilities, labels, names = [], [], []
    for images, y, batch_names in loader:
        x = transform(images.to(device))
        logits = model(x)
        if tta:
            logits = 0.5 * (logits + model(x.flip(-1)))
        probabilities.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(y.numpy())
        names.extend(batch_names)
    return np.concatenate(probabilities), np.concatenate(labels), names
