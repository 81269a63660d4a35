"""The fine-tuning recipe's tools: the BatchNorm policy (``bn_mode``), the head-first phase
(``freeze_backbone_epochs``), layer-wise lr decay (``layer_decay``) and the EMA of the weights (``EMAWeights``).

What each must guarantee: frozen statistics never move; the head-first phase leaves the backbone exactly as
loaded and its lr at 0, then its schedule starts; the EMA's weights are the ones validated, checkpointed,
tested after fit and restored on a resume in the middle of an epoch; the non-finite stop checks them.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel

from data_modules import CUB200DataModule
from mgff.callbacks.ema import EMAWeights, ema_decay
from mgff.callbacks.nonfinite_loss import NonFiniteStateError, StopOnNonFiniteLoss
from mgff.callbacks.preemption import TrainingPreempted
from mgff.fit import run as fit_run
from mgff.lit import FineGrainedClassifier
from mgff.lit.optim import cosine_schedule

torch.set_num_threads(1)

TINY = dict(backbone="resnet10t", stages=[4], head="linear", optimizer="adamw", lr=3e-3, weight_decay=0.05)


def tiny_model(**overrides) -> FineGrainedClassifier:
    return FineGrainedClassifier(num_classes=4, **{**TINY, **overrides})


def tiny_data(root: Path) -> CUB200DataModule:
    return CUB200DataModule(root=root, resize_size=72, crop_size=64, batch_size=4, num_workers=0, val_fraction=0.1)


def fit(model: L.LightningModule, root: Path, tmp_path: Path, epochs: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=list(callbacks),
    )
    trainer.fit(model, datamodule=tiny_data(root))
    return trainer


def backbone_state(model: FineGrainedClassifier) -> dict[str, torch.Tensor]:
    """Every weight and buffer of the backbone (BatchNorm statistics included), copied."""
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], suffix: str = "") -> list[str]:
    return [k for k in before if k.endswith(suffix) and not torch.equal(before[k], after[k])]


# ----- BatchNorm policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bn_mode", ["eval", "frozen"])
def test_batchnorm_statistics_do_not_move_in_a_whole_fit(bn_mode, cub_root, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(bn_mode=bn_mode)
    before = backbone_state(model)
    fit(model, cub_root, tmp_path, epochs=1)
    after = backbone_state(model)
    assert before.keys() == after.keys()
    assert changed(before, after, "running_mean") == [] and changed(before, after, "running_var") == []
    assert changed(before, after, "conv1.weight")  # the convolutions trained
    bn_affine = changed(before, after, "bn1.weight")
    if bn_mode == "eval":
        assert bn_affine  # the statistics are held, the affine weights train
    else:
        assert bn_affine == []  # FrozenBatchNorm2d: statistics and affine weights fixed


def test_batchnorm_in_train_mode_updates_its_statistics(cub_root, tmp_path):
    """The control of the test above: PyTorch's default moves the statistics."""
    torch.manual_seed(0)
    model = tiny_model(bn_mode="train")
    before = backbone_state(model)
    fit(model, cub_root, tmp_path, epochs=1)
    assert changed(before, backbone_state(model), "running_mean")


