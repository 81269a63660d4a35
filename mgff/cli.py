"""The one LightningCLI of mgff, used by ``python -m mgff <subcommand>`` and ``python -m mgff.fit``.

Configs are plain ``class_path``/``init_args`` YAML. Dataset facts (number of classes, class names)
flow from the DataModule into the model by argument links, so they are never written twice.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

import mgff.models.zoo  # noqa: F401  (registers the zoo's models with timm before any create_model)
from mgff.callbacks.eval_transform import EvalTransformInCheckpoint
from mgff.callbacks.nonfinite_loss import StopOnNonFiniteLoss
from mgff.callbacks.preemption import PreemptionCheckpoint
from mgff.callbacks.prediction_writer import PredictionCSVWriter
from mgff.callbacks.resume_state import ResumeStateCheckpoint
from mgff.callbacks.test_predictions import TestPredictionWriter
from mgff.lit.checkpoint import plain_hyperparameters, resolve_model_class
from mgff.models.pretrained import skip_pretrained_weights

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "mgff"}},
}


def setup_logging() -> None:
    """Show mgff's own messages (pretrained keys, skipped images) on stderr."""
    logger = logging.getLogger("mgff")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[mgff] %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class MGFFCLI(LightningCLI):
    """LightningCLI with mgff's links and default callbacks.

    - ``data.num_classes``, ``data.class_names`` and ``data.class_parents`` -> the model's
      ``num_classes``, ``class_names`` and ``class_parents`` (applied when the DataModule is instantiated);
    - ``data.mean``/``data.std`` -> the model's ``data_mean``/``data_std`` (it converts the batch to each
      network's own normalisation);
    - ``checkpoint``: ``ModelCheckpoint`` keeping the best by ``val/acc`` (override e.g.
      ``--checkpoint.save_top_k=3``); ``last_checkpoint``: ``last.ckpt``, the state after the latest epoch;
    - ``prediction_writer``: ``predict`` writes ``predictions.csv`` into the run directory; ``test`` (also the
      one at the end of ``mgff.fit``) writes ``test_predictions.csv`` there, one row per test image
      (:class:`~mgff.callbacks.test_predictions.TestPredictionWriter`, always on);
    - ``preemption``: on ``SIGUSR1``/``SIGTERM``, checkpoint at the end of a training step
      (``hpc_ckpt_N.ckpt`` in ``trainer.default_root_dir``), requeue on SLURM and stop
      (``--preemption.signals=[]`` turns it off);
    - the random generators' states and the training loader's position go into every checkpoint
      (:class:`~mgff.callbacks.resume_state.ResumeStateCheckpoint`), so a run resumed mid-epoch
      continues as if it had not stopped;
    - the saved ``config.yaml`` is overwritten (a requeued SLURM job reuses its run directory);
    - training stops at the first non-finite training loss, and at the end of a validation with a non-finite
      validation loss, monitored metric, parameter or buffer, before any checkpoint of that state is
      written (:class:`~mgff.callbacks.nonfinite_loss.StopOnNonFiniteLoss`),
      and every checkpoint records the evaluation transform (:class:`~mgff.callbacks.eval_transform.EvalTransformInCheckpoint`).

    Checks at start-up, before anything is built: every output folder (``trainer.default_root_dir``, the
    logger's ``save_dir``, ``checkpoint.dirpath``...) can be created and written, else an error names
    the key. Errors of the model's own arguments are reported as they are, not inside jsonargparse's
    union message.

    A ``--ckpt_path`` is untrusted input: its hyperparameters must be plain values
    (:func:`~mgff.lit.checkpoint.plain_hyperparameters`) before Lightning merges them into the config,
    so no object the checkpoint names is ever built; and the model is built without its initial
    ``pretrained`` weights, since the checkpoint's replace them (the file may be gone, the node offline).

    Distributed runs need nothing more than ``trainer.strategy``/``devices``/``num_nodes`` (and
    ``trainer.sync_batchnorm: true`` for SyncBatchNorm): the DataModule shards the data itself
    (see ``data_modules/resumable.py``), metrics are torchmetrics reduced over all ranks, and
    logging, checkpoint files and ``metrics.json`` come from rank 0.
    """

    def __init__(self, *args, **kwargs) -> None:
        setup_logging()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        parser.link_arguments("data.class_parents", "model.init_args.class_parents", apply_on="instantiate")
        # the batches' normalisation: the model converts it to each network's own (mgff/models/normalization.py)
        parser.link_arguments("data.mean", "model.init_args.data_mean", apply_on="instantiate")
        parser.link_arguments("data.std", "model.init_args.data_std", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Lightning 2.6's save_last writes last.ckpt only at steps where a top-k checkpoint is written,
        # i.e. when val/acc improved: a second, unmonitored checkpoint keeps last.ckpt the latest state
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,
                "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": ModelCheckpoint.CHECKPOINT_NAME_LAST,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        # read by ``python -m mgff.fit`` only; every subcommand accepts it, so one config serves all of them
        parser.add_argument(
            "--test_checkpoints",
            type=list[Literal["best", "last", "last_raw"]],
            default=["best"],
            help="what mgff.fit tests after fitting, the first as the run's test/* metrics and test_predictions.csv, "
            "the others as test_<name>/* and test_predictions_<name>.csv: best (the best-validation checkpoint), last "
            "(the last epoch's), last_raw (the last epoch's raw weights where an EMA of the weights was trained: the "
            "run without the average)",
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Always on, without config groups of their own. First in the list: Lightning keeps checkpoint
        # callbacks last, and the non-finite stop must come before the preemption callback's save and
        # before ModelCheckpoint's saves in on_validation_end / on_train_epoch_end.
        trainer.callbacks[:0] = [StopOnNonFiniteLoss(), ResumeStateCheckpoint(), EvalTransformInCheckpoint(), TestPredictionWriter()]
        return trainer

    # ----- checkpoints as untrusted input ---------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Lightning's merge of a ``--ckpt_path``'s hyperparameters into the config, on plain values only."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = plain_hyperparameters(ckpt.get("hyper_parameters", {}), str(ckpt_path))
        if not hparams:
            return
        if "_class_path" in hparams:
            resolve_model_class(hparams["_class_path"], LightningModule, str(ckpt_path))
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyperparameters of {ckpt_path} failed\n")
            raise

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if getattr(self, "subcommand", None) else self.config

    def _restores_checkpoint(self) -> bool:
        """Whether the run starts from a checkpoint (then the initial pretrained weights are not read)."""
        config = self._subconfig()
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in (None, "hpc"):  # Lightning's SLURM auto-resume, or an explicit "hpc"
            if ckpt_path is None and not SLURMEnvironment.detect():
                return False
            root = Path(config.get("trainer.default_root_dir") or os.getcwd())
            return any(root.glob("hpc_ckpt_*.ckpt"))
        return ckpt_path != "last" and Path(ckpt_path).is_file()  # "last" may find none: keep the weights

    # ----- start-up checks ------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        fitting = getattr(self, "subcommand", None) in (None, "fit")
        for key, path in output_dirs(self._subconfig(), fitting):
            reason = unwritable_reason(path)
            if reason:
                raise ValueError(f"{key} = {path!r} cannot be used as an output folder: {reason}")

    def instantiate_classes(self) -> None:
        with skip_pretrained_weights() if self._restores_checkpoint() else nullcontext():
            try:
                super().instantiate_classes()
            except ValueError as err:
                own = own_error_of_union(str(err))
                if own is None:
                    raise
                raise ValueError(own) from None


def output_dirs(config: Any, fitting: bool) -> list[tuple[str, str]]:
    """``(config key, folder)`` of every output folder a run's config sets (checkpoint folders only when fitting)."""
    keys = ["trainer.default_root_dir", "prediction_writer.output_dir"]
    if fitting:
        keys += ["checkpoint.dirpath", "last_checkpoint.dirpath", "preemption.dirpath"]
    found = [(key, config.get(key)) for key in keys]
    loggers = config.get("trainer.logger")
    for i, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        save_dir = logger.get("init_args", {}).get("save_dir") if hasattr(logger, "get") else None
        found.append((f"trainer.logger{f'[{i}]' if isinstance(loggers, list) else ''}.init_args.save_dir", save_dir))
    return [(key, str(path)) for key, path in found if path and "://" not in str(path)]


def unwritable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be created and written as a folder (``None`` when it can); creates nothing."""
    path = Path(path).expanduser().absolute()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                return f"{existing} is a file, not a folder"
            if not os.access(existing, os.W_OK | os.X_OK):
                return f"{existing} is not writable"
            return None
    return None


def own_error_of_union(message: str) -> str | None:
    """The model's or DataModule's own error inside jsonargparse's "Does not validate against any of the
    Union subtypes" message (which wraps every error raised while building a class), else ``None``."""
    if "Union subtypes" not in message or "\nErrors:\n" not in message:
        return None
    block = message.split("\nErrors:\n", 1)[1].split("\nGiven value", 1)[0]
    entries = [e.strip() for e in re.split(r"^  - ", block, flags=re.M) if e.strip()]
    own = [" ".join(line.strip() for line in e.splitlines()) for e in entries if not e.startswith("Expected a <class 'NoneType'>")]
    return "; ".join(own) or None


@contextmanager
def process_group_closed_on_exit() -> Iterator[None]:
    """Destroy the ``torch.distributed`` process group when the block ends, however it ends.

    Lightning destroys the group at exit only for NCCL; a gloo group (DDP on CPU) left alive keeps its
    C++ worker threads to interpreter teardown, where they abort the rank with "terminate called without
    an active exception" (SIGABRT, exit -6) after the run has finished and written its results.
    """
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(args: list[str] | None = None) -> None:
    """``python -m mgff fit|validate|test|predict --config ...``."""
    with process_group_closed_on_exit():
        MGFFCLI(args=args)
