"""Frozen-backbone probe of the classification heads: do the fusion head's other scales carry what the last map lacks?

Fine-tuning mixes two questions: what a head can read from the backbone's maps, and how the backbone and the
head train together (lrs, warmup, few epochs). This probe keeps only the first. The ImageNet EfficientNet-Lite0
backbone of the real-photo runner (``benchmarks/real_photos.py``: its run :data:`PROBE_RUN`, built from its config
by the project's CLI with the ``--weights`` / ``--mean`` / ``--std`` of :mod:`benchmarks.real_data`, stages 2, 3, 4)
computes the maps of every photo **once**, frozen (eval mode, no gradient):

- at 224 px, 40x28x28, 112x14x14 and 1280x7x7 per image, in the runner's split of ``--root`` (the CUB
  DataModule of the same run, :func:`real_photos.build_datamodule`: training photos minus the stratified 20 %
  validation split, the official test photos), through the DataModule's evaluation transform (resize 256, centre
  crop 224);
- the training photos twice: as they are and flipped left-right, the one augmentation (each epoch draws one of
  the two views per image, as the fine-tune's ``hflip=0.5`` does);
- held in memory for every head and seed, and on disk in float16 under
  ``runs/head_probe/cache/<root folder>-<hash of its path>/maps-<key>.pt``, the key naming the root and its
  sample lists, the weights file's content, the input normalisation, the image size, the backbone and its
  stages: any changed input computes the maps again.

Then every head of ``--heads`` (:data:`HEADS`; by default the seven of :data:`DEFAULT_HEADS`) is trained on the
cached maps for ``--epochs`` (30) epochs per seed (``--seeds``, default 0-4; the seed sets the head's
initialisation, the order and the flips): batch 64, one
optimiser (AdamW or SGD) over the head's two parameter roles of :mod:`mgff.lit.optim` (``fusion``: the MGFF
layers, at ``--lr`` x ``--fusion-lr-scale``; ``classifier``: a head's ``classifier_modules()``, at ``--lr``),
cosine decay per step, the loss of :meth:`FineGrainedClassifier.loss_terms` (cross-entropy + 0.1 x the head's
auxiliary pooling loss). Each head is the classifier's own: the run's model with the variant's overrides
(``--model.init_args.head=mgff``...), built by the CLI seeded with ``--seed_everything=seed`` (the same draws as
``torch.manual_seed(seed)``). The epoch of the best validation top-1 (the first of ties) is kept and its test
top-1 reported: mean ± sd over seeds and, per head, the pooled paired bootstrap interval of
``acc(head) - acc(linear)`` over the seeds' per-image correctness (:func:`mgff.stats.pooled_paired_bootstrap`).

Every head and seed is also a run folder that ``python -m mgff.report`` reads as it reads an ``mgff.fit`` run,
``<out>/<head>/seed<k>/`` (:func:`write_run`):

- ``config.yaml``: ``seed_everything: k`` and a ``probe:`` mapping (the head and its model overrides, the run the
  backbone and split come from, the maps' cache key: root, sample lists, weights file and its SHA-1,
  normalisation, sizes, backbone, stages; the recipe), so the seeds of one head and recipe form one group,
  labelled ``probe:head=<head>`` (``probe`` when it is the only one; see :data:`mgff.report.RUNNER_KEYS`);
- ``test_predictions.csv``: the columns of ``mgff.fit``'s :class:`~mgff.callbacks.TestPredictionWriter`
  (``index,path,label,label_name,pred,pred_name,prob,correct,top1_name,top1_prob...``), ``index`` the test
  dataset's and ``path`` the photo's path relative to the root, as an ``mgff.fit`` run of the same photos writes
  them, so ``--compare`` pairs a probe with fine-tunes image by image:
  ``python -m mgff.report runs/head_probe runs/sweep --compare probe:head=linear <fit group>`` (seeds paired
  by number);
- ``metrics.csv`` (``val/acc`` per epoch, for ``--plot``) and, last, ``metrics.json`` in ``mgff.fit``'s format
  (``test/acc``, ``test/acc5``, ``best_val/acc``, ``epochs``, ``global_step``, ``fit_seconds`` / ``cpu_seconds``:
  the head's training and evaluation, the shared maps not included (``maps_seconds``), ``num_classes``;
  ``best_checkpoint`` is null: the head's weights are not saved). A diverged seed leaves ``config.yaml`` alone
  (report lists it as skipped).

What it tells: ``multiscale_linear`` (the residual head with attention, SE and GCN off: align convs + mean over
positions of all scales, through the zero-initialised fused classifier) against ``linear`` says whether the
earlier maps add anything a linear read-out can use, and the control ``fused_last_map`` (the same fused path on
the last map alone) separates what the earlier scales add from what a second trained path does; ``mgff`` and its
ablations say what the fusion steps add on top. The evidence is EfficientNet-Lite0 at 224 px with a frozen
backbone; fine-tuning can change it, and Swin-B at 384 px is unmeasured.

Cost (one thread of a 2-core AMD EPYC, measured on the 1,402 shared photos: 600 training, 150 validation, 652
test): the maps take 3 minutes once; then each seed of 30 epochs takes, in CPU seconds, 13 (``linear``), 42
(``multiscale_linear``), 22 (``fused_last_map``), 85 (``mgff_no_attention``), 137 (``mgff_no_gcn``), 142
(``mgff_no_residual``), 179 (``mgff_no_se``), 180 (``mgff``): the default seven heads x 5 seeds take 66 minutes,
``--heads linear,multiscale_linear,fused_last_map`` 7. The fused heads' align convs, attention and GCN are what
costs (about 0.6 GFLOP per image and training step for ``mgff``, compute-bound on one core). Run one probe at a time.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/head_probe.py
    python benchmarks/head_probe.py --heads linear,multiscale_linear,mgff --epochs 30 --seeds 0,1,2,3,4 --out runs/head_probe
    python benchmarks/head_probe.py --root /data/CUB_200_2011 --weights my_lite0.safetensors --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225
    python -m mgff.report runs/head_probe runs/sweep --compare probe:head=linear <fit group label>
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import real_data, real_photos  # noqa: E402
from benchmarks.measure import describe_machine, machine_info  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402
from mgff.stats import pooled_paired_bootstrap  # noqa: E402

DEFAULT_OUT = real_data.REPO_ROOT / "runs" / "head_probe"
DEFAULT_CACHE = DEFAULT_OUT / "cache"
CACHE_FORMAT = 1  # bump when what a cache file holds changes
MAP_BATCH = 32  # photos per backbone forward while computing the maps
EVAL_BATCH = 256  # maps per head forward while evaluating


@dataclass(frozen=True)
class ProbeHead:
    """One head compared: its overrides of the classifier's arguments (``head``, ``fusion_residual``,
    ``use_attention``...) and what it is."""

    overrides: dict[str, Any]
    note: str


# the runner's run whose model (backbone, weights, loss) and data (split, view) the probe reads: the held-back
# settings of the fine-tunes it is compared with (no label smoothing)
PROBE_RUN = real_photos.RUNS["linear_best"]
LAST_STAGE = 4  # the last of the run's stages [2, 3, 4]
RESIDUAL = dict(head="mgff", fusion_residual=True)
HEADS: dict[str, ProbeHead] = {
    "linear": ProbeHead(dict(head="linear"), "norm + pool + linear on the last map (1280 ch)"),
    "multiscale_linear": ProbeHead(dict(RESIDUAL, use_attention=False, use_se=False, use_gcn=False),
                                   "linear base path + every scale's align conv, mean over positions, zero-init classifier"),
    "mgff": ProbeHead(dict(RESIDUAL), "residual MGFF: linear base path + align, MHSA, SE, GCN, super-nodes (the default)"),
    "mgff_no_attention": ProbeHead(dict(RESIDUAL, use_attention=False), "mgff without spatial attention"),
    "mgff_no_se": ProbeHead(dict(RESIDUAL, use_se=False), "mgff without SE"),
    "mgff_no_gcn": ProbeHead(dict(RESIDUAL, use_gcn=False), "mgff without GCN/pooling (mean over nodes)"),
    "mgff_no_residual": ProbeHead(dict(head="mgff", fusion_residual=False), "the plain MGFF head (fused readout alone)"),
    # a control, not run by default: multiscale_linear's fused path on the last map alone (one 1x1 align conv), so
    # multiscale_linear - fused_last_map is what the earlier scales add, apart from having a second path at all
    "fused_last_map": ProbeHead(dict(RESIDUAL, use_attention=False, use_se=False, use_gcn=False, stages=[LAST_STAGE]),
                                "control: multiscale_linear's fused path on the last map only (no earlier scale)"),
}
DEFAULT_HEADS = ("linear", "multiscale_linear", "mgff", "mgff_no_attention", "mgff_no_se", "mgff_no_gcn", "mgff_no_residual")
BASELINE = "linear"


# The default recipe, chosen on validation (seed 0, 30 epochs, the shared photos): AdamW at lr 1e-3 gave best val
# top-1 0.820 to linear, multiscale_linear and mgff alike; 3e-3 helped linear (0.853) and hurt multiscale_linear
# (0.780); 3e-4 helped mgff (0.827) and hurt linear (0.780); SGD at the fine-tune's classifier lr (0.1, momentum
# 0.9, weight decay 5e-4) gave linear 0.807, multiscale_linear 0.800; fusion layers at 0.1x of lr 3e-3, mgff 0.807.
@dataclass(frozen=True)
class Recipe:
    """How every head is trained on the cached maps. ``lr`` is the classifier role's, ``lr * fusion_lr_scale``
    the fusion layers'; 1-D parameters (biases, norms, layer scales) get no weight decay (:mod:`mgff.lit.optim`)."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    fusion_lr_scale: float = 1.0
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only
    epochs: int = 30
    batch_size: int = 64


