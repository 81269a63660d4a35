"""The frozen two-stage baseline: a frozen ImageNet backbone, the box of its own map, a zoomed crop, linear heads.

The strongest cheap baseline of the paper's two-stage claim: nothing of the backbone is trained, so whatever the
crop adds here comes from zooming in on the object, not from fine-tuning. The model and the data are those of
``experiments/lite0/two_stage.yaml`` (:data:`RUN`, built by the project's CLI with ``--root`` / ``--weights`` /
``--mean`` / ``--std``): EfficientNet-Lite0, stages 2-4, its split (training photos minus the stratified 20 %
validation split, the official test photos) and its evaluation view (resize 256, centre crop 224) with the same
view at 448 px as ``batch["source"]`` (``data.source_size``). Once per photo, frozen (eval mode, no gradient):

- ``view``: the 224 px view's last map (1280x7x7);
- ``box224``: the box of the frozen ``refined`` response of that map, with the config's box rule
  (:class:`~mgff.models.cropper.feature_localizer.FeatureLocalizer`, exactly what ``two_stage.yaml``'s stage 1
  does: about 2x one stage's FLOPs with its crop);
- ``box448``: the same response and rule on the map of the source view at 448 px (14x14: what
  ``--model.init_args.localize_size=448`` does; about 6x one stage);
- ``crop224`` / ``crop448``: the last map of the crop of that box, cut from the 448 px source view and resized to
  224 (:meth:`~mgff.lit.TwoStageClassifier.cut_crops`, ``crop_from: source``);
- ``whole448``: the last map of the whole source view at 448 px (a control: more pixels, no zoom);
- every one of them also for the photo flipped left-right (the view, the source and the crop flipped: the crop's
  own flip stands for the flipped photo's crop), the one augmentation, as in :mod:`benchmarks.head_probe`.

A map is stored as the mean over positions of its per-position channel standardisation (``(N, C)``), which is
exact for the linear head: :class:`~mgff.models.heads.LinearHead` is LayerNorm2d -> mean over positions ->
Linear, and the LayerNorm's affine commutes with the mean, so :class:`PooledLinearHead` (the same parameters, on
those vectors) gives the same logits (tested). Features are cached on disk like the probe's maps
(``runs/frozen_two_stage/cache/<root>-<hash>/features-<key>.pt``; the key names the root, sample lists, weights
file's content, normalisation, sizes and box rule).

Heads (:data:`HEADS`), each a linear head trained per seed exactly as ``head_probe.py`` trains its ``linear`` head
(its :class:`~benchmarks.head_probe.Recipe`: AdamW lr 1e-3, weight decay 0.05, batch 64, 30 epochs, cosine per
step, one view of each training photo per epoch drawn as is or flipped, the best validation epoch tested):

- ``view``: the 224 view alone (the frozen linear probe, on this config's split);
- ``crop_box224`` / ``crop_box448``: the crop alone;
- ``concat_box224`` / ``concat_box448``: one head on the view's and the crop's vectors concatenated;
- ``avg_box224`` / ``avg_box448``: the mean of the ``view`` and ``crop_*`` heads' probabilities (the two-stage
  model's ``merge: mean_prob``; no training of its own);
- controls: ``flip_avg``: the ``view`` head averaged with a head trained and tested on the flipped views (a second
  view without zoom); ``whole448``: the whole photo at 448 px.

Every head and seed is a run folder ``<out>/<head>/seed<k>/`` that ``python -m mgff.report`` reads as it reads an
``mgff.fit`` run (:func:`benchmarks.head_probe.write_run`: ``config.yaml`` with a ``probe:`` mapping,
``test_predictions.csv`` by test dataset index and path, ``metrics.csv``, ``metrics.json``), so the baseline pairs
with fine-tunes image by image: ``python -m mgff.report runs/frozen_two_stage runs/lite0 --compare <fit group>
probe:head=avg_box224``. ``results.md`` has the table (mean ± sd over seeds, pooled paired intervals against
``view``) and the frozen boxes' mIoU / hit@0.5 against the official boxes on the test photos.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/frozen_two_stage.py
    python benchmarks/frozen_two_stage.py --heads view,crop_box224,avg_box224 --seeds 0,1,2 --out runs/frozen_two_stage
    python benchmarks/frozen_two_stage.py --root /data/CUB_200_2011 --weights my_lite0.safetensors --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import head_probe, real_data, real_photos  # noqa: E402
from benchmarks.head_probe import CachedMaps, MapSplit, Recipe  # noqa: E402
from benchmarks.measure import describe_machine, machine_info  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402
from mgff.metrics.box_iou import BoxIoU  # noqa: E402
from mgff.models.heads import HeadOutput, LinearHead  # noqa: E402

RUN = real_photos.RUNS["lite0_two_stage"]
DEFAULT_OUT = real_data.REPO_ROOT / "runs" / "frozen_two_stage"
DEFAULT_CACHE = DEFAULT_OUT / "cache"
CACHE_FORMAT = 1  # bump when what a cache file holds changes
FEATURE_BATCH = 16  # photos per forward while computing the features
FEATURES = ("view", "crop224", "crop448", "whole448")  # the pooled vectors of every photo (and of its flip)
BASELINE = "view"


@dataclass(frozen=True)
class FrozenHead:
    """One row of the table: a linear head on ``features`` (concatenated), or, with ``average``, the mean of the
    named heads' probabilities; ``flipped``: trained and tested on the flipped photos."""

    note: str
    features: tuple[str, ...] = ()
    average: tuple[str, ...] = ()
    flipped: bool = False


