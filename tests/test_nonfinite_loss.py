"""StopOnNonFiniteLoss: every rank takes part in one decision per step, so a NaN loss on one rank stops all
of them at the same step. (The CLI run with ``lr 1e6`` that must fail fast is in ``test_cli.py``; a real
2-process DDP run costs ~30 s here, so the ranks are simulated by the strategy's reduction.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mgff.callbacks.nonfinite_loss import NonFiniteLossError, StopOnNonFiniteLoss


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