# ----- the maps ------------------------------------------------------------------------------------------
@dataclass
class MapSplit:
    """The frozen backbone's maps of one split.

    Attributes:
        name: ``train``, ``val`` or ``test``.
        maps: one float16 tensor per stage, ``(V * N, C_i, H_i, W_i)``: ``V`` views of the ``N`` images, view
            ``v`` of image ``i`` at row ``v * N + i`` (train: ``V = 2``, the image and its left-right flip).
        labels: ``(V * N,)`` int64, the label of every row.
        views: ``V``.
        stages: the backbone stage of each map (``[2, 3, 4]``).
        paths: the ``N`` images' paths relative to the root, row ``i`` being the split dataset's index ``i``.
    """

    name: str
    maps: list[Tensor]
    labels: Tensor
    views: int = 1
    stages: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()

    @property
    def num_images(self) -> int:
        return len(self.labels) // self.views

    def batch(self, rows: Tensor) -> list[Tensor]:
        """The maps of ``rows`` ``(B,)`` as float32, ``[(B, C_i, H_i, W_i)]``."""
        return [m[rows].float() for m in self.maps]

    def select(self, stages: list[int]) -> "MapSplit":
        """The same split with the maps of ``stages`` alone (no copy), for a head built on fewer stages."""
        missing = [s for s in stages if s not in self.stages]
        if missing:
            raise ValueError(f"stages {missing} are not among the cached maps' stages {list(self.stages)}")
        return MapSplit(self.name, [self.maps[self.stages.index(s)] for s in stages], self.labels, self.views, tuple(stages), self.paths)


