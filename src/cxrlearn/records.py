"""Typed records of results (pydantic v2): attributes in code, the same JSON keys on disk.

A part of ``metrics.json`` (operating points, calibration, subgroups, …) is a :class:`Record` made by the module
that computes it and read by attribute everywhere else. :meth:`Record.to_dict` writes the keys its maker set (so
a part written without an optional key, as the bundle's operating points are without ``val``, keeps that
shape), with floats as they are (NaN and infinity stay numbers, as ``json`` writes them); a ``metrics.json``
read back validates into the same records, and keys a newer cxrlearn added are kept, not refused.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A typed part of a result file."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python", exclude_unset=True, by_alias=True)
