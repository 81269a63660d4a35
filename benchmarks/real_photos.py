"""Fine-tune ImageNet EfficientNet-Lite0 on real CUB photos, one named run per setting, over seeds.

The one runner for every real-photo comparison of the project. A run (one entry of :data:`RUNS`) is a config
and a list of command-line overrides, exactly what ``python -m mgff.fit`` takes: an entry config of
``experiments/lite0/`` (``single.yaml``, ``two_stage.yaml``, ``full.yaml``, each including ``recipe.yaml``)
or any other config, then ``--model.init_args.head=mgff``-style options. Every model, DataModule and Trainer is
built from that config by the project's CLI parser (:class:`mgff.cli.MGFFCLI`), so a run here and
``python -m mgff.fit`` with the same arguments build the same thing; ``result.json`` records the command
(``fit_command``) and the run folder the resolved ``config.yaml``. For each run and seed it

- parses every run's config before the first one trains (a wrong key stops the command at once);
- fine-tunes on the training photos of ``--root`` (default: the 750 of ``../shared/realdata/CUB_200_2011_first25``)
  minus the config's stratified validation split (the same for every seed), keeping the checkpoint of the best
  validation top-1 (``val/acc``); a non-finite loss or state stops the run (it is reported as diverged);
- tests that checkpoint once on the official test photos (the CLI's test pass, which writes
  ``test_predictions.csv``: one row per test image, ``index,path,label,...,correct,...``),
- writes into the run folder ``best.ckpt``, ``test_predictions.csv``, ``result.json`` (``test_acc``,
  ``best_val_acc``, minutes, training CPU-seconds per image, ``test_metrics`` with a two-stage run's top-1 of each
  stage, the config, the overrides and the equivalent ``python -m mgff.fit`` command) and, as ``mgff.fit`` does,
  ``config.yaml``, ``hparams.yaml``, the CSV log ``metrics.csv`` and ``metrics.json`` in ``mgff.fit``'s format
  (what the test returned, ``best_val/acc``, ``best_checkpoint``, ``epochs``, ``global_step``, ``fit_seconds``,
  ``cpu_seconds``, ``torch_threads``, ``num_classes``; not for a diverged run), so ``python -m mgff.report <out>``
  groups and compares the runner's folders as it does ``mgff.fit``'s,

and finally writes ``<out>/results.md`` / ``results.csv`` (mean ± sd over seeds per run) and prints the table.
``--compare a,b`` adds the pooled paired bootstrap interval of ``acc(b) - acc(a)`` over the seeds both ran
(:func:`mgff.stats.pooled_paired_bootstrap`). ``--list`` prints each run's config and overrides; arguments
after ``--`` are overrides for every run (``-- --trainer.accelerator=gpu --data.init_args.batch_size=64``).

Run directories: ``--seed k`` (one seed) writes ``<out>/<run>/``; ``--seeds 0,1,2`` writes
``<out>/seed<k>/<run>/`` for each seed, and ``--report-only`` / ``--compare`` read every seed folder.

What the runner adds to a run's arguments (after the run's own overrides, before those after ``--``):

- the photos and weights, :mod:`benchmarks.real_data`: ``--root`` -> ``--data.init_args.root``, ``--weights``
  -> ``--model.init_args.pretrained``, ``--mean``/``--std`` (default 0.5: the shared TF-Lite-converted weights,
  ``../shared/weights/README.md``) -> ``data.mean``/``std`` and ``model.backbone_mean``/``backbone_std``, so
  the model's conversion is the identity;
- a resized image cache per source root (:mod:`benchmarks.real_data`, 256 px, ``--cache``) for every run whose
  data has no source view and resizes to at most 256 px; runs with a source view read the originals;
- ``--epochs`` -> ``trainer.max_epochs``, ``--workers`` -> ``data.num_workers``, ``--clip`` ->
  ``trainer.gradient_clip_val`` when given (otherwise the run's config decides);
- then the seed (``seed_everything``), the run folder (logger, ``checkpoint.dirpath``/``filename: best``) and no
  progress bar.

The named runs. ``lite0_single``, ``lite0_two_stage`` and ``lite0_full`` are the entry configs as they are (the
project's recipe: AdamW, LP-FT, EMA weights, 20 epochs...). Every other run is a historical one of
``BENCHMARKS.md``, built before those configs existed by a dict runner: :data:`HELD_BACK` turns the recipe back into
that runner's settings (SGD lr 0.01, momentum 0.9, head at 10x, weight decay 5e-4, no warmup, no label smoothing,
BatchNorm in train mode, nothing frozen, no EMA, 6 epochs, batch 32, the loader in the process, on the CPU) and the
run adds its own (head, ablation, lr, sizes...). Every setting the dict runner gave the model and the data is set
again, so the historical runs keep their settings when ``recipe.yaml`` changes. Checked against the dict runner
(its last version, on a generated CUB with random weights): all 43 historical runs build models with the same
hyperparameters and DataModules with the same settings, with the same initial weights for a seed, and the runs
trained for it (``linear``, ``mgff_best``, ``ts_features_source``, 2 epochs on the CPU) gave bit-identical best
checkpoints. What differs:

- the model also records the class names (the CLI links them from the DataModule); a run without the resized cache
  has the config's ``cache_size`` (512, unused without a ``cache_dir``), where the dict runner had 256;
- the logs: ``metrics.csv`` is in the run folder (was ``logs/version_N/``) and is written every 6 steps (was 5);
  the run folder also holds ``config.yaml`` and ``hparams.yaml``;
- ``test_predictions.csv`` has the CLI's columns (also ``label_name``, ``prob``, the top-5...), a superset of the
  old five (``index,path,label,pred,correct``); the test top-1 comes from the test pass (was a predict pass);
- ``ts_single_two_views`` is ``single.yaml`` with ``--model.class_path=mgff.lit.TwoViewClassifier`` (no entry
  config has that class);
- ``--epochs`` and ``--workers`` default to the run's config (the historical runs: 6 and 0, as the dict runner's
  defaults were), so ``lite0_*`` runs get the recipe's 20 epochs and 2 workers.

    nice -n 5 python benchmarks/real_photos.py --runs linear_best,mgff_best --epochs 6 --seeds 0,1,2 --out runs/heads
    python benchmarks/real_photos.py --runs linear_best,mgff_best --seeds 0,1,2 --out runs/heads --report-only \
        --compare linear_best,mgff_best
    python benchmarks/real_photos.py --root /data/CUB_200_2011 --weights my_lite0.safetensors --runs linear_best
    python benchmarks/real_photos.py --list --runs linear_best       # its config and overrides
    python benchmarks/real_photos.py --runs lite0_single --seeds 0,1,2 -- --trainer.accelerator=gpu

Run one process at a time: on 2 cores one 3-epoch run takes about 5 minutes alone, 26-33 in parallel with four others.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import real_data  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402
from mgff.stats import paired_bootstrap, pooled_paired_bootstrap  # noqa: E402,F401  (paired_bootstrap: for the other runners)

REPO_ROOT = real_data.REPO_ROOT
DEFAULT_OUT = REPO_ROOT / "runs" / "real_photos"
SEED = 0
# the entry configs of the real-photo runs (each includes experiments/lite0/recipe.yaml)
SINGLE = "experiments/lite0/single.yaml"
TWO_STAGE = "experiments/lite0/two_stage.yaml"
FULL = "experiments/lite0/full.yaml"
RESIZED_CACHE_SIZE = 256  # shorter side of the per-root resized cache (runs/cache/<root>-<hash>), as before


def yaml_value(value: Any) -> str:
    """A Python value as a command-line value the CLI parses back to it (``null``, ``true``, ``[2, 3, 4]``, ``sgd``)."""
    return value if isinstance(value, str) else json.dumps(value)


def model_options(**values: Any) -> tuple[str, ...]:
    """``--model.init_args.<key>=<value>`` for each keyword."""
    return tuple(f"--model.init_args.{key}={yaml_value(value)}" for key, value in values.items())


def data_options(**values: Any) -> tuple[str, ...]:
    """``--data.init_args.<key>=<value>`` for each keyword."""
    return tuple(f"--data.init_args.{key}={yaml_value(value)}" for key, value in values.items())


@dataclass(frozen=True)
class Run:
    """One named run: a config (relative to the repository root, or absolute) and the command-line overrides that
    follow it, as ``python -m mgff.fit --config <config> <overrides>`` takes them."""

    config: str
    overrides: tuple[str, ...] = ()
    note: str = ""

    @property
    def config_path(self) -> Path:
        path = Path(self.config)
        return path if path.is_absolute() else REPO_ROOT / path

    def args(self) -> list[str]:
        return ["--config", str(self.config_path), *self.overrides]

    def with_overrides(self, *more: str) -> "Run":
        """The same run with more overrides after its own."""
        return dataclasses.replace(self, overrides=(*self.overrides, *more))


# The dict runner's settings (its COMMON and DATA, the held-back measurement), over the recipe of
# experiments/lite0/recipe.yaml: every value it set, and what the recipe sets that it left at the class defaults.
HELD_BACK: tuple[str, ...] = (
    *model_options(
        backbone="efficientnet_lite0", img_size=224, stages=[2, 3, 4], optimizer="sgd", lr=0.01, head_lr_scale=10.0,
        momentum=0.9, weight_decay=0.0005, warmup_epochs=0.0, scheduler_interval="step", dropout=0.1, label_smoothing=0.0,
        # set by recipe.yaml, left at the class defaults by the dict runner: the fused path at the head's lr (None),
        # BatchNorm statistics updated, nothing frozen
        fusion_lr_scale=None, bn_mode="train", freeze_backbone_epochs=0,
    ),
    *data_options(batch_size=32, resize_size=256, crop_size=224, val_fraction=0.2, split_seed=0, num_workers=0),
    "--trainer.callbacks=[]",  # no EMA weights
    "--trainer.max_epochs=6",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
)


def held_back(config: str, note: str, *options: str, **model: Any) -> Run:
    """A historical run: ``config`` + :data:`HELD_BACK` + ``options`` (a ``--model.class_path`` among them comes before
    the init args it takes) + ``model`` as model options."""
    return Run(config, (*HELD_BACK, *options, *model_options(**model)), note)


# the 448 px source view that the two-stage comparisons read in every batch (two_stage.yaml and full.yaml have it)
SOURCE_VIEW = data_options(source_size=448)
RUNS: dict[str, Run] = {
    # the project's recipe (experiments/lite0/recipe.yaml), the entry configs as they are
    "lite0_single": Run(SINGLE, (), "experiments/lite0/single.yaml: single-stage linear head, the lite0 recipe"),
    "lite0_two_stage": Run(TWO_STAGE, (), "experiments/lite0/two_stage.yaml: two-stage linear head, the lite0 recipe"),
    "lite0_full": Run(FULL, (), "experiments/lite0/full.yaml: two-stage residual MGFF head, the lite0 recipe"),
}
# The heads table (issue 12 §4) uses one lr for every parameter, as the paper does ("初始学习率为2e−4",
# one initial lr): with the head at 10x the MGFF head diverged (with its LayerNorm readout: train loss
# 4.8 -> 23 within the first epoch) or stayed near chance (without it; BENCHMARKS.md). ``linear_head10x``
# is the linear head at the held-back setting, for reference.
ONE_LR = dict(head_lr_scale=1.0)
PLAIN = dict(head="mgff", fusion_residual=False)  # the MGFF head these runs measured (before the residual head)
RUNS.update({
    "linear": held_back(SINGLE, "norm + pool + linear on the last map (conv_head/bn2, 1280 ch)", **ONE_LR, head="linear"),
    "linear_head10x": held_back(SINGLE, "linear, head at 10x lr (the held-back setting)", head="linear"),
    "mgff": held_back(SINGLE, "full MGFF head: align + MHSA + SE + GCN + super-node pooling", **ONE_LR, **PLAIN),
    "mgff_no_attention": held_back(SINGLE, "MGFF without spatial attention", **ONE_LR, **PLAIN, use_attention=False),
    "mgff_no_se": held_back(SINGLE, "MGFF without SE", **ONE_LR, **PLAIN, use_se=False),
    "mgff_no_gcn": held_back(SINGLE, "MGFF without GCN/pooling (mean over nodes)", **ONE_LR, **PLAIN, use_gcn=False),
    # diagnosis: can the MGFF head take the 10x head lr with a warmup?
    "mgff_head10x": held_back(SINGLE, "MGFF, head at 10x lr, no warmup", **PLAIN),
    "mgff_head10x_warmup": held_back(SINGLE, "MGFF, head at 10x lr, 1 warmup epoch", **PLAIN, warmup_epochs=1.0),
})
# issue 13 §4: single-stage vs two-stage (the `features` localiser) vs two-stage with the ground-truth box
# (oracle), stage 2 cut from stage 1's 224 px view or from the same view at 448 px (§3); all on the same
# data: the originals (no resized cache) with the 448 px source view in every batch.
STAGE2 = dict(head="linear", crop_size=224)
RUNS.update({
    "ts_single": held_back(SINGLE, "single-stage linear, data as the two-stage runs", *SOURCE_VIEW, head="linear"),
    "ts_features_view": held_back(TWO_STAGE, "two-stage, features box, crop from the 224 view", *SOURCE_VIEW, **STAGE2,
                                  localization="features", crop_from="view"),
    "ts_features_source": held_back(TWO_STAGE, "two-stage, features box, crop from the 448 source", *SOURCE_VIEW, **STAGE2,
                                    localization="features", crop_from="source"),
    "ts_energy_source": held_back(TWO_STAGE, "two-stage, features box (energy response, the default before 'refined'), crop from the 448 source",
                                  *SOURCE_VIEW, **STAGE2, localization="features", feature_response="energy", crop_from="source"),
    "ts_oracle_view": held_back(TWO_STAGE, "two-stage, ground-truth box, crop from the 224 view", *SOURCE_VIEW, **STAGE2,
                                localization="ground_truth", crop_from="view"),
    "ts_oracle_source": held_back(TWO_STAGE, "two-stage, ground-truth box, crop from the 448 source", *SOURCE_VIEW, **STAGE2,
                                  localization="ground_truth", crop_from="source"),
})
# issue 21 §1: single-stage at equal compute. The two-stage forward (stage 1 at 224 + stage 2 on a 224 crop, the
# features box read from stage 1's maps) costs 2.0x one 224 px stage; EfficientNet's FLOPs grow with the side squared,
# so 320 px (2.04x) matches it; the resize keeps the 256/224 ratio of the 224 runs.
AT_320 = data_options(resize_size=366, crop_size=320)
AT_384 = data_options(resize_size=439, crop_size=384)
RUNS.update({
    "ts_single_equal_flops": held_back(SINGLE, "single-stage linear at 320 px (2.04x the FLOPs of 224)", *SOURCE_VIEW, *AT_320,
                                       head="linear", img_size=320),
    "ts_single_448": held_back(SINGLE, "single-stage linear at 448 px (4x the FLOPs of 224)", *SOURCE_VIEW,
                               *data_options(resize_size=512, crop_size=448), head="linear", img_size=448),
})
# issue 20 §3: the linear head's recipe search (3 epochs, seed 0, chosen on val); linear_head10x is the fourth setting
RUNS.update({
    "linear_lr02": held_back(SINGLE, "linear, lr 0.02, head at 10x", head="linear", lr=0.02),
    "linear_head30x": held_back(SINGLE, "linear, lr 0.01, head at 30x", head="linear", head_lr_scale=30.0),
    "linear_ls01": held_back(SINGLE, "linear, head at 10x, label smoothing 0.1", head="linear", label_smoothing=0.1),
})
# the frozen-backbone probe (head_probe.py) scored 0.833 with the linear head, 10 points above every fine-tune at lr 0.01:
# two more settings with a gentler backbone lr
RUNS.update({
    "linear_lr001": held_back(SINGLE, "linear, backbone lr 0.001, head at 10x (0.01)", head="linear", lr=0.001),
    "linear_lr001_head100x": held_back(SINGLE, "linear, backbone lr 0.001, head at 100x (0.1)", head="linear", lr=0.001, head_lr_scale=100.0),
})
# issue 20 §3: the residual MGFF head's recipe search (3 epochs, seed 0, chosen on val). The classifier role (the
# linear head inside it) stays at the linear head's 10x; what varies is the lr of the fused path, its layers and its
# zero-initialised classifier (one role, ``fusion``, since the fused classifier left the classifier role: at 10x it
# learned on the fresh features faster than they became useful, BENCHMARKS.md).
RESIDUAL = dict(head="mgff", fusion_residual=True)
RUNS.update({
    "mgff_res_head10x": held_back(SINGLE, "residual MGFF, fused path and classifier at 10x (the linear head's recipe)", **RESIDUAL),
    "mgff_res_fusion1x": held_back(SINGLE, "residual MGFF, fused path at 1x, classifier at 10x", **RESIDUAL, fusion_lr_scale=1.0),
    "mgff_res_fusion3x": held_back(SINGLE, "residual MGFF, fused path at 3x, classifier at 10x", **RESIDUAL, fusion_lr_scale=3.0),
    "mgff_res_fusion1x_warmup": held_back(SINGLE, "residual MGFF, fused path at 1x after a 1-epoch warmup of its own, classifier at 10x",
                                          **RESIDUAL, fusion_lr_scale=1.0, fusion_warmup_epochs=1.0),
    # the base path trained by its own CE, the fused path on the sum with the base held fixed (fusion_training)
    "mgff_res_fusion1x_detached": held_back(SINGLE, "residual MGFF, fused path at 1x, base path trained on its own (detached_base)",
                                            **RESIDUAL, fusion_lr_scale=1.0, fusion_training="detached_base"),
    "mgff_res_fusion3x_detached": held_back(SINGLE, "residual MGFF, fused path at 3x, base path trained on its own (detached_base)",
                                            **RESIDUAL, fusion_lr_scale=3.0, fusion_training="detached_base"),
})
# issue 20 §3: the winners of the searches (BENCHMARKS.md "Real photos: fusion head" has the search table) and the
# residual head's ablations at its recipe
LINEAR_BEST = dict(head="linear")  # linear_head10x's recipe: val 0.707 (lr 0.02: 0.607, head 30x: 0.580, label smoothing 0.1: 0.647)
MGFF_BEST = dict(RESIDUAL, fusion_lr_scale=1.0)  # mgff_res_fusion1x: val 0.713 (10x: 0.653, 3x: 0.653, 1x + warmup: 0.673)
RUNS.update({
    "linear_best": held_back(SINGLE, "linear head at its best recipe", **LINEAR_BEST),
    "mgff_best": held_back(SINGLE, "residual MGFF head at its best recipe", **MGFF_BEST),
    "mgff_best_no_attention": held_back(SINGLE, "mgff_best without spatial attention", **MGFF_BEST, use_attention=False),
    "mgff_best_no_se": held_back(SINGLE, "mgff_best without SE", **MGFF_BEST, use_se=False),
    "mgff_best_no_gcn": held_back(SINGLE, "mgff_best without GCN/pooling (mean over nodes)", **MGFF_BEST, use_gcn=False),
    "mgff_no_residual": held_back(SINGLE, "the plain MGFF head (fused readout alone) at mgff_best's recipe", **{**MGFF_BEST, "fusion_residual": False}),
})
# issue 21 §1: the same with the head of issue 20 (mgff_best's recipe). Its equal-FLOPs side is 320 px too (2.06x the
# FLOPs of a 224 px MGFF stage; the two-stage forward is 2.00x). _own_head gives stage 2 a head of its own on the
# shared backbone (one of the candidates for why the head's single-stage gain reversed inside two-stage).
TS_MGFF = dict(MGFF_BEST, crop_size=224, localization="features", crop_from="source")
RUNS.update({
    "ts_single_mgff": held_back(SINGLE, "single-stage residual MGFF, data as the two-stage runs", *SOURCE_VIEW, **MGFF_BEST),
    "ts_single_mgff_equal_flops": held_back(SINGLE, "single-stage residual MGFF at 320 px (2.06x the FLOPs of 224)", *SOURCE_VIEW, *AT_320,
                                            **MGFF_BEST, img_size=320),
    "ts_features_source_mgff": held_back(FULL, "two-stage, residual MGFF head shared by both stages, features box, crop from the 448 source",
                                         *SOURCE_VIEW, **TS_MGFF),
    "ts_features_source_mgff_own_head": held_back(FULL, "two-stage, shared backbone, a residual MGFF head per stage, features box, crop from the 448 source",
                                                  *SOURCE_VIEW, **TS_MGFF, shared_head=False),
    # the other two candidates: the pooling loss counted once per stage (weight halved: the mean of the two stages'),
    # and the fused path's lr with two CE terms on it (halved)
    "ts_features_source_mgff_aux_half": held_back(FULL, "ts_features_source_mgff, aux weight 0.05 (the mean over the stages)", *SOURCE_VIEW,
                                                  **TS_MGFF, aux_loss_weight=0.05),
    "ts_features_source_mgff_fusion_half": held_back(FULL, "ts_features_source_mgff, fused path at 0.5x", *SOURCE_VIEW,
                                                     **{**TS_MGFF, "fusion_lr_scale": 0.5}),
})
# issue 21 §2: the second loss without the zoom: a random crop of the localiser's areas from the same 448 source view,
# trained with its own CE; tested on the full view only (mgff.lit.TwoViewClassifier, which no entry config names). The
# areas and shapes are those of the features boxes on 400 training photos (ImageNet weights, stage 1's own 224 px map,
# the training transform): area 0.40-0.62 of the view (10th-90th percentile, median 0.49), width / height 0.65-1.15
# (median 0.90).
RUNS["ts_single_two_views"] = held_back(SINGLE, "single-stage linear, trained on the full view + a random crop from the 448 source, tested on the full view",
                                        "--model.class_path=mgff.lit.TwoViewClassifier", *SOURCE_VIEW,
                                        head="linear", crop_size=224, crop_from="source", crop_area=[0.40, 0.62], crop_ratio=[0.65, 1.15])
# issue 21 §3: single-stage at the paper's stage-1 side, for boxes from a model trained at 384 px
RUNS["ts_single_384"] = held_back(SINGLE, "single-stage linear at 384 px (the paper's stage-1 side)", *SOURCE_VIEW, *AT_384, head="linear", img_size=384)
# the same, its last map's energy kept correlated with the ImageNet weights' (mgff.lit.keep_localization): do its own
# boxes stay near the frozen map's 0.816 at 384? (issue 21 §3)
RUNS["ts_single_384_keep"] = held_back(SINGLE, "ts_single_384 keeping the ImageNet map's energy pattern (keep_localization_weight 1)",
                                       *SOURCE_VIEW, *AT_384, head="linear", img_size=384, keep_localization_weight=1.0)
RUNS["ts_single_384_keep3"] = held_back(SINGLE, "ts_single_384 keeping the ImageNet map's energy pattern (keep_localization_weight 3)",
                                        *SOURCE_VIEW, *AT_384, head="linear", img_size=384, keep_localization_weight=3.0)
DEFAULT_RUNS = ("linear", "mgff", "mgff_no_attention", "mgff_no_se", "mgff_no_gcn")


# ----- building through the project's CLI ---------------------------------------------------------------------------
def run_args(run: Run, source: RealData = RealData(), extra: Sequence[str] = ()) -> list[str]:
    """The CLI arguments of ``run`` on ``source``'s photos and weights: the config, the run's overrides,
    :meth:`RealData.cli_options`, then ``extra``."""
    return [*run.args(), *source.cli_options(), *extra]


def _cli(args: Sequence[str], build: str):
    """:class:`mgff.cli.MGFFCLI` on ``args`` (never ``sys.argv``): ``build`` is ``"nothing"`` (parse and check only;
    no seed set), ``"model"`` (the model and the DataModule, no Trainer) or ``"all"`` (as ``mgff.fit`` builds).

    A fresh CLI for every build: the CLI's instantiator records the hyperparameters of the config it parsed when it
    was made, so its parser must not be reused to build another config's model."""
    from mgff.cli import MGFFCLI

    class RunnerCLI(MGFFCLI):
        def _set_seed(self) -> None:
            if build != "nothing":
                super()._set_seed()

        def instantiate_classes(self) -> None:
            if build != "nothing":
                super().instantiate_classes()

        def instantiate_trainer(self, **kwargs):
            return super().instantiate_trainer(**kwargs) if build == "all" else None

    with warnings.catch_warnings():  # the runner's own command line is not the CLI's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return RunnerCLI(run=False, args=list(args))