@dataclass
class CachedMaps:
    """The maps of every split, their cache key, where they came from (``computed`` / ``disk``), the seconds
    that took now and the seconds their computation took (when read from disk: the run that wrote them), and the
    DataModule's class names (index = label)."""

    splits: dict[str, MapSplit]
    key: dict[str, Any]
    source: str
    seconds: float
    compute_seconds: float
    path: Path
    class_names: tuple[str, ...] = ()


def probe_model(source: RealData, overrides: dict[str, Any] | None = None, weights: bool = True, seed: int | None = None):
    """The classifier of :data:`PROBE_RUN` on the weights and normalisation of ``source`` with ``overrides`` (model
    arguments), built from its config by the project's CLI, which seeds the global generators with ``seed`` (else the
    config's); without its pretrained weights unless ``weights`` (only the backbone needs them)."""
    extra = [*real_photos.model_options(**(overrides or {})), *([f"--seed_everything={seed}"] if seed is not None else [])]
    return real_photos.build(PROBE_RUN, source, cache=None, extra=extra, weights=weights)[0]


def probe_datamodule(source: RealData):
    """The CUB DataModule of :data:`PROBE_RUN` on ``source`` (its split, sizes and normalisation), reading the original
    photos: each is decoded once here, so a resized cache would save nothing."""
    data = real_photos.build_datamodule(PROBE_RUN, source, cache=None)
    data.setup("fit")
    return data


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def map_cache_key(source: RealData, data, model) -> dict[str, Any]:
    """Everything the maps depend on: the root and its sample lists, the weights file's content, the input
    normalisation, the evaluation transform's sizes, the backbone and its stages."""
    samples = {split: [(s.path, s.label) for s in data.split_samples(split)] for split in ("train", "val", "test")}
    hp = model.hparams
    return dict(
        format=CACHE_FORMAT,
        root=str(Path(source.root).resolve()),
        samples_sha1=hashlib.sha1(json.dumps(samples).encode()).hexdigest(),
        weights=str(Path(source.weights).resolve()),
        weights_sha1=file_sha1(Path(source.weights)),
        mean=list(source.mean),
        std=list(source.std),
        resize_size=data.resize_size,
        crop_size=data.crop_size,
        img_size=hp.img_size,
        backbone=hp.backbone,
        stages=list(hp.stages),
        train_views=["as is", "flipped left-right"],
    )


