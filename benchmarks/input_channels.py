"""One input channel (timm's in_chans=1, RGB filters summed) against gray repeated on three.

Both start from the same ImageNet weights and get the same uint8 batches; the
batch normalisation and the model's forward and backward pass are timed. Also
reports how far apart their outputs are (the summed-filter model sees the same
image, normalised with the mean of the three channels' statistics).

Usage: python benchmarks/input_channels.py [--backbones tf_efficientnet_lite0 efficientnet_b0] [--size 224]
"""

from __future__ import annotations

import time

import torch
from _common import machine, parser

from cxrlearn.data.pipeline.normalize import BatchTransform
from cxrlearn.model.backbones import backbone_config
from cxrlearn.model.classifier import ChestXrayClassifier
from cxrlearn.model.pretrained import load_backbone_weights


def step_time(model, transform, batch, repeats):
    model.train()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        x = transform(batch).contiguous(memory_format=torch.channels_last)
        model(x).sum().backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "efficientnet_b0"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"# 1 vs 3 input channels, {args.size} px, batch {args.batch_size}, fwd+bwd, channels_last; {machine()}")
    print("| backbone | 3 channels (img/s) | 1 channel (img/s) | max abs difference of pooled ImageNet features |")
    print("|---|---|---|---|")
    batch = torch.randint(0, 256, (args.batch_size, 1, args.size, args.size), dtype=torch.uint8)
    for name in args.backbones:
        cfg = backbone_config(name)
        models, rates = {}, {}
        for channels in (3, 1):
            torch.manual_seed(0)
            model = ChestXrayClassifier(name, in_chans=channels).to(memory_format=torch.channels_last)
            source = load_backbone_weights(model.backbone, name, use_hub=False, in_chans=channels)
            transform = BatchTransform(cfg.mean, cfg.std, channels=channels)
            rates[channels] = args.batch_size / step_time(model, transform, batch, args.repeats)
            models[channels] = (model.eval(), transform)
        with torch.no_grad():
            out = {c: m.backbone(t(batch).contiguous(memory_format=torch.channels_last)) for c, (m, t) in models.items()}
        # Only meaningful where both carry the same pretrained weights.
        difference = "n/a (no offline weights)" if source.kind == "none" else f"{(out[3] - out[1]).abs().max().item():.3f}"
        print(f"| {name} | {rates[3]:.2f} | {rates[1]:.2f} | {difference} |")


if __name__ == "__main__":
    main()
