"""Writes ``predict`` results to a CSV: image path, ground truth, predicted class name, probability."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionCSVWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs and write ``predictions.csv``.

    Every rank writes its rows to a part file; after a barrier, rank 0 merges them in dataset order
    (dropping the duplicates a distributed sampler pads with) into ``<output_dir>/predictions.csv``.

    Args:
        output_dir: folder of the CSV; default the trainer's log dir (the run directory).
        filename: CSV file name.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.filename = filename
        self.path: Path | None = None
        self._rows: list[dict[str, Any]] = []

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        if not prediction:
            return
        names: Sequence[str] | None = getattr(pl_module.hparams, "class_names", None)
        n = len(prediction["index"])
        cols = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in prediction.items()}
        for i in range(n):
            label, pred = int(cols["label"][i]), int(cols["pred"][i])
            row = {
                "index": int(cols["index"][i]),
                "path": cols["path"][i],
                "label": label,
                "label_name": names[label] if names else "",
                "pred": pred,
                "pred_name": names[pred] if names else "",
                "prob": f"{float(cols['prob'][i]):.6f}",
            }
            if "box" in cols:
                row.update({k: f"{float(v):.1f}" for k, v in zip(("box_x1", "box_y1", "box_x2", "box_y2"), cols["box"][i])})
            self._rows.append(row)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out_dir = self._dir(trainer)
        out_dir.mkdir(parents=True, exist_ok=True)
        part = out_dir / f".{self.filename}.rank{trainer.global_rank}"
        _write_csv(part, self._rows)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            rows: dict[int, dict[str, str]] = {}
            for rank in range(trainer.world_size):
                rank_part = out_dir / f".{self.filename}.rank{rank}"
                with open(rank_part, newline="") as f:
                    for row in csv.DictReader(f):
                        rows.setdefault(int(row["index"]), row)
                rank_part.unlink()
            self.path = out_dir / self.filename
            _write_csv(self.path, [rows[k] for k in sorted(rows)])
        trainer.strategy.barrier()


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(rows[0]) if rows else ["index", "path", "label", "label_name", "pred", "pred_name", "prob"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