def cache_path(source: RealData, key: dict[str, Any], base: Path) -> Path:
    """``base/<root folder>-<hash of its path>/maps-<12 hex digits of the key>.pt``."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return source.cache_dir(base) / f"maps-{digest}.pt"


@torch.no_grad()
def compute_maps(model, data) -> dict[str, MapSplit]:
    """Run the frozen backbone (eval mode) over every split once, through the DataModule's evaluation transform;
    the training photos also flipped left-right. Maps are stored in float16."""
    from torch.utils.data import DataLoader

    from data_modules.dataset import FineGrainedDataset, collate_skip_none

    backbone, input_norm = model.backbone.eval(), model.input_norm.eval()
    evaluation = data.datasets["test"].transform
    splits = {}
    for name in ("train", "val", "test"):
        dataset = data.datasets[name]
        if name == "train":  # the training photos through the evaluation transform; the flip is the augmentation
            dataset = FineGrainedDataset(dataset.root, dataset.samples, evaluation, on_bad_image="raise", max_image_pixels=data.max_image_pixels)
        views = 2 if name == "train" else 1
        per_view: list[list[list[Tensor]]] = [[] for _ in range(views)]
        labels, indices = [], []
        for batch in DataLoader(dataset, batch_size=MAP_BATCH, shuffle=False, num_workers=0, collate_fn=collate_skip_none):
            images = input_norm(batch["image"])
            for view in range(views):
                maps = backbone(images.flip(-1) if view else images)
                per_view[view].append([m.half() for m in maps])
            labels.append(batch["label"])
            indices.append(batch["index"])
        if not torch.equal(torch.cat(indices), torch.arange(len(dataset))):
            raise RuntimeError(f"the {name} loader skipped or reordered photos of {dataset.root}")
        maps = [torch.cat([torch.cat([b[i] for b in per_view[view]]) for view in range(views)]) for i in range(len(per_view[0][0]))]
        splits[name] = MapSplit(name, maps, torch.cat(labels).long().repeat(views), views, tuple(model.hparams.stages))
    return splits


def load_or_compute_maps(source: RealData, cache: Path = DEFAULT_CACHE, log=print) -> tuple[CachedMaps, Any]:
    """The maps of ``source``: read from the disk cache when one with the same key exists, else computed and
    written there. Returns ``(maps, model)``, the model being the probe's classifier with the pretrained backbone."""
    data = probe_datamodule(source)
    model = probe_model(source)
    key = map_cache_key(source, data, model)
    path = cache_path(source, key, cache)
    # row i of a split is its dataset's index i (compute_maps checks it; the key holds the sample lists)
    paths = {name: tuple(s.path for s in data.datasets[name].samples) for name in ("train", "val", "test")}
    class_names = tuple(data.class_names)
    start = time.perf_counter()
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            splits = {name: MapSplit(name, list(s["maps"]), s["labels"], int(s["views"]), tuple(key["stages"]), paths[name])
                      for name, s in stored["splits"].items()}
            seconds = time.perf_counter() - start
            log(f"maps read from {path} in {seconds:.1f} s", flush=True)
            return CachedMaps(splits, key, "disk", seconds, float(stored["compute_seconds"]), path, class_names), model
        log(f"{path} holds maps of other inputs: computing them again", flush=True)
    splits = {name: dataclasses.replace(split, paths=paths[name]) for name, split in compute_maps(model, data).items()}
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.partial")
    torch.save(dict(key=key, compute_seconds=seconds,
                    splits={n: dict(maps=s.maps, labels=s.labels, views=s.views) for n, s in splits.items()}), partial)
    partial.replace(path)  # a run stopped while writing leaves no cache file that looks whole
    log(f"maps computed in {seconds:.1f} s, written to {path}", flush=True)
    return CachedMaps(splits, key, "computed", seconds, seconds, path, class_names), model


