"""The one LightningCLI of mgff, used by ``python -m mgff <subcommand>`` and ``python -m mgff.fit``.

Configs are plain ``class_path``/``init_args`` YAML. Dataset facts (number of classes, class names)
flow from the DataModule into the model by argument links, so they are never written twice.
"""

from __future__ import annotations

import logging
import sys

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import mgff.models.zoo  # noqa: F401  (registers the zoo's models with timm before any create_model)
from mgff.callbacks.preemption import PreemptionCheckpoint
from mgff.callbacks.prediction_writer import PredictionCSVWriter
from mgff.callbacks.resume_state import ResumeStateCheckpoint

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
    - ``prediction_writer``: ``predict`` writes ``predictions.csv`` into the run directory;
    - ``preemption``: on ``SIGUSR1``/``SIGTERM``, checkpoint at the end of a training step
      (``hpc_ckpt_N.ckpt`` in ``trainer.default_root_dir``), requeue on SLURM and stop
      (``--preemption.signals=[]`` turns it off);
    - the random generators' states and the training loader's position go into every checkpoint
      (:class:`~mgff.callbacks.resume_state.ResumeStateCheckpoint`), so a run resumed mid-epoch
      continues as if it had not stopped;
    - the saved ``config.yaml`` is overwritten (a requeued SLURM job reuses its run directory).

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

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # ResumeStateCheckpoint has no options: always on, without a config group of its own. First in
        # the list: Lightning keeps checkpoint callbacks last.
        trainer.callbacks.insert(0, ResumeStateCheckpoint())
        return trainer


def main(args: list[str] | None = None) -> None:
    """``python -m mgff fit|validate|test|predict --config ...``."""
    MGFFCLI(args=args)
