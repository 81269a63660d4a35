"""``python -m mgff.fit`` under DDP (2 CPU processes, gloo): it fits, tests once, writes metrics.json
from rank 0, and the accuracies it reports over both ranks equal a single-process evaluation of the
same checkpoint.

The data is chosen so that a padded split would show: 5 validation and 25 test images on 2 ranks.
Lightning's default ``DistributedSampler`` would pad rank 1 with a duplicate (6 and 26 images counted);
mgff's evaluation loaders shard without padding (3 + 2 and 13 + 12), so the reduced counts are exact.
Rank 0 also runs one more validation batch than rank 1 (2 against 1), which must not hang.

``strategy: ddp`` relaunches ``sys.argv`` for the other rank, so it runs in a subprocess (inside
pytest it would relaunch pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from data_modules import CUB200DataModule
from mgff.lit import TwoStageClassifier

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 2


def data_init_args(root: Path) -> dict:
    return {"root": str(root), "resize_size": 72, "crop_size": 64, "batch_size": BATCH_SIZE, "num_workers": 0, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def odd_sized_cub(tmp_path_factory) -> Path:
    """5 classes x 10 images: 25 train (5 held out for validation: one per class), 25 test."""
    from data_modules.synthetic import SyntheticSpec, write_synthetic_cub

    return write_synthetic_cub(tmp_path_factory.mktemp("ddp_data") / "CUB_200_2011", SyntheticSpec(num_classes=5, images_per_class=10, min_side=72, max_side=96))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, odd_sized_cub):
    """The two-stage model (ResNet stages + frozen tiny ViT cropper) fitted for 2 epochs on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("ddp_run")
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "strategy": "ddp",
            "devices": 2,
            "max_epochs": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "ddp", "version": 0}},
        },
        "model": {
            "class_path": "mgff.lit.TwoStageClassifier",
            "init_args": {
                "backbone": "resnet10t", "stages": [4], "head": "linear", "img_size": 64, "optimizer": "adamw", "lr": 0.003,
                "localization": "rollout", "cropper": "vit_tiny_patch16_224", "cropper_kwargs": {"depth": 1}, "localize_size": 64, "crop_size": 64, "min_box_size": 0.4,
            },
        },
        "data": {"class_path": "data_modules.CUB200DataModule", "init_args": data_init_args(odd_sized_cub)},
    }
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "mgff.fit", "--config", str(config_path)],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=400,  # a hang fails instead of blocking the suite
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir, result


def test_ddp_fit_tests_once_and_rank_zero_writes_metrics(ddp_run):
    run_dir, result = ddp_run
    assert result.stdout.count("mgff: test/acc=") == 1  # one summary: rank 0 only, one test phase
    assert [p.name for p in run_dir.rglob("metrics.json")] == ["metrics.json"]
    assert sorted(p.name for p in (run_dir / "ddp").iterdir()) == ["version_0"]  # one logger directory
    metrics = json.loads((run_dir / "ddp" / "version_0" / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    # 20 training images, 10 per rank, batches of 2 -> 5 steps per epoch (not 10: the data was sharded)
    assert metrics["global_step"] == 10


def test_ddp_accuracies_equal_single_process_evaluation(ddp_run, odd_sized_cub):
    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "ddp" / "version_0" / "metrics.json").read_text())
    best = Path(metrics["best_checkpoint"])
    model = TwoStageClassifier.load_from_checkpoint(best, map_location="cpu")  # no config needed
    datamodule = CUB200DataModule(**data_init_args(odd_sized_cub))
    assert len(datamodule.splits.val) == 5 and len(datamodule.splits.test) == 25
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    assert val["val/acc"] == pytest.approx(metrics["best_val/acc"], abs=1e-7)
    assert test["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-7)
    assert test["test/stage2_acc"] == pytest.approx(metrics["test/stage2_acc"], abs=1e-7)


def test_ddp_test_predictions_merge_both_ranks_once(ddp_run):
    """The run's own test writes test_predictions.csv: rank 0 merges the ranks' parts (13 + 12 images),
    each test image once, and the per-image results are the ones test/acc counted."""
    import csv

    run_dir, _ = ddp_run
    version = run_dir / "ddp" / "version_0"
    rows = list(csv.DictReader(open(version / "test_predictions.csv")))
    assert [int(r["index"]) for r in rows] == list(range(25)) and len({r["path"] for r in rows}) == 25
    assert not list(version.glob(".test_predictions.csv.rank*"))  # the parts were merged and removed
    metrics = json.loads((version / "metrics.json").read_text())
    assert sum(int(r["correct"]) for r in rows) / 25 == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert all(int(r["correct"]) == (r["pred"] == r["label"]) for r in rows)


@pytest.mark.parametrize("fails", [False, True])
def test_process_group_closed_on_exit_destroys_the_group_also_on_error(tmp_path, fails):
    """The entry points' guard: a gloo group left alive aborts the rank at interpreter exit (SIGABRT)."""
    import torch.distributed as dist

    from mgff.cli import process_group_closed_on_exit

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    try:
        with pytest.raises(RuntimeError, match="inside") if fails else nullcontext():
            with process_group_closed_on_exit():
                dist.barrier()
                if fails:
                    raise RuntimeError("inside the run")
    finally:
        initialized = dist.is_initialized()
        if initialized:  # keep the other tests' process clean whatever happened
            dist.destroy_process_group()
    assert not initialized
    with process_group_closed_on_exit():  # no group: nothing to do, no error
        pass
