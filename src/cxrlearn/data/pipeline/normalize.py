"""Step 4 of :class:`~cxrlearn.data.preprocessing.Preprocessing` on a batch: uint8 pixels to the network's
normalised float input, on the batch's device (GPU or CPU), for training, evaluation, prediction and ONNX export."""

from __future__ import annotations

import torch

from cxrlearn.data.preprocessing import Preprocessing


class BatchTransform(torch.nn.Module):
    """uint8 (B, 1, H, W) images -> float (B, C, H, W) normalised with the backbone's mean and std.

    For one input channel the averages of mean and std are used, matching a first convolution whose
    RGB weights were summed (timm's ``in_chans=1``). Three channels repeat the gray image, each
    normalised with its own channel's statistics.
    """

    def __init__(self, mean, std, channels: int = 3):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if channels == 1:
            mean, std = mean.mean().reshape(1), std.mean().reshape(1)
        self.channels = channels
        # x / 255 normalised = x * scale + shift: one fused pass over the batch.
        self.register_buffer("scale", (1.0 / (255.0 * std)).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected a uint8 batch of shape (B, 1, H, W), got {tuple(images.shape)} {images.dtype}")
        return torch.addcmul(self.shift, images.float(), self.scale)


def normalizer(preprocessing: Preprocessing) -> BatchTransform:
    """The preprocessing's step 4 as a module (move it to the batch's device)."""
    return BatchTransform(preprocessing.mean, preprocessing.std, channels=preprocessing.channels)
