"""Box quality of the localisers on real CUB photos: mIoU and hit@0.5 against the official boxes.

Data: ``--root`` (any CUB_200_2011-layout folder, any subset of classes; default the shared real photos of classes
1-25, :mod:`benchmarks.real_data`) read from the originals, the split and evaluation view of the config of
:mod:`benchmarks.real_photos`' run ``linear_best`` (resize ``--resize`` 256 -> centre crop ``--crop`` 224,
normalised with ``--mean``/``--std``) and the same view at ``--source-size`` (448 by default) as ``batch["source"]``.
Boxes are scored in the frame of that view (the frame the crop is cut from; the source view has the same geometry,
and IoU does not change with scale), against the official box moved through the same resize and crop.

Localisers, each scored on ``--split`` (``test`` by default):

- ``centred box``: a fixed box of ``f`` x the view's side around its centre, ``f`` chosen on the
  validation split (the best fixed box; about mIoU 0.51 / hit 0.55 on the held-back classes);
- ``features`` (:class:`~mgff.models.cropper.feature_localizer.FeatureLocalizer`, the default box rule) with every
  response that the model's head allows (``refined`` and ``energy``; ``cam`` for a linear head; ``attention`` for an
  MGFF head), on the stage-1 maps at the view's side (free: the maps of stage 1's own forward) and at
  ``--source-size`` (``localize_size``: one more backbone pass on the source view), for
  - the ``--weights`` (EfficientNet-Lite0, ImageNet by default), frozen (``imagenet``), and
  - every ``--checkpoint NAME=PATH`` (a :mod:`benchmarks.real_photos` run, fine-tuned on class labels);
- ``as trained``: every ``--checkpoint NAME=PATH``'s own localiser, one row named ``NAME``: its ``features``
  response (``feature_response``), its box rule (``box_threshold``, ``box_mode``, ``box_padding``,
  ``min_box_size``) and its side: a two-stage checkpoint's ``localize_size`` if set, else its stage-1 input side
  ``img_size`` (384 for a model trained at 384). A single-stage checkpoint gets
  :class:`~mgff.lit.TwoStageClassifier`'s defaults for the response and the rule. The map is read as the model
  reads it (:meth:`~mgff.lit.TwoStageClassifier.localize_from_features`): stage 1's own maps when the side is the
  view's, else one pass on the source view resized to the side (``--source-size`` must be at least the side);
- ``rollout`` / ``column_sum`` (the ViT localisers): no ViT weights exist offline, so only their cost.

``--out DIR`` writes the table as ``DIR/boxes.csv`` (its columns: localizer, weights, map, miou, hit50, images).

Cost: FLOPs per image (``torch.utils.flop_counter``) of one stage, of the localisation, of the two-stage
forward, as a ratio to one stage.

    nice -n 5 python benchmarks/box_quality.py --checkpoint linear=runs/real_photos/linear/best.ckpt \\
        --checkpoint mgff=runs/real_photos/mgff/best.ckpt --out runs/box_quality
    python benchmarks/box_quality.py --split val ...      # the comparison that picks the default
    python benchmarks/box_quality.py --root /data/CUB_200_2011 --weights my_lite0.safetensors --mean 0.485 0.456 0.406 \\
        --std 0.229 0.224 0.225 --checkpoint mine=runs/mine/best.ckpt
    ... --figure docs/figures/real_birds_localisation.png --figure-model "linear (fine-tuned)"   # the README figure
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import real_data  # noqa: E402
from benchmarks.measure import count_flops, describe_machine, machine_info, print_table  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402
from benchmarks import real_photos  # noqa: E402
from mgff.lit import FineGrainedClassifier  # noqa: E402
from mgff.lit.checkpoint import resolve_model_class  # noqa: E402
from mgff.lit.two_stage import TwoStageClassifier  # noqa: E402
from mgff.metrics.box_iou import BoxIoU  # noqa: E402
from mgff.models.cropper.feature_localizer import FeatureLocalizer  # noqa: E402

STAGE1 = dict(backbone="efficientnet_lite0", stages=[2, 3, 4], head="linear")  # the frozen --weights' model
CENTRED_FRACTIONS = tuple(round(0.40 + 0.05 * i, 2) for i in range(12))  # 0.40 .. 0.95
VIT_LOCALIZERS = {"rollout ViT-B/16 @224": ("vit_base_patch16_224", 224), "rollout ViT-B/16 @384": ("vit_base_patch16_384", 384)}
COLUMNS = [("localizer", "localiser", "s"), ("weights", "weights", "s"), ("map", "map computed at (grid)", "s"),
           ("miou", "mIoU", ".3f"), ("hit50", "hit@0.5", ".3f"), ("images", "images", "d")]


VIEW_RUN = "linear_best"  # the runner's run whose data (split and evaluation view) the boxes are scored on


def build_datamodule(source: RealData, source_size: int, batch_size: int = 25, num_workers: int = 0,
                     resize_size: int | None = None, crop_size: int | None = None):
    """The CUB DataModule on ``source``'s originals (no resized cache: the source view needs the full photo), built
    from the config of the runner's :data:`VIEW_RUN` (:func:`benchmarks.real_photos.build_datamodule`): its split
    (``val_fraction``, ``split_seed``) and evaluation view (``resize_size``/``crop_size`` unless given), plus the
    view at ``source_size``."""
    sizes = {k: v for k, v in dict(resize_size=resize_size, crop_size=crop_size).items() if v is not None}
    options = real_photos.data_options(source_size=source_size, batch_size=batch_size, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=False, **sizes)
    return real_photos.build_datamodule(real_photos.RUNS[VIEW_RUN], source, cache=None, extra=options)


def split_loader(datamodule, split: str):
    datamodule.setup("fit" if split in ("train", "val") else "test")
    return {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()


def features_model(num_classes: int, source: RealData = RealData(), img_size: int = 224, **overrides: Any) -> TwoStageClassifier:
    """A two-stage model with ``localization='features'`` around EfficientNet-Lite0 with ``source``'s weights and
    normalisation, frozen (its head is untrained: only the responses that do not read it are scored)."""
    kwargs = dict(STAGE1, num_classes=num_classes, img_size=img_size, localization="features", **source.model_kwargs())
    return TwoStageClassifier(**{**kwargs, **overrides}).eval()


def checkpoint_model(name: str, path: str | Path, source: RealData, **overrides: Any) -> TwoStageClassifier:
    """The stage 1 of ``--checkpoint name=path`` as a ``features`` two-stage model, for batches normalised as
    ``source`` says (the backbone's own normalisation comes from the checkpoint). The checkpoint is untrusted input:
    read with ``weights_only=True``, plain hyperparameters only; one of another model exits naming the file."""
    checkpoint = real_data.read_checkpoint(path, f"--checkpoint {name}=")
    class_path = checkpoint["hyper_parameters"].get("_class_path")
    try:
        if class_path is not None:
            resolve_model_class(class_path, FineGrainedClassifier, str(path))
        model = TwoStageClassifier.from_stage1_checkpoint(
            path, data_mean=list(source.mean), data_std=list(source.std), compile=False, **overrides)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise SystemExit(f"--checkpoint {name}={path}: not a checkpoint of an mgff FineGrainedClassifier or TwoStageClassifier "
                         f"that fits its own hyperparameters ({type(err).__name__}: {err})") from None
    return model.eval()


@dataclass(frozen=True)
class TrainedLocalizer:
    """A checkpoint's own ``features`` localiser as trained: the model (its response and box rule in its
    ``feature_localizer``), the side its map is computed at, and the row's labels."""

    model: TwoStageClassifier
    side: int
    rule: str  # the localiser column: response and box rule
    map: str  # the map column: side and grid


