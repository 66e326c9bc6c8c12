"""The public datasets' own label files, read into the harmonised findings; any table in the generic format;
tables of several datasets merged, split patient-wise and counted. Fixtures: tests/fixtures/datasets, in
each dataset's published header and value formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlearn.data.cohort.split import make_split
from cxrlearn.data.cohort.stats import table_stats
from cxrlearn.data.columns import DATASET, IMAGE, PATIENT_ID, SOURCE_SPLIT, VIEW, finding_columns
from cxrlearn.data.decoding.images import attach_images
from cxrlearn.data.sources.chexpert import read_chexpert
from cxrlearn.data.sources.datasets import merge_tables, read_dataset
from cxrlearn.data.sources.generic import TableColumns, read_table, write_table
from cxrlearn.data.sources.mimic import read_mimic
from cxrlearn.data.sources.padchest import read_padchest
from cxrlearn.data.sources.vindr import read_vindr
from cxrlearn.errors import DataError
from cxrlearn.findings import HARMONISED

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
PADCHEST = FIXTURES / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def test_chexpert_small_layout_with_its_uncertainty_policies():
    table = read_chexpert(FIXTURES / "chexpert")
    assert len(table) == 10 and set(finding_columns(table)) <= set(HARMONISED)
    first = table.iloc[0]
    assert first[IMAGE] == "train/patient00001/study1/view1_frontal.jpg" and first[PATIENT_ID] == "patient00001"
    assert first["Support Devices"] == 1 and first["Pneumothorax"] == 0 and np.isnan(first["Cardiomegaly"])
    assert table[VIEW].tolist()[2:4] == ["AP", "LATERAL"] and table["sex"].tolist()[:1] == ["F"]
    assert list(table[SOURCE_SPLIT]).count("valid") == 2
    # Patient 2, study 2: Cardiomegaly -1.0 (uncertain), under each policy.
    row = 1
    assert np.isnan(table.loc[row, "Cardiomegaly"])
    assert read_chexpert(FIXTURES / "chexpert", uncertain="positive").loc[row, "Cardiomegaly"] == 1
    assert read_chexpert(FIXTURES / "chexpert", uncertain="negative").loc[row, "Cardiomegaly"] == 0
    assert read_chexpert(FIXTURES / "chexpert", uncertain="negative")["Lung Lesion"].isna().sum() == 8  # blank stays
    full = (FIXTURES / "chexpert" / "train.csv").read_text().replace("CheXpert-v1.0-small/", "CheXpert-v1.0/")
    assert read_table_text(full, read_chexpert)[IMAGE].iloc[0] == first[IMAGE]  # the full release's layout


def read_table_text(text: str, reader, name: str = "train.csv"):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(text)
        return reader(path)


def test_mimic_joins_study_labels_to_every_image_of_the_study():
    table = read_mimic(FIXTURES / "mimic")
    assert len(table) == 7
    image = table[IMAGE].iloc[0]
    assert image == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    lateral = table[table[VIEW] == "LATERAL"].iloc[0]
    assert lateral[PATIENT_ID] == "10000032" and lateral[SOURCE_SPLIT] == "train"
    patient = table[table[PATIENT_ID] == "10000935"].set_index(SOURCE_SPLIT, append=True)
    labelled, unlabelled = patient.iloc[0], patient.iloc[1]
    assert labelled["Atelectasis"] == 1 and labelled["Pneumothorax"] == 0 and np.isnan(labelled["Pneumonia"])
    assert np.isnan(unlabelled[finding_columns(table)].astype(float)).all()  # a study the labeller did not label


def test_padchest_terms_map_onto_harmonised_findings():
    table = read_padchest(PADCHEST).set_index(IMAGE)
    normal = table.iloc[0]
    assert (normal[finding_columns(table.reset_index())] == 0).all() and normal["age"] == 2014 - 1930
    effusion = table.iloc[1]
    assert effusion["Pleural Effusion"] == 1 and effusion["Cardiomegaly"] == 1 and effusion["Pneumothorax"] == 0
    assert table.iloc[2][VIEW] == "L"
    supine = table.iloc[3]
    assert supine["Atelectasis"] == 1 and supine["Edema"] == 1 and supine[VIEW] == "AP_HORIZONTAL"
    assert table.iloc[4].isna()["Cardiomegaly"] and table.iloc[5].isna()["Cardiomegaly"]  # no labels; 'exclude'
    many = table.iloc[6]
    assert many[["Fracture", "Nodule", "Hernia", "Fibrosis"]].tolist() == [1, 1, 1, 1] and many["Mass"] == 0


def test_vindr_aggregates_its_readers_by_the_stated_rule():
    majority = read_vindr(FIXTURES / "vindr").set_index(PATIENT_ID)
    first = majority.loc["000434271f63a053c4128a0ba6352c7f"]
    assert first["Cardiomegaly"] == 1 and first["Pleural Effusion"] == 0 and first["readers"] == 3
    assert majority.loc["00053190460d56c53cc3e57321387478", "Nodule or Mass"] == 0
    third = majority.loc["0005e8e3701dfb1dd93d53e2ff537b6e"]
    assert third["Fibrosis"] == 1 and third["Fracture"] == 1  # rib and clavicle fractures are one finding
    test = majority.loc["002a34c58c5b758217ed1f584ccbcfe9"]
    assert test["Pneumothorax"] == 1 and test["readers"] == 1 and test[SOURCE_SPLIT] == "test"
    anyone = read_vindr(FIXTURES / "vindr", rule="any").set_index(PATIENT_ID)
    assert anyone.loc["000434271f63a053c4128a0ba6352c7f", "Pleural Effusion"] == 1
    assert majority.index.is_unique and (majority[IMAGE] == majority.index + ".dicom").all()


def test_a_generic_table_with_its_own_column_names(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file,mrn,sex,age,Effusion,Mass\n"
                    "a.png,p1,Female,61,1,0\n"
                    "b.png,p1,Female,61,,-1\n"
                    "c.png,p2,male,,0,1\n")
    table = read_table(path, TableColumns(image="file", patient="mrn", sex="sex", age="age"))
    assert finding_columns(table) == ["Effusion", "Mass"]
    assert table["sex"].tolist() == ["F", "F", "M"] and np.isnan(table["age"].iloc[2])
    assert np.isnan(table["Effusion"].iloc[1]) and np.isnan(table["Mass"].iloc[1])  # blank; uncertain ignored
    assert read_table(path, TableColumns(image="file", patient="mrn", sex="sex", age="age"),
                      uncertain="positive")["Mass"].iloc[1] == 1
    # The same table as Parquet (numbers as numbers, blanks as nulls) reads the same.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["Effusion"] = pd.to_numeric(frame["Effusion"]).astype("Int64")
    frame.to_parquet(tmp_path / "labels.parquet")
    parquet = read_table(tmp_path / "labels.parquet", TableColumns(image="file", patient="mrn", sex="sex", age="age"))
    pd.testing.assert_frame_equal(parquet, table)
    path.write_text("file,mrn,Effusion\na.png,p1,yes\n")
    with pytest.raises(DataError, match=r"labels.csv: column 'Effusion' line 2: 'yes' is not a label"):
        read_table(path, TableColumns(image="file", patient="mrn"))
    with pytest.raises(DataError, match=r"no column for patient \('patient'\).*data.columns"):
        read_table(path, TableColumns(image="file"))


def test_relative_image_paths_are_found_under_the_image_folder(tmp_path):
    table = read_chexpert(FIXTURES / "chexpert")
    image = tmp_path / table[IMAGE].iloc[0]
    image.parent.mkdir(parents=True)
    image.write_bytes(b"not read here")
    presence = attach_images(table, tmp_path)
    assert presence.n_present == 1 and presence.table["path"].iloc[0] == str(image)


def test_merged_nih_and_chexpert_split_patient_wise_with_right_counts(nih_table, tmp_path):
    nih = nih_table.iloc[:3000]
    chexpert = read_dataset("chexpert", FIXTURES / "chexpert")
    merged = merge_tables({"nih": nih, "chexpert": chexpert})
    findings = finding_columns(merged)
    assert len(merged) == len(nih) + len(chexpert)
    assert "Pleural Effusion" in merged and "Effusion" not in merged  # NIH's name, harmonised
    from_chexpert = merged[merged[DATASET] == "chexpert"]
    assert from_chexpert["Hernia"].isna().all()  # a finding CheXpert lacks is unknown there, not negative
    assert merged.loc[merged[DATASET] == "nih", "Lung Opacity"].isna().all()
    assert not set(merged.loc[merged[DATASET] == "nih", PATIENT_ID]) & set(from_chexpert[PATIENT_ID])
    split = make_split(merged, seed=5)
    assert split.groupby(PATIENT_ID)["split"].nunique().max() == 1  # patient-wise
    for dataset, part in merged.groupby(DATASET):
        share = split.set_index(IMAGE).loc[part[IMAGE], "split"].value_counts(normalize=True)
        if dataset == "nih":  # each dataset split in the ratios on its own
            assert abs(share["train"] - 0.7) < 0.03 and abs(share["test"] - 0.2) < 0.03
    stats = table_stats(merged)
    effusion = stats.findings["Pleural Effusion"]
    assert effusion.known == len(nih) + int(chexpert["Pleural Effusion"].notna().sum())
    assert effusion.positives == int(nih["Effusion"].sum() + (chexpert["Pleural Effusion"] == 1).sum())
    assert stats.findings["Hernia"].known == len(nih)
    # Written out and read back as a generic table (default columns), it is the same table and splits the same.
    for name in ("merged.csv", "merged.parquet"):
        again = read_table(write_table(merged, tmp_path / name))
        columns = list(again.columns)
        assert set(columns) <= set(merged.columns) and finding_columns(again) == findings
        pd.testing.assert_frame_equal(again, merged[columns], check_dtype=False)
        assert make_split(again, seed=5).equals(split)


@pytest.mark.parametrize("name,path", [("chexpert", "chexpert"), ("mimic", "mimic"), ("vindr", "vindr"),
                                       ("padchest", PADCHEST.relative_to(FIXTURES))])
def test_every_reader_speaks_the_harmonised_vocabulary_and_splits_from_the_cli(name, path, tmp_path):
    from cxrlearn.cli.main import main

    table = read_dataset(name, FIXTURES / path)
    assert set(finding_columns(table)) <= set(HARMONISED) and table[IMAGE].is_unique
    out = tmp_path / "split.csv"
    assert main(["split", "--dataset", name, "--table", str(FIXTURES / path), "--out", str(out)]) == 0
    split = pd.read_csv(out, dtype=str)
    assert set(split[IMAGE]) == set(table[IMAGE]) and split.groupby(PATIENT_ID)["split"].nunique().max() == 1
    report = __import__("json").loads(out.with_name("split.report.json").read_text())
    assert len(report["label_table"]["sha256"]) == 64


def test_a_file_of_another_dataset_is_refused_naming_what_it_lacks(tmp_path):
    with pytest.raises(DataError, match=r"valid.csv: missing column\(s\) .*image_id: not a VinDr-CXR label table"):
        read_vindr(FIXTURES / "chexpert" / "valid.csv")
    with pytest.raises(DataError, match=r"missing column\(s\) .*Path.*not CheXpert's train.csv"):
        read_chexpert(FIXTURES / "vindr" / "image_labels_test.csv")
    with pytest.raises(DataError, match=r"no mimic-cxr-\*-chexpert.csv\(.gz\) here"):
        read_mimic(FIXTURES / "chexpert")
    with pytest.raises(DataError, match=r"unknown dataset 'openi'"):
        read_dataset("openi", FIXTURES)


def test_merge_from_the_cli_then_split_the_merged_table(tmp_path, capsys, sample_images):
    """``cxrlearn merge``: NIH's shipped table, two public datasets' own files and a hospital's table in the
    generic format, into one Parquet that ``split --table`` splits patient-wise, each dataset on its own, and
    whose images are found under one folder."""
    from cxrlearn.cli.main import main

    own = tmp_path / "own.csv"
    own.write_text("file,mrn,Effusion,Cardiomegaly\n" + "".join(
        f"h{i}.png,m{i // 2},{i % 2},{'' if i % 3 else 1}\n" for i in range(40)))
    out = tmp_path / "merged.parquet"
    sources = ["nih", f"chexpert={FIXTURES / 'chexpert'}", f"vindr={FIXTURES / 'vindr'}", f"hospital={own}",
               "--column", "image=file", "--column", "patient=mrn"]
    assert main(["merge", "--out", str(out), *sources, "--image-folder", "chexpert=CheXpert-v1.0-small"]) == 0
    said = capsys.readouterr().out
    assert "Hernia: unknown in chexpert, vindr, hospital" in said
    merged = read_table(out)
    assert merged[DATASET].value_counts().to_dict() == {"nih": 112120, "chexpert": 10, "vindr": len(
        read_vindr(FIXTURES / "vindr")), "hospital": 40}
    hospital = merged[merged[DATASET] == "hospital"]
    assert hospital["Pleural Effusion"].tolist() == [i % 2 for i in range(40)]  # the hospital's "Effusion", harmonised
    assert hospital["Cardiomegaly"].isna().sum() == 26 and hospital["Hernia"].isna().all()
    assert hospital[PATIENT_ID].iloc[2] == "hospital:m1"
    split_file = tmp_path / "split.csv"
    assert main(["split", "--table", str(out), "--out", str(split_file)]) == 0
    split = pd.read_csv(split_file, dtype=str).merge(merged[[IMAGE, DATASET]], on=IMAGE)
    assert len(split) == len(merged) and split.groupby(PATIENT_ID)["split"].nunique().max() == 1
    nih_share = split[split[DATASET] == "nih"]["split"].value_counts(normalize=True)
    assert abs(nih_share["train"] - 0.7) < 0.01 and abs(nih_share["test"] - 0.2) < 0.01
    assert set(split[split[DATASET] == "hospital"]["split"]) == {"train", "val", "test"}
    # Its statistics: the whole table, then each dataset's own.
    stats_file = tmp_path / "stats.json"
    assert main(["stats", "--table", str(out), "--json", str(stats_file)]) == 0
    stats = __import__("json").loads(stats_file.read_text())
    assert list(stats) == ["all", "dataset nih", "dataset chexpert", "dataset vindr", "dataset hospital"]
    assert stats["dataset hospital"]["images"] == 40 and stats["dataset hospital"]["patients"] == 20
    assert stats["dataset hospital"]["findings"]["Pleural Effusion"] == {"known": 40, "positives": 20,
                                                                         "prevalence": 0.5}
    assert stats["dataset chexpert"]["findings"]["Hernia"]["known"] == 0
    assert stats["all"]["findings"]["Hernia"]["known"] == 112120
    # One image folder: NIH's file names anywhere under it, CheXpert's paths under their folder there.
    root = tmp_path / "images"
    nih_images = sorted(sample_images.glob("*.png"))[:3]
    (root / "images_001" / "images").mkdir(parents=True)
    for image in nih_images:
        (root / "images_001" / "images" / image.name).write_bytes(image.read_bytes())
    chexpert = read_chexpert(FIXTURES / "chexpert")
    for image in chexpert[IMAGE][:4]:
        (root / "CheXpert-v1.0-small" / image).parent.mkdir(parents=True, exist_ok=True)
        (root / "CheXpert-v1.0-small" / image).write_bytes(b"found, not read")
    present = attach_images(merged, root).table
    assert present.groupby(DATASET)[IMAGE].count().to_dict() == {"chexpert": 4, "nih": 3}
    assert set(present[IMAGE]) >= {"CheXpert-v1.0-small/" + image for image in chexpert[IMAGE][:4]}
    # A part named twice, a dataset without its files, a folder for file names: refused by name, nothing written.
    again = tmp_path / "again.parquet"
    assert main(["merge", "--out", str(again), "nih", "nih"]) == 2
    assert "'nih' is given twice" in capsys.readouterr().err
    assert main(["merge", "--out", str(again), "chexpert"]) == 2
    assert "'chexpert': expected NAME=PATH" in capsys.readouterr().err
    assert main(["merge", "--out", str(again), *sources, "--image-folder", "hospital=scans"]) == 2
    assert "hospital: its images are file names ('h0.png')" in capsys.readouterr().err and not again.exists()
