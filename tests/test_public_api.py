"""The public API: the names the README shows, importable from the package itself, and lightly."""

from __future__ import annotations

import subprocess
import sys


def test_public_names_import_from_the_package_and_are_the_library_functions():
    import cxrlearn
    from cxrlearn import Predictor, evaluate, load_bundle, make_split, read_label_table, train
    from cxrlearn.data.cohort.split import make_split as defined

    assert make_split is defined
    assert {"Predictor", "load_bundle", "make_split", "train", "evaluate"} <= set(cxrlearn.__all__)
    assert all(callable(f) for f in (Predictor, evaluate, load_bundle, make_split, read_label_table, train))
    from cxrlearn import merge_tables, read_labels, write_table
    from cxrlearn.data.sources.datasets import read_labels as reader

    assert read_labels is reader and callable(merge_tables) and callable(write_table)


def test_importing_the_package_loads_no_heavy_dependency():
    code = ("import sys, cxrlearn; heavy = [m for m in ('torch', 'pydicom', 'fastapi', 'lightning') if m in sys.modules];"
            " print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_readme_example_runs(evaluated, sample_images, capsys):
    """The README's Python example as written, with its bundle and image pointed at real ones."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    image = sorted(sample_images.glob("*.png"))[0]
    code = code.replace('"runs/kufel2023"', repr(str(evaluated[0]))).replace('"chest.png"', repr(str(image)))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "train" in printed and image.name in printed


def test_the_library_logs_and_the_command_shows_it_once_from_the_first_process(table_path, capsys, monkeypatch):
    """Library modules log (a logger per module) rather than print; the CLI shows INFO lines plainly and
    warnings with `warning: `, and nothing from a DDP process other than the first."""
    import logging

    from cxrlearn.cli.main import main

    assert main(["stats", "--csv", str(table_path)]) == 0
    capsys.readouterr()
    logging.getLogger("cxrlearn.data.decoding.images").warning("a test warning")
    logging.getLogger("cxrlearn.workflows.train").info("a test line")
    err = capsys.readouterr().err
    assert "warning: a test warning\n" in err and "a test line\n" in err
    monkeypatch.setenv("LOCAL_RANK", "1")
    logging.getLogger("cxrlearn.workflows.train").info("from rank 1")
    assert "from rank 1" not in capsys.readouterr().err
