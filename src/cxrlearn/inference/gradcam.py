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
from PIL import Image, ImageDraw, ImageFont


def grad_cam(model, x: torch.Tensor, finding: int) -> np.ndarray:
    """Heatmap (H, W) in [0, 1] of finding index ``finding`` for one normalised image ``x`` (1, C, H, W). An
    ensemble's is the mean of its members' heatmaps (each of its own last feature maps), scaled again to [0, 1]."""
    members = getattr(model, "members", None)
    if members is not None:
        mean = np.mean([grad_cam(member, x, finding) for member in members], axis=0)
        high = float(mean.max())
        return (mean / high).astype(np.float32) if high > 0 else mean.astype(np.float32)
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


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.5, fade_low: bool = True) -> np.ndarray:
    """An RGB uint8 picture: the X-ray with the heatmap (jet colours) blended over it, each pixel's colour in
    proportion to its heat (``fade_low``): where there is none the film shows as it is, not tinted blue."""
    import cv2

    if heat.shape != gray.shape:
        heat = cv2.resize(heat.astype(np.float32), (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    weight = alpha * np.clip(heat, 0.0, 1.0)[..., None].astype(np.float32) if fade_low else alpha
    return np.rint((1 - weight) * base + weight * colours.astype(np.float32)).astype(np.uint8)


#: The mark every picture carries: a research tool's heatmap, not a reading.
NOT_FOR_DIAGNOSIS = "Grad-CAM heatmap - research use, not for diagnosis"


def annotated_overlay(gray: np.ndarray, heat: np.ndarray, finding: str, probability: float,
                      threshold: float | None) -> np.ndarray:
    """The heatmap over the X-ray at the X-ray's own resolution (the heatmap is upsampled; the network's input is
    the whole image resized, so the two line up), above a caption: the finding, its probability and threshold
    and the call they make, a colour scale, and the not-for-diagnosis mark. RGB uint8, as tall as the image plus
    the caption."""
    picture = overlay(gray, heat)
    width = picture.shape[1]
    font_px = max(12, width // 48)
    font = ImageFont.load_default(size=font_px)
    margin, line = font_px // 2, int(font_px * 1.35)
    bar_height = font_px
    caption = Image.new("RGB", (width, margin * 3 + line * 2 + bar_height + line), (0, 0, 0))
    draw = ImageDraw.Draw(caption)
    call = "  (not called: threshold not established)" if threshold is None else (
        f"  (threshold {threshold:.1%}: {'positive' if probability >= threshold else 'negative'})")
    draw.text((margin, margin), f"{finding}: probability {probability:.1%}{call}", fill=(255, 255, 255), font=font)
    draw.text((margin, margin + line), NOT_FOR_DIAGNOSIS, fill=(200, 200, 200), font=font)
    # The colour scale: the overlay's colours from the least to the most heat of this image.
    top = margin * 2 + line * 2
    span = max(1, width - 2 * margin)
    ramp = np.linspace(0.0, 1.0, span, dtype=np.float32)[None, :].repeat(bar_height, axis=0)
    scale = overlay(np.zeros_like(ramp, dtype=np.uint8), ramp, alpha=1.0, fade_low=False)
    caption.paste(Image.fromarray(scale), (margin, top))
    draw.text((margin, top + bar_height + 2), "low", fill=(255, 255, 255), font=font)
    high = "high (Grad-CAM, scaled to this image's maximum)"
    if draw.textlength(high, font=font) > span * 0.7:  # a small image: the short label, not one over "low"
        high = "high"
    draw.text((width - margin - draw.textlength(high, font=font), top + bar_height + 2), high, fill=(255, 255, 255),
              font=font)
    return np.concatenate([picture, np.asarray(caption, dtype=np.uint8)], axis=0)


def heatmaps(predictor, decoded: np.ndarray, findings: list[str]) -> dict[str, np.ndarray]:
    """Grad-CAM of each named finding for one decoded image, at the model's input size (an ONNX predictor's
    heatmaps come from the same bundle run by torch: :meth:`Predictor.with_gradients`)."""
    predictor = predictor.with_gradients()
    pixels = predictor.model_pixels(decoded)
    x = predictor.transform(torch.from_numpy(pixels)[None, None].to(predictor.device))
    return {name: grad_cam(predictor.model, x, predictor.findings.index(name)) for name in findings}
