"""The training options the committed configs rely on, each checked for what it promises: the losses,
head-only epochs, the unfreezing warm-up, trainable_blocks, layer-wise learning-rate decay, freeze_bn and the
cosine schedule."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cxrlearn.data.pipeline.normalize import BatchTransform
from cxrlearn.errors import ConfigError
from cxrlearn.findings import FINDINGS
from cxrlearn.model.backbones import backbone_config
from cxrlearn.model.classifier import ChestXrayClassifier, HeadConfig
from cxrlearn.training.config import OptimConfig
from cxrlearn.training.losses import MultiLabelLoss, positive_weights
from cxrlearn.training.module import ChestXrayModule

BACKBONE = "tf_efficientnet_lite0"


# ---- losses ---------------------------------------------------------------------------------------------


def _logits_and_targets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, len(FINDINGS), generator=generator) * 3
    targets = (torch.rand(32, len(FINDINGS), generator=generator) < 0.2).float()
    return logits, targets


def test_losses_reduce_to_binary_cross_entropy_where_they_should():
    logits, targets = _logits_and_targets()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.isclose(MultiLabelLoss("bce")(logits, targets), bce)
    # Focal loss with gamma 0 and no alpha weighting is BCE; ASL without focusing or clipping is too.
    assert torch.isclose(MultiLabelLoss("focal", focal_gamma=0.0, focal_alpha=-1)(logits, targets), bce, atol=1e-6)
    assert torch.isclose(MultiLabelLoss("asymmetric", asl_gamma_neg=0, asl_gamma_pos=0, asl_clip=0)(logits, targets),
                         bce, atol=1e-5)
    # Focusing lowers the loss of easy examples: focal and ASL are below BCE here.
    assert MultiLabelLoss("focal")(logits, targets) < bce
    assert MultiLabelLoss("asymmetric")(logits, targets) < bce


def test_asymmetric_clip_discards_very_easy_negatives_and_pos_weight_is_bce_only():
    targets = torch.zeros(1, 2)
    logits = torch.tensor([[-5.0, 2.0]])  # p = 0.0067 (under the 0.05 clip) and 0.88
    loss = MultiLabelLoss("asymmetric", asl_gamma_neg=0, asl_clip=0.05)
    per_element = torch.stack([loss(logits[:, :1], targets[:, :1]), loss(logits[:, 1:], targets[:, 1:])])
    assert per_element[0] == 0 and per_element[1] > 0
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    assert positive_weights(labels).tolist() == [1.0, 4.0]  # 2/2, and 4 negatives over (at least) 1
    assert positive_weights(torch.zeros(500, 1)).tolist() == [100.0]  # capped
    with pytest.raises(ConfigError, match="pos_weight applies to the bce loss only"):
        MultiLabelLoss("focal", pos_weight=torch.ones(2))


# ---- options of the training loop, on real sample images ---------------------------------------------


class RealImages(Dataset):
    """16 real sample radiographs at 64 px with their NIH labels, as the DataModule yields them."""

    def __init__(self, nih_table, sample_images):
        names = sorted(p.name for p in sample_images.glob("*.png"))[:16]
        labels = nih_table.set_index("image").loc[names, list(FINDINGS)].to_numpy(np.float32)
        self.items = [(torch.from_numpy(np.asarray(Image.open(sample_images / n).convert("L").resize((64, 64))))[None],
                       torch.from_numpy(labels[i]), n) for i, n in enumerate(names)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Normalised(L.LightningDataModule):
    def __init__(self, dataset):
        super().__init__()
        cfg = backbone_config(BACKBONE)
        self.dataset, self.transform = dataset, BatchTransform(cfg.mean, cfg.std)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=4, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx=0):
        images, labels, names = batch
        return self.transform(images), labels, names


class LearningRates(L.Callback):
    """After each step: every optimiser group's rate (the head's group last)."""

    def __init__(self):
        self.groups: list[list[float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.groups.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    @property
    def backbone(self) -> list[float]:
        """The rate of the backbone's top group (its only one without layer-wise decay)."""
        return [rates[-2] for rates in self.groups]

    @property
    def head(self) -> list[float]:
        return [rates[-1] for rates in self.groups]


