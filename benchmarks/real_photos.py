"""Fine-tune ImageNet EfficientNet-Lite0 on real CUB photos, one named run per setting, over seeds.

The one runner for every real-photo comparison of the project. A run is a model class plus overrides of
:data:`COMMON` (one entry of :data:`RUNS`; adding a run is adding an entry); every run shares the data split,
epochs, optimiser and input normalisation unless its entry says otherwise. For each run and seed it

- fine-tunes at 224 px (resize 256 -> random crop 224, flip; centre crop at evaluation) on the training photos
  of ``--root`` (default: the 750 of ``../shared/realdata/CUB_200_2011_first25``) minus a stratified 20 %
  validation split (``DATA["split_seed"]``, the same for every seed), keeping the checkpoint of the best
  validation top-1 (``val/acc``); a non-finite loss or state stops the run (it is reported as diverged);
- tests that checkpoint once on the official test photos (one predict pass),
- writes ``<run dir>/best.ckpt``, ``test_predictions.csv`` (one row per test image: ``index,path,label,pred,
  correct``), ``result.json`` (``test_acc``, ``best_val_acc``, minutes, training CPU-seconds per image, a two-stage run's
  ``test_metrics`` with each stage's top-1...) and
  the Lightning CSV logs,

and finally writes ``<out>/results.md`` / ``results.csv`` (mean ± sd over seeds per run) and prints the table.
``--compare a,b`` adds the pooled paired bootstrap interval of ``acc(b) - acc(a)`` over the seeds both ran
(:func:`mgff.stats.pooled_paired_bootstrap`).

Run directories: ``--seed k`` (one seed) writes ``<out>/<run>/``; ``--seeds 0,1,2`` writes
``<out>/seed<k>/<run>/`` for each seed, and ``--report-only`` / ``--compare`` read every seed folder.

Inputs are normalised as the weights expect (``--mean``/``--std``, default 0.5: the shared TF-Lite-converted
weights, ``../shared/weights/README.md``), on the DataModule and as the backbone's normalisation, so the model's
conversion is the identity. Photos are decoded once into a resized cache per source root
(:mod:`benchmarks.real_data`).

    nice -n 5 python benchmarks/real_photos.py --runs linear_best,mgff_best --epochs 6 --seeds 0,1,2 --out runs/heads
    python benchmarks/real_photos.py --runs linear_best,mgff_best --seeds 0,1,2 --out runs/heads --report-only \
        --compare linear_best,mgff_best
    python benchmarks/real_photos.py --root /data/CUB_200_2011 --weights my_lite0.safetensors --runs linear_best

Run one process at a time: on 2 cores one 3-epoch run takes about 5 minutes alone, 26-33 in parallel with four others.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import real_data  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402
from mgff.stats import paired_bootstrap, pooled_paired_bootstrap  # noqa: E402,F401  (paired_bootstrap: for the other runners)

REPO_ROOT = real_data.REPO_ROOT
DEFAULT_OUT = REPO_ROOT / "runs" / "real_photos"

# the settings every run shares: the held-back measurement (SGD lr 0.01, momentum 0.9, head at
# 10x, 6 epochs, batch 32, seed 0, EfficientNet-Lite0 stages 2-4 at 224 px)
SEED = 0
EPOCHS = 6
DATA = dict(batch_size=32, resize_size=256, crop_size=224, val_fraction=0.2, split_seed=0, cache_size=256)
COMMON: dict[str, Any] = dict(
    backbone="efficientnet_lite0",
    img_size=224,
    stages=[2, 3, 4],
    optimizer="sgd",
    lr=0.01,
    head_lr_scale=10.0,
    momentum=0.9,
    weight_decay=5e-4,
    warmup_epochs=0.0,
    scheduler_interval="step",
    dropout=0.1,
    label_smoothing=0.0,
)


@dataclass(frozen=True)
class Run:
    """One named run: the LightningModule class (import path) and its overrides of :data:`COMMON`."""

    model_class: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # overrides of DATA (e.g. source_size, no cache)


CLASSIFIER = "mgff.lit.FineGrainedClassifier"
# The heads table (issue 12 §4) uses one lr for every parameter, as the paper does ("初始学习率为2e−4",
# one initial lr): with the head at 10x the MGFF head diverged (with its LayerNorm readout: train loss
# 4.8 -> 23 within the first epoch) or stayed near chance (without it; BENCHMARKS.md). ``linear_head10x``
# is the linear head at the held-back setting, for reference.
ONE_LR = dict(head_lr_scale=1.0)
PLAIN = dict(head="mgff", fusion_residual=False)  # the MGFF head these runs measured (before the residual head)
RUNS: dict[str, Run] = {
    "linear": Run(CLASSIFIER, dict(ONE_LR, head="linear"), "norm + pool + linear on the last map (conv_head/bn2, 1280 ch)"),
    "linear_head10x": Run(CLASSIFIER, dict(head="linear"), "linear, head at 10x lr (the held-back setting)"),
    "mgff": Run(CLASSIFIER, dict(ONE_LR, **PLAIN), "full MGFF head: align + MHSA + SE + GCN + super-node pooling"),
    "mgff_no_attention": Run(CLASSIFIER, dict(ONE_LR, **PLAIN, use_attention=False), "MGFF without spatial attention"),
    "mgff_no_se": Run(CLASSIFIER, dict(ONE_LR, **PLAIN, use_se=False), "MGFF without SE"),
    "mgff_no_gcn": Run(CLASSIFIER, dict(ONE_LR, **PLAIN, use_gcn=False), "MGFF without GCN/pooling (mean over nodes)"),
    # diagnosis: can the MGFF head take the 10x head lr with a warmup?
    "mgff_head10x": Run(CLASSIFIER, dict(PLAIN), "MGFF, head at 10x lr, no warmup"),
    "mgff_head10x_warmup": Run(CLASSIFIER, dict(PLAIN, warmup_epochs=1.0), "MGFF, head at 10x lr, 1 warmup epoch"),
}
# issue 13 §4: single-stage vs two-stage (the `features` localiser) vs two-stage with the ground-truth box
# (oracle), stage 2 cut from stage 1's 224 px view or from the same view at 448 px (§3); all on the same
# data: the originals (no resized cache) with the 448 px source view in every batch.
TWO_STAGE = "mgff.lit.TwoStageClassifier"
SOURCE_DATA = dict(cache_dir=None, source_size=448)
STAGE2 = dict(head="linear", crop_size=224)
RUNS.update({
    "ts_single": Run(CLASSIFIER, dict(head="linear"), "single-stage linear, data as the two-stage runs", SOURCE_DATA),
    "ts_features_view": Run(TWO_STAGE, dict(STAGE2, localization="features", crop_from="view"), "two-stage, features box, crop from the 224 view", SOURCE_DATA),
    "ts_features_source": Run(TWO_STAGE, dict(STAGE2, localization="features", crop_from="source"), "two-stage, features box, crop from the 448 source", SOURCE_DATA),
    "ts_energy_source": Run(TWO_STAGE, dict(STAGE2, localization="features", feature_response="energy", crop_from="source"),
                            "two-stage, features box (energy response, the default before 'refined'), crop from the 448 source", SOURCE_DATA),
    "ts_oracle_view": Run(TWO_STAGE, dict(STAGE2, localization="ground_truth", crop_from="view"), "two-stage, ground-truth box, crop from the 224 view", SOURCE_DATA),
    "ts_oracle_source": Run(TWO_STAGE, dict(STAGE2, localization="ground_truth", crop_from="source"), "two-stage, ground-truth box, crop from the 448 source", SOURCE_DATA),
})
# issue 21 §1: single-stage at equal compute. The two-stage forward (stage 1 at 224 + stage 2 on a 224 crop, the
# features box read from stage 1's maps) costs 2.0x one 224 px stage; EfficientNet's FLOPs grow with the side squared,
# so 320 px (2.04x) matches it; the resize keeps the 256/224 ratio of the 224 runs.
RUNS.update({
    "ts_single_equal_flops": Run(CLASSIFIER, dict(head="linear", img_size=320), "single-stage linear at 320 px (2.04x the FLOPs of 224)",
                                 dict(SOURCE_DATA, resize_size=366, crop_size=320)),
    "ts_single_448": Run(CLASSIFIER, dict(head="linear", img_size=448), "single-stage linear at 448 px (4x the FLOPs of 224)",
                         dict(SOURCE_DATA, resize_size=512, crop_size=448)),
})
# issue 20 §3: the linear head's recipe search (3 epochs, seed 0, chosen on val); linear_head10x is the fourth setting
RUNS.update({
    "linear_lr02": Run(CLASSIFIER, dict(head="linear", lr=0.02), "linear, lr 0.02, head at 10x"),
    "linear_head30x": Run(CLASSIFIER, dict(head="linear", head_lr_scale=30.0), "linear, lr 0.01, head at 30x"),
    "linear_ls01": Run(CLASSIFIER, dict(head="linear", label_smoothing=0.1), "linear, head at 10x, label smoothing 0.1"),
})
# the frozen-backbone probe (head_probe.py) scored 0.833 with the linear head, 10 points above every fine-tune at lr 0.01:
# two more settings with a gentler backbone lr
RUNS.update({
    "linear_lr001": Run(CLASSIFIER, dict(head="linear", lr=0.001), "linear, backbone lr 0.001, head at 10x (0.01)"),
    "linear_lr001_head100x": Run(CLASSIFIER, dict(head="linear", lr=0.001, head_lr_scale=100.0), "linear, backbone lr 0.001, head at 100x (0.1)"),
})
# issue 20 §3: the residual MGFF head's recipe search (3 epochs, seed 0, chosen on val). The classifier role (the
# linear head inside it) stays at the linear head's 10x; what varies is the lr of the fused path, its layers and its
# zero-initialised classifier (one role, ``fusion``, since the fused classifier left the classifier role: at 10x it
# learned on the fresh features faster than they became useful, BENCHMARKS.md).
RESIDUAL = dict(head="mgff", fusion_residual=True)
RUNS.update({
    "mgff_res_head10x": Run(CLASSIFIER, dict(RESIDUAL), "residual MGFF, fused path and classifier at 10x (the linear head's recipe)"),
    "mgff_res_fusion1x": Run(CLASSIFIER, dict(RESIDUAL, fusion_lr_scale=1.0), "residual MGFF, fused path at 1x, classifier at 10x"),
    "mgff_res_fusion3x": Run(CLASSIFIER, dict(RESIDUAL, fusion_lr_scale=3.0), "residual MGFF, fused path at 3x, classifier at 10x"),
    "mgff_res_fusion1x_warmup": Run(CLASSIFIER, dict(RESIDUAL, fusion_lr_scale=1.0, fusion_warmup_epochs=1.0),
                                    "residual MGFF, fused path at 1x after a 1-epoch warmup of its own, classifier at 10x"),
    # the base path trained by its own CE, the fused path on the sum with the base held fixed (fusion_training)
    "mgff_res_fusion1x_detached": Run(CLASSIFIER, dict(RESIDUAL, fusion_lr_scale=1.0, fusion_training="detached_base"),
                                      "residual MGFF, fused path at 1x, base path trained on its own (detached_base)"),
    "mgff_res_fusion3x_detached": Run(CLASSIFIER, dict(RESIDUAL, fusion_lr_scale=3.0, fusion_training="detached_base"),
                                      "residual MGFF, fused path at 3x, base path trained on its own (detached_base)"),
})
# issue 20 §3: the winners of the searches (BENCHMARKS.md "Real photos: fusion head" has the search table) and the
# residual head's ablations at its recipe
LINEAR_BEST = dict(head="linear")  # linear_head10x's recipe: val 0.707 (lr 0.02: 0.607, head 30x: 0.580, label smoothing 0.1: 0.647)
MGFF_BEST = dict(RESIDUAL, fusion_lr_scale=1.0)  # mgff_res_fusion1x: val 0.713 (10x: 0.653, 3x: 0.653, 1x + warmup: 0.673)
RUNS.update({
    "linear_best": Run(CLASSIFIER, dict(LINEAR_BEST), "linear head at its best recipe"),
    "mgff_best": Run(CLASSIFIER, dict(MGFF_BEST), "residual MGFF head at its best recipe"),
    "mgff_best_no_attention": Run(CLASSIFIER, dict(MGFF_BEST, use_attention=False), "mgff_best without spatial attention"),
    "mgff_best_no_se": Run(CLASSIFIER, dict(MGFF_BEST, use_se=False), "mgff_best without SE"),
    "mgff_best_no_gcn": Run(CLASSIFIER, dict(MGFF_BEST, use_gcn=False), "mgff_best without GCN/pooling (mean over nodes)"),
    "mgff_no_residual": Run(CLASSIFIER, dict(MGFF_BEST, fusion_residual=False), "the plain MGFF head (fused readout alone) at mgff_best's recipe"),
})
# issue 21 §1: the same with the head of issue 20 (mgff_best's recipe). Its equal-FLOPs side is 320 px too (2.06x the
# FLOPs of a 224 px MGFF stage; the two-stage forward is 2.00x). _own_head gives stage 2 a head of its own on the
# shared backbone (one of the candidates for why the head's single-stage gain reversed inside two-stage).
TS_MGFF = dict(MGFF_BEST, crop_size=224, localization="features", crop_from="source")
RUNS.update({
    "ts_single_mgff": Run(CLASSIFIER, dict(MGFF_BEST), "single-stage residual MGFF, data as the two-stage runs", SOURCE_DATA),
    "ts_single_mgff_equal_flops": Run(CLASSIFIER, dict(MGFF_BEST, img_size=320), "single-stage residual MGFF at 320 px (2.06x the FLOPs of 224)",
                                      dict(SOURCE_DATA, resize_size=366, crop_size=320)),
    "ts_features_source_mgff": Run(TWO_STAGE, dict(TS_MGFF), "two-stage, residual MGFF head shared by both stages, features box, crop from the 448 source", SOURCE_DATA),
    "ts_features_source_mgff_own_head": Run(TWO_STAGE, dict(TS_MGFF, shared_head=False),
                                            "two-stage, shared backbone, a residual MGFF head per stage, features box, crop from the 448 source", SOURCE_DATA),
    # the other two candidates: the pooling loss counted once per stage (weight halved: the mean of the two stages'),
    # and the fused path's lr with two CE terms on it (halved)
    "ts_features_source_mgff_aux_half": Run(TWO_STAGE, dict(TS_MGFF, aux_loss_weight=0.05), "ts_features_source_mgff, aux weight 0.05 (the mean over the stages)", SOURCE_DATA),
    "ts_features_source_mgff_fusion_half": Run(TWO_STAGE, dict(TS_MGFF, fusion_lr_scale=0.5), "ts_features_source_mgff, fused path at 0.5x", SOURCE_DATA),
})
# issue 21 §2: the second loss without the zoom: a random crop of the localiser's areas from the same 448 source view,
# trained with its own CE; tested on the full view only (mgff.lit.TwoViewClassifier). The areas and shapes are those of
# the features boxes on 400 training photos (ImageNet weights, stage 1's own 224 px map, the training transform):
# area 0.40-0.62 of the view (10th-90th percentile, median 0.49), width / height 0.65-1.15 (median 0.90).
RUNS["ts_single_two_views"] = Run("mgff.lit.TwoViewClassifier", dict(head="linear", crop_size=224, crop_from="source", crop_area=[0.40, 0.62],
                                                                      crop_ratio=[0.65, 1.15]),
                                  "single-stage linear, trained on the full view + a random crop from the 448 source, tested on the full view", SOURCE_DATA)
# issue 21 §3: single-stage at the paper's stage-1 side, for boxes from a model trained at 384 px
RUNS["ts_single_384"] = Run(CLASSIFIER, dict(head="linear", img_size=384), "single-stage linear at 384 px (the paper's stage-1 side)",
                            dict(SOURCE_DATA, resize_size=439, crop_size=384))
# the same, its last map's energy kept correlated with the ImageNet weights' (mgff.lit.keep_localization): do its own
# boxes stay near the frozen map's 0.816 at 384? (issue 21 §3)
RUNS["ts_single_384_keep"] = Run(CLASSIFIER, dict(head="linear", img_size=384, keep_localization_weight=1.0),
                                 "ts_single_384 keeping the ImageNet map's energy pattern (keep_localization_weight 1)",
                                 dict(SOURCE_DATA, resize_size=439, crop_size=384))
RUNS["ts_single_384_keep3"] = Run(CLASSIFIER, dict(head="linear", img_size=384, keep_localization_weight=3.0),
                                  "ts_single_384 keeping the ImageNet map's energy pattern (keep_localization_weight 3)",
                                  dict(SOURCE_DATA, resize_size=439, crop_size=384))
DEFAULT_RUNS = ("linear", "mgff", "mgff_no_attention", "mgff_no_se", "mgff_no_gcn")


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def model_kwargs(run: Run, data, source: RealData = RealData()) -> dict[str, Any]:
    """The model's init arguments: :data:`COMMON`, the run's overrides, the data's class count, the weights and
    their normalisation (for classes that take them)."""
    cls = import_class(run.model_class)
    kwargs = {**COMMON, **run.overrides, "num_classes": data.num_classes}
    accepted = inspect.signature(cls).parameters
    has_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key, value in source.model_kwargs().items():
        if key in accepted or has_var_kwargs:
            kwargs.setdefault(key, value)
    return kwargs


def build_datamodule(source: RealData, num_workers: int, cache: Path = real_data.DEFAULT_CACHE, **overrides: Any):
    """The CUB DataModule of every run: :data:`DATA` with the run's overrides, on ``source``, through its resized
    cache under ``cache`` unless the overrides set ``cache_dir=None`` (the originals)."""
    return source.datamodule(cache=cache, num_workers=num_workers, **{**DATA, **overrides})


class TrainingTime:
    """Process CPU seconds and images of the training batches alone (no validation, no test), for a cost per image
    that does not depend on what else the machine runs (one thread, loader in the process)."""

    def __init__(self) -> None:
        import lightning as L

        outer = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer._started = time.process_time()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                outer.seconds += time.process_time() - outer._started
                outer.images += len(batch["label"]) if batch else 0

        self.seconds, self.images, self._started = 0.0, 0, 0.0
        self.callback = _Callback()

    @property
    def ms_per_image(self) -> float | None:
        return 1000 * self.seconds / self.images if self.images else None


def train_and_test(
    name: str, run: Run, run_dir: Path, source: RealData = RealData(), num_workers: int = 0, epochs: int = EPOCHS, seed: int = SEED,
    also_last: bool = False, clip: float | None = None, cache: Path = real_data.DEFAULT_CACHE,
) -> dict[str, Any]:
    """Fine-tune one run, test its best-validation checkpoint, write its per-image predictions and ``result.json``.

    ``seed`` seeds the training (initialisation of new layers, order, augmentation); the train/val split stays
    ``DATA["split_seed"]``. ``clip``: ``gradient_clip_val`` (norm). A non-finite loss, validation loss or weight
    stops the run before any checkpoint of that state (:class:`~mgff.callbacks.nonfinite_loss.StopOnNonFiniteLoss`);
    the result then says ``diverged`` and has no ``test_acc``. ``also_last`` also tests the last epoch's weights
    (``last_test_acc``: a diagnosis of the checkpoint choice, never the reported figure)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from mgff.callbacks.nonfinite_loss import NonFiniteLossError, StopOnNonFiniteLoss

    L.seed_everything(seed, workers=True)
    data = build_datamodule(source, num_workers, cache, **run.data)
    data.prepare_data()
    data.setup("fit")
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in [*run_dir.glob("best*.ckpt"), *run_dir.glob("last_epoch*.ckpt"), run_dir / "result.json"]:
        old.unlink(missing_ok=True)
    model = import_class(run.model_class)(**model_kwargs(run, data, source))
    checkpoint = ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val/acc", mode="max", save_top_k=1)
    # Lightning's save_last writes last.ckpt only when a top-k checkpoint is saved in the same step, so the last
    # epoch's weights need a checkpoint of their own (no monitor: every epoch replaces it)
    final = ModelCheckpoint(dirpath=run_dir, filename="last_epoch", save_top_k=1) if also_last else None
    timing = TrainingTime()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        precision="32-true",
        deterministic=False,
        gradient_clip_val=clip,
        # the stop before the checkpoints: it must see a diverged state before they save it
        callbacks=[StopOnNonFiniteLoss(), timing.callback, checkpoint] + ([final] if final else []),
        logger=CSVLogger(save_dir=str(run_dir), name="logs"),
        enable_progress_bar=False,
        log_every_n_steps=5,
    )
    result: dict[str, Any] = dict(run=name, epochs=epochs, seed=seed, clip=clip, root=str(source.root), note=run.note)
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=data)
    except NonFiniteLossError as err:
        result.update(diverged=str(err), minutes=round((time.perf_counter() - start) / 60, 1))
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        return result
    minutes = (time.perf_counter() - start) / 60
    best = checkpoint.best_model_path
    # read before predict(): restoring best.ckpt also restores the callbacks' states, and a best.ckpt written in
    # the first epoch holds the last-epoch callback's state from before it had saved anything (path '')
    last_path = final.best_model_path if final else None
    # one pass over the test images gives both the per-image rows and the top-1 (no separate trainer.test)
    rows = prediction_rows(trainer.predict(model, datamodule=data, ckpt_path=best))
    with open(run_dir / "test_predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if len(rows) != len(data.datasets["test"]):
        raise RuntimeError(f"{name}: {len(rows)} predictions for {len(data.datasets['test'])} test images")
    ckpt_epoch = int(torch.load(best, map_location="cpu", weights_only=True)["epoch"])
    result.update(
        test_acc=round(float(np.mean([r["correct"] for r in rows])), 4),
        best_val_acc=round(float(checkpoint.best_model_score), 4),
        best_epoch=ckpt_epoch + 1,
        minutes=round(minutes, 1),
        train_ms_per_image=round(timing.ms_per_image, 1) if timing.ms_per_image else None,
        checkpoint=str(Path(best).relative_to(REPO_ROOT)) if Path(best).is_relative_to(REPO_ROOT) else best,
    )
    if hasattr(model, "classify_crops"):  # two-stage: each stage's top-1 too (the merged one is test_acc above)
        tested = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)[0]
        result["test_metrics"] = {k: round(float(v), 4) for k, v in sorted(tested.items()) if k.endswith("acc")}
    if also_last:
        last = prediction_rows(trainer.predict(model, datamodule=data, ckpt_path=last_path))
        result["last_test_acc"] = round(float(np.mean([r["correct"] for r in last])), 4)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def prediction_rows(predictions: list[dict]) -> list[dict[str, Any]]:
    """``trainer.predict`` batches -> one row per test image (index, path, label, pred, correct), by index."""
    rows = []
    for batch in predictions:
        for i in range(len(batch["label"])):
            label, pred = int(batch["label"][i]), int(batch["pred"][i])
            rows.append(dict(index=int(batch["index"][i]), path=str(batch["path"][i]), label=label, pred=pred, correct=int(label == pred)))
    return sorted(rows, key=lambda r: r["index"])


