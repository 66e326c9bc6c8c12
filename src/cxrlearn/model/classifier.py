"""The classifier: a timm backbone, then Kufel et al. 2023's head.

GlobalAveragePooling → Dense(units, activation) → BatchNormalization → Dropout →
Dense(findings: 14 for NIH's table, the table's own otherwise). The model returns logits; sigmoid is applied at inference
(:meth:`ChestXrayClassifier.predict_proba`), so training can use the numerically
stable ``BCEWithLogits``.

Default head width 512, ReLU: the paper gives neither. 512 is a bottleneck below
every supported backbone's feature width (1,280 for B0-B1 and Lite0-Lite2, up to
2,560 for B7), which adds few parameters (0.66 M on B1's 6.5 M) and, with
the BatchNorm after it, trains stably at the paper's learning rate.
"""

from __future__ import annotations

import timm
import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from cxrlearn.errors import ConfigError
from cxrlearn.findings import FINDINGS
from cxrlearn.settings import Choice, Real, Whole

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "linear": nn.Identity}
#: The widest head a config or a bundle may ask for.
MAX_HEAD_UNITS = 65536


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class HeadConfig:
    """The head's settings, declared once: a run's config (``model.head``) and a bundle's metadata both read them
    through this declaration. A wrong value is a ``ValueError`` naming the field."""

    units: Whole = Field(512, ge=1, le=MAX_HEAD_UNITS, description="width of the head's Dense layer")
    activation: Choice(*ACTIVATIONS) = Field("relu", description="the Dense layer's activation")
    dropout: Real = Field(0.0, ge=0, lt=1, description="dropout before the last layer")


class ChestXrayClassifier(nn.Module):
    """A timm backbone (no classifier, average pooling) and the paper's head.

    Follows timm's contract: ``forward_features`` (feature maps),
    ``forward_head`` (pooled features -> logits) and ``forward``.
    """

    def __init__(
        self,
        backbone: str,
        head: HeadConfig = HeadConfig(),
        num_findings: int = len(FINDINGS),
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()

        if not timm.is_model(backbone):
            raise ConfigError(f"unknown backbone {backbone!r}: not a timm model name")
        self.backbone_name = backbone
        self.head_config = head
        self.in_chans = in_chans
        self.num_findings = num_findings
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=0, global_pool="avg", in_chans=in_chans,
            drop_path_rate=drop_path_rate,
        )
        width = self.backbone.num_features
        self.head = nn.Sequential(
            nn.Linear(width, head.units),
            ACTIVATIONS[head.activation](),
            nn.BatchNorm1d(head.units),
            nn.Dropout(head.dropout),
            nn.Linear(head.units, num_findings),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_head(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