@pytest.mark.parametrize("bn_mode", ["eval", "frozen"])
def test_known_answer_prediction_is_the_same_in_train_and_eval_mode(bn_mode):
    """With the statistics held, a freshly built model predicts a batch the same in train and in eval mode
    (dropout off); with ``bn_mode='train'`` the batch statistics make them differ."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    model = tiny_model(bn_mode=bn_mode, dropout=0.0)
    # statistics as a pretrained model has them (not the 0/1 of a fresh init, which batch statistics might match)
    for module in model.backbone.modules():
        if hasattr(module, "running_mean") and module.running_mean is not None:
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        trained = model.train()(images).logits
        evaluated = model.eval()(images).logits
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=1e-6)
    control = tiny_model(bn_mode="train", dropout=0.0)
    control.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(control.train()(images).logits, control.eval()(images).logits, atol=1e-3)


def test_bn_mode_eval_keeps_batchnorm_in_eval_mode_after_train():
    model = tiny_model(bn_mode="eval").train()
    norms = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert model.backbone.model.conv1[0].training  # the rest trains


def test_bad_recipe_values_are_refused_by_name():
    with pytest.raises(ValueError, match=r"model.bn_mode must be one of \('train', 'eval', 'frozen'\), got 'fixed'"):
        tiny_model(bn_mode="fixed")
    with pytest.raises(ValueError, match=r"model.freeze_backbone_epochs must be a whole number of epochs >= 0, got -1"):
        tiny_model(freeze_backbone_epochs=-1)
    with pytest.raises(ValueError, match=r"model.layer_decay must be in \(0, 1\] or null, got 1.5"):
        tiny_model(layer_decay=1.5)


# ----- head first, then the backbone --------------------------------------------------------------------
class RecordBackbone(L.Callback):
    """The backbone's state and the optimiser's lr per role at the end of each training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.lrs: list[dict[str, float]] = []
        self.frozen_flags: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            groups = trainer.optimizers[0].param_groups
            self.lrs.append({g["role"]: g["lr"] for g in groups if g["params"]})
            self.frozen_flags.append(pl_module.backbone.frozen and not pl_module.backbone.training)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append(backbone_state(pl_module))


def test_head_first_phase_leaves_the_backbone_as_loaded_then_trains_it(cub_root, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(bn_mode="train", freeze_backbone_epochs=1, warmup_epochs=0)
    initial, head_before = backbone_state(model), model.head.state_dict()["classifier.weight"].clone()
    record = RecordBackbone()
    fit(model, cub_root, tmp_path, epochs=2, callbacks=[record])
    after_phase, after_fit = record.states
    assert changed(initial, after_phase) == []  # weights and BatchNorm statistics, in train mode too
    assert changed(initial, after_fit, "running_mean") and changed(initial, after_fit, "conv1.weight")
    assert not torch.equal(head_before, model.head.state_dict()["classifier.weight"])
    assert record.frozen_flags == [True, False]  # no gradients and eval mode in the phase only
    assert record.lrs[0]["backbone"] == 0.0 and record.lrs[0]["classifier"] > 0
    assert record.lrs[1]["backbone"] > 0  # its cosine starts at the unfreeze (no warmup here: at its peak)
    assert math.isclose(record.lrs[1]["backbone"], TINY["lr"], rel_tol=1e-6)
    assert model.backbone.frozen is False  # nothing left frozen for whoever uses the model next


def test_a_role_starting_later_has_lr_zero_then_its_own_warmup_and_cosine():
    factor, _ = cosine_schedule("step", total_steps=100, max_epochs=10, warmup_epochs=1, start_epochs=2)
    assert [factor(s) for s in (0, 10, 19)] == [0.0, 0.0, 0.0]
    assert 0 < factor(20) < factor(25) < factor(29) <= 1.0  # warmup over the 10 steps after the start
    assert factor(30) == 1.0 and factor(99) < 0.01  # then the cosine to the end of training
    epoch_factor, _ = cosine_schedule("epoch", total_steps=100, max_epochs=10, warmup_epochs=0, start_epochs=3)
    assert [epoch_factor(e) for e in (0, 2, 3)] == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="never trains"):
        cosine_schedule("step", 100, 10, 0, start_epochs=10)


def test_head_first_phase_under_ddp_needs_find_unused_parameters():
    model = tiny_model(freeze_backbone_epochs=1)
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(_ddp_kwargs={}))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        model.on_fit_start()
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(_ddp_kwargs={"find_unused_parameters": True}))
    model.on_fit_start()


