"""Stop training at the first non-finite loss, so that a diverged run cannot look like a result.

A run that diverges (``lr`` far too high, an overflow under reduced precision) otherwise trains on NaN
to the end: the monitored ``val/acc`` stays finite (NaN logits argmax to class 0), the NaN weights are
saved as the "best" checkpoint and ``metrics.json`` reports chance-level accuracy as if it were one.

Divergence can also show first in validation: one optimizer step with a huge ``lr`` leaves the weights
finite (|w| ~ 1e6) but the next forward overflows, so the last step of an epoch gives ``val/loss=nan``
with a finite training loss. Lightning (2.x) validates before ``on_train_epoch_end`` and saves
checkpoints in ``on_train_epoch_end`` or ``on_validation_end``, checkpoint callbacks last: the checks
below run in ``on_validation_end`` and ``on_train_epoch_end`` of an earlier callback, so they stop the run
before any checkpoint of the diverged state is written, and before ``ModelCheckpoint`` ranks a NaN
metric (it maps NaN to -inf, but still saves while it holds fewer than ``save_top_k``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

__all__ = ["NonFiniteLossError", "NonFiniteStateError", "StopOnNonFiniteLoss", "first_nonfinite_tensor"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; raised on every rank at the same step."""


class NonFiniteStateError(NonFiniteLossError):
    """The validation loss, a metric a checkpoint is ranked on, or a parameter or buffer is NaN or infinite
    at the end of a validation or training epoch; raised on every rank before any checkpoint of that state."""


class StopOnNonFiniteLoss(L.Callback):
    """Raise :class:`NonFiniteLossError` after the first training step whose loss is not finite, and
    :class:`NonFiniteStateError` (a subclass) when, while fitting, a validation ends with a non-finite
    ``val/loss`` or checkpoint-monitored metric, or a validation or training epoch ends with a non-finite
    parameter or buffer (BatchNorm statistics).

    The messages name the global step, the epoch, the loss terms (training: the module's
    ``last_loss_terms``, ``ce``, ``aux``, ...; validation: the logged ``val/loss_*``) and the first
    non-finite parameter or buffer. Under DDP the ranks agree at every check (one boolean all-reduce:
    buffers differ between ranks without SyncBatchNorm) and all raise together, so none waits on the
    others. Put it before the checkpoint callbacks (the CLI puts it first; Lightning keeps checkpoint
    callbacks last): the exception ends the run before any of them saves again, so no checkpoint holds
    a diverged state, and ``mgff.fit`` writes no ``metrics.json`` and exits with status 1.
    """

    def __init__(self) -> None:
        self._step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        bad_here = isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        terms = getattr(pl_module, "last_loss_terms", None) or {}
        described = ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items()) or "not recorded"
        if bad_here:
            what = f"non-finite training loss {_value(loss)} on rank {trainer.global_rank}"
        else:
            what = f"non-finite training loss on another rank (rank {trainer.global_rank} had {_value(loss)})"
        raise NonFiniteLossError(
            f"{what} at global step {self._step} (epoch {trainer.current_epoch}, batch {batch_idx} of the epoch); "
            f"loss terms: {described}. Training stopped; no checkpoint was written after this step. "
            "Lower model.init_args.lr (or warm up longer), or check the data for broken images."
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # ``validate``/``test`` of a checkpoint: report, do not stop
            return
        metrics = trainer.callback_metrics
        found = []
        if "val/loss" in metrics and not _finite(metrics["val/loss"]):
            found.append(f"non-finite validation loss {_value(metrics['val/loss'])}")
        for name in sorted({cb.monitor for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)}):
            if name != "val/loss" and name in metrics and not _finite(metrics[name]):
                found.append(f"non-finite {name} {_value(metrics[name])} (the metric checkpoints are ranked on)")
        where = "the end of the sanity check's validation" if trainer.sanity_checking else f"the end of epoch {trainer.current_epoch}'s validation"
        terms = ", ".join(f"{k.removeprefix('val/loss_')}={float(v):.4g}" for k, v in metrics.items() if k.startswith("val/loss_"))
        loss = "" if found[:1] and found[0].startswith("non-finite validation loss") else f"validation loss {_value(metrics.get('val/loss'))}, "
        self._raise_if_any_rank(trainer, pl_module, found, where, f"{loss}loss terms: {terms or 'not logged'}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # for epochs without validation (``limit_val_batches: 0``, ``check_val_every_n_epoch``), where
        # ModelCheckpoint saves in this hook; after a validation the weights are those checked there
        self._raise_if_any_rank(trainer, pl_module, [], f"the end of training epoch {trainer.current_epoch}", "")

    def _raise_if_any_rank(self, trainer: L.Trainer, pl_module: L.LightningModule, found: list[str], where: str, details: str) -> None:
        """Raise on every rank if ``found`` (this rank's non-finite values) or a non-finite parameter or
        buffer of ``pl_module`` is reported on any rank."""
        bad_tensor = first_nonfinite_tensor(pl_module)
        for callback in getattr(trainer, "callbacks", []):  # the averaged weights, which validation and the checkpoints use
            average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
            if bad_tensor is None and average is not None:
                bad_average = first_nonfinite_tensor(average.module)
                bad_tensor = f"averaged {bad_average} ({type(callback).__name__})" if bad_average else None
        bad_here = bool(found) or bad_tensor is not None
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        if bad_here:
            what = "; ".join(found + ([f"non-finite {bad_tensor} (the first found)"] if bad_tensor else [])) + f" on rank {trainer.global_rank}"
            state = "" if bad_tensor else "; parameters and buffers finite"
        else:
            what, state = f"non-finite values on another rank (rank {trainer.global_rank}: all finite)", ""
        raise NonFiniteStateError(
            f"{what} at {where} (global step {trainer.global_step}){'; ' + details if details else ''}{state}. "
            "Training stopped; no checkpoint of this state was written. "
            "Lower model.init_args.lr (or warm up longer), or check the data for broken images."
        )


def first_nonfinite_tensor(module: torch.nn.Module) -> str | None:
    """``"parameter <name>"`` or ``"buffer <name>"`` of the first floating-point tensor of ``module`` (parameters
    first, in registration order) holding a NaN or infinity; ``None`` when all are finite. One device sync per
    device, not one per tensor."""
    named = [("parameter", name, t) for name, t in module.named_parameters()]
    named += [("buffer", name, t) for name, t in module.named_buffers() if t.is_floating_point() or t.is_complex()]
    named = [entry for entry in named if entry[2].numel() and entry[2].device.type != "meta"]
    finite: dict[int, bool] = {}
    for device in {t.device for _, _, t in named}:
        on_device = [i for i, (_, _, t) in enumerate(named) if t.device == device]
        flags = torch.stack([torch.isfinite(named[i][2].detach()).all() for i in on_device]).cpu().tolist()
        finite.update(zip(on_device, flags))
    first = next((i for i in range(len(named)) if not finite[i]), None)
    return None if first is None else f"{named[first][0]} {named[first][1]}"


def _finite(value: Any) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all())


def _value(loss: Any) -> str:
    return f"{float(loss.detach().float().mean()):.4g}" if isinstance(loss, Tensor) else "(none)"