@functools.lru_cache(maxsize=1)
def _parser():
    """The CLI's parser, made once: parsing leaves it as it was (only building must not reuse it, see :func:`_cli`)."""
    return _cli(["--config", str(REPO_ROOT / SINGLE)], "nothing").parser


def resolve(args: Sequence[str]) -> dict[str, Any]:
    """The parsed, type-checked config of ``args`` as a dict (nothing built)."""
    return _parser().parse_args(list(args)).as_dict()


def cache_options(config: dict[str, Any], source: RealData, cache: Path | None) -> list[str]:
    """The resized cache of ``source``'s root under ``cache`` (``cache_dir``, ``cache_size`` 256) for data that needs
    no more than it holds: no source view, no explicit ``cache_dir``, a resize to at most 256 px. Else nothing (the
    originals)."""
    data = config["data"]["init_args"]
    if cache is None or data.get("cache_dir") is not None or data.get("source_size") is not None or data["resize_size"] > RESIZED_CACHE_SIZE:
        return []
    return list(data_options(cache_dir=str(source.cache_dir(cache)), cache_size=RESIZED_CACHE_SIZE))


def build_args(run: Run, source: RealData = RealData(), cache: Path | None = real_data.DEFAULT_CACHE, extra: Sequence[str] = ()) -> list[str]:
    """:func:`run_args` plus the resized cache where the run's data can read it (:func:`cache_options`)."""
    args = run_args(run, source, extra)
    return args + cache_options(resolve(args), source, cache) if cache is not None else args


