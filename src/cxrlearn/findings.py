"""The 14 findings of NIH ChestX-ray14: the one place their names and order live.

Order is the canonical one used by NIH's papers (Wang et al., CVPR 2017) and by
Kufel et al. 2023; label vectors, model outputs and reports all follow it.
"""

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

#: The label NIH writes for an image with none of the 14 findings. It is not a
#: class of its own: such an image has the all-zero label vector.
NO_FINDING = "No Finding"

#: Other spellings met in NIH's own files, mapped to the canonical names
#: (the radiologists' box list writes "Infiltrate").
FINDING_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}


def canonical_finding(name: str) -> str:
    """Return the canonical spelling of a finding name, or raise ``KeyError``."""
    name = name.strip()
    if name in FINDINGS:
        return name
    if name in FINDING_ALIASES:
        return FINDING_ALIASES[name]
    raise KeyError(name)
