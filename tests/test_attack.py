"""The second attack's cases (issue 19), replayed: each was a data loss, a leak or a traceback, and each is
refused by name now, with nothing lost. Seeded and bounded; files and services on loopback only."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from cxrlearn.cli.main import main
from cxrlearn.data.sources.download import COMPLETE, extract_archive, read_archives

MD5 = "0" * 32


# 4. download never deletes or writes outside its folder ----------------------------------------------------------

@pytest.mark.parametrize("name", ["/abs/path/x.tar.gz", ".hidden.tar.gz", "../x.tar.gz", "a/b.tar.gz", "x.zip",
                                  "images_001.tar.gz/.."])
def test_archive_names_that_could_escape_or_delete_are_refused(tmp_path, capsys, name):
    to = tmp_path / "nih"
    (to / "images_005").mkdir(parents=True)
    (to / "images_005" / "kept.png").write_bytes(b"earlier work")
    archives = tmp_path / "archives.tsv"
    archives.write_text(f"archive\turl\tmd5\n{name}\thttp://127.0.0.1:9/x\t{MD5}\n")
    assert main(["download", "nih", "--to", str(to), "--archives", str(archives), "--parts", "1"]) == 2
    err = capsys.readouterr().err
    assert f"line 2: archive {name!r} is not a plain file name" in err
    assert (to / "images_005" / "kept.png").read_bytes() == b"earlier work"
    assert sorted(p.name for p in to.iterdir()) == ["images_005"]


def _tar(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extraction_never_replaces_a_folder_it_did_not_make(tmp_path):
    archive = tmp_path / "images_005.tar.gz"
    _tar(archive, {"images/a.png": b"new"})
    folder = tmp_path / "images_005"
    folder.mkdir()
    (folder / "mine.png").write_bytes(b"earlier work")
    with pytest.raises(Exception, match="was not extracted by cxrlearn download"):
        extract_archive(archive, folder)
    assert (folder / "mine.png").read_bytes() == b"earlier work"
    # A folder it made (with its marker) is reused as it is.
    other = tmp_path / "images_006"
    assert extract_archive(archive, other) == 1 and (other / COMPLETE).is_file()
    assert extract_archive(archive, other) == 1


def test_download_options_and_lists_are_checked(tmp_path, capsys):
    for value in ("-1", "nan", "inf", "0"):
        with pytest.raises(SystemExit) as stopped:
            main(["download", "nih", "--to", str(tmp_path / "x"), "--timeout", value])
        assert stopped.value.code == 2
        assert "is not a number of seconds over 0" in capsys.readouterr().err
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("archive\turl\tmd5\nbild_ä.tar.gz\thttp://x/\t".encode("latin-1") + MD5.encode() + b"\n")
    with pytest.raises(Exception, match="not UTF-8 text"):
        read_archives(latin)
    assert not (tmp_path / "x").exists()


# 5. Paths in tables stay inside --images ---------------------------------------------------------------------------

@pytest.mark.parametrize("image", ["/etc/hostname", "../outside.png", "a/../../b.png", "a\\..\\b.png", "~/x.png"])
def test_table_paths_outside_the_image_folder_are_refused_naming_the_line(tmp_path, capsys, image):
    table = tmp_path / "labels.csv"
    table.write_text(f"image,patient,Effusion\nok/a.png,p1,0\n{image},p2,1\n")
    (tmp_path / "images").mkdir()
    assert main(["check", "--table", str(table), "--images", str(tmp_path / "images")]) == 2
    assert f"column 'image' line 3: {image!r} is not a path inside the image folder" in capsys.readouterr().err


def test_an_image_folder_outside_the_image_folder_is_refused(tmp_path, capsys):
    table = tmp_path / "labels.csv"
    table.write_text("image,patient,Effusion\nok/a.png,p1,0\n")
    assert main(["merge", "--out", str(tmp_path / "m.csv"), f"site={table}", "--image-folder",
                 "site=../../../etc"]) == 2
    assert "--image-folder site=../../../etc: not a folder inside the image folder" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_attach_images_refuses_such_paths_from_any_reader(tmp_path):
    import pandas as pd

    from cxrlearn.data.decoding.images import attach_images

    table = pd.DataFrame({"image": ["a.png", "/etc/hostname"], "patient_id": ["1", "2"]})
    with pytest.raises(Exception, match=r"row 2: image '/etc/hostname' is not a path inside the image folder"):
        attach_images(table, tmp_path)


# 6. No silent wrong answer from a bundle ---------------------------------------------------------------------------

@pytest.fixture
def copied_run(evaluated, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(evaluated[0], run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    return run


def _edit_meta(run, change) -> None:
    import json

    meta = json.loads((run / "model.json").read_text())
    change(meta)
    (run / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("field, value, message", [
    ("std", [1e-300] * 3, "preprocessing.std must be 3 positive numbers from 0.001 to 100.0"),
    ("mean", [1e300] * 3, "preprocessing.mean must be 3 numbers from -1.0 to 2.0"),
])
def test_normalisation_numbers_that_cannot_give_an_answer_are_refused_at_load(copied_run, sample_images, capsys,
                                                                             field, value, message):
    _edit_meta(copied_run, lambda meta: meta["preprocessing"].__setitem__(field, value))
    image = str(sorted(sample_images.glob("*.png"))[0])
    assert main(["predict", "--model", str(copied_run), image, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_non_finite_weights_or_outputs_are_an_error_not_a_blank(copied_run, sample_images, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from cxrlearn.data.decoding.images import load_grayscale
    from cxrlearn.errors import ConfigError
    from cxrlearn.inference.predictor import Predictor

    predictor = Predictor(copied_run)
    predictor.model.head[-1].bias.data[:] = float("inf")  # as weights damaged after loading would give
    pixels = load_grayscale(sorted(sample_images.glob("*.png"))[0])
    with pytest.raises(ConfigError, match="non-finite outputs for x.png"):
        predictor.predict([pixels], ["x.png"])
    state = load_file(str(copied_run / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(copied_run / "model.safetensors"))
    image = str(sorted(sample_images.glob("*.png"))[0])
    assert main(["predict", "--model", str(copied_run), image, "--no-progress"]) == 2
    assert f"{name} holds non-finite numbers" in capsys.readouterr().err


# 3. No patient in two splits, ever ---------------------------------------------------------------------------------

def test_a_dataset_column_cannot_split_a_patient(nih_table, sample_images, tmp_path, capsys):
    import json

    import pandas as pd

    from cxrlearn.data.decoding.images import attach_images

    present = attach_images(nih_table, sample_images).table.sort_values("image").reset_index(drop=True)
    table = pd.DataFrame({"image": present["image"], "patient": present["patient_id"].astype(str),
                          "dataset": ["site-a" if i % 2 else "site-b" for i in range(len(present))],
                          "Effusion": present["Effusion"].astype(int), "Nodule": present["Nodule"].astype(int)})
    straddling = table.groupby("patient")["dataset"].nunique().gt(1).sum()
    assert straddling > 50  # the attack's case: one patient's images under two dataset names
    path = tmp_path / "labels.csv"
    table.to_csv(path, index=False)
    split = tmp_path / "split.csv"
    assert main(["split", "--table", str(path), "--out", str(split)]) == 0
    assert "patients in more than one split: 0" in capsys.readouterr().out
    assert json.loads((tmp_path / "split.report.json").read_text())["shared_patients"] == 0
    made = pd.read_csv(split, dtype=str)
    assert made.groupby("patient_id")["split"].nunique().max() == 1
    assert set(made["split"]) == {"train", "val", "test"} and len(made) == len(table)


# 2. A continued run cannot change its data -------------------------------------------------------------------------

def test_a_continued_run_cannot_change_its_table_or_split(table_path, nih_table, sample_images, tmp_path, capsys):
    import shutil

    import pandas as pd

    from test_training import split_file
    from cxrlearn.data.decoding.images import attach_images

    present = attach_images(nih_table, sample_images).table
    split = split_file(present, tmp_path / "given.csv", 48, 16)
    run = tmp_path / "run"
    base = ["train", "--images", str(sample_images), "--backbone", "tf_efficientnet_lite0", "--image-size", "64",
            "--set", "model.hub=false", "--set", "data.num_workers=0", "--set", f"data.cache={tmp_path / 'cache'}",
            "--out", str(run), "--no-progress"]
    # A split of the images present, made by the run (48 + 16 images: a copy of the table limited to them).
    rows = pd.read_csv(table_path)
    small = tmp_path / "small.csv"
    rows[rows["Image Index"].isin(pd.read_csv(split)["image"])].to_csv(small, index=False)
    assert main([*base, "--csv", str(small), "--epochs", "1"]) == 0
    capsys.readouterr()

    # The same table moved: allowed. The same name with other labels: refused by name.
    moved = tmp_path / "moved.csv"
    shutil.copyfile(small, moved)
    changed = pd.read_csv(small)
    changed.loc[changed.index[:5], "Finding Labels"] = "Hernia"
    relabelled = tmp_path / "relabelled.csv"
    changed.to_csv(relabelled, index=False)
    assert main([*base, "--csv", str(relabelled), "--epochs", "2", "--resume"]) == 2
    assert "holds other labels or images than the table this run started with" in capsys.readouterr().err

    # The run's own split edited (a test image moved to train): refused.
    own = pd.read_csv(run / "split.csv")
    edited = own.copy()
    edited.loc[edited["split"] != "train", "split"] = "train"
    edited.loc[edited.index[0], "split"] = "val"
    saved = (run / "split.csv").read_bytes()
    edited.to_csv(run / "split.csv", index=False)
    assert main([*base, "--csv", str(moved), "--epochs", "2", "--resume"]) == 2
    assert "split.csv was changed after this run made or took it" in capsys.readouterr().err
    (run / "split.csv").write_bytes(saved)

    # Killed after its split, before its first checkpoint: a rerun with other split settings is refused...
    shutil.rmtree(run / "checkpoints")
    assert main([*base, "--csv", str(moved), "--epochs", "1", "--set", "data.split_seed=7"]) == 2
    assert "data.split_seed was 2137, now 7" in capsys.readouterr().err
    # ... and with its own settings it continues, from the moved table, with its own split.
    assert main([*base, "--csv", str(moved), "--epochs", "1"]) == 0
    assert (run / "split.csv").read_bytes() == saved


# 8. Memory bounded by what is decoded, not by its copies -------------------------------------------------------

def test_a_16_bit_png_decodes_without_float_copies(tmp_path):
    import tracemalloc

    import numpy as np
    from PIL import Image

    from cxrlearn.data.decoding.images import decode_grayscale

    side = 2500
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    data = buffer.getvalue()
    tracemalloc.start()
    try:
        decoded = decode_grayscale(data, "big.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(decoded, np.rint(ramp / 257.0).astype(np.uint8))  # round(v / 257), as before
    # Three float64 copies took over 24 bytes a pixel; the 16-bit pixels and the 8-bit result take 3 to 5.
    assert peak < 8 * side * side, f"{peak / side / side:.1f} bytes a pixel"


# 9. No traceback: settings refused by name before any file is written ------------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number >= 0, not inf"),
    ("optim.backbone_lr_scale=.inf", "optim.backbone_lr_scale must be a finite number"),
    ("optim.warmup_epochs=.inf", "optim.warmup_epochs must be a finite number"),
    ("data.findings=[[a]]", "data.findings must be null or a list of distinct finding names"),
    ("train.seed=4294967296", "train.seed must be a whole number from 0 to 4294967295"),
    ("train.strategy=bogus", "train.strategy must be one of auto, ddp"),
    ("model.trainable_blocks=1000", "model.trainable_blocks 1000: tf_efficientnet_lite0 has 7 stages"),
    ("optim.layer_decay=1.5", "optim.layer_decay must be null or a number > 0 and <= 1, not 1.5"),
    ("model.weights=missing.pth", "model.weights missing.pth: no such file"),
    ("model.init_from=missing-run", "missing-run: not a cxrlearn model bundle"),
    ("data.cache=a-file.txt", "data.cache (--cache) a-file.txt: is a file"),
])
def test_bad_settings_are_refused_before_anything_is_written(table_path, sample_images, tmp_path, capsys,
                                                             monkeypatch, setting, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file.txt").write_text("not a cache")
    argv = ["train", "--csv", str(table_path), "--images", str(sample_images), "--backbone", "tf_efficientnet_lite0",
            "--out", str(tmp_path / "run"), "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_gpu_training_on_a_machine_without_one_is_refused_by_name(table_path, sample_images, tmp_path, capsys,
                                                                  monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--csv", str(table_path), "--images", str(sample_images), "--accelerator", "gpu",
                 "--out", str(tmp_path / "run")]) == 2
    assert "train.accelerator gpu: this machine has no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_numbers_are_read_as_people_write_them(tmp_path):
    from cxrlearn.training.config import load_config

    assert load_config(sets=["optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)  # the README's own example
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: 1e-4\n  weight_decay: 5E-2\ntrain:\n  epochs: 20\n")
    loaded = load_config(config)
    assert loaded.optim.lr == pytest.approx(1e-4) and loaded.optim.weight_decay == pytest.approx(0.05)
    assert loaded.train.epochs == 20 and isinstance(loaded.train.epochs, int)


# 9. No traceback: damaged or hostile bundles are refused at load, naming the file and field ----------------------

@pytest.mark.parametrize("change, message", [
    (lambda m: m["head"].__setitem__("activation", ["relu"]), "field 'head.activation' must be one of relu, silu, gelu, linear"),
    (lambda m: m["head"].__setitem__("units", 10**9), "field 'head.units' must be a whole number from 1 to 65536"),
    (lambda m: m.__setitem__("findings", [f"f{i}" for i in range(100_000)]), "field 'findings' must be at most 1000"),
    (lambda m: m["input_check"].__setitem__("layout_threshold", "high"), "'input_check.layout_threshold' must be"),
    (lambda m: m["input_check"].__setitem__("threshold", [1]), "'input_check.threshold' must be a finite number"),
    (lambda m: m.__setitem__("backbone", "vit_huge_patch14_224"), "the weights do not fit the model"),
])
def test_hostile_metadata_is_refused_at_load(copied_run, sample_images, capsys, change, message):
    import time

    _edit_meta(copied_run, change)
    image = str(sorted(sample_images.glob("*.png"))[0])
    started = time.monotonic()
    assert main(["predict", "--model", str(copied_run), image, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert time.monotonic() - started < 30  # refused from the metadata, not after building a huge model
    # The service refuses to start on it (two of these started, then answered 500 to every request).
    assert main(["serve", "--model", str(copied_run), "--port", "1"]) == 2  # before binding any port
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("text, message", [
    ('{"format": ' + "9" * 5000 + "}", "not JSON cxrlearn reads"),
    ("[" * 100_000 + "]" * 100_000, "not JSON cxrlearn reads"),
])
def test_pathological_json_is_refused(copied_run, capsys, text, message):
    (copied_run / "model.json").write_text(text)
    assert main(["card", str(copied_run)]) == 2
    assert message in capsys.readouterr().err


def test_an_oversized_model_json_is_refused_unread(copied_run, capsys):
    with open(copied_run / "model.json", "a") as handle:
        handle.truncate(20 * 2**20)  # 20 MB, as a 300 MB one would be
    assert main(["card", str(copied_run)]) == 2
    assert "a bundle's metadata is at most" in capsys.readouterr().err


def test_another_runs_input_check_is_refused(copied_run, sample_images, capsys):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(copied_run / "input_check.safetensors"))
    width = arrays["feature_mean"].shape[0] // 2  # as another backbone's would be
    arrays["feature_mean"] = arrays["feature_mean"][:width].copy()
    arrays["feature_precision"] = np.ascontiguousarray(arrays["feature_precision"][:width, :width])
    save_file(arrays, str(copied_run / "input_check.safetensors"))
    image = str(sorted(sample_images.glob("*.png"))[0])
    assert main(["predict", "--model", str(copied_run), image, "--no-progress"]) == 2
    assert f"the input check describes {width} features, but tf_efficientnet_lite0 gives {2 * width}" \
        in capsys.readouterr().err


@pytest.mark.parametrize("damage", [b"", b"garbage" * 1000, "truncated"])
def test_a_damaged_onnx_file_is_refused_by_name(copied_run, sample_images, capsys, damage):
    onnx_path = copied_run / "model.onnx"
    assert main(["export", "--model", str(copied_run)]) == 0
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 2] if damage == "truncated" else damage)
    capsys.readouterr()
    image = str(sorted(sample_images.glob("*.png"))[0])
    assert main(["predict", "--model", str(copied_run), image, "--runtime", "onnx", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: not a readable ONNX model" in err and "Traceback" not in err


# 9. No traceback: odd files in image folders, odd names, damaged caches ------------------------------------------

@pytest.fixture
def odd_folder(sample_images, tmp_path):
    """Three real images, a link to itself, a link loop between folders, a dangling link and a FIFO."""
    import os
    import shutil

    folder = tmp_path / "odd"
    folder.mkdir()
    for path in sorted(sample_images.glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "self.png").symlink_to("self.png")
    (folder / "dir_loop").symlink_to("dir_loop")
    (folder / "images_001").mkdir()
    (folder / "images_001" / "images").symlink_to("../images_001")
    (folder / "dangling.png").symlink_to("missing.png")
    os.mkfifo(folder / "fifo.png")
    return folder


def test_link_loops_and_fifos_in_an_image_folder_are_named_not_a_traceback(odd_folder, table_path, evaluated,
                                                                         tmp_path, capsys):
    for argv in (["check", "--csv", str(table_path), "--images", str(odd_folder)],
                 ["split", "--csv", str(table_path), "--images", str(odd_folder), "--out", str(tmp_path / "s.csv")],
                 ["prepare", "--csv", str(table_path), "--images", str(odd_folder), "--size", "64", "--out",
                  str(tmp_path / "cache")]):
        assert main(argv) == 0, argv
        err = capsys.readouterr().err
        assert "are not readable files (a link loop, a FIFO) or point nowhere and are skipped" in err
        assert "Traceback" not in err
    assert main(["predict", "--model", str(evaluated[0]), str(odd_folder), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert f"skipped {odd_folder / 'dangling.png'}: a link to nothing, or a link loop" in err
    assert f"skipped {odd_folder / 'self.png'}: a link to nothing, or a link loop" in err
    assert f"skipped {odd_folder / 'fifo.png'}: not a regular file (a FIFO or a device)" in err
    assert len(pd_read(tmp_path / "p.csv")) == 3


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


def test_a_file_name_that_is_not_utf8_loses_no_row(evaluated, sample_images, tmp_path, capsys):
    import os
    import shutil

    folder = tmp_path / "names"
    folder.mkdir()
    images = sorted(sample_images.glob("*.png"))[:2]
    shutil.copy(images[0], folder / images[0].name)
    shutil.copy(images[1], os.path.join(os.fsencode(folder), b"scan-\xff.png"))
    assert main(["predict", "--model", str(evaluated[0]), str(folder), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    names = pd_read(tmp_path / "p.csv")["image"].tolist()
    assert sorted(names) == sorted([images[0].name, "scan-\\udcff.png"])
    assert main(["predict", "--model", str(evaluated[0]), str(folder), "--no-progress"]) == 0
    assert "scan-\\udcff.png" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "meta.json").write_text(""), "meta.json: damaged"),
    (lambda c: (c / "meta.json").write_text('{"format": 1, "si'), "meta.json: damaged"),
    (lambda c: (c / "meta.json").write_text("[1, 2]"), "meta.json: damaged (not a JSON object)"),
    (lambda c: (c / "index.tsv").write_bytes(b"\xff\xfe\t0\n"), "index.tsv: not UTF-8 text"),
])
def test_a_damaged_cache_is_refused_by_name(table_path, sample_images, tmp_path, capsys, damage, message):
    cache = tmp_path / "cache"
    argv = ["prepare", "--csv", str(table_path), "--images", str(sample_images), "--size", "32", "--out", str(cache)]
    assert main(argv) == 0
    damage(cache)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_two_prepares_on_one_cache_do_not_truncate_each_other(table_path, sample_images, tmp_path, capsys):
    import fcntl

    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / ".lock", "a+") as held:  # as a first prepare holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["prepare", "--csv", str(table_path), "--images", str(sample_images), "--size", "32",
                     "--out", str(cache)]) == 2
        assert "another cxrlearn process is adding to this cache" in capsys.readouterr().err
        assert not (cache / "pixels.u8").exists()


def test_image_names_with_a_tab_or_line_break_are_refused(tmp_path, capsys):
    import pandas as pd

    from cxrlearn.data.decoding.images import attach_images

    table = pd.DataFrame({"image": ["a.png", "b\tc.png"], "patient_id": ["1", "2"]})
    with pytest.raises(Exception, match=r"row 2: image 'b\\tc.png' holds a control character"):
        attach_images(table, tmp_path)


# 9. No traceback: outputs that cannot be written where asked ------------------------------------------------------

def test_outputs_under_a_file_or_a_read_only_folder_are_refused_by_name(table_path, evaluated, sample_images,
                                                                         tmp_path, capsys):
    import os

    run = evaluated[0]
    (tmp_path / "a-file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    image = str(sorted(sample_images.glob("*.png"))[0])
    cases = [
        ["split", "--csv", str(table_path), "--out", str(tmp_path / "a-file" / "split.csv")],
        ["stats", "--csv", str(table_path), "--json", str(tmp_path / "a-file" / "s.json")],
        ["predict", "--model", str(run), image, "--out", str(tmp_path / "a-file" / "p.csv"), "--no-progress"],
        ["export", "--model", str(run), "--out", str(tmp_path / "a-file" / "m.onnx")],
    ]
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs another user
        cases.append(["split", "--csv", str(table_path), "--out", str(locked / "split.csv")])
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "cannot write" in err and "Traceback" not in err, err
    os.chmod(locked, 0o755)
    (tmp_path / "folder.onnx").mkdir()
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "folder.onnx")]) == 2
    assert "is a folder; name the file to write" in capsys.readouterr().err
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_a_damaged_reproduction_state_is_refused_by_name(sample_images, tmp_path, capsys):
    out = tmp_path / "R"
    out.mkdir()
    (out / "reproduction-state.json").write_text('{"stages": {"split"')
    assert main(["reproduce", "kufel2023", "--images", str(sample_images), "--out", str(out),
                 "--set", "model.backbone=tf_efficientnet_lite0", "--set", "model.hub=false"]) == 2
    assert "reproduction-state.json: damaged" in capsys.readouterr().err


# 10. The input check on small images ------------------------------------------------------------------------------

def test_an_image_far_below_the_training_resolution_is_flagged(sample_images):
    from PIL import Image

    from cxrlearn.data.decoding.images import load_grayscale
    from cxrlearn.model.input_check import TURNS, cheap_reasons

    full = load_grayscale(sorted(sample_images.glob("*.png"))[0])
    thumb = np.asarray(Image.fromarray(full).resize((32, 32), Image.Resampling.BOX))
    reason = cheap_reasons(thumb, 0.0, input_size=256)
    assert reason.startswith("far below the training resolution (32×32 px; the model takes 256 px")
    assert cheap_reasons(full, 0.0, input_size=256) is None  # the sample's own 256 px images pass
    assert cheap_reasons(thumb, 0.0) is None or not cheap_reasons(thumb, 0.0).startswith("far below")
    # A rotation names its direction: the image one quarter turn anticlockwise puts right lies clockwise.
    assert "rotated 90° clockwise" in TURNS and "rotated 90° anticlockwise" in TURNS
    tall = np.zeros((40, 60), dtype=np.uint8)
    tall[0, :] = 255  # the top edge
    assert TURNS["rotated 90° clockwise"](np.rot90(tall, -1))[0].tolist() == tall[0].tolist()

