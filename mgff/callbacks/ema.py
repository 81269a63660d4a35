"""An exponential moving average of the weights, with its horizon in epochs: Lightning's ``WeightAveraging``.

The averaged weights are the model's output everywhere a run reads one: Lightning's
:class:`~lightning.pytorch.callbacks.WeightAveraging` swaps them in for every validation (so ``val/acc`` and
the best checkpoint are the average's), writes them as a checkpoint's ``state_dict`` (the raw weights go to
``current_model_state``, with the average's state beside them, for resuming), and copies them into the model
when training ends. :class:`~mgff.callbacks.nonfinite_loss.StopOnNonFiniteLoss` checks them too.

Two departures from Lightning's ``EMAWeightAveraging``:

- the decay is set as a horizon in epochs, ``decay = 1 - 1 / (horizon_epochs * steps_per_epoch)``, fixed when
  fit starts: a fixed decay such as 0.999 is a horizon of about 1,000 steps, longer than a whole 15-epoch run of
  18 steps an epoch (270 steps), so the average would still hold mostly the first weights;
- loading a checkpoint outside ``fit`` (``trainer.test(ckpt_path=...)`` after fit, ``validate``, ``predict``) keeps
  the averaged weights of its ``state_dict``. Lightning's callback, still holding its average after fit, loads
  the checkpoint's raw ``current_model_state`` over them there, so a run would test other weights than the ones
  it validated and checkpointed.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

log = logging.getLogger("mgff")


def ema_decay(horizon_epochs: float, steps_per_epoch: float) -> float:
    """The per-step decay whose horizon (``1 / (1 - decay)`` steps) is ``horizon_epochs`` epochs."""
    steps = horizon_epochs * steps_per_epoch
    if steps <= 1:
        return 0.0
    return 1.0 - 1.0 / steps


class EMAWeights(WeightAveraging):
    """Exponential moving average of the parameters and buffers, updated after every optimiser step.

    Args:
        horizon_epochs: the average's horizon in epochs of training (see the module docstring);
            e.g. ``1.0`` averages over about the last epoch's steps.
        use_buffers: average the buffers too (BatchNorm statistics); ``False`` copies them from the model.
    """

    def __init__(self, horizon_epochs: float = 1.0, use_buffers: bool = True) -> None:
        if horizon_epochs <= 0:
            raise ValueError(f"EMAWeights horizon_epochs must be > 0 epochs, got {horizon_epochs}")
        super().__init__(use_buffers=use_buffers)
        self.horizon_epochs = horizon_epochs
        self.decay: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            steps_per_epoch = trainer.estimated_stepping_batches / max(trainer.max_epochs or 1, 1)
            self.decay = ema_decay(self.horizon_epochs, steps_per_epoch)
            self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(self.decay)
            log.info("EMA of the weights: horizon %.3g epochs of %.1f steps -> decay %.5f", self.horizon_epochs, steps_per_epoch, self.decay)
        super().setup(trainer, pl_module, stage)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming ``fit``: the raw weights and the average both come back (Lightning's). Otherwise the model keeps
        the checkpoint's ``state_dict``, the averaged weights, already loaded."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