def build(run: Run, source: RealData = RealData(), cache: Path | None = real_data.DEFAULT_CACHE, extra: Sequence[str] = (),
          weights: bool = True):
    """``(model, datamodule)`` of ``run`` on ``source``, built by the project's CLI from :func:`build_args` (no
    Trainer); ``extra`` are overrides after the run's (``--model.init_args.img_size=96``). Without the initial
    pretrained weights unless ``weights``. The CLI seeds the global generators with the config's ``seed_everything``
    (``--seed_everything=k`` in ``extra`` to choose)."""
    from mgff.models.pretrained import skip_pretrained_weights

    args = build_args(run, source, cache, extra)
    if weights:
        cli = _cli(args, "model")
    else:
        with skip_pretrained_weights():
            cli = _cli(args, "model")
    return cli.model, cli.datamodule


def build_datamodule(run: Run, source: RealData = RealData(), cache: Path | None = real_data.DEFAULT_CACHE, extra: Sequence[str] = ()):
    """The DataModule of ``run`` on ``source`` (:func:`build`; its model is built without pretrained weights)."""
    return build(run, source, cache, extra, weights=False)[1]


def fit_command(args: Sequence[str]) -> str:
    """The ``python -m mgff.fit`` command that builds the same run (paths relative to the repository when inside it)."""
    def short(arg: str) -> str:
        return arg.replace(str(REPO_ROOT) + os.sep, "")

    return shlex.join(["python", "-m", "mgff.fit", *(short(a) for a in args)])


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


