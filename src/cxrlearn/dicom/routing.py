"""Which radiographs the model is for: routing by what the study is, before any pixel is predicted on.

A chest X-ray model answers frontal chest radiographs. A CR or DX instance of a lateral view, a hand or a knee
reaches the node all the same (a PACS forwards by modality), and its answer would be meaningless. Each instance
is judged from its header (:func:`refusal`), by :class:`Accept` (``--accept``):

- **modality**: ``Modality`` in ``modalities`` (CR, DX by default; the SOP class is already a radiograph's);
- **body part**: ``BodyPartExamined`` in ``body_parts`` (CHEST by default); where it is empty, the study's, series'
  and protocol's descriptions are read for a word of :data:`CHEST_WORDS`; where neither says, the instance is
  **refused** ("body part not stated"): a model for chests does not guess that an image is one;
- **view**: ``ViewPosition`` in ``views`` (PA, AP by default); a lateral one (LL, RL, LAT, LATERAL...) is refused
  even on a CHEST instance; where it is empty, a description that says lateral refuses it and otherwise it is
  **accepted** as frontal (most chest films are, and the input check still judges the pixels).

``--accept any`` answers every radiograph, as before. Secondary captures (``--secondary-captures``) carry none of
these attributes and are not routed. A refused instance goes to ``refused/`` with the reason (its text begins
:data:`NOT_FOR_THIS_MODEL`), gets no result, and is counted by ``dicom status``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from cxrlearn.defaults import ACCEPT_BODY_PARTS, ACCEPT_MODALITIES, ACCEPT_VIEWS
from cxrlearn.errors import ConfigError

#: How every routing refusal begins (``dicom status`` counts them apart).
NOT_FOR_THIS_MODEL = "not for this model"
#: Words in a description that name the chest, where BodyPartExamined is empty.
CHEST_WORDS = ("CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "CXR", "PA CHEST")
#: ViewPosition values and description words of a lateral view.
LATERAL = re.compile(r"\b(LL|RL|LAT|LATERAL|LLD|RLD)\b")
DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription")


@dataclass(frozen=True)
class Accept:
    """What the model answers; an empty field accepts anything for it."""

    modalities: tuple[str, ...] = ACCEPT_MODALITIES
    body_parts: tuple[str, ...] = ACCEPT_BODY_PARTS
    views: tuple[str, ...] = ACCEPT_VIEWS

    @classmethod
    def parse(cls, text: str | None) -> Accept:
        """``--accept``: ``any``, or ``modality=CR|DX,body=CHEST,view=PA|AP`` (fields left out keep their
        defaults; ``field=any`` accepts anything for it). Refused by name otherwise."""
        if text is None:
            return cls()
        if text.strip().lower() == "any":
            return cls((), (), ())
        fields = {"modality": "modalities", "body": "body_parts", "view": "views"}
        values = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in fields or not value.strip():
                raise ConfigError(f"--accept {text!r}: expected any, or modality=CR|DX,body=CHEST,view=PA|AP "
                                  f"(fields {', '.join(fields)})")
            words = tuple(w.strip().upper() for w in value.split("|") if w.strip())
            values[fields[key]] = () if words == ("ANY",) else words
        return cls(**values)

    def text(self) -> str:
        """In words, for the model card and ``dicom status``."""
        def one(values):
            return "|".join(values) if values else "any"
        return f"modality {one(self.modalities)}, body part {one(self.body_parts)}, view {one(self.views)}"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def refusal(ds: Dataset, accept: Accept) -> str | None:
    """Why the model is not for this instance (module docstring), or None."""
    modality = _text(ds, "Modality")
    if accept.modalities and modality and modality not in accept.modalities:
        return f"{NOT_FOR_THIS_MODEL}: modality {modality} (it answers {'|'.join(accept.modalities)})"
    words = " ".join(_text(ds, k) for k in DESCRIPTIONS)
    body = _text(ds, "BodyPartExamined")
    if accept.body_parts:
        if body and body not in accept.body_parts:
            return f"{NOT_FOR_THIS_MODEL}: body part {body} (it answers {'|'.join(accept.body_parts)})"
        if not body and not any(re.search(rf"\b{w}\b", words) for w in (*CHEST_WORDS, *accept.body_parts)):
            return (f"{NOT_FOR_THIS_MODEL}: body part not stated (BodyPartExamined is empty and no description "
                    "names the chest)")
    view = _text(ds, "ViewPosition")
    if accept.views:
        if view and view not in accept.views:
            kind = "lateral view" if LATERAL.fullmatch(view) else "view"
            return f"{NOT_FOR_THIS_MODEL}: {kind} {view} (it answers {'|'.join(accept.views)})"
        if not view and LATERAL.search(words):
            return f"{NOT_FOR_THIS_MODEL}: lateral view (ViewPosition is empty and a description says lateral)"
    return None
