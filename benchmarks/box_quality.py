"""Box quality of the localisers on real CUB photos: mIoU and hit@0.5 against the official boxes.

Data: ``../shared/realdata/CUB_200_2011_first25`` (real photos at their original resolution), the
DataModule's evaluation view of :mod:`benchmarks.real_photos` (resize 256 -> centre crop 224,
mean = std = 0.5) and the same view at ``--source-size`` (448 by default) as ``batch["source"]``. Boxes
are scored in the frame of that view (the frame the crop is cut from; the source view has the same
geometry, and IoU does not change with scale), against the official box moved through the same
resize and crop.

Localisers, each scored on ``--split`` (``test`` by default):

- ``centred box``: a fixed box of ``f`` x the view's side around its centre, ``f`` chosen on the
  validation split (the best fixed box; about mIoU 0.51 / hit 0.55 on the held-back classes);
- ``features`` (:class:`~mgff.models.cropper.feature_localizer.FeatureLocalizer`) with every response
  that the model's head allows (``refined`` and ``energy``; ``cam`` for a linear head; ``attention`` for an
  MGFF head),
  on the stage-1 maps at 224 px (free: the maps of stage 1's own forward) and at ``--source-size``
  (``localize_size``: one more backbone pass on the source view), for
  - the shared ImageNet EfficientNet-Lite0 weights, frozen (``imagenet``), and
  - every ``--checkpoint name=path`` (a :mod:`benchmarks.real_photos` run, fine-tuned on class labels);
- ``rollout`` / ``column_sum`` (the ViT localisers): no ViT weights exist offline, so only their cost.

Cost: FLOPs per image (``torch.utils.flop_counter``) of one stage, of the localisation, of the two-stage
forward, as a ratio to one stage.

    nice -n 5 python benchmarks/box_quality.py --checkpoint linear=runs/real_photos/linear/best.ckpt \\
        --checkpoint mgff=runs/real_photos/mgff/best.ckpt
    python benchmarks/box_quality.py --split val ...      # the comparison that picks the default
    ... --figure docs/figures/real_birds_localisation.png --figure-model "linear (fine-tuned)"   # the README figure
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import count_flops, describe_machine, machine_info, print_table
from mgff.lit.two_stage import TwoStageClassifier
from mgff.metrics.box_iou import BoxIoU
from mgff.models.cropper.feature_localizer import FeatureLocalizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
DATA_ROOT = SHARED / "realdata" / "CUB_200_2011_first25"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0_imagenet.safetensors"
WEIGHTS_MEAN = WEIGHTS_STD = (0.5, 0.5, 0.5)
# the evaluation view of benchmarks/real_photos.py
DATA = dict(resize_size=256, crop_size=224, val_fraction=0.2, split_seed=0)
STAGE1 = dict(backbone="efficientnet_lite0", img_size=224, stages=[2, 3, 4], head="linear")
CENTRED_FRACTIONS = tuple(round(0.40 + 0.05 * i, 2) for i in range(12))  # 0.40 .. 0.95
VIT_LOCALIZERS = {"rollout ViT-B/16 @224": ("vit_base_patch16_224", 224), "rollout ViT-B/16 @384": ("vit_base_patch16_384", 384)}


def build_datamodule(source_size: int, batch_size: int = 25, num_workers: int = 0, cache_dir: str | None = None):
    from data_modules import CUB200DataModule

    return CUB200DataModule(
        root=str(DATA_ROOT), batch_size=batch_size, num_workers=num_workers, mean=WEIGHTS_MEAN, std=WEIGHTS_STD,
        source_size=source_size, persistent_workers=False, pin_memory=False, cache_dir=cache_dir, **DATA,
    )


def split_loader(datamodule, split: str):
    datamodule.setup("fit" if split in ("train", "val") else "test")
    return {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()


def features_model(num_classes: int, checkpoint: str | Path | None = None, **overrides: Any) -> TwoStageClassifier:
    """A two-stage model with ``localization='features'``: the shared ImageNet weights (head unused by
    ``energy``) or the stage 1 of a fine-tuned classifier's checkpoint."""
    if checkpoint is not None:
        return TwoStageClassifier.from_stage1_checkpoint(checkpoint, **overrides).eval()
    kwargs = dict(STAGE1, num_classes=num_classes, pretrained=str(WEIGHTS), localization="features")
    kwargs.update(data_mean=list(WEIGHTS_MEAN), data_std=list(WEIGHTS_STD), backbone_mean=list(WEIGHTS_MEAN), backbone_std=list(WEIGHTS_STD))
    return TwoStageClassifier(**{**kwargs, **overrides}).eval()


