"""Heads on frozen backbone maps: a cheap diagnostic beside benchmarks/real_photos.py.

The shared ImageNet EfficientNet-Lite0 (mean = std = 0.5) runs once, without gradients, on every real
CUB photo of ``../shared/realdata/CUB_200_2011_first25`` (224 px centre view of the 256 px resize, no
augmentation; the same train/val/test split as benchmarks/real_photos.py). Its stage maps (stages 2-4:
40x28x28, 112x14x14 and the 1280x7x7 map after conv_head/bn2) are kept in memory (fp16), and each head of
:data:`HEADS` is trained on them alone (SGD, momentum 0.9, cosine per step, batch 32, seed 0),
selected on validation and tested once. It asks one question the fine-tune cannot answer cheaply:
on the same features, does a head train to the accuracy of the linear head, and which of its parts
(or settings: lr, aux-loss weight, width) costs accuracy? It is not the paper's protocol (the backbone
is not fine-tuned).

    nice -n 5 python benchmarks/head_probe.py                       # every head
    nice -n 5 python benchmarks/head_probe.py --heads linear,mgff --epochs 30
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_photos import DATA_ROOT, DEFAULT_OUT, WEIGHTS, build_datamodule  # noqa: E402

from mgff.models.backbone import TimmBackbone  # noqa: E402
from mgff.models.fusion import MGFFHead  # noqa: E402
from mgff.models.heads import LinearHead  # noqa: E402

# name -> (head kind, head kwargs, aux-loss weight, lr)
HEADS = {
    "linear": ("linear", {}, 0.0, 0.1),
    "mgff": ("mgff", {}, 0.1, 0.1),
    "mgff_no_attention": ("mgff", dict(use_attention=False), 0.1, 0.1),
    "mgff_no_se": ("mgff", dict(use_se=False), 0.1, 0.1),
    "mgff_no_gcn": ("mgff", dict(use_gcn=False), 0.1, 0.1),
    "mgff_no_readout_norm": ("mgff", dict(readout_norm=False), 0.1, 0.1),
    "mgff_aux0": ("mgff", {}, 0.0, 0.1),
    "mgff_lr0.01": ("mgff", {}, 0.1, 0.01),
    "mgff_last_map_only": ("mgff_last", {}, 0.1, 0.1),
}


@torch.no_grad()
def extract(out: Path, batch_size: int = 16) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    data = build_datamodule(out, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    # the evaluation transform for every split: one fixed view per image
    data.datasets["train"].transform = data.datasets["val"].transform
    backbone = TimmBackbone("efficientnet_lite0", out_indices=(2, 3, 4), pretrained=str(WEIGHTS)).eval()
    features = {}
    for split in ("train", "val", "test"):
        maps, labels = None, []
        loader = torch.utils.data.DataLoader(data.datasets[split], batch_size=batch_size, collate_fn=data._loader(split, False).collate_fn)
        for batch in loader:
            outputs = [o.half() for o in backbone(batch["image"])]  # half the memory; heads run in fp32
            maps = [[o] for o in outputs] if maps is None else [m + [o] for m, o in zip(maps, outputs)]
            labels.append(batch["label"])
        features[split] = ([torch.cat(m) for m in maps], torch.cat(labels))
    return features, backbone.feature_channels, backbone.feature_reductions, data.num_classes


def build_head(kind, kwargs, channels, reductions, num_classes):
    if kind == "linear":
        return LinearHead(channels, reductions, num_classes, dropout=0.1)
    if kind == "mgff_last":
        return MGFFHead(channels[-1:], reductions[-1:], num_classes, **kwargs)
    return MGFFHead(channels, reductions, num_classes, **kwargs)


def accuracy(head, maps, labels, kind, batch_size=64) -> float:
    head.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            x = [m[i:i + batch_size].float() for m in maps]
            x = x[-1:] if kind == "mgff_last" else x
            correct += (head(x).logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / len(labels)


def train_head(name, features, channels, reductions, num_classes, epochs, batch_size=32):
    kind, kwargs, aux_weight, lr = HEADS[name]
    torch.manual_seed(0)
    head = build_head(kind, kwargs, channels, reductions, num_classes)
    decay = [p for p in head.parameters() if p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9)
    maps, labels = features["train"]
    steps = epochs * math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    best = (-1.0, 0, 0.0)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(labels), batch_size):
            idx = order[i:i + batch_size]
            x = [m[idx].float() for m in maps]
            out = head(x[-1:] if kind == "mgff_last" else x)
            loss = F.cross_entropy(out.logits, labels[idx]) + aux_weight * out.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = accuracy(head, *features["val"], kind)
        if val > best[0]:
            best = (val, epoch + 1, accuracy(head, *features["test"], kind))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not DATA_ROOT.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {DATA_ROOT} and {WEIGHTS}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    features, channels, reductions, num_classes = extract(DEFAULT_OUT)
    print(f"features extracted in {time.perf_counter() - start:.0f} s", flush=True)
    print("| head | best val top-1 | epoch | test top-1 at that epoch | seconds |\n|---|---|---|---|---|", flush=True)
    for name in args.heads.split(","):
        start = time.perf_counter()
        val, epoch, test = train_head(name, features, channels, reductions, num_classes, args.epochs)
        print(f"| {name} | {val:.3f} | {epoch}/{args.epochs} | {test:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