def location_options(run_dir: Path, also_last: bool) -> list[str]:
    """The options that put a run's outputs into ``run_dir``: the CSV log, ``config.yaml`` and ``test_predictions.csv``
    (the logger's folder is ``run_dir`` itself), ``best.ckpt`` and, with ``also_last``, ``last_epoch.ckpt``."""
    run_dir = run_dir.absolute()
    return [
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
        "--trainer.logger.init_args.name", run_dir.parent.name,
        "--trainer.logger.init_args.version", run_dir.name,
        "--checkpoint.dirpath", str(run_dir), "--checkpoint.filename=best",
        "--last_checkpoint.dirpath", str(run_dir), "--last_checkpoint.filename=last_epoch",
        f"--last_checkpoint.save_top_k={1 if also_last else 0}",
        # what this runner tests (the best checkpoint; with also_last the last epoch's too), recorded in config.yaml
        # so that the recorded mgff.fit command and mgff.report see the same choice; recipe.yaml's is the fixed rule
        "--test_checkpoints=[best, last]" if also_last else "--test_checkpoints=[best]",
        "--trainer.enable_progress_bar=false",
    ]


def training_args(
    run: Run, run_dir: Path, source: RealData = RealData(), cache: Path | None = real_data.DEFAULT_CACHE, seed: int = SEED,
    epochs: int | None = None, workers: int | None = None, clip: float | None = None, also_last: bool = False, extra: Sequence[str] = (),
) -> list[str]:
    """Every CLI argument of one training run: :func:`build_args` with the runner's options (``--epochs``,
    ``--workers``, ``--clip`` where given, then ``extra``), the seed and the run folder last."""
    options = [f"--trainer.max_epochs={epochs}"] if epochs is not None else []
    options += [f"--data.init_args.num_workers={workers}"] if workers is not None else []
    options += [f"--trainer.gradient_clip_val={clip}"] if clip is not None else []
    return build_args(run, source, cache, [*options, *extra]) + [f"--seed_everything={seed}", *location_options(run_dir, also_last)]