HEADS: dict[str, FrozenHead] = {
    "view": FrozenHead("linear head on the 224 view (the frozen linear probe)", ("view",)),
    "crop_box224": FrozenHead("linear head on the crop, box from the 224 map", ("crop224",)),
    "crop_box448": FrozenHead("linear head on the crop, box from the 448 map", ("crop448",)),
    "concat_box224": FrozenHead("one linear head on [view, crop], box from the 224 map", ("view", "crop224")),
    "concat_box448": FrozenHead("one linear head on [view, crop], box from the 448 map", ("view", "crop448")),
    "avg_box224": FrozenHead("mean probabilities of view and crop_box224 (the two-stage merge)", average=("view", "crop_box224")),
    "avg_box448": FrozenHead("mean probabilities of view and crop_box448", average=("view", "crop_box448")),
    "flipped_view": FrozenHead("linear head trained and tested on the flipped photos (flip_avg's second head)", ("view",), flipped=True),
    "flip_avg": FrozenHead("control: mean probabilities of view and flipped_view (a second view, no zoom)", average=("view", "flipped_view")),
    "whole448": FrozenHead("control: linear head on the whole photo at 448 px (more pixels, no zoom)", ("whole448",)),
}
DEFAULT_HEADS = tuple(HEADS)


# ----- the features -------------------------------------------------------------------------------------
def standardized_mean(x: Tensor, eps: float) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C)``: every position's channels standardised (LayerNorm without affine, ``eps``),
    then the mean over positions: what :class:`~mgff.models.heads.LinearHead` pools, before its affine."""
    return F.layer_norm(x.permute(0, 2, 3, 1).float(), (x.shape[1],), eps=eps).mean(dim=(1, 2))


class PooledLinearHead(nn.Module):
    """:class:`~mgff.models.heads.LinearHead` on pooled vectors: ``(B, C) -> HeadOutput(logits (B, K))``.

    Holds a real ``LinearHead`` (same parameters, initialisation and optimiser roles) and applies its LayerNorm's
    affine and its classifier to :func:`standardized_mean` of the map, which equals ``LinearHead(maps)``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = LinearHead([in_features], [32], num_classes)

    @property
    def eps(self) -> float:
        return self.linear.norm.eps

    def classifier_modules(self) -> list[nn.Module]:
        return self.linear.classifier_modules()

    def forward(self, features: list[Tensor]) -> HeadOutput:
        x = features[-1] * self.linear.norm.weight + self.linear.norm.bias
        logits = self.linear.classifier(self.linear.dropout(x))
        return HeadOutput(logits, logits.new_zeros(()), None)


