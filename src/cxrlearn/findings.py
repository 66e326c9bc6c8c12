"""Finding names: NIH ChestX-ray14's 14 (the default vocabulary) and the harmonised names across datasets.

``FINDINGS``: NIH's 14, in the canonical order of NIH's papers (Wang et al., CVPR 2017) and Kufel et
al. 2023; a model trained on NIH's table predicts them in this order. A model trained on another table
predicts that table's findings (the bundle carries its list).

``HARMONISED``: one vocabulary across the public datasets, so that a model of one can be judged on
another and tables of several can be merged. Each dataset's reader maps its own labels onto these names
where the meanings match, and leaves the rest out (docs/datasets.md: what maps to what, and what not).
"""

from typing import Sequence

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


#: Harmonised finding names (docs/datasets.md). A name here means the same finding in every dataset that
#: has it; near misses are kept apart (NIH's "Infiltration" is not CheXpert's broader "Lung Opacity").
HARMONISED: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum",
    "Fibrosis", "Fracture", "Hernia", "Infiltration", "Lung Lesion", "Lung Opacity", "Mass", "Nodule",
    "Nodule or Mass", "Pleural Effusion", "Pleural Other", "Pleural Thickening", "Pneumonia", "Pneumothorax",
    "Support Devices",
)

#: NIH's names that differ from the harmonised ones (the others are the same word).
NIH_HARMONISED: dict[str, str] = {"Effusion": "Pleural Effusion", "Pleural_Thickening": "Pleural Thickening"}


def harmonised(name: str) -> str | None:
    """The harmonised name of a finding named as NIH or the harmonised vocabulary name it, or None."""
    name = NIH_HARMONISED.get(name, name)
    return name if name in HARMONISED else None


#: Other names hospitals and datasets write for harmonised findings, in the form :func:`finding_key` makes
#: (lower case, single spaces). Case, spaces, underscores and hyphens never matter; these are the words that do.
SYNONYMS: dict[str, str] = {
    "infiltrate": "Infiltration", "infiltrates": "Infiltration", "effusion": "Pleural Effusion",
    "effusions": "Pleural Effusion", "pleural effusions": "Pleural Effusion", "pneumothoraces": "Pneumothorax",
    "lung nodule": "Nodule", "pulmonary nodule": "Nodule", "nodules": "Nodule", "masses": "Mass",
    "lung mass": "Mass", "nodule mass": "Nodule or Mass", "nodule/mass": "Nodule or Mass",
    "pulmonary edema": "Edema", "oedema": "Edema", "pulmonary oedema": "Edema", "consolidations": "Consolidation",
    "pulmonary fibrosis": "Fibrosis", "enlarged heart": "Cardiomegaly", "cardiac enlargement": "Cardiomegaly",
    "fractures": "Fracture", "support device": "Support Devices", "lung opacities": "Lung Opacity",
    "lung lesions": "Lung Lesion", "hiatal hernia": "Hernia",
}


def finding_key(name: str) -> str:
    """A finding name with case, underscores, hyphens and repeated spaces taken out: what two spellings of
    one name share (``Pleural_Thickening``, ``pleural thickening``, ``PLEURAL-THICKENING``)."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _known_by_key() -> dict[str, str]:
    known = {finding_key(n): n for n in FINDINGS}
    known |= {finding_key(n): n for n in HARMONISED}  # the harmonised name wins where both share a key
    return known | SYNONYMS


_KNOWN = _known_by_key()


def canonical_column(name: str) -> str:
    """The name a table's finding column is read under: NIH's and the harmonised names as written; another
    spelling or a common synonym of one of them as that name (``Infiltrate`` -> ``Infiltration``, ``pleural
    effusion`` -> ``Pleural Effusion``); any other name as it is (a finding of the table's own)."""
    name = name.strip()
    if name in FINDINGS or name in HARMONISED:
        return name
    return _KNOWN.get(finding_key(name), name)


def match_findings(wanted: Sequence[str], available: Sequence[str]) -> dict[str, str]:
    """Each name of ``wanted`` that ``available`` also has, by the same name or else the same harmonised name
    (NIH's ``Effusion`` is ``Pleural Effusion``), mapped to the name ``available`` gives it."""
    by_harmonised: dict[str, str] = {}
    for name in available:
        by_harmonised.setdefault(harmonised(name) or name, name)
    matches = {}
    for name in wanted:
        match = name if name in available else by_harmonised.get(harmonised(name) or name)
        if match is not None:
            matches[name] = match
    return matches