def load_correct(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(index, correct)`` of one finished run, ordered by image index."""
    with open(run_dir / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["index"]) for r in rows]), np.array([int(r["correct"]) for r in rows])


def seed_dirs(out: Path, seeds: list[int] | None) -> dict[int | None, Path]:
    """Where each seed's runs live: ``{None: out}`` for the one-seed layout, else ``{k: out/seed<k>}``."""
    return {None: out} if seeds is None else {k: out / f"seed{k}" for k in seeds}


def read_results(out: Path, names: list[str], seeds: list[int] | None) -> dict[str, dict[int | None, dict]]:
    """``{run: {seed: result.json}}`` of the finished runs among ``names`` and ``seeds``."""
    found: dict[str, dict[int | None, dict]] = {}
    for seed, folder in seed_dirs(out, seeds).items():
        for name in names:
            path = folder / name / "result.json"
            if path.is_file():
                found.setdefault(name, {})[seed] = json.loads(path.read_text())
    return found


def compare(out: Path, seeds: list[int] | None, a: str, b: str) -> str:
    """``b - a``: pooled paired bootstrap over the seeds where both runs finished (same test images)."""
    pairs, used = [], []
    for seed, folder in seed_dirs(out, seeds).items():
        if not all((folder / n / "test_predictions.csv").is_file() for n in (a, b)):
            continue
        (ia, ca), (ib, cb) = load_correct(folder / a), load_correct(folder / b)
        if not np.array_equal(ia, ib):
            raise ValueError(f"{a} and {b} were tested on different images ({folder})")
        pairs.append((ca, cb))
        used.append(seed)
    if not pairs:
        return f"\n{b} - {a}: no seed where both finished"
    d, lo, hi = pooled_paired_bootstrap(pairs)
    seeds_text = "seed " + ",".join(str(s) for s in used) if used != [None] else "one seed"
    return (f"\n{b} - {a}: {d:+.3f} top-1, pooled paired bootstrap 95 % interval [{lo:+.3f}, {hi:+.3f}] "
            f"({seeds_text}; {len(pairs[0][0])} test images, 10,000 resamples)")


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_table(out: Path, results: dict[str, dict[int | None, dict]], comparisons: list[tuple[str, str]], seeds: list[int] | None, command: str) -> str:
    """``results.md`` / ``results.csv`` under ``out``: one row per run, mean ± sd over its seeds; the comparisons."""
    import torch

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Command: `{command}`",
        "",
        "| run | seeds | test top-1 | per seed | best val top-1 | best epoch | minutes | train ms/image | what |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in results.items():
        done = {s: r for s, r in by_seed.items() if "test_acc" in r}
        diverged = sorted(str(r["seed"]) for r in by_seed.values() if "diverged" in r)
        tests = [r["test_acc"] for r in done.values()]
        per_seed = " / ".join(f"{r['test_acc']:.3f}" for r in done.values()) + (f" (diverged: seed {', '.join(diverged)})" if diverged else "")
        epochs = "/".join(str(r["best_epoch"]) for r in done.values())
        any_result = next(iter(by_seed.values()))
        train_ms = [r["train_ms_per_image"] for r in done.values() if r.get("train_ms_per_image")]
        last = [r["last_test_acc"] for r in done.values() if "last_test_acc" in r]
        lines.append(
            f"| {name} | {len(done)} | {mean_sd(tests)} | {per_seed} | {mean_sd([r['best_val_acc'] for r in done.values()])} | "
            f"{epochs} of {any_result['epochs']} | {statistics.mean(r['minutes'] for r in by_seed.values()):.1f} | "
            f"{f'{statistics.mean(train_ms):.0f}' if train_ms else '-'} | {any_result['note']}" + (f" (last epoch's weights: test {mean_sd(last)})" if last else "") + " |"
        )
    for a, b in comparisons:
        lines.append(compare(out, seeds, a, b))
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    rows = [r for by_seed in results.values() for r in by_seed.values()]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # runs may add keys
        writer.writeheader()
        writer.writerows(rows)
    return text


def parse_names(text: str | None, default: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(default)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {sorted(RUNS)}")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs distinct seeds, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", help=f"comma-separated names of RUNS (default: {','.join(DEFAULT_RUNS)})")
    parser.add_argument("--compare", action="append", default=[], help="a,b: pooled paired bootstrap CI of acc(b) - acc(a) over the seeds; repeatable")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="runs/real_photos by default")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (0: decode the small cached JPEGs in the main process, saving a worker's memory)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (on shared cores two threads spin against each other)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help=f"one training seed, runs in <out>/<run>/ (default {SEED}; the data split stays fixed)")
    seeds.add_argument("--seeds", type=parse_seeds, default=None, help="several training seeds, e.g. 0,1,2: runs in <out>/seed<k>/<run>/")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val (gradient norm); off by default")
    parser.add_argument("--cache", type=Path, default=real_data.DEFAULT_CACHE, help="where the per-root resized caches live")
    parser.add_argument("--also-last", action="store_true", help="also test the last epoch's weights (last_test_acc in result.json; a diagnosis)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--skip-done", action="store_true", help="reuse the result of runs that already have a result.json")
    real_data.add_arguments(parser)
    args = parser.parse_args(argv)
    names = parse_names(args.runs, DEFAULT_RUNS)
    comparisons = [tuple(parse_names(c, ())) for c in args.compare]
    if any(len(c) != 2 for c in comparisons):
        raise SystemExit("--compare takes two run names: a,b")
    source = real_data.from_args(args)
    if not args.report_only:
        source.check()
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed, folder in seed_dirs(args.out, args.seeds).items():
            seed = SEED if seed is None and args.seed is None else (args.seed if seed is None else seed)
            for name in names:
                if args.skip_done and (folder / name / "result.json").is_file():
                    continue
                result = train_and_test(name, RUNS[name], folder / name, source, args.workers, args.epochs, seed, args.also_last, args.clip, args.cache)
                if "diverged" in result:
                    print(f"{name} (seed {seed}): diverged: {result['diverged']}", flush=True)
                else:
                    print(f"{name} (seed {seed}): test top-1 {result['test_acc']:.4f} (best val {result['best_val_acc']:.4f}, {result['minutes']} min)", flush=True)
    results = read_results(args.out, names, args.seeds)
    missing = [n for n in names if n not in results]
    if missing:
        print(f"no finished run of {missing} under {args.out}", file=sys.stderr)
    command = "python benchmarks/real_photos.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_table(args.out, results, comparisons, args.seeds, command.strip()))


if __name__ == "__main__":
    main()
