"""Writes ``predict`` results to a CSV: image path, ground truth (if any), the top-k class names and probabilities, boxes."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger("mgff")


class PredictionCSVWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs and write ``predictions.csv``.

    Columns: ``index``, ``path``; ``label``/``label_name`` when the data has labels; ``pred``,
    ``pred_name``, ``prob``; ``top1_name``, ``top1_prob`` ... ``top{k}_*`` (the ``top_k`` most probable
    classes); ``box_x1..box_y2`` (the two-stage model's box in input pixels) and ``photo_box_x1..`` (the
    same box in the photo's own pixels, where the data says how the input was cut from the photo);
    ``error`` where the data reports files it could not decode (their rows have no prediction; a
    warning counts them). Class names are the model's (``hparams.class_names``: the checkpoint's).

    Every rank writes its rows to a part file; after a barrier, rank 0 merges them in dataset order
    (dropping the duplicates a distributed sampler pads with) into ``<output_dir>/predictions.csv``.

    Args:
        output_dir: folder of the CSV; default the trainer's log dir (the run directory).
        filename: CSV file name.
        top_k: number of most probable classes listed per image (at most the number of classes).
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.csv", top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ValueError(f"prediction_writer.top_k must be at least 1, got {top_k}")
        self.output_dir = output_dir
        self.filename = filename
        self.top_k = top_k
        self.path: Path | None = None
        self._rows: list[dict[str, Any]] = []

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        if prediction:
            self._rows += prediction_rows(prediction, getattr(pl_module.hparams, "class_names", None), self.top_k)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = write_merged_csv(trainer, self._dir(trainer), self.filename, self._rows)
        if self.path is not None:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            failed = sum(1 for row in rows if row.get("error"))
            if failed:
                log.warning("%d of %d images could not be decoded: no prediction, see the error column of %s", failed, len(rows), self.path)


def prediction_rows(prediction: dict[str, Any], class_names: Sequence[str] | None, top_k: int) -> list[dict[str, Any]]:
    """CSV rows (one per image) of a ``predict_step`` output: ``index``, ``path``, ``pred``, ``prob``, ``probs``
    ``(B, C)`` and optionally ``label``, ``error``, ``box``/``photo_box`` ``(B, 4)``; see :class:`PredictionCSVWriter`
    for the columns. ``class_names`` give the ``*_name`` columns (empty without)."""
    name = (lambda i: class_names[i]) if class_names else (lambda i: "")  # noqa: E731
    cols = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in prediction.items()}
    k = min(top_k, cols["probs"].shape[-1]) if "probs" in cols else 0
    top_prob, top_index = cols["probs"].topk(k, dim=-1) if k else (None, None)
    rows = []
    for i in range(len(cols["index"])):
        error = cols["error"][i] if "error" in cols else ""
        row: dict[str, Any] = {"index": int(cols["index"][i]), "path": cols["path"][i]}
        if "label" in cols:
            label = int(cols["label"][i])
            row.update(label=label, label_name=name(label) if label >= 0 else "")
        pred = int(cols["pred"][i])
        row.update(pred=pred, pred_name=name(pred), prob=f"{float(cols['prob'][i]):.6f}")
        for j in range(k):
            row[f"top{j + 1}_name"] = name(int(top_index[i, j]))
            row[f"top{j + 1}_prob"] = f"{float(top_prob[i, j]):.6f}"
        for key, prefix in (("box", "box"), ("photo_box", "photo_box")):
            if key in cols:
                row.update({f"{prefix}_{c}": f"{float(v):.1f}" for c, v in zip(("x1", "y1", "x2", "y2"), cols[key][i])})
        if "error" in cols:
            if error:  # no prediction for a file that could not be decoded
                row = {c: ("" if c not in ("index", "path") else v) for c, v in row.items()}
            row["error"] = error
        rows.append(row)
    return rows


def write_merged_csv(trainer: L.Trainer, out_dir: Path, filename: str, rows: list[dict[str, Any]]) -> Path | None:
    """Write this rank's ``rows`` to a part file; after a barrier, rank 0 merges every rank's part in ``index``
    order, keeping the first row of an index (a distributed sampler pads with duplicates), into
    ``out_dir/filename`` and deletes the parts. Collective: every rank calls it. Returns the merged CSV's path
    on rank 0, ``None`` on the others."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / f".{filename}.rank{trainer.global_rank}", rows)
    trainer.strategy.barrier()
    path = None
    if trainer.is_global_zero:
        merged: dict[int, dict[str, str]] = {}
        for rank in range(trainer.world_size):
            rank_part = out_dir / f".{filename}.rank{rank}"
            with open(rank_part, newline="") as f:
                for row in csv.DictReader(f):
                    merged.setdefault(int(row["index"]), row)
            rank_part.unlink()
        path = out_dir / filename
        _write_csv(path, [merged[k] for k in sorted(merged)])
    trainer.strategy.barrier()
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(rows[0]) if rows else ["index", "path", "pred", "pred_name", "prob"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
