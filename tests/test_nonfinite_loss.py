"""StopOnNonFiniteLoss: every rank takes part in one decision per step and per validation, so a NaN loss, a
NaN validation loss or metric, or a NaN parameter or buffer on one rank stops all of them at the same point.
(The CLI runs with ``lr 1e6`` that must fail fast, and one whose NaN appears only in validation, are in
``test_cli.py``; a real 2-process DDP run costs ~30 s here, so the ranks are simulated by the strategy's
reduction.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from mgff.callbacks.nonfinite_loss import NonFiniteLossError, NonFiniteStateError, StopOnNonFiniteLoss


class TwoRankStrategy:
    """``reduce_boolean_decision`` as DDP computes it over two ranks, the other rank's decision given."""

    def __init__(self, other_rank_bad: bool) -> None:
        self.other_rank_bad = other_rank_bad
        self.calls: list[tuple[bool, bool]] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls.append((decision, all))
        return (decision and self.other_rank_bad) if all else (decision or self.other_rank_bad)


def run_step(outputs, other_rank_bad: bool, step: int = 5):
    strategy = TwoRankStrategy(other_rank_bad)
    trainer = SimpleNamespace(strategy=strategy, global_step=step, current_epoch=1, global_rank=0)
    module = SimpleNamespace(last_loss_terms={"ce": torch.tensor(float("nan")), "aux": torch.tensor(0.25)})
    callback = StopOnNonFiniteLoss()
    callback.on_train_batch_start(trainer, module, None, 3)
    try:
        callback.on_train_batch_end(trainer, module, outputs, None, 3)
    finally:
        assert strategy.calls and all(any_rank is False for _, any_rank in strategy.calls)  # an "any" over ranks, every step


def test_nonfinite_loss_names_step_epoch_and_terms():
    with pytest.raises(NonFiniteLossError, match=r"loss nan on rank 0 at global step 5 \(epoch 1, batch 3 .*loss terms: ce=nan, aux=0.25"):
        run_step({"loss": torch.tensor(float("nan"))}, other_rank_bad=False)
    with pytest.raises(NonFiniteLossError, match=r"loss inf on rank 0"):
        run_step(torch.tensor(float("inf")), other_rank_bad=False)


def test_finite_rank_stops_with_the_rank_that_diverged():
    run_step({"loss": torch.tensor(0.7)}, other_rank_bad=False)  # both finite: training goes on
    with pytest.raises(NonFiniteLossError, match=r"on another rank \(rank 0 had 0.7\) at global step 5"):
        run_step({"loss": torch.tensor(0.7)}, other_rank_bad=True)
    with pytest.raises(NonFiniteLossError, match=r"another rank"):
        run_step(None, other_rank_bad=True)  # a rank whose batch was skipped still takes part in the decision


def end_validation(module, metrics, other_rank_bad=False, sanity=False):
    """``on_validation_end`` of a fit's validation after epoch 2 (global step 30), on rank 0 of two."""
    strategy = TwoRankStrategy(other_rank_bad)
    trainer = SimpleNamespace(
        strategy=strategy, global_step=30, current_epoch=2, global_rank=0, sanity_checking=sanity,
        state=SimpleNamespace(fn=TrainerFn.FITTING), callback_metrics=metrics,
        checkpoint_callbacks=[SimpleNamespace(monitor="val/acc"), SimpleNamespace(monitor=None)],
    )
    try:
        StopOnNonFiniteLoss().on_validation_end(trainer, module)
    finally:
        assert strategy.calls == [(strategy.calls[0][0], False)]  # one "any" over ranks per validation


def finite_metrics(**changes):
    metrics = {"val/loss": torch.tensor(1.2), "val/loss_ce1": torch.tensor(0.7), "val/loss_ce2": torch.tensor(0.5), "val/acc": torch.tensor(0.4)}
    return {**metrics, **{k.replace("__", "/"): torch.tensor(v) for k, v in changes.items()}}


def test_nonfinite_validation_loss_stops_naming_epoch_and_terms():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    end_validation(module, finite_metrics())  # all finite: training goes on
    nan = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"^non-finite validation loss nan on rank 0 at the end of epoch 2's validation \(global step 30\); "
                       r"loss terms: ce1=nan, ce2=0.5; parameters and buffers finite\. Training stopped; no checkpoint"):
        end_validation(module, finite_metrics(val__loss=nan, val__loss_ce1=nan))
    assert issubclass(NonFiniteStateError, NonFiniteLossError)  # mgff.fit's catch holds it
    with pytest.raises(NonFiniteStateError, match=r"non-finite val/acc nan \(the metric checkpoints are ranked on\) on rank 0 .*validation loss 1.2, loss terms"):
        end_validation(module, finite_metrics(val__acc=nan))
    with pytest.raises(NonFiniteStateError, match=r"the sanity check's validation"):
        end_validation(module, finite_metrics(val__loss=float("inf")), sanity=True)


def test_nonfinite_parameter_or_buffer_is_named():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module[1].running_var[1] = float("inf")  # BatchNorm statistics, not a parameter
    with pytest.raises(NonFiniteStateError, match=r"^non-finite buffer 1.running_var \(the first found\) on rank 0 .*validation loss 1.2, loss terms: ce1=0.7, ce2=0.5\. Training"):
        end_validation(module, finite_metrics())
    with torch.no_grad():
        module[1].weight[0] = float("nan")
        module[0].bias[1] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"non-finite parameter 0.bias \(the first found\)"):
        end_validation(module, finite_metrics())


def test_finite_rank_stops_with_a_rank_whose_state_diverged():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with pytest.raises(NonFiniteStateError, match=r"^non-finite values on another rank \(rank 0: all finite\) at the end of epoch 2's validation"):
        end_validation(module, finite_metrics(), other_rank_bad=True)  # e.g. its BatchNorm statistics (no SyncBatchNorm)


def test_validate_and_test_of_a_checkpoint_are_not_stopped():
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), callback_metrics=finite_metrics(val__loss=float("nan")))
    StopOnNonFiniteLoss().on_validation_end(trainer, torch.nn.Linear(2, 2))  # reported by the validation itself


def test_epoch_without_validation_checks_the_state():
    module = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(strategy=TwoRankStrategy(False), global_step=7, current_epoch=1, global_rank=0, callback_metrics={})
    StopOnNonFiniteLoss().on_train_epoch_end(trainer, module)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"^non-finite parameter weight \(the first found\) on rank 0 at the end of training epoch 1 \(global step 7\)\. Training stopped"):
        StopOnNonFiniteLoss().on_train_epoch_end(trainer, module)