def trained_localizer(name: str, path: str | Path, source: RealData, view_side: int, source_size: int) -> TrainedLocalizer | None:
    """``--checkpoint name=path``'s own localiser (``None``, with a note, when it was trained with another localiser
    than ``features``: the ground-truth box or a ViT).

    The side: ``localize_size`` if the checkpoint sets it, else its ``img_size`` (else the view's). A map at the
    view's side is stage 1's own (``localize_size=None``); another side is one pass on the source view resized to it,
    so it must not exceed ``source_size``."""
    hparams = real_data.read_checkpoint(path, f"--checkpoint {name}=")["hyper_parameters"]
    localization = hparams.get("localization", "features")  # a single-stage checkpoint has no localiser hparams
    if localization != "features":
        print(f"--checkpoint {name}: trained with localization={localization!r}; no 'as trained' row (it scores features localisers)", file=sys.stderr)
        return None
    side = int(hparams.get("localize_size") or hparams.get("img_size") or view_side)
    if side != view_side and side > source_size:
        raise SystemExit(f"--checkpoint {name}={path} reads its map at {side} px, which is cut from the source view: "
                         f"set --source-size to at least {side} (got {source_size})")
    localize_size = side if hparams.get("localize_size") or side != view_side else None
    model = checkpoint_model(name, path, source, localize_size=localize_size)
    hp = model.hparams
    with torch.no_grad():
        _, maps = model.stage1_with_maps(torch.zeros(1, 3, side, side))
    grid = maps[-2 if hp.feature_response == "refined" else -1].shape[-2:]
    rule = (f"as trained: {hp.feature_response}, threshold {hp.box_threshold}, {hp.box_mode}, "
            f"padding {hp.box_padding:g}, min {hp.min_box_size:g}")
    return TrainedLocalizer(model, side, rule, f"{side} px ({grid[0]}x{grid[1]})")


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
def score_localizers(models: dict[str, TwoStageClassifier], loader, source_size: int, centred_fraction: float, limit: int | None = None,
                     trained: dict[str, TrainedLocalizer] | None = None) -> list[dict[str, Any]]:
    """mIoU and hit@0.5 of the centred box, of every ``features`` response of every model (the default box rule)
    with the map of stage 1's own forward (at the view's size) and of a pass at ``source_size`` on the source view,
    and of every ``trained`` localiser as its checkpoint trained it (one row each, named by its key).

    The view-side maps are exactly what ``localize()`` reads in the model; the ``source_size`` maps are what it
    reads with ``localize_size=source_size`` (the model's own ``stage1_with_maps`` on the source view). Each row:
    ``localizer``, ``weights``, ``map`` (side and grid), ``miou``, ``hit50``, ``images``."""
    trained = trained or {}
    centred = ("centred box", f"f={centred_fraction:.2f} (chosen on val)", 0)
    metrics: dict[tuple[str, str, int], BoxIoU] = {centred: BoxIoU()}
    grids: dict[tuple[str, str, int], str] = {}
    for batch in limited(loader, limit):
        images, gt = batch["image"], batch["box"].float()
        size = tuple(images.shape[-2:])
        metrics[centred].update(centred_boxes(len(gt), size, centred_fraction), gt)
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
        for name, localizer in trained.items():
            key = (localizer.rule, name, localizer.side)
            grids[key] = localizer.map
            boxes = localizer.model.localize_from_features(images, source=batch["source"]).boxes
            metrics.setdefault(key, BoxIoU()).update(boxes, gt)
    rows = []
    for (localizer, weights, side), metric in metrics.items():
        values = metric.compute()
        rows.append(dict(localizer=localizer, weights=weights, map=grids.get((localizer, weights, side), "-"), miou=float(values["miou"]), hit50=float(values["hit_rate"]), images=int(metric.count)))
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """The table as CSV: one line per row, the columns of :data:`COLUMNS` (their keys as the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows({key: row[key] for key, _, _ in COLUMNS} for row in rows)
    return path


def cost_rows(num_classes: int, source: RealData, source_size: int, view_side: int = 224) -> list[dict[str, Any]]:
    """FLOPs per image of one stage, of each localisation, of the two-stage forward (ratio to one stage)."""
    images = torch.randn(1, 3, view_side, view_side)
    model = features_model(num_classes, source, view_side)
    one_stage = count_flops(lambda: model.classify(images))[0]
    rows = [dict(what=f"one stage (EfficientNet-Lite0 @{view_side}, linear head)", gflops=one_stage / 1e9, ratio=1.0, params_m=0.0)]
    for side, label in ((None, f"{view_side} px: stage 1's own maps"), (source_size, f"{source_size} px: one more backbone pass")):
        two = features_model(num_classes, source, view_side, localize_size=side)
        source_view = torch.randint(0, 256, (1, 3, source_size, source_size), dtype=torch.uint8) if side else None
        loc = count_flops(lambda: two.localize(images, source=source_view))[0]
        full = count_flops(lambda: two.forward_outputs(images, {"source": source_view} if side else None))[0]
        rows.append(dict(what=f"features localisation, {label}", gflops=loc / 1e9, ratio=loc / one_stage, params_m=0.0))
        rows.append(dict(what=f"two-stage forward, features @ {label.split(':')[0]}", gflops=full / 1e9, ratio=full / one_stage, params_m=0.0))
    for label, (vit_name, side) in VIT_LOCALIZERS.items():
        vit = TwoStageClassifier(**STAGE1, img_size=view_side, num_classes=num_classes, localization="rollout", cropper=vit_name, cropper_pretrained=False).eval()
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
    frame_name = model.crop_frame(source)
    frame = source if frame_name == "source" else images
    figure = localization_panel(
        images, crop.response, crop.boxes, crop.crops, batch["box"], titles=[f"{n}\nIoU {v:.2f}" for n, v in zip(names, iou.tolist())],
        crop_titles=crop_titles(crop.boxes, images.shape[-2:], frame.shape[-2:], frame_name, crop.crops.shape[-1]),
        mean=datamodule.mean, std=datamodule.std,
    )
    figure.suptitle(f"features localiser ({model.hparams.feature_response}, map at {model.hparams.localize_size or images.shape[-1]} px): "
                    "predicted box red, official box green; below, the crop stage 2 classifies", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    return path


def parse_checkpoints(items: list[str]) -> dict[str, Path]:
    """``--checkpoint NAME=PATH`` options -> ``{NAME: PATH}`` (names distinct)."""
    checkpoints: dict[str, Path] = {}
    for item in items:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SystemExit(f"--checkpoint takes NAME=PATH, got {item!r}")
        if name in checkpoints:
            raise SystemExit(f"--checkpoint {name}= given twice: names label the rows, so they must differ")
        checkpoints[name] = Path(path)
    return checkpoints


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="a fine-tuned classifier checkpoint: every response at the view's side and --source-size, and its own localiser "
                             "as trained (row NAME); repeatable")
    parser.add_argument("--source-size", type=int, default=448, help="side of the source view the finer maps are computed on")
    parser.add_argument("--resize", type=int, default=None, help=f"the view: resize the shorter side to this (default the runner's {VIEW_RUN}: 256)")
    parser.add_argument("--crop", type=int, default=None,
                        help=f"the view: centre crop of this side, the frame boxes are scored in (default the runner's {VIEW_RUN}: 224)")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images (quick checks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the table to DIR/boxes.csv")
    parser.add_argument("--no-cost", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--figure", type=Path, help="also save a few test birds with map, boxes and crop (PNG) here")
    parser.add_argument("--figure-model", default="imagenet (frozen)", help="weights name of the figure's model (a --checkpoint name + ' (fine-tuned)')")
    parser.add_argument("--figure-response", default="refined", help="its features response")
    real_data.add_arguments(parser)
    args = parser.parse_args(argv)
    checkpoints = parse_checkpoints(args.checkpoint)
    figure_models = ["imagenet (frozen)", *(f"{name} (fine-tuned)" for name in checkpoints)]
    if args.figure and args.figure_model not in figure_models:
        raise SystemExit(f"--figure-model {args.figure_model!r} is none of the scored models {figure_models}")
    source = real_data.from_args(args).check()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/box_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command.strip()}\n# {describe_machine(machine_info(torch.device('cpu')))}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    datamodule = build_datamodule(source, args.source_size, args.batch_size, resize_size=args.resize, crop_size=args.crop)
    args.crop = datamodule.crop_size  # the view's side, the run's unless --crop
    models = {f"{name} (fine-tuned)": checkpoint_model(name, path, source) for name, path in checkpoints.items()}
    trained = {name: trained_localizer(name, path, source, args.crop, args.source_size) for name, path in checkpoints.items()}
    fraction = best_centred_fraction(split_loader(datamodule, "val"), args.limit)
    models = {"imagenet (frozen)": features_model(datamodule.num_classes, source, args.crop), **models}
    start = time.perf_counter()
    rows = score_localizers(models, split_loader(datamodule, args.split), args.source_size, fraction, args.limit,
                            {name: t for name, t in trained.items() if t is not None})
    print_table(f"Box quality on the {args.split} split ({time.perf_counter() - start:.0f} s)", COLUMNS, rows)
    result = {"split": args.split, "rows": rows}
    if args.out:
        print(f"table: {write_csv(rows, args.out / 'boxes.csv')}")
    if args.figure:
        overrides = dict(localize_size=args.source_size, crop_from="source", feature_response=args.figure_response)
        named = {f"{name} (fine-tuned)": name for name in checkpoints}
        if args.figure_model in named:
            figure_model = checkpoint_model(named[args.figure_model], checkpoints[named[args.figure_model]], source, **overrides)
        else:  # the frozen --weights
            figure_model = features_model(datamodule.num_classes, source, args.crop, **overrides)
        print(f"figure: {save_figure(figure_model, datamodule, args.figure)}")
    if not args.no_cost:
        cost = cost_rows(datamodule.num_classes, source, args.source_size, args.crop)
        print_table("Cost per image (FLOPs, batch 1)", [("what", "what", "s"), ("gflops", "GFLOPs", ".3f"), ("ratio", "x one stage", ".2f"), ("params_m", "extra params (M)", ".1f")], cost)
        result["cost"] = cost
    return result


if __name__ == "__main__":
    main()