def responses_for(model: TwoStageClassifier) -> list[str]:
    """The ``features`` responses the model allows: ``refined`` and ``energy`` only for the frozen ImageNet
    weights (their head is untrained), else also ``cam`` (linear head) or ``attention`` (MGFF head)."""
    if model.hparams.pretrained:  # built from the weights file, not from a fine-tuned checkpoint
        return ["refined", "energy"]
    return ["refined", "energy", "cam"] if model.hparams.head == "linear" else ["refined", "energy", "attention"]


def centred_boxes(batch: int, size: tuple[int, int], fraction: float) -> torch.Tensor:
    """``(batch, 4)`` xyxy boxes of ``fraction`` x each side around the centre of an ``(H, W)`` view."""
    height, width = size
    box = torch.tensor([width * (1 - fraction) / 2, height * (1 - fraction) / 2, width * (1 + fraction) / 2, height * (1 + fraction) / 2])
    return box.expand(batch, 4)


def best_centred_fraction(loader, limit: int | None = None) -> float:
    """The fixed centred box fraction with the highest hit@0.5 (then mIoU) on ``loader``."""
    metrics = {f: BoxIoU() for f in CENTRED_FRACTIONS}
    for batch in limited(loader, limit):
        for fraction, metric in metrics.items():
            metric.update(centred_boxes(len(batch["box"]), batch["image"].shape[-2:], fraction), batch["box"].float())
    scores = {f: m.compute() for f, m in metrics.items()}
    return max(scores, key=lambda f: (float(scores[f]["hit_rate"]), float(scores[f]["miou"])))


def limited(loader, limit: int | None):
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            return
        if limit is not None and seen + len(batch["box"]) > limit:
            batch = {k: v[: limit - seen] for k, v in batch.items()}
        seen += len(batch["box"])
        yield batch


@torch.no_grad()
def score_localizers(models: dict[str, TwoStageClassifier], loader, source_size: int, centred_fraction: float, limit: int | None = None) -> list[dict[str, Any]]:
    """mIoU and hit@0.5 of the centred box and of every ``features`` response of every model, with the map
    of stage 1's own forward (at the view's size) and of a pass at ``source_size`` on the source view.

    The 224 px maps are exactly what ``localize()`` reads in the model; the ``source_size`` maps are what it
    reads with ``localize_size=source_size`` (the model's own ``stage1_with_maps`` on the source view)."""
    metrics: dict[tuple[str, str, int], BoxIoU] = {("centred box", f"f={centred_fraction:.2f} (chosen on val)", 0): BoxIoU()}
    grids: dict[tuple[str, str, int], str] = {}
    for batch in limited(loader, limit):
        images, gt = batch["image"], batch["box"].float()
        size = tuple(images.shape[-2:])
        metrics[("centred box", f"f={centred_fraction:.2f} (chosen on val)", 0)].update(centred_boxes(len(gt), size, centred_fraction), gt)
        for name, model in models.items():
            for side in (size[0], source_size):
                view = images if side == size[0] else model.input_norm.data_from_unit(batch["source"].float() / 255.0)
                output, maps = model.stage1_with_maps(view)
                for response in responses_for(model):
                    key = (f"features: {response}", name, side)
                    grid = maps[-2 if response == "refined" else -1].shape[-2:]  # refined: on the finer map's grid
                    grids[key] = f"{side} px ({grid[0]}x{grid[1]})"
                    _, boxes = FeatureLocalizer(response)(maps, size, model.head, output.logits)
                    metrics.setdefault(key, BoxIoU()).update(boxes, gt)
    rows = []
    for (localizer, weights, side), metric in metrics.items():
        values = metric.compute()
        rows.append(dict(localizer=localizer, weights=weights, map=grids.get((localizer, weights, side), "-"), miou=float(values["miou"]), hit50=float(values["hit_rate"]), images=int(metric.count)))
    return rows


def cost_rows(num_classes: int, source_size: int) -> list[dict[str, Any]]:
    """FLOPs per image of one stage, of each localisation, of the two-stage forward (ratio to one stage)."""
    images = torch.randn(1, 3, 224, 224)
    model = features_model(num_classes)
    one_stage = count_flops(lambda: model.classify(images))[0]
    rows = [dict(what="one stage (EfficientNet-Lite0 @224, linear head)", gflops=one_stage / 1e9, ratio=1.0, params_m=0.0)]
    for side, label in ((None, "224 px: stage 1's own maps"), (source_size, f"{source_size} px: one more backbone pass")):
        two = features_model(num_classes, localize_size=side)
        source = torch.randint(0, 256, (1, 3, source_size, source_size), dtype=torch.uint8) if side else None
        loc = count_flops(lambda: two.localize(images, source=source))[0]
        full = count_flops(lambda: two.forward_outputs(images, {"source": source} if side else None))[0]
        rows.append(dict(what=f"features localisation, {label}", gflops=loc / 1e9, ratio=loc / one_stage, params_m=0.0))
        rows.append(dict(what=f"two-stage forward, features @ {label.split(':')[0]}", gflops=full / 1e9, ratio=full / one_stage, params_m=0.0))
    for label, (vit_name, side) in VIT_LOCALIZERS.items():
        vit = TwoStageClassifier(**STAGE1, num_classes=num_classes, localization="rollout", cropper=vit_name, cropper_pretrained=False).eval()
        loc = count_flops(lambda: vit.localize(images))[0]
        params = sum(p.numel() for p in vit.cropper.parameters()) / 1e6
        rows.append(dict(what=f"{label} localisation (no weights offline: cost only)", gflops=loc / 1e9, ratio=loc / one_stage, params_m=params))
        del vit
    return rows


