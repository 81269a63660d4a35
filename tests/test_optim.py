"""The learning-rate schedule: the paper's per-epoch cosine and the per-step option."""

import math

import pytest
import torch

from mgff.lit.optim import cosine_schedule


def test_epoch_interval_sets_one_lr_per_epoch_along_the_cosine():
    # the paper: "使用函数cos(x)调整每轮的学习率" (the lr of each epoch is set by cos(x))
    factor, interval = cosine_schedule("epoch", total_steps=500, max_epochs=50, warmup_epochs=0)
    assert interval == "epoch"
    assert factor(0) == 1.0
    assert factor(25) == pytest.approx(0.5)
    assert factor(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 50)))


def test_step_interval_advances_every_step():
    factor, interval = cosine_schedule("step", total_steps=100, max_epochs=10, warmup_epochs=1)
    assert interval == "step"
    assert factor(0) < factor(9) < factor(10) == pytest.approx(1.0)  # a warmup of 10 steps
    assert factor(10) > factor(11) > factor(99)


def test_lightning_steps_the_epoch_schedule_once_per_epoch(tmp_path):
    import lightning as L

    from mgff.lit.classifier import FineGrainedClassifier

    class Tiny(FineGrainedClassifier):
        def training_step(self, batch, batch_idx):
            return self.head.classifier.weight.sum() * 0 + self(batch).logits.square().mean()

    model = Tiny(num_classes=2, backbone="test_resnet", stages=[-1], head="linear", lr=0.1, scheduler_interval="epoch")
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    data = torch.utils.data.DataLoader(torch.randn(8, 3, 32, 32), batch_size=2)
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record()], default_root_dir=tmp_path).fit(model, data)
    per_epoch = [lrs[i:i + 4] for i in range(0, 12, 4)]
    assert all(len(set(e)) == 1 for e in per_epoch)  # constant within an epoch
    assert per_epoch[0][0] == pytest.approx(0.1) and per_epoch[1][0] == pytest.approx(0.1 * 0.75)


def test_unknown_interval_is_an_error():
    with pytest.raises(ValueError, match="scheduler_interval"):
        cosine_schedule("batch", 10, 1, 0)