# ----- layer-wise lr decay ------------------------------------------------------------------------------
def test_layer_decay_gives_each_layer_the_lr_it_says():
    import timm
    from timm.optim import param_groups_layer_decay

    model = FineGrainedClassifier(num_classes=4, backbone="efficientnet_lite0", stages=[2, 3, 4], head="linear", lr=1e-3,
                                  head_lr_scale=10, layer_decay=0.75)
    groups = model.optimizer_param_groups()
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    timm_model = model.backbone.model
    layers = {id(p): g["lr_scale"] for g in param_groups_layer_decay(timm_model, layer_decay=0.75) for p in g["params"]}
    depth = round(math.log(min(layers.values())) / math.log(0.75))
    assert depth > 5
    assert math.isclose(lr_of[id(timm_model.conv_stem.weight)], 1e-3 * 0.75**depth, rel_tol=1e-9)  # ~0.01x at 0.75
    assert math.isclose(lr_of[id(timm_model.conv_head.weight)], 1e-3, rel_tol=1e-9)  # the last layer at lr
    # every backbone parameter at lr x 0.75^(layers above it); the head at its own lr, undecayed
    for p in timm_model.parameters():
        assert math.isclose(lr_of[id(p)], 1e-3 * layers[id(p)], rel_tol=1e-9)
    assert all(math.isclose(lr_of[id(p)], 1e-2) for p in model.head.parameters())
    assert timm.models.is_model("efficientnet_lite0")


# ----- the EMA of the weights -----------------------------------------------------------------------------
def test_ema_decay_is_set_as_a_horizon_in_epochs():
    assert math.isclose(ema_decay(1.0, 18), 1 - 1 / 18)
    assert math.isclose(ema_decay(2.0, 500), 0.999)
    assert ema_decay(0.01, 18) == 0.0  # shorter than a step: no averaging
    with pytest.raises(ValueError, match="horizon_epochs must be > 0"):
        EMAWeights(horizon_epochs=0)


class RecordWeights(L.Callback):
    """The classifier weight the model holds while it validates (per epoch) and while it tests."""

    def __init__(self) -> None:
        self.validated: dict[int, torch.Tensor] = {}
        self.tested: list[torch.Tensor] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.validated[trainer.current_epoch] = pl_module.head.classifier.weight.detach().clone()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:  # one entry per test pass
            self.tested.append(pl_module.head.classifier.weight.detach().clone())


RECORD: RecordWeights | None = None


class GlobalRecord(RecordWeights):
    """:class:`RecordWeights` the CLI can build from a config, kept where the test reads it."""

    def __init__(self) -> None:
        super().__init__()
        global RECORD
        RECORD = self


