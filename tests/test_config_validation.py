"""Config values of the wrong type or range, and paths of the wrong kind, are refused in one line naming the
key or option — before any split, cache or training starts."""

from __future__ import annotations

import gzip

import pytest

from cxrlearn.cli.main import main
from cxrlearn.errors import ConfigError
from cxrlearn.model.classifier import HeadConfig
from cxrlearn.training.config import RunConfig, load_config

BAD_VALUES = [
    ("train.epochs", "ten", "a whole number"),
    ("train.epochs", 2.7, "a whole number"),
    ("train.epochs", 0, "a whole number from 1"),
    ("optim.lr", "fast", "a number > 0"),
    ("optim.lr", -1, "a number > 0"),
    ("data.image_size", "big", "a whole number from 32 to 2048"),
    ("data.cache_size", -5, "null or a whole number from 32 to 2048"),
    ("optim.head_only_epochs", "ten", "a whole number >= 0"),
    ("train.early_stopping_patience", "ten", "a whole number >= 0"),
    ("data.batch_size", 0, "a whole number from 1"),
    ("data.batch_size", -8, "a whole number from 1"),
    ("data.num_workers", -2, "or auto"),
    ("train.devices", -1, "or auto"),
    ("data.ratios", [0.7, 0.2, 0.2], "sum to 1"),
    ("model.head.dropout", 1.0, "< 1"),
    ("train.channels_last", "yes", "true or false"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_config_values_are_refused_naming_the_key(key, value, expected):
    section, *rest = key.split(".")
    nested: dict = {}
    node = nested.setdefault(section, {})
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=rf"{key} must be .*{expected}"):
        load_config(overrides=nested)


def test_train_refuses_bad_values_before_writing_anything(sample_images, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", "cpu-sample", "--images", str(sample_images), "--out", str(out),
                 "--set", "optim.head_only_epochs=ten"])
    assert code == 2 and not out.exists()
    assert "optim.head_only_epochs must be a whole number >= 0, not 'ten'" in capsys.readouterr().err
    config = tmp_path / "latin1.yaml"
    config.write_bytes("train:\n  epochs: 3 # \xe9poques\n".encode("latin-1"))
    assert main(["train", "--config", str(config), "--images", str(sample_images), "--out", str(out)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err and not out.exists()


def test_paths_of_the_wrong_kind_are_refused(table_path, sample_images, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    cases = [
        (["prepare", "--images", str(sample_images), "--out", str(a_file)], "is a file; a folder is needed"),
        (["train", "--images", str(sample_images), "--out", str(a_file)], "is a file; a folder is needed"),
        (["split", "--out", str(a_folder)], "is a folder; name the file"),
        (["stats", "--json", str(a_folder)], "is a folder; name the file"),
        (["check", "--images", str(sample_images), "--report", str(a_folder)], "is a folder; name the file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert a_file.read_text() == "x" and not list(a_folder.iterdir())


def test_a_truncated_gzip_split_file_is_named(tmp_path, capsys):
    whole = gzip.compress(b"image,patient_id,split\n" + b"00000001_000.png,1,train\n" * 2000)
    cut = tmp_path / "split.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    assert main(["stats", "--split", str(cut)]) == 2
    assert "split.csv.gz: not a readable split file" in capsys.readouterr().err


def test_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--model", ".", "--port", "99999"])
    assert stop.value.code == 2
    assert "99999 is not a TCP port between 1 and 65535" in capsys.readouterr().err


def test_the_config_is_a_typed_value_that_round_trips():
    """load_config gives typed sections; the dict written to config.yaml and the bundle reads back the same."""
    config = load_config("kufel2023", sets=["data.batch_size=8", "model.head.units=128"])
    assert isinstance(config, RunConfig) and config.data.batch_size == 8 and config.model.head == HeadConfig(128)
    assert config.data.cache_size is None and config.data.image_size == 240 and config.optim.scheduler == "plateau"
    assert RunConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"data.batch_size must be a whole number"):
        RunConfig.from_dict({**config.to_dict(), "data": {**config.to_dict()["data"], "batch_size": "8"}})


def test_every_flag_the_config_declares_is_an_option_of_train_and_sets_its_key(tmp_path):
    """The flags are named in the settings' declarations (FLAGS); the parser lists them by hand only so that
    ``cxrlearn --help`` starts without torch. Each must exist, with a type the key accepts."""
    import argparse

    from cxrlearn.cli.main import build_parser
    from cxrlearn.training.config import FLAGS, SETTINGS

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = {option: action for action in commands.choices["train"]._actions for option in action.option_strings}
    assert set(FLAGS) <= set(train), sorted(set(FLAGS) - set(train))
    for flag, key in FLAGS.items():
        expected = int if SETTINGS[key].annotation is int else None
        assert expected is None or train[flag].type is int, flag