def fit(dataset, epochs: int, optim: dict | None = None, **module_options):
    torch.manual_seed(0)
    model = ChestXrayClassifier(BACKBONE, HeadConfig(units=16, dropout=0.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = OptimConfig(**{"lr": 1e-3, "scheduler": "none", **(optim or {})})
    module = ChestXrayModule(model, MultiLabelLoss(), settings, list(FINDINGS), **module_options)
    rates = LearningRates()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[rates])
    trainer.fit(module, datamodule=Normalised(dataset))
    after = model.state_dict()
    changed = {k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])}
    return changed, rates


@pytest.fixture(scope="module")
def images(nih_table, sample_images):
    return RealImages(nih_table, sample_images)


def test_head_only_epochs_keep_the_backbone_and_its_statistics_unchanged(images):
    changed, _ = fit(images, epochs=1, optim={"head_only_epochs": 1})
    assert changed and all(k.startswith("head.") for k in changed), sorted(changed)[:5]
    changed, _ = fit(images, epochs=2, optim={"head_only_epochs": 1})
    assert any(k.startswith("backbone.") for k in changed)


def test_trainable_blocks_fine_tune_only_the_top_stages(images):
    changed, _ = fit(images, epochs=1, trainable_blocks=1)
    backbone = {k for k in changed if k.startswith("backbone.")}
    last = f"backbone.blocks.{len(ChestXrayClassifier(BACKBONE).backbone.blocks) - 1}."
    assert backbone and all(k.startswith((last, "backbone.conv_head", "backbone.bn2")) for k in backbone), \
        sorted(backbone)[:5]
    assert not any(k.startswith(("backbone.conv_stem", "backbone.blocks.0.")) for k in changed)


def test_layer_decay_lowers_each_stage_s_rate_below_the_one_above_and_warms_them_all_up(images):
    stages = len(ChestXrayClassifier(BACKBONE).backbone.blocks)
    changed, rates = fit(images, epochs=2, optim={"head_only_epochs": 1, "backbone_lr_scale": 0.1,
                                                  "layer_decay": 0.5})
    steps = len(images) // 4
    # The stem, each stage, and the top (conv_head, bn2): 1e-4 at the top, halved per depth below it.
    expected = [1e-4 * 0.5 ** (stages + 1 - depth) for depth in range(stages + 2)]
    assert rates.groups[-1] == pytest.approx(expected + [1e-3])
    # The unfreezing epoch ramps every backbone group up, keeping their ratios.
    assert rates.groups[steps] == pytest.approx([lr / steps for lr in expected] + [1e-3])
    assert {k.split(".")[1] for k in changed if k.startswith("backbone.")} >= {"conv_stem", "blocks", "conv_head"}
    _, plain = fit(images, epochs=1)
    assert len(plain.groups[-1]) == 2  # without it: one backbone group


def test_freeze_bn_keeps_imagenet_statistics_while_weights_learn(images):
    changed, _ = fit(images, epochs=1, freeze_bn=True)
    assert not any(k.endswith(("running_mean", "running_var")) and k.startswith("backbone.") for k in changed)
    assert any(k.startswith("backbone.") and k.endswith("weight") for k in changed)
    changed, _ = fit(images, epochs=1, freeze_bn=False)
    assert any(k.endswith("running_mean") and k.startswith("backbone.") for k in changed)


def test_the_unfreezing_epoch_ramps_the_backbone_learning_rate_up(images):
    _, rates = fit(images, epochs=2, optim={"head_only_epochs": 1, "backbone_lr_scale": 0.1})
    steps = len(images) // 4
    ramp = rates.backbone[steps:]
    assert ramp == pytest.approx([1e-4 * (i + 1) / steps for i in range(steps)])
    assert rates.head == pytest.approx([1e-3] * 2 * steps)
    _, rates = fit(images, epochs=2, optim={"head_only_epochs": 1, "backbone_lr_scale": 0.1, "unfreeze_warmup": False})
    assert rates.backbone[steps:] == pytest.approx([1e-4] * steps)


def test_the_cosine_schedule_warms_up_then_decays_to_zero(images):
    _, rates = fit(images, epochs=3, optim={"scheduler": "cosine", "warmup_epochs": 1.0})
    steps = len(images) // 4
    head = np.array(rates.head)  # the rate for the next step, read after each step
    assert np.all(np.diff(head[:steps - 1]) > 0)  # linear warm-up over the first epoch
    assert head.max() == pytest.approx(1e-3, rel=1e-6)
    assert np.all(np.diff(head[steps:]) <= 1e-12) and head[-1] < 0.05 * 1e-3  # cosine down to about zero
