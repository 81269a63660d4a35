"""Per-image results of a run's own ``test``: ``test_predictions.csv`` beside ``metrics.json``.

What ``python -m mgff.report --compare`` pairs between runs (a paired bootstrap over the test images).
Named apart from ``predict``'s ``predictions.csv``, which a separate command writes from any checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import lightning as L
from torch import Tensor

from mgff.callbacks.prediction_writer import prediction_rows, write_merged_csv
from mgff.lit.classifier import input_box_to_photo

log = logging.getLogger("mgff")

__all__ = ["TestPredictionWriter"]


class TestPredictionWriter(L.Callback):
    """Write one row per test image to ``<run dir>/test_predictions.csv``: ``index``, ``path``, ``label``,
    ``label_name``, ``pred``, ``pred_name``, ``prob``, ``correct`` (1 or 0), ``top1_name`` ... ``top{k}_prob``
    and, for the two-stage model, its box (``box_*`` in input pixels, ``photo_box_*`` where the batch says
    how the input was cut from the photo); the columns of :class:`~mgff.callbacks.PredictionCSVWriter`.

    The rows are the predictions the test metrics counted: during ``test`` the module's
    ``forward_outputs`` (the one call every step makes for its logits) is wrapped to keep the last batch's
    outputs, so no second forward runs; the wrapper is removed when the test ends. Under DDP every rank
    writes a part file and rank 0 merges them in dataset order (as ``predict``'s writer does). A module
    without ``forward_outputs`` gets no file (a warning says so).

    Args:
        output_dir: folder of the CSV; default the trainer's log dir (the run directory).
        filename: CSV file name.
        top_k: number of most probable classes listed per image (at most the number of classes).
    """

    __test__ = False  # a Lightning callback, not a pytest class

    def __init__(self, output_dir: str | None = None, filename: str = "test_predictions.csv", top_k: int = 5) -> None:
        if top_k < 1:
            raise ValueError(f"TestPredictionWriter top_k must be at least 1, got {top_k}")
        self.output_dir = output_dir
        self.filename = filename
        self.top_k = top_k
        self.path: Path | None = None
        self._rows: list[dict[str, Any]] = []
        self._last: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self._wrapped: L.LightningModule | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self.path = [], None
        original: Callable | None = getattr(pl_module, "forward_outputs", None)
        if original is None:
            log.warning("%s has no forward_outputs: no %s written", type(pl_module).__name__, self.filename)
            return

        def recording_forward_outputs(images: Tensor, batch: dict[str, Any] | None = None):
            logits, aux_loss, extras = original(images, batch)
            self._last = (logits, extras)
            return logits, aux_loss, extras

        pl_module.forward_outputs = recording_forward_outputs  # an instance attribute over the class's method
        self._wrapped = pl_module

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._last = None

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._last is None or not batch:  # a batch of skipped images only, or no wrapper
            return
        logits, extras = self._last
        probs = logits["main"].detach().float().softmax(dim=-1)
        prob, pred = probs.max(dim=-1)
        prediction = {"index": batch["index"], "path": batch["path"], "label": batch["label"], "pred": pred, "prob": prob, "probs": probs}
        if "box" in extras:  # as predict_step gives it
            prediction["box"] = extras["box"].detach()
            if "input_to_photo" in batch:
                prediction["photo_box"] = input_box_to_photo(prediction["box"], batch["input_to_photo"])
        for row in prediction_rows(prediction, getattr(pl_module.hparams, "class_names", None), self.top_k):
            columns = list(row.items())
            after_prob = [name for name, _ in columns].index("prob") + 1
            self._rows.append(dict(columns[:after_prob] + [("correct", int(row["pred"] == row["label"]) if row["pred"] != "" else "")] + columns[after_prob:]))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_wrapped = self._wrapped is not None
        self._unwrap()
        if was_wrapped:
            out_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
            self.path = write_merged_csv(trainer, out_dir, self.filename, self._rows)
        self._rows = []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            vars(self._wrapped).pop("forward_outputs", None)
            self._wrapped, self._last = None, None