def build_model_and_data(source: RealData, extra: tuple[str, ...] = ()):
    """``(model, datamodule)`` of :data:`RUN` on ``source``'s original photos (the source view needs them), the
    model with its pretrained backbone in eval mode, the DataModule set up for fit and test."""
    model, data = real_photos.build(RUN, source, cache=None, extra=extra)
    data.setup("fit")
    if data.source_size is None:
        raise ValueError(f"{RUN.config}: the frozen two-stage baseline crops from the source view; set data.source_size")
    return model.eval(), data


def feature_cache_key(source: RealData, data, model) -> dict[str, Any]:
    """Everything the features depend on: :func:`head_probe.map_cache_key` plus the source side and the box rule."""
    key = head_probe.map_cache_key(source, data, model)
    hp = model.hparams
    key.update(format=CACHE_FORMAT, run=RUN.config, source_size=data.source_size, crop_size=model.crop_size,
               response=hp.feature_response, box_threshold=hp.box_threshold, box_mode=hp.box_mode,
               box_padding=hp.box_padding, min_box_size=hp.min_box_size, features=list(FEATURES))
    return key


@torch.no_grad()
def photo_features(model, images: Tensor, source: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The pooled vectors of one batch, as is: ``({feature: (B, C)}, {"box224": (B, 4), "box448": (B, 4)})``.

    Args:
        images: ``(B, 3, 224, 224)`` the view, in the data's normalisation.
        source: ``(B, 3, S, S)`` uint8, the same view at ``S`` = the source side.
    The ``box448`` map is the source view's (what ``localize_from_features`` reads with ``localize_size`` equal to
    the source side); boxes are in the view's pixels, crops cut from the source (``cut_crops``)."""
    size = tuple(images.shape[-2:])
    eps = model.head.norm.eps
    out224, maps224 = model.stage1_with_maps(images)
    whole = model.input_norm.data_from_unit(source.float() / 255.0).to(images.dtype)
    out448, maps448 = model.stage1_with_maps(whole)
    boxes = {"box224": model.feature_localizer(maps224, size, model.head, out224.logits)[1],
             "box448": model.feature_localizer(maps448, size, model.head, out448.logits)[1]}
    vectors = {"view": standardized_mean(maps224[-1], eps), "whole448": standardized_mean(maps448[-1], eps)}
    for name, box in (("crop224", boxes["box224"]), ("crop448", boxes["box448"])):
        vectors[name] = standardized_mean(model.backbone(model.input_norm(model.cut_crops(images, box, source)))[-1], eps)
    return vectors, boxes