@torch.no_grad()
def save_figure(model: TwoStageClassifier, datamodule, path: str | Path, num_images: int = 5, split: str = "test", seed: int = 0) -> Path:
    """A few birds of ``split`` (seeded): the response map, predicted (red) and official (green) boxes with their
    IoU, and the crop stage 2 gets, cut from the source view (``crop_from='source'``), as a PNG for the README."""
    from mgff.metrics.box_iou import paired_box_iou
    from mgff.viz.dataset import sample_batch
    from mgff.viz.localization import crop_titles, localization_panel

    batch = sample_batch(datamodule, split, num_images=num_images, seed=seed)
    images, source = batch["image"], batch.get("source")
    crop = model.localize(images, source, boxes=batch["box"])
    iou = paired_box_iou(crop.boxes, batch["box"].float())
    names = [datamodule.class_names[y].split(".")[-1].replace("_", " ") for y in batch["label"].tolist()]
    frame = source if model.hparams.crop_from == "source" else images
    figure = localization_panel(
        images, crop.response, crop.boxes, crop.crops, batch["box"], titles=[f"{n}\nIoU {v:.2f}" for n, v in zip(names, iou.tolist())],
        crop_titles=crop_titles(crop.boxes, images.shape[-2:], frame.shape[-2:], model.hparams.crop_from, crop.crops.shape[-1]),
        mean=datamodule.mean, std=datamodule.std,
    )
    figure.suptitle(f"features localiser ({model.hparams.feature_response}, map at {model.hparams.localize_size or images.shape[-1]} px): "
                    "predicted box red, official box green; below, the crop stage 2 classifies", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--checkpoint", action="append", default=[], help="name=path of a fine-tuned classifier checkpoint; repeatable")
    parser.add_argument("--source-size", type=int, default=448, help="side of the source view the finer maps are computed on")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images (quick checks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cost", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--figure", type=Path, help="also save a few test birds with map, boxes and crop (PNG) here")
    parser.add_argument("--figure-model", default="imagenet (frozen)", help="weights name of the figure's model (a --checkpoint name + ' (fine-tuned)')")
    parser.add_argument("--figure-response", default="refined", help="its features response")
    args = parser.parse_args(argv)
    if not DATA_ROOT.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {DATA_ROOT} and {WEIGHTS} (the shared real data and weights)")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/box_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command.strip()}\n# {describe_machine(machine_info(torch.device('cpu')))}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    datamodule = build_datamodule(args.source_size)
    fraction = best_centred_fraction(split_loader(datamodule, "val"), args.limit)
    models = {"imagenet (frozen)": features_model(datamodule.num_classes)}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--checkpoint takes name=path, got {item!r}")
        models[f"{name} (fine-tuned)"] = features_model(datamodule.num_classes, path)
    start = time.perf_counter()
    rows = score_localizers(models, split_loader(datamodule, args.split), args.source_size, fraction, args.limit)
    columns = [("localizer", "localiser", "s"), ("weights", "weights", "s"), ("map", "map computed at (grid)", "s"), ("miou", "mIoU", ".3f"), ("hit50", "hit@0.5", ".3f"), ("images", "images", "d")]
    print_table(f"Box quality on the {args.split} split ({time.perf_counter() - start:.0f} s)", columns, rows)
    result = {"split": args.split, "rows": rows}
    if args.figure:
        checkpoints = {f"{n} (fine-tuned)": p for n, _, p in (c.partition("=") for c in args.checkpoint)}
        overrides = dict(localize_size=args.source_size, crop_from="source", feature_response=args.figure_response)
        figure_model = features_model(datamodule.num_classes, checkpoints.get(args.figure_model), **overrides)
        print(f"figure: {save_figure(figure_model, datamodule, args.figure)}")
    if not args.no_cost:
        cost = cost_rows(datamodule.num_classes, args.source_size)
        print_table("Cost per image (FLOPs, batch 1)", [("what", "what", "s"), ("gflops", "GFLOPs", ".3f"), ("ratio", "x one stage", ".2f"), ("params_m", "extra params (M)", ".1f")], cost)
        result["cost"] = cost
    return result


if __name__ == "__main__":
    main()