def train_and_test(
    name: str, run: Run, run_dir: Path, source: RealData = RealData(), cache: Path | None = real_data.DEFAULT_CACHE, seed: int = SEED,
    epochs: int | None = None, workers: int | None = None, clip: float | None = None, also_last: bool = False, extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Fine-tune one run, test its best-validation checkpoint, write its per-image predictions and ``result.json``.

    The model, DataModule and Trainer are the CLI's, from :func:`training_args`. ``seed`` seeds the training
    (initialisation of new layers, order, augmentation); the train/val split stays the config's ``split_seed``.
    A non-finite loss, validation loss or weight stops the run before any checkpoint of that state
    (:class:`~mgff.callbacks.nonfinite_loss.StopOnNonFiniteLoss`); the result then says ``diverged`` and has no
    ``test_acc``. ``also_last`` also tests the last epoch's weights (``last_test_acc``: a diagnosis of the
    checkpoint choice, never the reported figure)."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mgff.callbacks.nonfinite_loss import NonFiniteLossError, StopOnNonFiniteLoss
    from mgff.callbacks.test_predictions import TestPredictionWriter
    from mgff.fit import cpu_seconds_so_far

    args = training_args(run, run_dir, source, cache, seed, epochs, workers, clip, also_last, extra)
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in [*run_dir.glob("best*.ckpt"), *run_dir.glob("last_epoch*.ckpt"), run_dir / "result.json", run_dir / "test_predictions.csv",
                run_dir / "metrics.json"]:
        old.unlink(missing_ok=True)
    cli = _cli(args, "all")
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    timing = TrainingTime()
    # after the non-finite stop (it must see a diverged state first), before the checkpoints
    stop = next(i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, StopOnNonFiniteLoss))
    trainer.callbacks.insert(stop + 1, timing.callback)
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    checkpoint = next(cb for cb in checkpoints if cb.monitor)
    final = next(cb for cb in checkpoints if not cb.monitor) if also_last else None
    writer = next(cb for cb in trainer.callbacks if isinstance(cb, TestPredictionWriter))
    result: dict[str, Any] = dict(run=name, epochs=trainer.max_epochs, seed=seed, clip=clip, root=str(source.root), note=run.note,
                                  config=run.config, overrides=[*run.overrides, *extra], fit_command=fit_command(args))
    start, cpu_start = time.perf_counter(), cpu_seconds_so_far()
    try:
        trainer.fit(model, datamodule=data)
    except NonFiniteLossError as err:
        result.update(diverged=str(err), minutes=round((time.perf_counter() - start) / 60, 1))
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        return result
    fit_seconds, cpu_seconds = time.perf_counter() - start, cpu_seconds_so_far() - cpu_start
    minutes = fit_seconds / 60
    epochs_run, global_step = trainer.current_epoch, trainer.global_step  # before test() restores a checkpoint
    best = checkpoint.best_model_path
    # read before test(): restoring best.ckpt also restores the callbacks' states, and a best.ckpt written in the
    # first epoch holds the last-epoch callback's state from before it had saved anything (path '')
    last_path = final.best_model_path if final else None
    # one pass over the test images gives the top-1 (of each stage too) and the per-image rows
    tested = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)[0]
    rows = load_rows(writer.path)
    if len(rows) != len(data.datasets["test"]):
        raise RuntimeError(f"{name}: {len(rows)} predictions for {len(data.datasets['test'])} test images")
    ckpt_epoch = int(torch.load(best, map_location="cpu", weights_only=True)["epoch"])
    result.update(
        test_acc=round(float(np.mean([int(r["correct"]) for r in rows])), 4),
        best_val_acc=round(float(checkpoint.best_model_score), 4),
        best_epoch=ckpt_epoch + 1,
        minutes=round(minutes, 1),
        train_ms_per_image=round(timing.ms_per_image, 1) if timing.ms_per_image else None,
        checkpoint=str(Path(best).relative_to(REPO_ROOT)) if Path(best).is_relative_to(REPO_ROOT) else best,
        test_metrics={k: round(float(v), 4) for k, v in sorted(tested.items()) if k.endswith("acc")},
    )
    # mgff.fit's metrics.json (its names: the best checkpoint's test as test/*, the last epoch's as test_last/*)
    metrics: dict[str, Any] = {k: float(v) for k, v in tested.items()}
    metrics["best_val/acc"] = float(checkpoint.best_model_score)
    tested_checkpoints = {"best": best}
    if also_last:
        writer.filename = "last_epoch_test_predictions.csv"
        last = trainer.test(model, datamodule=data, ckpt_path=last_path, verbose=False)[0]
        result["last_test_acc"] = round(float(last["test/acc"]), 4)
        metrics.update({k.replace("test/", "test_last/", 1): float(v) for k, v in last.items()})
        tested_checkpoints["last"] = last_path
    metrics.update(tested_checkpoints=tested_checkpoints, best_checkpoint=best, epochs=epochs_run, global_step=global_step,
                   fit_seconds=round(fit_seconds, 1), cpu_seconds=round(cpu_seconds, 1), torch_threads=torch.get_num_threads(),
                   num_classes=data.num_classes)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")  # last: it marks the run finished
    return result


