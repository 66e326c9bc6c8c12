"""Reading NIH's label table in each of its formats, and refusing bad tables."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pandas as pd
import pytest

from cxrlearn.data.columns import label_matrix
from cxrlearn.data.sources.nih import read_image_list, read_label_table
from cxrlearn.errors import DataError
from cxrlearn.findings import FINDINGS, NO_FINDING

HEADER_2020 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


@pytest.fixture(scope="module")
def raw_lines(table_path) -> list[str]:
    return gzip.decompress(table_path.read_bytes()).decode().splitlines()


def write_table(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_full_2020_table(nih_table, raw_lines):
    assert raw_lines[0] == HEADER_2020
    assert len(nih_table) == 112_120
    assert nih_table["patient_id"].nunique() == 30_805
    assert list(nih_table.columns[-14:]) == list(FINDINGS)
    # Positives counted independently, straight from the text of each row.
    label_text = [line.split(",")[1] for line in raw_lines[1:]]
    for name in FINDINGS:
        expected = sum(name in labels.split("|") for labels in label_text)
        assert nih_table[name].sum() == expected, name
    assert nih_table["Hernia"].sum() == 227
    no_finding = label_matrix(nih_table).sum(axis=1) == 0
    assert no_finding.sum() == sum(labels == NO_FINDING for labels in label_text) == 60_361


def test_row_values(nih_table):
    row = nih_table.set_index("image").loc["00000001_001.png"]
    assert row["patient_id"] == 1 and row["follow_up"] == 1 and row["age"] == 58
    assert row["sex"] == "M" and row["view"] == "PA"
    assert (row["width"], row["height"]) == (2894, 2729)
    assert row["pixel_spacing_x"] == pytest.approx(0.143)
    vector = row[list(FINDINGS)].to_numpy(dtype=int)
    assert [FINDINGS[i] for i in np.flatnonzero(vector)] == ["Cardiomegaly", "Emphysema"]


def test_2017_format_plain_and_gzipped(tmp_path, raw_lines, nih_table):
    # NIH's original file: the same header plus a trailing empty column on every line.
    lines_2017 = [raw_lines[0] + ","] + [line + "," for line in raw_lines[1:]]
    plain = write_table(tmp_path / "Data_Entry_2017.csv", lines_2017)
    zipped = tmp_path / "Data_Entry_2017.csv.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, zipped):
        table = read_label_table(path)
        pd.testing.assert_frame_equal(table, nih_table)


def test_derived_table_with_age_units(tmp_path, raw_lines):
    # The 5% sample's sample_labels.csv: ages as 060Y, size columns renamed.
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y"
    )
    rows = []
    for line in raw_lines[1:201]:
        cells = line.split(",")
        cells[4] = f"{int(cells[4]):03d}Y"
        rows.append(",".join(cells))
    rows.append("99999999_000.png,No Finding,0,99999999,011M,F,AP,1024,1024,0.1,0.1")
    table = read_label_table(write_table(tmp_path / "sample_labels.csv", [header] + rows))
    expected_ages = [int(line.split(",")[4]) for line in raw_lines[1:201]]
    assert table["age"].tolist()[:200] == expected_ages
    assert table["age"].iloc[-1] == 0  # 11 months
    assert table["width"].iloc[0] == int(raw_lines[1].split(",")[7])


@pytest.mark.parametrize(
    "header_edit, message",
    [
        (lambda h: h.replace("Patient ID,", ""), r"missing column\(s\) 'Patient ID'"),
        (lambda h: h.replace("Finding Labels", "Findings Label"), r"'Finding Labels' \(found 'Findings Label': renamed\?\)"),
    ],
)
def test_missing_or_renamed_column(tmp_path, raw_lines, header_edit, message):
    lines = [header_edit(raw_lines[0])] + raw_lines[1:20]
    if "Patient ID" not in lines[0]:
        lines = [lines[0]] + [",".join(l.split(",")[:3] + l.split(",")[4:]) for l in lines[1:]]
    path = write_table(tmp_path / "t.csv", lines)
    with pytest.raises(DataError, match=message) as err:
        read_label_table(path)
    assert str(path) in str(err.value)


def test_unknown_finding_names_the_line(tmp_path, raw_lines):
    lines = raw_lines[:20]
    lines[7] = lines[7].replace(lines[7].split(",")[1], "Cardiomegaly|Pneumothoras")
    path = write_table(tmp_path / "t.csv", lines)
    with pytest.raises(DataError, match=r"unknown finding 'Pneumothoras'.*did you mean 'Pneumothorax'\?: line 8") as err:
        read_label_table(path)
    assert str(path) in str(err.value)


def test_no_finding_with_a_finding_is_refused(tmp_path, raw_lines):
    lines = raw_lines[:20]
    lines[4] = lines[4].replace(lines[4].split(",")[1], "No Finding|Mass")
    with pytest.raises(DataError, match=r"'No Finding' is given together with findings: line 5"):
        read_label_table(write_table(tmp_path / "t.csv", lines))


def test_duplicated_image_rows(tmp_path, raw_lines):
    lines = raw_lines[:20] + [raw_lines[3]]
    with pytest.raises(DataError, match=r"listed more than once: line 4 \('00000001_002.png'\), line 21"):
        read_label_table(write_table(tmp_path / "t.csv", lines))


@pytest.mark.parametrize(
    "column, value, message",
    [(3, "P17", "Patient ID is not a whole number"), (4, "sixty", "Patient Age is not a number"),
     (5, "X", "Patient Gender is not M or F"), (1, "", "Finding Labels is empty")],
)
def test_bad_values_name_the_line(tmp_path, raw_lines, column, value, message):
    lines = raw_lines[:20]
    cells = lines[10].split(",")
    cells[column] = value
    lines[10] = ",".join(cells)
    with pytest.raises(DataError, match=re.escape(message) + r".*line 11"):
        read_label_table(write_table(tmp_path / "t.csv", lines))


def test_damaged_files(tmp_path, table_path):
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(table_path.read_bytes()[:50_000])
    with pytest.raises(DataError, match=r"cut\.csv\.gz: damaged or truncated gzip"):
        read_label_table(truncated)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        read_label_table(empty)
    binary = tmp_path / "image.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"image\.csv"):
        read_label_table(binary)
    with pytest.raises(DataError, match=r"nothere\.csv: no such file"):
        read_label_table(tmp_path / "nothere.csv")


def test_official_lists(nih_table, train_val_list_path, test_list_path):
    train_val = read_image_list(train_val_list_path)
    test = read_image_list(test_list_path)
    assert (len(train_val), len(test)) == (86_524, 25_596)
    assert set(train_val).isdisjoint(test)
    assert set(train_val) | set(test) == set(nih_table["image"])
    patients = nih_table.set_index("image")["patient_id"]
    assert set(patients[train_val]).isdisjoint(set(patients[test]))
    assert patients[test].nunique() == 2_797


def test_image_list_with_a_repeat(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a.png\nb.png\n\na.png\n")
    with pytest.raises(DataError, match=r"list\.txt: image 'a\.png' is listed more than once"):
        read_image_list(path)