# ----- training a head on them ---------------------------------------------------------------------------
def build_optimizer(head: torch.nn.Module, recipe: Recipe, total_steps: int):
    """One optimiser over the head's ``fusion`` and ``classifier`` roles (:mod:`mgff.lit.optim`) and a per-step
    cosine from ``lr`` to 0 over ``total_steps``: ``(optimizer, LambdaLR)``."""
    from mgff.lit.optim import GroupRecipe, head_parameter_roles, param_groups, warmup_cosine
    from mgff.lit.optim import build_optimizer as optimizer_of

    recipes = {"fusion": GroupRecipe(recipe.lr * recipe.fusion_lr_scale, recipe.weight_decay),
               "classifier": GroupRecipe(recipe.lr, recipe.weight_decay)}
    optimizer = optimizer_of(recipe.optimizer, param_groups(head_parameter_roles(head), recipes), recipe.lr, recipe.momentum, False)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, 0))


@torch.no_grad()
def predict(head: torch.nn.Module, split: MapSplit, batch_size: int = EVAL_BATCH) -> Tensor:
    """Class probabilities ``(N, C)`` (softmax of the logits, float32) of ``head`` (eval mode) on the first view of ``split``."""
    head.eval()
    rows = torch.arange(split.num_images)
    return torch.cat([head(split.batch(rows[i:i + batch_size])).logits.float().softmax(-1) for i in range(0, len(rows), batch_size)])


def evaluate(head: torch.nn.Module, split: MapSplit, batch_size: int = EVAL_BATCH) -> Tensor:
    """Per-image top-1 correctness ``(N,)`` bool of ``head`` (eval mode) on the first view of ``split``."""
    return predict(head, split, batch_size).argmax(-1) == split.labels[: split.num_images]


def train_head(model, splits: dict[str, MapSplit], recipe: Recipe, seed: int) -> dict[str, Any]:
    """Train ``model.head`` on ``splits["train"]`` for ``recipe.epochs`` epochs, keep the weights of the epoch with
    the best validation top-1 (the first of ties) and test them.

    Returns ``val_acc`` (per epoch), ``best_epoch`` (1-based), ``best_val_acc``, ``test_acc``, ``test_correct``
    (per test image, 0/1), ``cpu_s`` / ``wall_s`` (training and evaluation), ``test_probs`` (``(N, C)`` tensor,
    the tested weights' class probabilities) and ``fit_metrics`` (unrounded, in ``mgff.fit``'s ``metrics.json``
    format: ``test/acc``, ``test/acc5``, ``best_val/acc``, ``best_epoch``, ``epochs``, ``global_step``,
    ``fit_seconds``, ``cpu_seconds``, ``torch_threads``, ``num_classes``); or, when the loss stops being finite,
    ``diverged`` (what happened) and no test figures.
    """
    head = model.head
    train = splits["train"]
    n = train.num_images
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    optimizer, scheduler = build_optimizer(head, recipe, recipe.epochs * steps_per_epoch)
    val_acc: list[float] = []
    best_state, best = None, -1
    cpu, wall = time.process_time(), time.perf_counter()
    for epoch in range(recipe.epochs):
        head.train()
        # one view per image and epoch (as is or flipped), in a new order
        rows = torch.randperm(n, generator=generator) + n * torch.randint(0, train.views, (n,), generator=generator)
        for start in range(0, n, recipe.batch_size):
            batch = rows[start:start + recipe.batch_size]
            out = head(train.batch(batch))
            terms = model.loss_terms({"main": out.logits}, out.aux_loss, train.labels[batch])
            loss = torch.stack(list(terms.values())).sum()
            if not torch.isfinite(loss):
                return dict(diverged=f"loss {loss.item()} at epoch {epoch + 1}, step {start // recipe.batch_size + 1} "
                            f"({', '.join(f'{k} {v.item():.3g}' for k, v in terms.items())}); try a lower --lr", val_acc=val_acc)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        correct = evaluate(head, splits["val"])
        val_acc.append(correct.sum().item() / len(correct))
        if best < 0 or val_acc[-1] > val_acc[best]:
            best = epoch
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    test = splits["test"]
    probs = predict(head, test)
    labels = test.labels[: test.num_images]
    correct = probs.argmax(-1) == labels
    top5 = (probs.topk(min(5, probs.shape[1]), dim=-1).indices == labels[:, None]).any(-1)
    cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
    fit_metrics = {
        "test/acc": correct.sum().item() / len(correct),
        "test/acc5": top5.sum().item() / len(top5),
        "best_val/acc": val_acc[best],
        "best_epoch": best + 1,
        "best_checkpoint": None,
        "epochs": recipe.epochs,
        "global_step": recipe.epochs * steps_per_epoch,
        "fit_seconds": round(wall_s, 1),
        "cpu_seconds": round(cpu_s, 1),
        "torch_threads": torch.get_num_threads(),
        "num_classes": probs.shape[1],
    }
    return dict(val_acc=[round(v, 4) for v in val_acc], best_epoch=best + 1, best_val_acc=round(val_acc[best], 4),
                test_acc=round(correct.float().mean().item(), 4), test_correct=correct.int().tolist(),
                cpu_s=round(cpu_s, 1), wall_s=round(wall_s, 1), test_probs=probs, fit_metrics=fit_metrics)