def load_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``test_predictions.csv``."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_correct(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(index, correct)`` of one finished run, ordered by image index."""
    rows = sorted(load_rows(run_dir / "test_predictions.csv"), key=lambda r: int(r["index"]))
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


def list_runs(names: list[str], source: RealData) -> str:
    """Each run's note, config and overrides, as ``python -m mgff.fit`` takes them (on ``source``)."""
    return "\n\n".join(f"{name}: {RUNS[name].note}\n  {fit_command(run_args(RUNS[name], source))}" for name in names)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [options] [-- CLI overrides for every run]")
    parser.add_argument("--runs", help=f"comma-separated names of RUNS (default: {','.join(DEFAULT_RUNS)})")
    parser.add_argument("--list", action="store_true", help="print each run's config and overrides (of --runs, else all) and exit")
    parser.add_argument("--compare", action="append", default=[], help="a,b: pooled paired bootstrap CI of acc(b) - acc(a) over the seeds; repeatable")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="runs/real_photos by default")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the run's; the historical runs: 6)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data.num_workers (default: the run's; the historical runs: 0, decoding the small cached JPEGs in the main process)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (on shared cores two threads spin against each other)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help=f"one training seed, runs in <out>/<run>/ (default {SEED}; the data split stays fixed)")
    seeds.add_argument("--seeds", type=parse_seeds, default=None, help="several training seeds, e.g. 0,1,2: runs in <out>/seed<k>/<run>/")
    parser.add_argument("--clip", type=float, default=None, help="trainer.gradient_clip_val (gradient norm); off by default")
    parser.add_argument("--cache", type=Path, default=real_data.DEFAULT_CACHE, help="where the per-root resized caches live")
    parser.add_argument("--also-last", action="store_true", help="also test the last epoch's weights (last_test_acc in result.json; a diagnosis)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--skip-done", action="store_true", help="reuse the result of runs that already have a result.json (whatever their overrides)")
    real_data.add_arguments(parser)
    args = parser.parse_args(own)
    names = parse_names(args.runs, tuple(RUNS) if args.list and not args.runs else DEFAULT_RUNS)
    comparisons = [tuple(parse_names(c, ())) for c in args.compare]
    if any(len(c) != 2 for c in comparisons):
        raise SystemExit("--compare takes two run names: a,b")
    source = real_data.from_args(args)
    if args.list:
        print(list_runs(names, source))
        return
    if not args.report_only:
        source.check()
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in names:  # every run's config parses before the first one trains
            try:
                resolve(run_args(RUNS[name], source, extra))
            except SystemExit as err:
                raise SystemExit(f"run {name}: its config does not parse ({err}); see the message above") from None
        for seed, folder in seed_dirs(args.out, args.seeds).items():
            seed = SEED if seed is None and args.seed is None else (args.seed if seed is None else seed)
            for name in names:
                if args.skip_done and (folder / name / "result.json").is_file():
                    continue
                result = train_and_test(name, RUNS[name], folder / name, source, args.cache, seed, args.epochs, args.workers, args.clip,
                                        args.also_last, extra)
                if "diverged" in result:
                    print(f"{name} (seed {seed}): diverged: {result['diverged']}", flush=True)
                else:
                    print(f"{name} (seed {seed}): test top-1 {result['test_acc']:.4f} (best val {result['best_val_acc']:.4f}, {result['minutes']} min)", flush=True)
    results = read_results(args.out, names, args.seeds)
    missing = [n for n in names if n not in results]
    if missing:
        print(f"no finished run of {missing} under {args.out}", file=sys.stderr)
    command = "python benchmarks/real_photos.py " + " ".join(argv)
    print(write_table(args.out, results, comparisons, args.seeds, command.strip()))


if __name__ == "__main__":
    main()
