"""Multi-label losses on logits: BCE (the paper's), focal and asymmetric.

An unknown label (NaN: a finding the image was not labelled for) takes no part: its term is dropped and
the mean is over the known labels of the batch, so it moves neither the loss nor any gradient.

Focal loss is torchvision's ``sigmoid_focal_loss`` (Lin et al. 2017). Asymmetric
loss (Ridnik et al., ICCV 2021) is written here: no well-kept package ships it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from cxrlearn.errors import ConfigError

LOSSES = ("bce", "focal", "asymmetric")


class AsymmetricLoss(nn.Module):
    """ASL: down-weights easy negatives (gamma_neg) and discards very easy ones (clip)."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-label terms (no reduction)."""
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # probability shifting
        loss_pos = targets * torch.log(p.clamp(min=self.eps)) * (1 - p) ** self.gamma_pos
        loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg**self.gamma_neg
        return -(loss_pos + loss_neg)


class MultiLabelLoss(nn.Module):
    def __init__(self, name: str = "bce", pos_weight: torch.Tensor | None = None, focal_gamma: float = 2.0,
                 focal_alpha: float = 0.25, asl_gamma_neg: float = 4.0, asl_gamma_pos: float = 0.0, asl_clip: float = 0.05):
        super().__init__()
        if name not in LOSSES:
            raise ConfigError(f"loss {name!r} is not one of {', '.join(LOSSES)}")
        if pos_weight is not None and name != "bce":
            raise ConfigError("pos_weight applies to the bce loss only")
        self.name = name
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None, persistent=False)
        self.focal = (focal_gamma, focal_alpha)
        self.asl = AsymmetricLoss(asl_gamma_neg, asl_gamma_pos, asl_clip)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean over the known labels (``targets`` NaN where unknown)."""
        logits = logits.float()
        known = ~torch.isnan(targets)
        targets = torch.where(known, targets, torch.zeros_like(targets))
        if self.name == "bce":
            terms = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
        elif self.name == "focal":
            gamma, alpha = self.focal
            terms = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
        else:
            terms = self.asl(logits, targets)
        # where(), not a product: an unknown label's term is never part of the graph (0 * inf would be NaN).
        return torch.where(known, terms, torch.zeros_like(terms)).sum() / known.sum().clamp(min=1)


def positive_weights(labels: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """BCE pos_weight = negatives / positives per finding among the known training labels, capped."""
    known = ~torch.isnan(labels)
    positives = torch.where(known, labels, torch.zeros_like(labels)).sum(dim=0)
    negatives = known.sum(dim=0) - positives
    return (negatives / positives.clamp(min=1)).clamp(max=cap)
