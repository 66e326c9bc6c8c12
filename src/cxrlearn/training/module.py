"""The LightningModule: loss, optimiser and schedule, per-finding validation AUC.

Validation AUC is torchmetrics' exact ``MultilabelAUROC``, whose state is
gathered across processes under DDP, so every process logs the AUC of the whole
validation set.
"""

from __future__ import annotations

import math
import time

import lightning as L
import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAUROC

from cxrlearn.defaults import SEED
from cxrlearn.errors import ConfigError
from cxrlearn.inference.predict import flip_averaged
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.training.config import OptimConfig
from cxrlearn.training.losses import MultiLabelLoss
from cxrlearn.training.stopping import between_batches

MONITOR = "val/mean_auc"
#: The target an unknown label becomes for torchmetrics, which leaves it out (``ignore_index``).
UNKNOWN = -1


class LabelCounts(Metric):
    """Positives and known labels per finding, and images seen, summed across processes."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.add_state("positives", torch.zeros(num_labels), dist_reduce_fx="sum")
        self.add_state("known", torch.zeros(num_labels), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, labels: torch.Tensor) -> None:
        known = ~torch.isnan(labels)
        self.positives += torch.where(known, labels, torch.zeros_like(labels)).sum(dim=0).to(self.positives)
        self.known += known.sum(dim=0).to(self.known)
        self.count += labels.shape[0]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.positives, self.known, self.count


def backbone_stages(model: ChestXrayClassifier, key: str) -> torch.nn.Sequential:
    """The backbone's stages (a timm EfficientNet's ``blocks``), which the setting ``key`` needs."""
    stages = getattr(model.backbone, "blocks", None)
    if stages is None:
        raise ConfigError(f"{key} needs a backbone with stages (timm EfficientNets); {model.backbone_name} has none")
    return stages


def trainable_parameters(model: ChestXrayClassifier, blocks: int | None) -> set[int]:
    """ids of the backbone parameters fine-tuning may change: all, or the last ``blocks`` stages.

    Fine-tuning only the top stages (and the final 1×1 convolution) keeps the
    generic low-level ImageNet filters intact, which small datasets cannot
    re-learn, and costs only the top stages' backward pass.
    """
    backbone = model.backbone
    if blocks is None:
        return {id(p) for p in backbone.parameters()}
    stages = backbone_stages(model, "model.trainable_blocks")
    if not 0 <= blocks <= len(stages):
        raise ConfigError(f"model.trainable_blocks must be between 0 and {len(stages)} for {model.backbone_name}")
    modules = list(stages[len(stages) - blocks:]) + [getattr(backbone, n) for n in ("conv_head", "bn2") if hasattr(backbone, n)]
    return {id(p) for m in modules for p in m.parameters()}


def backbone_groups(model: ChestXrayClassifier, lr: float, layer_decay: float | None) -> list[dict]:
    """The backbone's optimiser groups: one at ``lr``, or with layer-wise learning-rate decay one per depth.

    Layer-wise decay (Howard & Ruder 2018; Bao et al. 2022) gives the top of the backbone (the
    stages after the last block) ``lr``, each stage below ``layer_decay`` times the rate of the
    one above, and the stem the lowest: the generic low-level filters move least.
    """
    backbone = model.backbone
    if layer_decay is None:
        return [{"params": list(backbone.parameters()), "lr": lr}]
    top = len(backbone_stages(model, "optim.layer_decay")) + 1
    by_depth: dict[int, list] = {}
    for name, parameter in backbone.named_parameters():
        if name.startswith("blocks."):
            depth = int(name.split(".")[1]) + 1
        else:
            depth = 0 if name.startswith(("conv_stem.", "bn1.")) else top
        by_depth.setdefault(depth, []).append(parameter)
    return [{"params": params, "lr": lr * layer_decay ** (top - depth)} for depth, params in sorted(by_depth.items())]


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's randomness (dropout, drop-path): resumed runs draw the same."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])


class ChestXrayModule(L.LightningModule):
    def __init__(
        self,
        model: ChestXrayClassifier,
        loss: MultiLabelLoss,
        optim: OptimConfig,
        findings: list[str],
        seed: int = SEED,
        freeze_bn: bool = False,
        channels_last: bool = False,
        tta: bool = False,
        trainable_blocks: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.optim = optim
        self.findings = list(findings)
        self.seed = seed
        self.freeze_bn = freeze_bn
        self.channels_last = channels_last
        self.tta = tta
        self.trainable = trainable_parameters(model, trainable_blocks)
        n = len(findings)
        self.val_auroc = MultilabelAUROC(num_labels=n, average=None, thresholds=None, ignore_index=UNKNOWN)
        self.val_counts = LabelCounts(n)
        self._epoch_images = 0
        self._epoch_start = 0.0
        self._loss_sum, self._loss_images = torch.zeros(()), 0  # the epoch's loss so far, for its mean
        self._resumed_loss: tuple[torch.Tensor, int] | None = None
        self._epoch_begun: int | None = None
        self.last_val: dict = {}

    # ---- the backbone's state per epoch -------------------------------------------------
    def backbone_frozen(self) -> bool:
        return self.current_epoch < self.optim.head_only_epochs

    def _set_backbone_mode(self) -> None:
        frozen = self.backbone_frozen()
        for p in self.model.backbone.parameters():
            p.requires_grad_(not frozen and id(p) in self.trainable)
        for module in self.model.backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                # Frozen BatchNorm keeps ImageNet statistics: small batches of X-rays would skew them.
                # Stages that trainable_blocks leaves frozen keep theirs too, or their "frozen" output
                # would drift with the running statistics while their weights stay put.
                # Set both ways: a BatchNorm frozen in the head-only epochs trains again once its stage does (it
                # stayed in eval mode before, in a run continued from a checkpoint of the epoch before too).
                outside = not any(id(p) in self.trainable for p in module.parameters(recurse=False))
                module.train(not (frozen or self.freeze_bn or outside))

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(epoch_seed(self.seed, self.current_epoch))
        self._begin_epoch()

    def _begin_epoch(self) -> None:
        """The epoch's state: at its start, or, for a run continued between two of its batches (for which
        Lightning does not call ``on_train_epoch_start``; the random state is the checkpoint's), at its next
        batch."""
        self._set_backbone_mode()
        self._epoch_images, self._epoch_start = 0, time.perf_counter()
        if self._resumed_loss is not None:  # continued between two batches: the batches before count too
            (self._loss_sum, self._loss_images), self._resumed_loss = self._resumed_loss, None
        else:
            self._loss_sum, self._loss_images = torch.zeros((), device=self.device), 0
        self._epoch_begun = self.current_epoch

    def _unfreezing_epoch(self) -> bool:
        head_only = self.optim.head_only_epochs
        return head_only > 0 and self.current_epoch == head_only and self.optim.unfreeze_warmup

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._epoch_begun != self.current_epoch:
            self._begin_epoch()
        # The epoch that unfreezes the backbone ramps its learning rate up from zero:
        # Adam's first steps on parameters without history move each weight by about
        # the full learning rate, which knocks a pretrained backbone off its features.
        if self._unfreezing_epoch():
            groups = self._backbone_param_groups()
            if batch_idx == 0:
                self._backbone_lrs = [group["lr"] for group in groups]
            steps = max(1, int(self.trainer.num_training_batches))
            for group, lr in zip(groups, self._backbone_lrs):
                group["lr"] = lr * (batch_idx + 1) / steps

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The unfreezing epoch's target learning rates (its groups hold the ramped ones), for a run continued
        # between two of its batches (:mod:`cxrlearn.training.stopping`).
        # ... and the epoch's loss so far, for its mean.
        if hasattr(self, "_backbone_lrs"):
            checkpoint["cxrlearn_backbone_lrs"] = list(self._backbone_lrs)
        checkpoint["cxrlearn_epoch_loss"] = (self._loss_sum.detach().cpu(), self._loss_images)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "cxrlearn_backbone_lrs" in checkpoint:
            self._backbone_lrs = list(checkpoint["cxrlearn_backbone_lrs"])
        if "cxrlearn_epoch_loss" in checkpoint and between_batches(checkpoint):
            total, images = checkpoint["cxrlearn_epoch_loss"]
            self._resumed_loss = (total.to(self.device), int(images))

    def _backbone_param_groups(self) -> list[dict]:
        """The optimiser's backbone groups: all but the last, the head's (:meth:`configure_optimizers`)."""
        return self.optimizers().optimizer.param_groups[:-1]

    def on_train_epoch_end(self) -> None:
        # The epoch's mean loss, kept here rather than by Lightning (whose running mean a checkpoint does not hold,
        # so that a run continued between two batches would log the mean of the batches after them only).
        if self._loss_images:
            self.log("train/loss_epoch", self._loss_sum / self._loss_images, on_epoch=True)
        if self._unfreezing_epoch():
            for group, lr in zip(self._backbone_param_groups(), self._backbone_lrs):
                group["lr"] = lr
        seconds = time.perf_counter() - self._epoch_start
        if seconds > 0:
            self.log("train/images_per_sec", self._epoch_images / seconds * self.trainer.world_size, sync_dist=False)

    # ---- steps ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        loss = self.loss(self(images), labels)
        self._epoch_images += len(labels)
        self._loss_sum = self._loss_sum + loss.detach().float() * len(labels)
        self._loss_images += len(labels)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(labels))
        return loss

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        return flip_averaged(self, images) if self.tta else self(images)

    def validation_step(self, batch, batch_idx):
        images, labels, _ = batch
        logits = self.predict_logits(images)
        self.log("val/loss", self.loss(logits, labels), on_epoch=True, sync_dist=True, batch_size=len(labels))
        targets = torch.where(torch.isnan(labels), torch.full_like(labels, UNKNOWN), labels).int()
        self.val_auroc.update(torch.sigmoid(logits.float()), targets)
        self.val_counts.update(labels)

    def on_validation_epoch_end(self) -> None:
        aucs = self.val_auroc.compute()
        positives, known, count = self.val_counts.compute()
        defined = (positives > 0) & (positives < known)
        values = {}
        for name, auc, ok in zip(self.findings, aucs.tolist(), defined.tolist()):
            if ok:
                values[name] = auc
                self.log(f"val/auc/{name}", auc)
        mean = float(np.mean(list(values.values()))) if values else 0.5
        self.log(MONITOR, mean, prog_bar=True)
        self.last_val = {"mean_auc": mean, "auc": values, "n_images": int(count.item())}
        self.val_auroc.reset()
        self.val_counts.reset()
        plateau = self.lr_schedulers() if self.trainer.state.fn == "fit" else None
        if isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Stepped here, before the epoch's checkpoints are written, so that they hold the stepped state:
            # Lightning steps plateau schedulers after saving them and not again on resuming, which left a
            # resumed run one bad epoch short of the uninterrupted run's schedule.
            plateau.step(mean)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """Lightning's own stepping, except for the plateau scheduler, which :meth:`on_validation_epoch_end`
        steps."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()

    # ---- optimiser -----------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        lr = float(o.lr)
        decay = float(o.layer_decay) if o.layer_decay is not None else None
        # The head's group comes last (the unfreezing warm-up ramps every group before it).
        groups = backbone_groups(self.model, lr * float(o.backbone_lr_scale), decay) + [
            {"params": list(self.model.head.parameters()), "lr": lr},
        ]
        wd = float(o.weight_decay)
        if o.name == "adam":
            optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=wd)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
        if o.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=float(o.plateau_factor), patience=int(o.plateau_patience)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": MONITOR, "interval": "epoch"}}
        if o.scheduler == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            per_epoch = total / max(1, self.trainer.max_epochs)
            warmup = int(float(o.warmup_epochs) * per_epoch)

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return optimizer
