"""Exact resume: a run stopped by a signal mid-epoch and resumed from its checkpoint ends where an
uninterrupted run ends (same metrics, same weights); checkpoints reload without a config; a checkpoint
of another architecture or class count is refused with an error naming both values."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from mgff.callbacks.preemption import TrainingPreempted
from mgff.fit import run as fit_run
from mgff.lit import FineGrainedClassifier

torch.set_num_threads(1)

STEPS_PER_EPOCH = 5  # 20 training images (24 train minus 4 held out for validation) / batch 4
STOP_AT_STEP = 7  # global step at which the signal arrives: epoch 1, its third batch (mid-epoch)


class SignalAtStep(L.Callback):
    """Sends a real signal to this process at the start of training step ``step`` (counted over the
    whole run, as ``trainer.global_step``), as a scheduler or ``kill`` would."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.Signals[self.signal_name])


def write_config(path: Path, run_dir: Path, cub_root: Path, *, stop_at: int | None = None) -> Path:
    """A tiny deterministic run with every source of randomness a resume can get wrong: dropout (the
    torch generator), random crop and flip (albumentations' own generators), shuffled order."""
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "deterministic": True,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "run", "version": 0}},
            "callbacks": [] if stop_at is None else [{"class_path": f"{__name__}.SignalAtStep", "init_args": {"step": stop_at}}],
        },
        "model": {
            "class_path": "mgff.lit.FineGrainedClassifier",
            "init_args": {"backbone": "resnet10t", "stages": [4], "head": "linear", "dropout": 0.5, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.05, "warmup_epochs": 1},
        },
        "data": {
            "class_path": "data_modules.CUB200DataModule",
            "init_args": {"root": str(cub_root), "resize_size": 72, "crop_size": 64, "batch_size": 4, "num_workers": 0, "val_fraction": 0.1},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "run" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cub_root):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    handler_before = signal.getsignal(signal.SIGTERM)
    metrics = fit_run(["--config", str(write_config(tmp / "config.yaml", tmp, cub_root))])
    # after fit (and during the final test) SIGTERM is handled as before, not swallowed
    assert signal.getsignal(signal.SIGTERM) == handler_before
    return tmp, metrics


def test_stopped_and_resumed_run_equals_uninterrupted_run(uninterrupted, cub_root, tmp_path):
    full_dir, full_metrics = uninterrupted
    assert full_metrics["global_step"] == 2 * STEPS_PER_EPOCH

    config = write_config(tmp_path / "config.yaml", tmp_path, cub_root, stop_at=STOP_AT_STEP)
    with pytest.raises(TrainingPreempted) as stopped:
        fit_run(["--config", str(config)])
    assert stopped.value.code == 128 + signal.SIGTERM and stopped.value.signal_name == "SIGTERM"
    checkpoint = Path(stopped.value.checkpoint)
    assert checkpoint == tmp_path / "hpc_ckpt_1.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == STOP_AT_STEP + 1  # the step during which the signal came was finished
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches_taken"]) == (1, STOP_AT_STEP + 1 - STEPS_PER_EPOCH)
    assert not (tmp_path / "run" / "version_0" / "metrics.json").exists()  # a stopped run is not tested

    # the resumed run: same config (the signal callback fires only at a step it does not run again)
    resumed = fit_run(["--config", str(config), "--ckpt_path", str(checkpoint)])

    for key in ("test/acc", "test/acc5", "test/loss", "best_val/acc", "global_step", "epochs"):
        assert resumed[key] == full_metrics[key], key
    expected, got = final_weights(full_dir), final_weights(tmp_path)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=f"weights differ in {name}")


def test_checkpoint_reloads_without_config(uninterrupted):
    run_dir, metrics = uninterrupted
    path = run_dir / "run" / "version_0" / "checkpoints" / "last.ckpt"
    model = FineGrainedClassifier.load_from_checkpoint(path, map_location="cpu")
    assert model.hparams.num_classes == 4 and model.hparams.backbone == "resnet10t" and len(model.hparams.class_names) == 4
    for name, value in final_weights(run_dir).items():
        assert torch.equal(model.state_dict()[name], value), name
    saved = json.loads((run_dir / "run" / "version_0" / "metrics.json").read_text())
    assert saved["num_classes"] == 4


def test_load_from_checkpoint_with_another_class_count_names_both_values(uninterrupted):
    # mgff's load_from_checkpoint keeps the keyword overrides out of the checkpoint's hyperparameters, so
    # on_load_checkpoint compares the model built with them against what the checkpoint was trained with
    path = uninterrupted[0] / "run" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 4 vs this model 3"):
        FineGrainedClassifier.load_from_checkpoint(path, map_location="cpu", num_classes=3, class_names=None)


def test_resume_with_another_class_count_is_refused(uninterrupted, tmp_path):
    from data_modules.synthetic import SyntheticSpec, write_synthetic_cub

    three_classes = write_synthetic_cub(tmp_path / "CUB_200_2011", SyntheticSpec(num_classes=3, images_per_class=6, min_side=96, max_side=128))
    path = uninterrupted[0] / "run" / "version_0" / "checkpoints" / "last.ckpt"
    config = write_config(tmp_path / "config.yaml", tmp_path, three_classes)
    with pytest.raises(ValueError, match=r"other classes than the data has \(4 vs 3 classes\): only in the checkpoint: \['004.Violet_Patched_Bird'\]"):
        fit_run(["--config", str(config), "--ckpt_path", str(path)])