def ema_config(path: Path, run_dir: Path, cub_root: Path, *, stop_at: int | None = None, record: bool = False, tests=("last", "best", "last_raw")) -> Path:
    callbacks = [{"class_path": "mgff.callbacks.EMAWeights", "init_args": {"horizon_epochs": 1.0}}]
    if record:
        callbacks.append({"class_path": f"{__name__}.GlobalRecord"})
    if stop_at is not None:
        callbacks.append({"class_path": "test_resume.SignalAtStep", "init_args": {"step": stop_at}})
    config = {
        "seed_everything": 7,
        "test_checkpoints": list(tests),
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "deterministic": True, "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1, "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "run", "version": 0}},
            "callbacks": callbacks,
        },
        "model": {"class_path": "mgff.lit.FineGrainedClassifier", "init_args": {**TINY, "dropout": 0.5, "warmup_epochs": 1}},
        "data": {"class_path": "data_modules.CUB200DataModule",
                 "init_args": {"root": str(cub_root), "resize_size": 72, "crop_size": 64, "batch_size": 4, "num_workers": 0, "val_fraction": 0.1}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def checkpoint_of(run_dir: Path, name: str) -> dict:
    return torch.load(run_dir / "run" / "version_0" / "checkpoints" / name, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, cub_root):
    tmp = tmp_path_factory.mktemp("ema")
    metrics = fit_run(["--config", str(ema_config(tmp / "config.yaml", tmp, cub_root, record=True))])
    return tmp, metrics, RECORD


def test_the_averaged_weights_are_validated_checkpointed_and_tested(ema_run):
    run_dir, metrics, record = ema_run
    best = Path(metrics["best_checkpoint"])
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    epoch = checkpoint["epoch"]
    saved = checkpoint["state_dict"]["head.classifier.weight"]
    raw = checkpoint["current_model_state"]["head.classifier.weight"]
    assert not torch.equal(saved, raw)  # the average is not the raw weights...
    assert torch.equal(record.validated[epoch], saved)  # ...and is what that epoch validated
    last = checkpoint_of(run_dir, "last.ckpt")
    assert "averaging_state" in last and "current_model_state" in last  # what a resume needs
    # test_checkpoints [last, best, last_raw]: mgff.fit's tests read the averages, then the last raw weights
    assert len(record.tested) == 3
    assert torch.equal(record.tested[0], last["state_dict"]["head.classifier.weight"])
    assert torch.equal(record.tested[1], saved)
    assert torch.equal(record.tested[2], last["current_model_state"]["head.classifier.weight"])
    assert {"test/acc", "test_best/acc", "test_last_raw/acc"} <= set(metrics)
    assert metrics["tested_checkpoints"]["best"] == str(best)
    run = run_dir / "run" / "version_0"
    assert all((run / f).is_file() for f in ("test_predictions.csv", "test_predictions_best.csv", "test_predictions_last_raw.csv"))
    loaded = FineGrainedClassifier.load_from_checkpoint(best, map_location="cpu")
    assert torch.equal(loaded.head.classifier.weight, saved)


def test_last_raw_needs_a_run_with_an_average(cub_root, tmp_path):
    config = ema_config(tmp_path / "config.yaml", tmp_path, cub_root, tests=("best", "last_raw"))
    plain = yaml.safe_load(config.read_text())
    plain["trainer"]["callbacks"], plain["trainer"]["max_epochs"] = [], 1
    config.write_text(yaml.safe_dump(plain))
    with pytest.raises(ValueError, match=r"last_raw.*holds no raw weights.*EMAWeights"):
        fit_run(["--config", str(config)])


def test_a_resume_in_the_middle_of_an_epoch_restores_the_average(ema_run, cub_root, tmp_path):
    full_dir, full_metrics, _ = ema_run
    config = ema_config(tmp_path / "config.yaml", tmp_path, cub_root, stop_at=7)  # epoch 1, its third batch
    with pytest.raises(TrainingPreempted) as stopped:
        fit_run(["--config", str(config)])
    resumed = fit_run(["--config", str(config), "--ckpt_path", str(stopped.value.checkpoint)])
    for key in ("test/acc", "test/loss", "best_val/acc", "global_step"):
        assert resumed[key] == full_metrics[key], key
    expected, got = checkpoint_of(full_dir, "last.ckpt"), checkpoint_of(tmp_path, "last.ckpt")
    for part in ("state_dict", "current_model_state"):  # the average and the raw weights both continue exactly
        for name, value in expected[part].items():
            torch.testing.assert_close(got[part][name], value, rtol=0, atol=1e-6, msg=f"{part}: {name}")


class TwoRanks:
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def test_the_nonfinite_stop_checks_the_averaged_weights():
    module = nn.Linear(3, 2)
    ema = EMAWeights()
    ema._average_model = AveragedModel(module)
    trainer = SimpleNamespace(strategy=TwoRanks(), callbacks=[ema], global_step=3, global_rank=0, current_epoch=0)
    StopOnNonFiniteLoss().on_train_epoch_end(trainer, module)  # all finite: goes on
    with torch.no_grad():
        ema._average_model.module.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"non-finite averaged parameter weight .*EMAWeights"):
        StopOnNonFiniteLoss().on_train_epoch_end(trainer, module)
