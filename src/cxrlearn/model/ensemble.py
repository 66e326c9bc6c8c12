"""An ensemble as one network: its members' probabilities averaged, behind the classifier's own contract.

``backbone(x)`` gives the members' pooled features side by side, and ``head(features)`` splits them, runs each
member's head, and returns the logit of the mean probability: so everything that runs a bundle (evaluation,
the Predictor, the service, DICOM results, ONNX export as one graph, the input check on the pooled features)
runs an ensemble unchanged. Averaging probabilities rather than logits keeps a member that is sure of itself
from outvoting the others.

The members share one preprocessing (the input the network takes): the bundle has one. Members that were
trained at other sizes or normalisations are refused when the ensemble is made.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cxrlearn.model.classifier import ChestXrayClassifier

#: Mean probabilities are clipped to [EPS, 1 - EPS] before their logit (float32 keeps it finite).
EPS = 1e-7


class _Backbones:
    """The members' backbones as one: pooled features side by side (not a module: the weights are the
    ensemble's members')."""

    def __init__(self, ensemble: EnsembleClassifier):
        self._ensemble = ensemble

    @property
    def num_features(self) -> int:
        return sum(self._ensemble.widths)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([member.backbone(x) for member in self._ensemble.members], dim=1)


class _Heads:
    """The members' heads as one: each on its own features, then the logit of the mean probability."""

    def __init__(self, ensemble: EnsembleClassifier):
        self._ensemble = ensemble

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        parts = torch.split(features, self._ensemble.widths, dim=1)
        probabilities = torch.stack([torch.sigmoid(member.head(part))
                                     for member, part in zip(self._ensemble.members, parts)]).mean(dim=0)
        p = probabilities.clamp(EPS, 1 - EPS)
        return torch.log(p) - torch.log1p(-p)


class EnsembleClassifier(nn.Module):
    """Several :class:`ChestXrayClassifier` of the same findings and input channels, averaged."""

    def __init__(self, members: Sequence[ChestXrayClassifier]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble has at least two members")
        kinds = {(m.num_findings, m.in_chans) for m in members}
        if len(kinds) > 1:
            raise ValueError(f"an ensemble's members must predict the same findings from the same input; got {kinds}")
        self.members = nn.ModuleList(members)
        self.widths = [m.backbone.num_features for m in members]
        self.num_findings, self.in_chans = next(iter(kinds))

    @property
    def backbone(self) -> _Backbones:
        return _Backbones(self)

    @property
    def head(self) -> _Heads:
        return _Heads(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))
