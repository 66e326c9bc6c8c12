"""The paper's augmentation and the backbone's normalisation, applied to whole batches.

Loader workers only gather uint8 rows from the memory-mapped cache; everything
arithmetic happens here, once per batch and on the training device (Lightning
calls it from ``on_after_batch_transfer``). A batch of 256 images costs one
``grid_sample``, which is negligible on a GPU and cheap on a CPU, so workers are
never the bottleneck.

Randomness is drawn per sample in the dataset from (seed, epoch, sample index)
(see :func:`augmentation_parameters`), not from a global generator: a run is
repeatable whatever the number of workers, GPUs or batch size.

Kufel et al. 2023: horizontal flip with p=0.3, rotation within ±5°, brightness
within ±0.2 (a multiplicative factor in [0.8, 1.2], as Keras' ``brightness_range``
and torchvision's ``adjust_brightness``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation; the defaults are Kufel et al. 2023's."""

    flip_p: float = 0.3
    rotation_deg: float = 5.0
    brightness: float = 0.2

    def parameters(self, seed: int, epoch: int, index: int) -> np.ndarray:
        """(flip 0/1, angle in degrees, brightness factor) for one sample, repeatable."""
        rng = np.random.default_rng((seed, epoch, index))
        draws = rng.random(3)
        return np.array(
            [
                float(draws[0] < self.flip_p),
                (2.0 * draws[1] - 1.0) * self.rotation_deg,
                1.0 + (2.0 * draws[2] - 1.0) * self.brightness,
            ],
            dtype=np.float32,
        )


#: Parameters that change nothing: no flip, no rotation, brightness factor 1.
IDENTITY = np.array([0.0, 0.0, 1.0], dtype=np.float32)


class BatchTransform(torch.nn.Module):
    """uint8 (B, 1, S, S) images + per-sample parameters -> normalised float (B, C, H, H).

    ``mean``/``std`` come from the backbone's pretrained configuration (timm); for
    one input channel their averages are used, matching a first convolution whose
    RGB weights were summed (timm's ``in_chans=1``).
    """

    def __init__(self, mean, std, channels: int = 3, output_size: int | None = None):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if channels == 1:
            mean, std = mean.mean().reshape(1), std.mean().reshape(1)
        self.channels = channels
        self.output_size = output_size
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected a uint8 batch of shape (B, 1, S, S), got {tuple(images.shape)} {images.dtype}")
        x = images.float().div_(255.0)
        size = self.output_size or x.shape[-1]
        moves = params is not None and bool((params[:, 0] != 0).any() or (params[:, 1] != 0).any())
        if moves:
            angle = params[:, 1].to(x) * (math.pi / 180.0)
            flip = 1.0 - 2.0 * params[:, 0].to(x)  # -1 mirrors the x axis
            cos, sin = torch.cos(angle), torch.sin(angle)
            # Output -> input sampling grid: rotation, then the mirror.
            theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
            theta[:, 0, 0] = cos * flip
            theta[:, 0, 1] = -sin
            theta[:, 1, 0] = sin * flip
            theta[:, 1, 1] = cos
            grid = F.affine_grid(theta, [x.shape[0], 1, size, size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if params is not None:
            x = (x * params[:, 2].to(x).reshape(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        # Broadcasting (B, 1, H, W) against (1, C, 1, 1) repeats the gray channel C times.
        return ((x - self.mean) / self.std).contiguous()