@torch.no_grad()
def flipped_features(model, images: Tensor, source: Tensor, boxes: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same vectors for the photo flipped left-right: the view and the source flipped, the crops of the
    unflipped boxes flipped (the flipped photo's crop, up to the box rule's own asymmetry)."""
    eps = model.head.norm.eps
    last = lambda x: standardized_mean(model.backbone(model.input_norm(x))[-1], eps)  # noqa: E731
    whole = model.input_norm.data_from_unit(source.float() / 255.0).to(images.dtype)
    vectors = {"view": last(images.flip(-1)), "whole448": last(whole.flip(-1))}
    for name, box in (("crop224", boxes["box224"]), ("crop448", boxes["box448"])):
        vectors[name] = last(model.cut_crops(images, box, source).flip(-1))
    return vectors


@torch.no_grad()
def compute_features(model, data, log=print) -> dict[str, dict[str, Any]]:
    """Every split through the evaluation view (training photos too): ``{split: {"as_is": {feature: (N, C)},
    "flipped": {...}, "labels": (N,), "boxes": {name: (N, 4)}, "gt_boxes": (N, 4), "paths": [...]}}``."""
    from torch.utils.data import DataLoader

    from data_modules.dataset import FineGrainedDataset, collate_skip_none

    evaluation = data.datasets["test"].transform
    splits = {}
    for name in ("train", "val", "test"):
        dataset = data.datasets[name]
        if name == "train":
            dataset = FineGrainedDataset(dataset.root, dataset.samples, evaluation, on_bad_image="raise", max_image_pixels=data.max_image_pixels)
        parts: dict[str, list] = {"as_is": [], "flipped": [], "boxes": [], "labels": [], "gt": [], "index": []}
        start = time.perf_counter()
        for batch in DataLoader(dataset, batch_size=FEATURE_BATCH, shuffle=False, num_workers=0, collate_fn=collate_skip_none):
            vectors, boxes = photo_features(model, batch["image"], batch["source"])
            parts["as_is"].append(vectors)
            parts["flipped"].append(flipped_features(model, batch["image"], batch["source"], boxes))
            parts["boxes"].append(boxes)
            parts["labels"].append(batch["label"])
            parts["gt"].append(batch["box"])
            parts["index"].append(batch["index"])
        if not torch.equal(torch.cat(parts["index"]), torch.arange(len(dataset))):
            raise RuntimeError(f"the {name} loader skipped or reordered photos of {dataset.root}")
        cat = lambda dicts: {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}  # noqa: E731
        splits[name] = dict(as_is=cat(parts["as_is"]), flipped=cat(parts["flipped"]), boxes=cat(parts["boxes"]),
                            labels=torch.cat(parts["labels"]).long(), gt_boxes=torch.cat(parts["gt"]).float(),
                            paths=[s.path for s in dataset.samples])
        log(f"{name}: {len(dataset)} photos in {time.perf_counter() - start:.0f} s", flush=True)
    return splits


@dataclass
class Features:
    """The cached vectors of every split (:func:`compute_features`), their key and timing, the class names."""

    splits: dict[str, dict[str, Any]]
    key: dict[str, Any]
    source: str
    seconds: float
    compute_seconds: float
    path: Path
    class_names: tuple[str, ...]


def load_or_compute_features(source: RealData, cache: Path = DEFAULT_CACHE, extra: tuple[str, ...] = (), log=print) -> Features:
    """The features of ``source``, read from the disk cache when one with the same key exists, else computed and
    written there (``extra``: CLI overrides of :data:`RUN`, e.g. smaller sizes in tests)."""
    model, data = build_model_and_data(source, extra)
    key = feature_cache_key(source, data, model)
    path = source.cache_dir(cache) / f"features-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.pt"
    class_names = tuple(data.class_names)
    start = time.perf_counter()
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            seconds = time.perf_counter() - start
            log(f"features read from {path} in {seconds:.1f} s", flush=True)
            return Features(stored["splits"], key, "disk", seconds, float(stored["compute_seconds"]), path, class_names)
        log(f"{path} holds features of other inputs: computing them again", flush=True)
    splits = compute_features(model, data, log)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.partial")
    torch.save(dict(key=key, compute_seconds=seconds, splits=splits), partial)
    partial.replace(path)
    log(f"features computed in {seconds:.1f} s, written to {path}", flush=True)
    return Features(splits, key, "computed", seconds, seconds, path, class_names)


def head_splits(features: Features, head: FrozenHead) -> dict[str, MapSplit]:
    """The :class:`~benchmarks.head_probe.MapSplit` of every split for a trained ``head``: one "map" ``(V * N, D)``
    (its features concatenated); train has two views (as is, flipped: swapped for a ``flipped`` head)."""
    splits = {}
    for name, split in features.splits.items():
        first, second = ("flipped", "as_is") if head.flipped else ("as_is", "flipped")
        vector = lambda view: torch.cat([split[view][f] for f in head.features], dim=1)  # noqa: E731
        views = [vector(first), vector(second)] if name == "train" else [vector(first)]
        splits[name] = MapSplit(name, [torch.cat(views)], split["labels"].repeat(len(views)), len(views), (0,), tuple(split["paths"]))
    return splits


# ----- training and averaging -----------------------------------------------------------------------------
def train_linear(head: FrozenHead, features: Features, recipe: Recipe, seed: int) -> dict[str, Any]:
    """One linear head on ``head``'s features for ``seed`` (:func:`benchmarks.head_probe.train_head`), plus the
    tested weights' validation probabilities ``val_probs``."""
    splits = head_splits(features, head)
    torch.manual_seed(seed)  # the head's initialisation, as the CLI seeds a probe head
    module = PooledLinearHead(splits["train"].maps[0].shape[1], len(features.class_names))
    shim = SimpleNamespace(head=module, loss_terms=lambda logits, aux, labels: {"ce": F.cross_entropy(logits["main"], labels)})
    result = head_probe.train_head(shim, splits, recipe, seed)
    if "diverged" not in result:
        result["val_probs"] = head_probe.predict(module, splits["val"])
    result["params"] = sum(p.numel() for p in module.parameters())
    return result


def averaged(parts: list[dict[str, Any]], features: Features, recipe: Recipe) -> dict[str, Any]:
    """The mean of trained heads' probabilities, as a :func:`train_linear` result (its costs the parts' sum)."""
    if any("diverged" in p for p in parts):
        return dict(diverged="a part diverged", val_acc=[])
    labels = {n: features.splits[n]["labels"] for n in ("val", "test")}
    val_probs = sum(p["val_probs"] for p in parts) / len(parts)
    probs = sum(p["test_probs"] for p in parts) / len(parts)
    correct = probs.argmax(-1) == labels["test"]
    top5 = (probs.topk(min(5, probs.shape[1]), dim=-1).indices == labels["test"][:, None]).any(-1)
    val = (val_probs.argmax(-1) == labels["val"]).float().mean().item()
    cpu, wall = sum(p["cpu_s"] for p in parts), sum(p["wall_s"] for p in parts)
    fit_metrics = dict(parts[0]["fit_metrics"], **{"test/acc": correct.float().mean().item(), "test/acc5": top5.float().mean().item(),
                                                   "best_val/acc": val, "best_epoch": None, "fit_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)})
    return dict(val_acc=[round(val, 4)], best_epoch=None, best_val_acc=round(val, 4), test_acc=round(correct.float().mean().item(), 4),
                test_correct=correct.int().tolist(), cpu_s=round(cpu, 1), wall_s=round(wall, 1), test_probs=probs, val_probs=val_probs,
                fit_metrics=fit_metrics, params=sum(p["params"] for p in parts))


def needed(heads: list[str]) -> list[str]:
    """``heads`` with the heads their averages read, each after what it reads."""
    order: list[str] = []

    def add(name: str) -> None:
        for part in HEADS[name].average:
            add(part)
        if name not in order:
            order.append(name)

    for name in heads:
        add(name)
    return order


def head_config(name: str, seed: int, recipe: Recipe, features: Features) -> dict[str, Any]:
    """The run folder's ``config.yaml``: a ``probe:`` mapping (see :data:`mgff.report.RUNNER_KEYS`) in which only
    ``head`` differs between heads, so the seeds of one head form one group labelled ``probe:head=<name>`` (what
    the head reads is :data:`HEADS`'s, also written into ``metrics.json`` as ``head_definition``)."""
    return {"seed_everything": seed,
            "probe": {"head": name, "runner": "frozen_two_stage", "base_run": {"config": RUN.config, "overrides": list(RUN.overrides)},
                      "maps": dict(features.key), "recipe": asdict(recipe)}}


def run_heads(features: Features, heads: list[str], seeds: list[int], recipe: Recipe, out: Path | None = None, log=print) -> dict[str, dict[int, dict]]:
    """Every head of ``heads`` (and the heads their averages read) over ``seeds``: ``{head: {seed: result}}``, each
    written as a run folder ``out/<head>/seed<k>/`` when ``out`` is given."""
    # what write_run reads of the maps: the test photos' labels and paths, the class names, the features' timing
    test = head_splits(features, HEADS["view"])["test"]
    maps = CachedMaps({"test": test}, features.key, features.source, features.seconds, features.compute_seconds, features.path, features.class_names)
    results: dict[str, dict[int, dict]] = {}
    for name in needed(heads):
        head = HEADS[name]
        for seed in seeds:
            if head.average:
                result = averaged([results[part][seed] for part in head.average], features, recipe)
            else:
                result = train_linear(head, features, recipe, seed)
            if "fit_metrics" in result:
                result["fit_metrics"]["head_definition"] = asdict(head)
            if out is not None:
                head_probe.write_run(out / name / f"seed{seed}", name, seed, result, recipe, maps, config=head_config(name, seed, recipe, features))
            results.setdefault(name, {})[seed] = result
            if "diverged" in result:
                log(f"{name} seed {seed}: diverged: {result['diverged']}", flush=True)
            else:
                log(f"{name} seed {seed}: test top-1 {result['test_acc']:.4f} (val {result['best_val_acc']:.4f})", flush=True)
    return {name: results[name] for name in needed(heads)}


# ----- the report -----------------------------------------------------------------------------------------
def box_quality(features: Features, split: str = "test") -> dict[str, dict[str, float]]:
    """mIoU and hit@0.5 of the frozen boxes against the official ones on ``split``: ``{box: {miou, hit50}}``."""
    found = {}
    for name, boxes in features.splits[split]["boxes"].items():
        metric = BoxIoU()
        metric.update(boxes, features.splits[split]["gt_boxes"])
        scores = metric.compute()
        found[name] = {"miou": float(scores["miou"]), "hit50": float(scores["hit_rate"])}
    return found


def report(results: dict[str, dict[int, dict]], features: Features, recipe: Recipe, seeds: list[int], command: str, machine: str, total_s: float) -> str:
    splits = features.splits
    where = (f"computed in {features.seconds:.0f} s" if features.source == "computed"
             else f"read from the disk cache (computed in {features.compute_seconds:.0f} s by the run that wrote it)")
    boxes = box_quality(features)
    lines = [
        f"Command: `{command}`",
        f"Machine: {machine}",
        f"Data: {RUN.config}'s split and views of {features.key['root']}: train {len(splits['train']['labels'])} (+ flips), "
        f"val {len(splits['val']['labels'])}, test {len(splits['test']['labels'])}; features {where}; `{features.path}`",
        "Frozen boxes on test vs the official boxes: " + "; ".join(f"{n}: mIoU {b['miou']:.3f}, hit@0.5 {b['hit50']:.3f}" for n, b in boxes.items()),
        f"Recipe: {recipe.optimizer}, lr {recipe.lr:g}, weight decay {recipe.weight_decay:g}, cosine per step, batch {recipe.batch_size}, "
        f"{recipe.epochs} epochs, seeds {','.join(map(str, seeds))}; test top-1 of the best-val epoch. Total {total_s / 60:.1f} min.",
        "",
        f"| head | seeds | test top-1 | per seed | vs {BASELINE} (pooled paired 95 %) | val top-1 | what |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in results.items():
        done = [r for r in by_seed.values() if "test_acc" in r]
        lines.append(f"| {name} | {len(done)} | {head_probe.mean_sd([r['test_acc'] for r in done])} | "
                     f"{' / '.join(format(r['test_acc'], '.3f') for r in done)} | {head_probe.against_baseline(results, name, BASELINE)} | "
                     f"{head_probe.mean_sd([r['best_val_acc'] for r in done])} | {HEADS[name].note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=lambda text: head_probe.parse_heads(text, HEADS), default=list(DEFAULT_HEADS), help=f"comma-separated of {','.join(HEADS)} (default: all)")
    parser.add_argument("--seeds", type=real_photos.parse_seeds, default=[0, 1, 2, 3, 4], help="training seeds (default 0,1,2,3,4); the split stays fixed")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results.md and the run folders <head>/seed<k>/ (default runs/frozen_two_stage)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the per-root feature caches live")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help=f"a CLI override of {RUN.config} (e.g. --override=--data.init_args.source_size=320); repeatable")
    real_data.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.lr <= 0:
        raise SystemExit("--epochs must be at least 1 and --lr above 0")
    source = real_data.from_args(args).check()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    recipe = Recipe(lr=args.lr, epochs=args.epochs)
    features = load_or_compute_features(source, args.cache, tuple(args.override))
    results = run_heads(features, args.heads, args.seeds, recipe, out=args.out)
    command = ("python benchmarks/frozen_two_stage.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    text = report(results, features, recipe, args.seeds, command, describe_machine(machine_info(torch.device("cpu"))), time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    print("\n" + text, flush=True)
    return dict(results=results, text=text, boxes=box_quality(features), features=features)


if __name__ == "__main__":
    main()
