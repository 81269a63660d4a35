"""``python -m mgff.fit --config experiments/<name>.yaml``: fit, test the best checkpoint once, report.

The run: fit with checkpoints selected on the validation split; then the test split is evaluated
once with the best checkpoint; the final metrics go to ``<run dir>/metrics.json`` and a one-line
summary is printed. ``test_checkpoints`` (a config key) chooses the model a run reports by a fixed rule instead,
e.g. ``[last, best, last_raw]``: the last epoch's weights are the run's ``test/*``, and the best-validation
checkpoint and the last epoch's raw (un-averaged) weights are reported beside them as ``test_best/*`` and
``test_last_raw/*``, each with its ``test_predictions_<name>.csv``. ``--ckpt_path`` resumes a stopped run from its checkpoint.

Under DDP (``--trainer.strategy ddp``, or ``srun`` on SLURM) every rank runs this function: fit and
test are collective (the test split is evaluated once, sharded over the ranks without duplicates),
and rank 0 alone writes ``metrics.json`` and prints. A run stopped by a signal
(:class:`~mgff.callbacks.preemption.PreemptionCheckpoint`) skips the test and exits with ``128 + signal``
after saying which checkpoint to resume from. A run whose training loss turns NaN or infinite stops at
that step, and one whose validation loss, checkpoint-ranked metric, parameters or buffers do stops at
the end of that validation, before any checkpoint of the state is written
(:class:`~mgff.callbacks.nonfinite_loss.StopOnNonFiniteLoss`); it is not tested, writes no
``metrics.json`` and exits with status 1, naming the step, epoch and loss terms.

``metrics.json`` holds what ``trainer.test`` returned (``test/acc``, ``test/acc5``; for the two-stage model also
each stage's ``test/stage1_acc``, ``test/stage2_acc``...), ``best_val/acc``, the best checkpoint, epochs and steps,
``fit_seconds`` (wall time of the fit), ``cpu_seconds`` (user + system CPU time of the same fit, this process's
and its children's: the data-loader workers, see :func:`cpu_seconds_so_far`), ``torch_threads``
(``torch.get_num_threads()``) and ``num_classes``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mgff.callbacks.nonfinite_loss import NonFiniteLossError
from mgff.callbacks.preemption import TrainingPreempted
from mgff.cli import MGFFCLI, process_group_closed_on_exit


class FitCLI(MGFFCLI):
    """The mgff CLI without subcommands, plus ``--ckpt_path`` to resume."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path",
            type=Optional[str],
            default=None,
            help="checkpoint to resume fitting from: a path, 'last' (the run's last.ckpt) or 'hpc' (the newest "
            "hpc_ckpt_N.ckpt in trainer.default_root_dir, written on preemption; on SLURM the default when None)",
        )


def cpu_seconds_so_far() -> float:
    """User + system CPU seconds used so far by this process and its descendants.

    Descendants that ended and were waited for (``RUSAGE_CHILDREN``) and those still running: data-loader
    workers are persistent (``persistent_workers``) and outlive ``trainer.fit``, so the ended ones alone would
    miss them. Under Lightning's own DDP launcher on one machine the other ranks are this process's children
    and count too; under ``srun`` each rank is its own process. The difference of two calls is the CPU time
    spent in between.
    """
    try:
        import resource
    except ImportError:  # not POSIX: this process only
        return time.process_time()
    own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # ended meanwhile: counted by RUSAGE_CHILDREN once it is waited for
            continue
        # a live child's own ended children are in its children_*; its live ones are listed themselves
        total += times.user + times.system + getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
    return total


