"""The command line, run in-process on the real table and sample images."""

from __future__ import annotations

import json

import pandas as pd

from cxrlearn.cli.main import main


def test_split_and_stats_commands(tmp_path, table_path, test_list_path, capsys):
    out = tmp_path / "split.csv"
    assert main(["split", "--csv", str(table_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "largest relative prevalence deviation" in printed and "patients in more than one split: 0" in printed
    report = json.loads((tmp_path / "split.report.json").read_text())
    assert report["seed"] == 2137 and report["ratios"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    assert report["label_table"]["file"] == table_path.name
    assert str(tmp_path) not in json.dumps(report)  # no machine paths in saved results

    official = tmp_path / "official.csv"
    assert main(["split", "--csv", str(table_path), "--out", str(official), "--official-test", str(test_list_path)]) == 0
    assert (pd.read_csv(official)["split"] == "test").sum() == 25_596

    # Without --csv (and with --official-test alone): NIH's tables as shipped with cxrlearn, the same files.
    shipped = tmp_path / "shipped.csv"
    assert main(["split", "--out", str(shipped)]) == 0
    assert shipped.read_bytes() == out.read_bytes()
    shipped_official = tmp_path / "shipped-official.csv"
    assert main(["split", "--out", str(shipped_official), "--official-test"]) == 0
    assert shipped_official.read_bytes() == official.read_bytes()

    stats_json = tmp_path / "stats.json"
    assert main(["stats", "--csv", str(table_path), "--split", str(out), "--json", str(stats_json)]) == 0
    stats = json.loads(stats_json.read_text())
    assert sum(stats[s]["images"] for s in ("train", "val", "test")) == stats["all"]["images"] == 112_120


def test_shipped_tables_are_nihs(data_dir):
    import gzip

    from cxrlearn.data.sources import tables

    nih = data_dir / "nih"
    assert gzip.decompress(tables.label_table().read_bytes()) == gzip.decompress(
        (nih / "Data_Entry_2017_v2020.csv.gz").read_bytes())
    assert gzip.decompress(tables.test_list().read_bytes()) == (nih / "test_list.txt").read_bytes()
    assert gzip.decompress(tables.train_val_list().read_bytes()) == (nih / "train_val_list.txt").read_bytes()
    assert gzip.decompress(tables.boxes().read_bytes()) == gzip.decompress((nih / "BBox_List_2017.csv.gz").read_bytes())


def test_split_of_present_images(tmp_path, table_path, sample_images, capsys):
    out = tmp_path / "sample-split.csv"
    assert main(["split", "--csv", str(table_path), "--images", str(sample_images), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 1_115
    assert "1,115 of the table's 112,120 images are present" in capsys.readouterr().err


def test_bad_input_exits_2_with_the_file_named(tmp_path, capsys):
    table = tmp_path / "labels.csv"
    table.write_text("Image Index,Finding Labels\nx.png,Mass\n")
    assert main(["split", "--csv", str(table), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrlearn split: error:") and "labels.csv: missing column(s)" in err
    assert not (tmp_path / "s.csv").exists()


def test_check_reports_a_corrupt_image(tmp_path, table_path, sample_images, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    names = sorted(p.name for p in sample_images.glob("*.png"))[:4]
    for name in names[:3]:
        (folder / name).write_bytes((sample_images / name).read_bytes())
    (folder / names[3]).write_bytes((sample_images / names[3]).read_bytes()[:200])
    report = tmp_path / "bad.tsv"
    assert main(["check", "--csv", str(table_path), "--images", str(folder), "--report", str(report)]) == 3
    assert report.read_text().startswith(names[3] + "\t")
    assert "3 images decode; 1 cannot be used" in capsys.readouterr().out


def test_prepare_command(tmp_path, table_path, data_dir, capsys):
    images = data_dir / "nih-sample" / "images-1024"
    out = tmp_path / "cache"
    args = ["prepare", "--csv", str(table_path), "--images", str(images), "--size", "128", "--out", str(out), "--workers", "2"]
    assert main(args) == 0
    assert "cache holds 48 images: 48 added" in capsys.readouterr().out
    assert main(args) == 0
    assert "48 were already cached" in capsys.readouterr().out
    assert main(args[:5] + ["--size", "64"] + args[7:]) == 2
    assert "cannot take 64×64" in capsys.readouterr().err


def test_every_command_has_a_description_and_every_option_help():
    """The attack: export, serve and dicom status had no description in --help, --runtime no help."""
    import argparse

    from cxrlearn.cli.main import build_parser

    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    yield from walk(child, f"{name} {sub}")

    missing = []
    for name, parser in walk(build_parser(), "cxrlearn"):
        if name == "cxrlearn" or any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            continue
        if not (parser.description or "").strip():
            missing.append(f"{name}: no description")
        missing += [f"{name} {a.option_strings[0]}: no help" for a in parser._actions
                    if a.option_strings and a.help in (None, "") and a.option_strings[0] != "-h"]
    assert missing == []