def run_probe(source: RealData, heads: list[str], seeds: list[int], recipe: Recipe, maps: CachedMaps, log=print,
              out: Path | None = None) -> dict[str, dict[int, dict]]:
    """Every head of ``heads`` over every seed on ``maps``: ``{head: {seed: train_head's result}}`` (without its
    ``test_probs`` and ``fit_metrics``, which go into the run folder ``out/<head>/seed<k>/`` when ``out`` is given,
    :func:`write_run`, as each seed ends)."""
    results: dict[str, dict[int, dict]] = {}
    for name in heads:
        for seed in seeds:
            # the CLI seeds with the seed before building: the head's initialisation and its dropout
            model = probe_model(source, HEADS[name].overrides, weights=False, seed=seed)
            stages = list(model.hparams.stages)
            result = train_head(model, {n: s.select(stages) for n, s in maps.splits.items()}, recipe, seed)
            result["params"] = sum(p.numel() for p in model.head.parameters())
            if out is not None:
                write_run(out / name / f"seed{seed}", name, seed, result, recipe, maps)
            result.pop("test_probs", None)
            result.pop("fit_metrics", None)
            results.setdefault(name, {})[seed] = result
            if "diverged" in result:
                log(f"{name} seed {seed}: diverged: {result['diverged']}", flush=True)
            else:
                log(f"{name} seed {seed}: test top-1 {result['test_acc']:.4f} at the best val epoch {result['best_epoch']}/{recipe.epochs} "
                    f"(val {result['best_val_acc']:.4f}; {result['wall_s']:.0f} s)", flush=True)
    return results


# ----- run folders that mgff.report reads ----------------------------------------------------------------
def probe_config(name: str, seed: int, recipe: Recipe, maps: CachedMaps) -> dict[str, Any]:
    """The run folder's ``config.yaml``: the seed and what the probe of ``name`` depends on (see the module's doc);
    no locations, so the seeds of one head, recipe and maps are equal but for ``seed_everything``."""
    return {
        "seed_everything": seed,
        "probe": {
            "head": name,
            "head_overrides": dict(HEADS[name].overrides),  # model arguments over the base run's
            "base_run": {"config": PROBE_RUN.config, "overrides": list(PROBE_RUN.overrides)},
            "maps": dict(maps.key),
            "recipe": asdict(recipe),
        },
    }


