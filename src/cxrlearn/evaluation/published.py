"""Published per-finding AUC-ROC on ChestX-ray14, for context in reports.

Each comes from another split (and often another label version), so none is a
like-for-like target: reports print each source's data and split beside it.
"""

from __future__ import annotations

from cxrlearn.findings import FINDINGS

PUBLISHED: dict[str, dict] = {
    "Kufel 2023": {
        "model": "EfficientNet-B1",
        "data": "ChestX-ray14, custom patient-wise split (seed 2137)",
        "source": "Kufel et al., J Pers Med 13:1426 (2023); per-class values as quoted by public replications",
        "auc": (0.817, 0.911, 0.879, 0.716, 0.853, 0.771, 0.769, 0.898, 0.815, 0.908, 0.935, 0.824, 0.812, 0.890),
        "mean": 0.8428,
    },
    "CheXNet 2017": {
        "model": "DenseNet-121",
        "data": "ChestX-ray14, random patient-wise split",
        "source": "Rajpurkar et al., arXiv:1711.05225 (2017)",
        "auc": (0.809, 0.925, 0.864, 0.735, 0.868, 0.780, 0.768, 0.889, 0.790, 0.888, 0.937, 0.805, 0.806, 0.916),
        "mean": 0.841,
    },
    "Wang 2017": {
        "model": "ResNet-50",
        "data": "ChestX-ray14, the dataset authors' own split",
        "source": "Wang et al., CVPR 2017",
        "auc": (0.716, 0.807, 0.784, 0.609, 0.706, 0.671, 0.633, 0.806, 0.708, 0.835, 0.815, 0.769, 0.708, 0.767),
        "mean": 0.738,
    },
}


def published_auc(source: str) -> dict[str, float]:
    """``{finding: AUC}`` of one published source, in canonical finding order."""
    return dict(zip(FINDINGS, PUBLISHED[source]["auc"]))
