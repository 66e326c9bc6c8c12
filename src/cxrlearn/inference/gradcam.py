"""Grad-CAM heatmaps (Selvaraju et al., ICCV 2017) on the backbone's last feature map, and overlays.

For finding k, the gradient of its logit with respect to the last feature map
A (C, h, w), averaged over space, weighs A's channels; the ReLU of the
weighted sum, upsampled to the image and scaled to [0, 1], is the heatmap.

Written here (30 lines over the model's timm contract, ``forward_features`` /
``forward_head``) rather than taken from pytorch-grad-cam (PyPI ``grad-cam``):
that package requires the GUI build of OpenCV (``opencv-python``), which
installs the same ``cv2`` module as the headless build the data loader uses and
needs X11/OpenGL libraries that servers and CI machines lack. Its Grad-CAM is
the same computation: gradients averaged over space, ReLU, bilinear upsampling,
min-max scaling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def grad_cam(model, x: torch.Tensor, finding: int) -> np.ndarray:
    """Heatmap (H, W) in [0, 1] of finding index ``finding`` for one normalised image ``x`` (1, C, H, W)."""
    model.eval()
    with torch.enable_grad():
        features = model.forward_features(x.detach())
        logit = model.forward_head(features)[0, finding]
        (gradient,) = torch.autograd.grad(logit, features)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    low, high = float(cam.min()), float(cam.max())
    return ((cam - low) / (high - low)).cpu().numpy() if high > low else np.zeros(tuple(cam.shape), dtype=np.float32)


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """An RGB uint8 picture: the X-ray with the heatmap (jet colours) blended over it."""
    import cv2

    if heat.shape != gray.shape:
        heat = cv2.resize(heat.astype(np.float32), (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return np.rint((1 - alpha) * base + alpha * colours.astype(np.float32)).astype(np.uint8)


def heatmaps(predictor, decoded: np.ndarray, findings: list[str]) -> dict[str, np.ndarray]:
    """Grad-CAM of each named finding for one decoded image, at the model's input size (PyTorch runtime)."""
    if predictor.runtime != "torch":
        raise ValueError("Grad-CAM needs gradients: use the torch runtime")
    pixels = predictor.model_pixels(decoded)
    x = predictor.transform(torch.from_numpy(pixels)[None, None].to(predictor.device))
    return {name: grad_cam(predictor.model, x, predictor.findings.index(name)) for name in findings}