def prediction_csv_rows(probs: Tensor, split: MapSplit, class_names: tuple[str, ...] = (), top_k: int = 5) -> list[dict[str, Any]]:
    """The rows of ``test_predictions.csv`` for ``probs`` ``(N, C)`` on ``split``: the columns and order of
    :class:`mgff.callbacks.TestPredictionWriter` (``correct`` after ``prob``), ``index`` the dataset's index."""
    from mgff.callbacks.prediction_writer import prediction_rows

    if len(split.paths) != split.num_images or len(probs) != split.num_images:
        raise ValueError(f"{split.name}: {len(probs)} predictions and {len(split.paths)} paths for {split.num_images} images")
    prob, pred = probs.max(dim=-1)
    prediction = dict(index=torch.arange(split.num_images), path=list(split.paths), label=split.labels[: split.num_images],
                      pred=pred, prob=prob, probs=probs)
    rows = []
    for row in prediction_rows(prediction, list(class_names) or None, top_k):
        columns = list(row.items())
        after_prob = [column for column, _ in columns].index("prob") + 1
        rows.append(dict(columns[:after_prob] + [("correct", int(row["pred"] == row["label"]))] + columns[after_prob:]))
    return rows


def write_run(run_dir: Path, name: str, seed: int, result: dict[str, Any], recipe: Recipe, maps: CachedMaps,
              config: dict[str, Any] | None = None) -> None:
    """One head and seed as a run folder ``mgff.report`` reads: ``config.yaml`` (``config``, by default
    :func:`probe_config`), ``test_predictions.csv``, ``metrics.csv`` and, last (it marks the run finished),
    ``metrics.json``; a diverged result writes the config alone. Outputs of an earlier run in the folder are removed
    first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in ("metrics.json", "test_predictions.csv", "metrics.csv"):
        (run_dir / old).unlink(missing_ok=True)
    config = probe_config(name, seed, recipe, maps) if config is None else config
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if "diverged" in result:
        return
    rows = prediction_csv_rows(result["test_probs"], maps.splits["test"], maps.class_names)
    with open(run_dir / "test_predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    steps_per_epoch = result["fit_metrics"]["global_step"] // recipe.epochs
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "val/acc"])
        writer.writerows([epoch, (epoch + 1) * steps_per_epoch - 1, acc] for epoch, acc in enumerate(result["val_acc"]))
    metrics = dict(result["fit_metrics"], params=result.get("params"), maps_seconds=round(maps.compute_seconds, 1))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


# ----- the report ----------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def against_baseline(results: dict[str, dict[int, dict]], name: str, baseline: str = BASELINE) -> str:
    """``acc(name) - acc(baseline)`` with its pooled paired 95 % interval over the seeds both finished."""
    base = results.get(baseline, {})
    pairs = [(base[s]["test_correct"], r["test_correct"]) for s, r in results[name].items() if "test_correct" in r and "test_correct" in base.get(s, {})]
    if name == baseline or not pairs:
        return "-"
    diff, low, high = pooled_paired_bootstrap(pairs)
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def report(results: dict[str, dict[int, dict]], maps: CachedMaps, recipe: Recipe, seeds: list[int], command: str, machine: str, total_s: float) -> str:
    """The Markdown report: command, machine, the maps and their timing, the recipe, one row per head."""
    splits = maps.splits
    shapes = " + ".join("x".join(str(d) for d in m.shape[1:]) for m in splits["train"].maps)
    where = (f"computed in {maps.seconds:.0f} s" if maps.source == "computed"
             else f"read from the disk cache in {maps.seconds:.1f} s (computed in {maps.compute_seconds:.0f} s by the run that wrote it)")
    lines = [
        f"Command: `{command}`",
        f"Machine: {machine}",
        f"Maps: {shapes} per image (float16), train {splits['train'].num_images} x {splits['train'].views} views, "
        f"val {splits['val'].num_images}, test {splits['test'].num_images}; {where}; `{maps.path}`",
        f"Recipe: {recipe.optimizer}, lr {recipe.lr:g} (classifier), {recipe.lr * recipe.fusion_lr_scale:g} (fusion layers), "
        f"weight decay {recipe.weight_decay:g}, cosine per step, batch {recipe.batch_size}, {recipe.epochs} epochs, seeds {','.join(map(str, seeds))}; "
        f"test top-1 of the best-val epoch. Total {total_s / 60:.1f} min.",
        "",
        f"| head | seeds | test top-1 | per seed | vs {BASELINE} (pooled paired 95 %) | best val top-1 | best epoch | params | train s / seed: CPU (wall) | what |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in results.items():
        done = [r for r in by_seed.values() if "test_acc" in r]
        diverged = [str(s) for s, r in by_seed.items() if "diverged" in r]
        per_seed = " / ".join(f"{r['test_acc']:.3f}" for r in done) + (f" (diverged: seed {', '.join(diverged)})" if diverged else "")
        cpu = f"{statistics.mean(r['cpu_s'] for r in done):.0f} ({statistics.mean(r['wall_s'] for r in done):.0f})" if done else "-"
        params = next(iter(by_seed.values()))["params"]
        lines.append(
            f"| {name} | {len(done)} | {mean_sd([r['test_acc'] for r in done])} | {per_seed} | {against_baseline(results, name)} | "
            f"{mean_sd([r['best_val_acc'] for r in done])} | {'/'.join(str(r['best_epoch']) for r in done)} of {recipe.epochs} | "
            f"{params / 1e6:.2f} M | {cpu} | {HEADS[name].note} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, text: str, results: dict[str, dict[int, dict]], payload: dict[str, Any]) -> None:
    """``results.md`` (the report), ``results.csv`` (one row per head and seed) and ``results.json`` (all of it,
    with every epoch's val top-1 and every test image's correctness)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    rows = [dict(head=name, seed=seed, **{k: v for k, v in r.items() if k not in ("test_correct", "val_acc")})
            for name, by_seed in results.items() for seed, r in by_seed.items()]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(dict(payload, results={n: {str(s): r for s, r in b.items()} for n, b in results.items()}), indent=1) + "\n")