def last_checkpoint_path(trainer) -> str | None:
    """The checkpoint of the last epoch: the CLI's unmonitored ``last_checkpoint`` (``last.ckpt``)."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", "") is None and (callback.last_model_path or callback.best_model_path):
            return callback.last_model_path or callback.best_model_path
    return None


def test_checkpoint(
    trainer, model, datamodule, name: str, best_path: str | None, last_path: str | None, prefix: str = "test"
) -> tuple[str | None, dict]:
    """Test one of ``best``, ``last``, ``last_raw`` (see ``--test_checkpoints``); its per-image rows go to
    ``test_predictions.csv`` (``prefix == "test"``) or ``test_predictions_<name>.csv``. Returns the path tested and
    what ``trainer.test`` returned."""
    from mgff.callbacks.test_predictions import TestPredictionWriter

    writers = [cb for cb in trainer.callbacks if isinstance(cb, TestPredictionWriter)]
    filenames = [w.filename for w in writers]
    if prefix != "test":
        for writer in writers:
            writer.filename = f"test_predictions_{name}.csv"
    try:
        if name != "best" and last_path is None:
            raise ValueError(f"test_checkpoints names {name!r}, and this run wrote no last.ckpt (last_checkpoint)")
        if name in ("best", "last"):
            path = best_path if name == "best" else last_path
            tested = trainer.test(model, datamodule=datamodule, ckpt_path=path or None, verbose=False)
            return path, (tested[0] if tested else {})
        path = last_path
        # last_raw: the weights trained, not their average (an EMA run's checkpoints hold the average as state_dict)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if "current_model_state" not in saved:
            raise ValueError(f"test_checkpoints names 'last_raw': {path} holds no raw weights (current_model_state); "
                             "they exist only in a run with a WeightAveraging callback such as mgff.callbacks.EMAWeights")
        model.load_state_dict(saved["current_model_state"])
        tested = trainer.test(model, datamodule=datamodule, verbose=False)
        return f"{path}:current_model_state", (tested[0] if tested else {})
    finally:
        for writer, filename in zip(writers, filenames):
            writer.filename = filename


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Fit, test the best checkpoint (or what ``--test_checkpoints`` names), write ``metrics.json``; return the
    metrics (on every rank)."""
    cli = FitCLI(run=False, args=args)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    start, cpu_start = time.perf_counter(), cpu_seconds_so_far()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cli.config.get("ckpt_path"))
    except TrainingPreempted as stop:
        if trainer.is_global_zero:
            then = "the requeued SLURM job resumes from it by itself" if stop.requeued else f"rerun with --ckpt_path {stop.checkpoint}"
            print(f"mgff: {stop}; not tested; {then}")
        raise
    except NonFiniteLossError as err:  # also NonFiniteStateError (validation loss, parameters, buffers)
        if trainer.is_global_zero:
            print(f"mgff: {err} Not tested, no metrics.json written.")
        raise
    fit_seconds, cpu_seconds = time.perf_counter() - start, cpu_seconds_so_far() - cpu_start

    # the monitored ModelCheckpoint (the CLI's ``checkpoint``), not ``last_checkpoint``
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)), trainer.checkpoint_callback)
    best_path = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    metrics: dict[str, Any] = {}
    tested_paths: dict[str, str | None] = {}
    last_path = last_checkpoint_path(trainer)  # now: testing a checkpoint restores the callbacks' states saved in it
    for i, name in enumerate(cli.config.get("test_checkpoints") or ["best"]):
        prefix = "test" if i == 0 else f"test_{name}"
        tested_paths[name], tested = test_checkpoint(trainer, model, datamodule, name, best_path, last_path, prefix)
        metrics.update({k.replace("test/", f"{prefix}/", 1): float(v) for k, v in tested.items()})
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics["best_val/acc"] = float(checkpoint.best_model_score)
    metrics.update(
        {
            "tested_checkpoints": tested_paths,
            "best_checkpoint": best_path,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "fit_seconds": round(fit_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "num_classes": datamodule.num_classes,
        }
    )
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(
            f"mgff: test/acc={metrics.get('test/acc', float('nan')):.4f} "
            f"best val/acc={metrics.get('best_val/acc', float('nan')):.4f} "
            f"epochs={metrics['epochs']} fit={fit_seconds:.0f}s run_dir={run_dir}"
        )
    return metrics


if __name__ == "__main__":
    with process_group_closed_on_exit():  # every rank runs this: a gloo group left alive aborts the exit
        run()
