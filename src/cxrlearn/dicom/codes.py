"""How findings are coded in the DICOM results: cxrlearn's local scheme by default, or a site's own mapping.

By default a finding is coded in :data:`SCHEME` (PS3.16's "99" prefix for private schemes) under its cxrlearn name
(``Pleural_Thickening``; a Long Code Value beyond 16 characters, PS3.3 8.8). A site whose PACS or routing rules
expect SNOMED CT or RadLex supplies a mapping (``--codes FILE``), a CSV with the columns ``finding`` (the bundle's
name), ``scheme``, ``value`` and ``meaning``::

    finding,scheme,value,meaning
    Effusion,SCT,60046008,Pleural effusion
    Pneumothorax,SCT,36118008,Pneumothorax

Findings it leaves out keep the local code. The file is checked whole before anything is predicted (a node refuses
to start): a finding the model does not have, a scheme it does not know, a code value that cannot be one of that
scheme's (a SNOMED CT identifier whose Verhoeff check digit or partition is wrong, a RadLex ID that is not
``RID`` and digits), an empty meaning, or two findings given one code are refused, naming the file, the line and
the field. Whether a well-formed code means what the site says is the site's to check: no terminology server is
asked.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from pydicom.sr.coding import Code

from cxrlearn.errors import ConfigError

#: The local coding scheme of findings and of cxrlearn's own concepts.
SCHEME = "99CXRLEARN"
#: The columns of a mapping file.
COLUMNS = ("finding", "scheme", "value", "meaning")
#: The longest Code Meaning (LO).
MAX_MEANING = 64

# Verhoeff's dihedral-group tables, as SNOMED CT's check digit uses them.
_D = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
      [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
      [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
      [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
_P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
      [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
      [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]


def verhoeff_valid(digits: str) -> bool:
    """True when ``digits`` ends in its Verhoeff check digit (SNOMED CT identifiers do)."""
    check = 0
    for position, digit in enumerate(reversed(digits)):
        check = _D[check][_P[position % 8][int(digit)]]
    return check == 0


def snomed_concept_problem(value: str) -> str | None:
    """Why ``value`` cannot be a SNOMED CT concept identifier, or None: 6-18 digits, no leading zero, a concept's
    partition (the two digits before the check digit: 00 or 10) and a valid Verhoeff check digit."""
    if not re.fullmatch(r"[1-9][0-9]{5,17}", value):
        return "a SNOMED CT identifier is 6 to 18 digits"
    if value[-3:-1] not in ("00", "10"):
        return f"partition {value[-3:-1]} is not a concept's (00 or 10): a description or relationship identifier?"
    if not verhoeff_valid(value):
        return "its check digit is wrong (Verhoeff): a typing error?"
    return None


#: The schemes a mapping may name, with what their code values look like (None: well formed by this check).
_SCHEMES = {
    "SCT": snomed_concept_problem,
    "RADLEX": lambda v: None if re.fullmatch(r"RID[0-9]+", v) else "a RadLex ID is RID and digits",
    "DCM": lambda v: None if re.fullmatch(r"[0-9A-Za-z_.-]{1,16}", v) else "a DCM code is up to 16 letters or digits",
    "LN": lambda v: None if re.fullmatch(r"[0-9]{1,7}-[0-9]", v) else "a LOINC code is digits, a dash, a check digit",
}


def _value_problem(scheme: str, value: str) -> str | None:
    if scheme.startswith("99"):  # a private scheme: any value DICOM can hold
        return None if 0 < len(value) <= 64 else "a code value is 1 to 64 characters"
    return _SCHEMES[scheme](value)


def local_code(finding: str) -> Code:
    """A finding in :data:`SCHEME`, its name as the code value."""
    return Code(finding, SCHEME, finding[:MAX_MEANING])


@dataclass(frozen=True)
class FindingCodes:
    """Each finding's code in the results: the site's mapping where it names one, else :func:`local_code`."""

    mapped: Mapping[str, Code] = field(default_factory=dict)

    def code(self, finding: str) -> Code:
        return self.mapped.get(finding) or local_code(finding)

    def finding(self, code_value: str, scheme: str) -> str | None:
        """The finding a code stands for (the inverse of :meth:`code` for mapped findings), or None."""
        for name, code in self.mapped.items():
            if (code.value, code.scheme_designator) == (code_value, scheme):
                return name
        return code_value if scheme == SCHEME else None

    @classmethod
    def read(cls, path: Path, findings: Sequence[str]) -> FindingCodes:
        """A site's mapping file (module description), checked against the model's ``findings``; ConfigError
        naming the file, the line and the field for anything it cannot use."""
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
                header = list(rows[0]) if rows else []
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise ConfigError(f"--codes {path}: cannot be read ({err})") from None
        missing = [c for c in COLUMNS if c not in header]
        if missing or not rows:
            raise ConfigError(f"--codes {path}: expected a CSV with the columns {', '.join(COLUMNS)} and a row per "
                              f"mapped finding" + (f" (missing: {', '.join(missing)})" if missing and rows else ""))
        mapped: dict[str, Code] = {}
        for line, row in enumerate(rows, start=2):
            finding, code = _checked_row(path, line, row, findings)
            if finding in mapped:
                raise ConfigError(f"--codes {path}, line {line}: {finding} is mapped twice")
            if code in mapped.values():
                other = next(name for name, c in mapped.items() if c == code)
                raise ConfigError(f"--codes {path}, line {line}: {finding} is given {other}'s code "
                                  f"({code.scheme_designator} {code.value}): a reader could not tell them apart")
            mapped[finding] = code
        return cls(mapped)


def _checked_row(path: Path, line: int, row: Mapping[str, str | None], findings: Sequence[str]
                 ) -> tuple[str, Code]:
    finding, scheme, value, meaning = ((row.get(column) or "").strip() for column in COLUMNS)
    where = f"--codes {path}, line {line}"
    if finding not in findings:
        raise ConfigError(f"{where}: finding {finding!r} is not one of the model's ({', '.join(findings)})")
    scheme = scheme.upper()
    if scheme not in _SCHEMES and not re.fullmatch(r"99[0-9A-Z_]{1,14}", scheme):
        raise ConfigError(f"{where}: scheme {scheme!r} is not known (SCT, RADLEX, DCM, LN, or a private scheme "
                          f"beginning 99)")
    problem = _value_problem(scheme, value)
    if problem:
        raise ConfigError(f"{where}: value {value!r} is not a {scheme} code: {problem}")
    if not meaning or len(meaning) > MAX_MEANING:
        raise ConfigError(f"{where}: meaning must be 1 to {MAX_MEANING} characters (what a reader sees)")
    return finding, Code(value, scheme, meaning)