def parse_heads(text: str, known: dict[str, Any] = HEADS) -> list[str]:
    """``--heads a,b``: the names, each once, all of them keys of ``known``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--heads: unknown head(s) {unknown or text!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=parse_heads, default=list(DEFAULT_HEADS),
                        help=f"comma-separated heads of {','.join(HEADS)} (default: {','.join(DEFAULT_HEADS)})")
    parser.add_argument("--seeds", type=real_photos.parse_seeds, default=[0, 1, 2, 3, 4], help="training seeds (default 0,1,2,3,4); the split stays fixed")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default=Recipe.optimizer)
    parser.add_argument("--lr", type=float, default=Recipe.lr, help=f"lr of the classifier role (default {Recipe.lr:g})")
    parser.add_argument("--fusion-lr-scale", type=float, default=Recipe.fusion_lr_scale, help="the fusion layers' lr is lr x this (default 1)")
    parser.add_argument("--weight-decay", type=float, default=Recipe.weight_decay, help=f"on weights of 2+ dimensions (default {Recipe.weight_decay:g})")
    parser.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where results.md / results.csv / results.json and the run folders <head>/seed<k>/ go (default runs/head_probe)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the per-root map caches live (default runs/head_probe/cache)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (on shared cores two threads spin against each other)")
    real_data.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.fusion_lr_scale < 0:
        raise SystemExit("--epochs and --batch-size must be at least 1, --lr above 0 and --fusion-lr-scale at least 0")
    source = real_data.from_args(args).check()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    recipe = Recipe(args.optimizer, args.lr, args.fusion_lr_scale, args.weight_decay, Recipe.momentum, args.epochs, args.batch_size)
    maps, _ = load_or_compute_maps(source, args.cache)
    results = run_probe(source, args.heads, args.seeds, recipe, maps, out=args.out)
    command = "python benchmarks/head_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine_info(torch.device("cpu"))
    text = report(results, maps, recipe, args.seeds, command.strip(), describe_machine(info), time.perf_counter() - start)
    payload = dict(command=command.strip(), machine=info, recipe=asdict(recipe), seeds=args.seeds, root=str(source.root), weights=str(source.weights),
                   maps=dict(source=maps.source, seconds=round(maps.seconds, 1), compute_seconds=round(maps.compute_seconds, 1), path=str(maps.path), key=maps.key),
                   total_s=round(time.perf_counter() - start, 1))
    write_outputs(args.out, text, results, payload)
    print("\n" + text, flush=True)
    return dict(payload, results=results, text=text)


if __name__ == "__main__":
    main()
