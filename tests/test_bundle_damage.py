"""Damaged or tampered bundles are refused on load with the file and field named — by predict, by the
service at start-up — never run with wrong answers or a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from cxrlearn.cli.main import main
from cxrlearn.errors import ConfigError
from cxrlearn.findings import FINDINGS
from cxrlearn.inference.predictor import Predictor


def _copy(run, target):
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "logs", "*.onnx"))
    return target


def _edit(meta: dict, change) -> dict:
    change(meta)
    return meta


def _set(path: str, value):
    def change(meta):
        node = meta
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return change


META_CASES = {
    "image size that would take the machine down": (_set("preprocessing.input_size", 100000),
                                                    "preprocessing.input_size must be a whole number"),
    "image size other than trained at": (_set("preprocessing.input_size", 32), "trained at 64"),
    "cache resampled otherwise": (_set("preprocessing.cache_resampling", "nearest"),
                                  "preprocessing.cache_resampling must be one of lanczos, bilinear"),
    "repeated finding name": (_set("findings", [FINDINGS[1], *FINDINGS[1:]]), "Cardiomegaly more than once"),
    "zero std": (_set("preprocessing.std", [0, 0, 0]), "preprocessing.std must be 3 positive numbers"),
    "channels other than the network's": (_set("preprocessing.channels", 1), "the network takes 3"),
    "a newer format": (_set("format", 3), "bundle format 3 is not one this cxrlearn reads"),
    "negative temperature": (_set(f"temperature.{FINDINGS[0]}", -1), f"'temperature.{FINDINGS[0]}' must be a positive"),
    "non-numeric threshold": (_set(f"thresholds.{FINDINGS[0]}", "high"), f"'thresholds.{FINDINGS[0]}' must be a prob"),
    "threshold over 1": (_set(f"thresholds.{FINDINGS[2]}", 1.5), f"'thresholds.{FINDINGS[2]}' must be a prob"),
    "one finding fewer": (lambda m: m.update(findings=list(FINDINGS[:-1]), thresholds={}, temperature=None),
                          "the weights do not fit"),
    "missing head": (lambda m: m.pop("head"), "field 'head' is missing"),
    "unknown backbone": (_set("backbone", "resnet9000"), "resnet9000"),
    "string channels": (_set("in_chans", "3"), "'in_chans' must be 1 or 3"),
    "tta as text": (_set("tta", "yes"), "'tta' must be true or false"),
    "threshold for an unknown finding": (_set("thresholds", {"Fracture": 0.5}), "'Fracture', which is not one"),
}

FILE_CASES = {
    "invalid JSON": ("model.json", b'{"format": 1, ', "not valid JSON"),
    "empty JSON": ("model.json", b"", "not valid JSON"),
    "non-UTF-8 JSON": ("model.json", b"\xff\xfe\x00{", "not UTF-8"),
    "a JSON list": ("model.json", b"[1, 2]", "is a JSON object, not list"),
    "truncated weights": ("model.safetensors", None, "not a readable safetensors file"),
    "replaced weights": ("model.safetensors", b"\x00" * 4096, "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_tampered_metadata_is_refused_by_name(evaluated, tmp_path, case):
    change, message = META_CASES[case]
    bundle = _copy(evaluated[0], tmp_path / "run")
    meta = json.loads((bundle / "model.json").read_text())
    (bundle / "model.json").write_text(json.dumps(_edit(meta, change)))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        Predictor(bundle)
    assert "model.json" in str(caught.value) or "model.safetensors" in str(caught.value)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_damaged_files_are_refused_by_name(evaluated, tmp_path, case):
    name, data, message = FILE_CASES[case]
    bundle = _copy(evaluated[0], tmp_path / "run")
    if data is None:
        data = (bundle / name).read_bytes()[:1000]
    (bundle / name).write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        Predictor(bundle)


def test_predict_and_serve_refuse_a_damaged_bundle_with_status_2(evaluated, sample_images, tmp_path, capsys):
    bundle = _copy(evaluated[0], tmp_path / "run")
    meta = json.loads((bundle / "model.json").read_text())
    meta["temperature"] = {FINDINGS[0]: -1}
    (bundle / "model.json").write_text(json.dumps(meta))
    image = sorted(sample_images.glob("*.png"))[0]
    assert main(["predict", "--model", str(bundle), str(image), "--no-progress"]) == 2
    assert "must be a positive number" in capsys.readouterr().err
    assert main(["serve", "--model", str(bundle), "--port", "1"]) == 2  # refused before binding any port
    assert "must be a positive number" in capsys.readouterr().err


def test_a_bundle_in_the_first_format_predicts_the_same(evaluated, sample_images, tmp_path):
    """A bundle written before the preprocessing became one object (format 1: image_size, normalization
    and config.data.cache_size apart) is read as the same preprocessing and predicts the same."""
    from cxrlearn.data.preprocessing import Preprocessing

    current = _copy(evaluated[0], tmp_path / "current")
    legacy = _copy(evaluated[0], tmp_path / "legacy")
    meta = json.loads((legacy / "model.json").read_text())
    pre = Preprocessing.from_dict(meta.pop("preprocessing"))
    meta.update(format=1, image_size=pre.input_size,
                normalization={"mean": list(pre.mean), "std": list(pre.std), "scale": "pixels / 255"})
    (legacy / "model.json").write_text(json.dumps(meta))
    images = sorted(sample_images.glob("*.png"))[:12]
    new, _ = Predictor(current).predict_files(images, progress=False)
    old, _ = Predictor(legacy).predict_files(images, progress=False)
    assert [p.probabilities for p in old] == [p.probabilities for p in new]
    assert [p.positive for p in old] == [p.positive for p in new]
