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
        "auc": {
            "Atelectasis": 0.817, "Cardiomegaly": 0.911, "Effusion": 0.879, "Infiltration": 0.716, "Mass": 0.853,
            "Nodule": 0.771, "Pneumonia": 0.769, "Pneumothorax": 0.898, "Consolidation": 0.815, "Edema": 0.908,
            "Emphysema": 0.935, "Fibrosis": 0.824, "Pleural_Thickening": 0.812, "Hernia": 0.890,
        },
        "mean": 0.8428,
    },
    "CheXNet 2017": {
        "model": "DenseNet-121",
        "data": "ChestX-ray14, random patient-wise split",
        "source": "Rajpurkar et al., arXiv:1711.05225 (2017)",
        "auc": {
            "Atelectasis": 0.809, "Cardiomegaly": 0.925, "Effusion": 0.864, "Infiltration": 0.735, "Mass": 0.868,
            "Nodule": 0.780, "Pneumonia": 0.768, "Pneumothorax": 0.889, "Consolidation": 0.790, "Edema": 0.888,
            "Emphysema": 0.937, "Fibrosis": 0.805, "Pleural_Thickening": 0.806, "Hernia": 0.916,
        },
        "mean": 0.841,
    },
    "Wang 2017": {
        "model": "ResNet-50",
        "data": "ChestX-ray14, the dataset authors' own split",
        "source": "Wang et al., CVPR 2017",
        "auc": {
            "Atelectasis": 0.716, "Cardiomegaly": 0.807, "Effusion": 0.784, "Infiltration": 0.609, "Mass": 0.706,
            "Nodule": 0.671, "Pneumonia": 0.633, "Pneumothorax": 0.806, "Consolidation": 0.708, "Edema": 0.835,
            "Emphysema": 0.815, "Fibrosis": 0.769, "Pleural_Thickening": 0.708, "Hernia": 0.767,
        },
        "mean": 0.738,
    },
}


def published_auc(source: str) -> dict[str, float]:
    """``{finding: AUC}`` of one published source, in canonical finding order."""
    values = PUBLISHED[source]["auc"]
    return {name: values[name] for name in FINDINGS}
