"""Stop a fit cleanly on a signal: checkpoint at the end of a training step, stop, requeue on SLURM.

Why not Lightning's own handling (checked on lightning 2.6): on SIGTERM it only stops (no checkpoint);
on SLURM's ``SIGUSR1`` it saves ``hpc_ckpt_N.ckpt`` from inside the signal handler, i.e. wherever the
step happened to be (between ``optimizer.step`` and the loop's progress counters, or in a collective on
one rank), and then keeps training until SLURM kills the job. Here the handler only sets a flag; the
checkpoint is written at a step boundary that Lightning's resume logic knows (the same point where
``ModelCheckpoint(every_n_train_steps=...)`` saves), after all ranks agreed to stop.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("mgff")


class TrainingPreempted(SIGTERMException):
    """Raised after the preemption checkpoint is written; ends the process with ``128 + signal``
    (the shell's code for death by that signal) unless caught.

    Attributes:
        signal_name: the signal that stopped training (``SIGUSR1``, ``SIGTERM``...).
        checkpoint: path of the checkpoint to resume from.
        requeued: whether ``scontrol requeue`` was run for this SLURM job.
    """

    def __init__(self, signum: int, checkpoint: str, requeued: bool) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.checkpoint = checkpoint
        self.requeued = requeued

    def __str__(self) -> str:
        return f"training stopped by {self.signal_name}; resume from {self.checkpoint}"


def next_hpc_checkpoint_path(folder: str | Path) -> Path:
    """``<folder>/hpc_ckpt_<N+1>.ckpt``: the name Lightning resumes from by itself on SLURM (highest N)
    when ``ckpt_path`` is None, and with ``ckpt_path="hpc"`` anywhere."""
    numbers = [int(m.group(1)) for p in Path(folder).glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return Path(folder) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class PreemptionCheckpoint(Callback):
    """On one of ``signals``: finish the current training step, write ``hpc_ckpt_N.ckpt``, requeue
    the SLURM job (for ``requeue_signals``), and stop with :class:`TrainingPreempted`.

    - All ranks stop at the same step: each step end, the ranks agree (one all-reduce of a flag) on
      whether any of them got a signal, so a signal to rank 0 alone is enough.
    - The checkpoint is never written at a step that a validation run follows (the last step of an
      epoch, a ``val_check_interval`` step): Lightning resumes such a checkpoint past that validation,
      so its checkpoint selection would be lost. The stop waits for the next step instead.
    - A signal during the last epoch's final validation still gives a checkpoint (written at the end of
      training; resuming it goes straight to the test).
    - A second identical signal while waiting gets the signal's previous handling (e.g. termination).
    - Outside training (the final test, after an error) the previous handlers apply.

    Args:
        signals: signal names to handle (``SIGUSR1``: SLURM's warning from ``#SBATCH --signal``;
            ``SIGTERM``: ``kill``, ``scancel``, most schedulers' preemption).
        requeue_signals: those of ``signals`` after which a SLURM job is requeued (``scontrol requeue``).
        dirpath: folder of the checkpoint; default the trainer's ``default_root_dir`` (where Lightning
            looks for ``hpc_ckpt_N.ckpt`` on SLURM).
    """

    def __init__(self, signals: list[str] = ["SIGUSR1", "SIGTERM"], requeue_signals: list[str] = ["SIGUSR1"], dirpath: str | None = None) -> None:
        unknown = [name for name in [*signals, *requeue_signals] if name not in signal.Signals.__members__]
        if unknown:
            raise ValueError(f"preemption: unknown signal names {unknown}; use names like 'SIGTERM', 'SIGUSR1'")
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue_signals = {signal.Signals[name] for name in requeue_signals}
        self.dirpath = dirpath
        self.received: signal.Signals | None = None
        self._original_handlers: dict[signal.Signals, Any] = {}
        self._active = False

    # ----- signal handlers ------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._active or self.received == signum:
            # outside training (a handler Lightning put back after an error), or asked twice:
            # do what would have happened without this callback
            self._active = False
            self._restore_handlers()
            signal.raise_signal(signum)
            return
        if self.received is None:  # the first signal decides (e.g. SIGUSR1's requeue)
            self.received = signal.Signals(signum)
        log.info("received %s: checkpointing and stopping at the end of a training step", signal.Signals(signum).name)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: not in the main thread, %s not handled", [s.name for s in self.signals])
            return
        self._active = True
        for signum in self.signals:
            previous = signal.signal(signum, self._on_signal)
            # Lightning installs its own handlers after setup and puts back what it found at teardown:
            # remember the handler from before any of ours
            if signum not in self._original_handlers:
                self._original_handlers[signum] = previous

    def _restore_handlers(self) -> None:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._original_handlers.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    # ----- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.received = None
            self._original_handlers = {}
            # installed before Lightning's: it then leaves SIGUSR1 to us instead of its in-handler save
            self._install_handlers()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install_handlers()  # again: Lightning has since wrapped SIGTERM in its own stop-only handler

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if stop and not _validation_follows(trainer, batch_idx):
            self._checkpoint_and_stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a signal during the last epoch's final validation: the checkpoint resumes as "training done",
        # so a requeued job goes straight to the test
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._checkpoint_and_stop(trainer)
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # ----- the stop -------------------------------------------------------------------------------
    def _checkpoint_and_stop(self, trainer: L.Trainer) -> None:
        requeue = trainer.strategy.reduce_boolean_decision(self.received in self.requeue_signals, all=False)
        signum = self.received or signal.SIGTERM  # another rank got it: stop as for SIGTERM
        folder = self.dirpath or trainer.default_root_dir
        path = trainer.strategy.broadcast(str(next_hpc_checkpoint_path(folder)) if trainer.is_global_zero else None)
        trainer.save_checkpoint(path)
        requeued = requeue and trainer.is_global_zero and _slurm_requeue()
        if trainer.is_global_zero:
            log.info("preemption checkpoint written to %s%s", path, " (SLURM job requeued)" if requeued else "")
        raise TrainingPreempted(signum, path, requeued)


def _validation_follows(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether a validation run may follow training step ``batch_idx`` of this epoch (conservative:
    it ignores ``check_val_every_n_epoch``, so at worst the stop waits one more step)."""
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    every = trainer.val_check_batch
    return isinstance(every, int) and every > 0 and (batch_idx + 1) % every == 0


def _slurm_requeue() -> bool:
    """``scontrol requeue`` this SLURM job (array task included); ``False`` outside SLURM or on failure."""
    if not SLURMEnvironment.detect():
        return False
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("scontrol not found: SLURM job %s not requeued", job_id)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    return True
