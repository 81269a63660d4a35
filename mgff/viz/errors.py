"""Error analysis from a ``predictions.csv``: confusion matrix, per-class accuracy, confused pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from data_modules.dataset import load_rgb
from mgff.viz.drawing import show_image

__all__ = [
    "read_predictions", "confusion_matrix", "prediction_class_names", "plot_confusion_matrix",
    "per_class_accuracy", "plot_per_class_accuracy", "most_confused_pairs", "plot_confused_examples",
]


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a ``predictions.csv`` written by :class:`~mgff.callbacks.PredictionCSVWriter` (columns
    ``index, path, label, label_name, pred, pred_name, prob`` [``, box_x1..box_y2``])."""
    # no NA parsing: a class may well be called "NA" or "None", and an empty name means "no names"
    table = pd.read_csv(path, keep_default_na=False)
    missing = {"path", "label", "pred"} - set(table.columns)
    if missing:
        raise ValueError(f"{path} is not a predictions CSV: no column(s) {sorted(missing)}")
    return table


def _as_predictions(predictions: pd.DataFrame | str | Path) -> pd.DataFrame:
    return predictions if isinstance(predictions, pd.DataFrame) else read_predictions(predictions)


def prediction_class_names(predictions: pd.DataFrame | str | Path, num_classes: int | None = None) -> list[str]:
    """Class names by index from a predictions table's ``label_name``/``pred_name`` columns; a class
    that never appears (or a CSV without names) is named by its index."""
    table = _as_predictions(predictions)
    num_classes = num_classes or int(max(table["label"].max(), table["pred"].max())) + 1
    names = [str(i) for i in range(num_classes)]
    for index_column, name_column in (("label", "label_name"), ("pred", "pred_name")):
        if name_column in table:
            for index, name in zip(table[index_column], table[name_column]):
                if isinstance(name, str) and name:
                    names[int(index)] = name
    return names


def confusion_matrix(predictions: pd.DataFrame | str | Path, num_classes: int | None = None, normalize: str | None = None) -> Tensor:
    """Confusion matrix of a predictions table (or CSV path), with torchmetrics' ``MulticlassConfusionMatrix``.

    Args:
        predictions: :func:`read_predictions` output or the CSV's path.
        num_classes: ``C``; default one more than the largest class index in ``label``/``pred``.
        normalize: ``None`` (counts), ``"true"`` (rows sum to 1), ``"pred"`` or ``"all"``.

    Returns:
        ``(C, C)`` tensor, row = true class, column = predicted class (int64 counts when not normalised).
    """
    table = _as_predictions(predictions)
    num_classes = num_classes or int(max(table["label"].max(), table["pred"].max())) + 1
    metric = MulticlassConfusionMatrix(num_classes, normalize=normalize or "none")
    metric.update(torch.tensor(table["pred"].to_numpy(), dtype=torch.long), torch.tensor(table["label"].to_numpy(), dtype=torch.long))
    return metric.compute()


def plot_confusion_matrix(matrix: Tensor, class_names: Sequence[str] | None = None, normalize: bool = True, annotate: bool | None = None) -> Figure:
    """Heat map of a ``(C, C)`` count matrix (rows true, columns predicted).

    ``normalize``: colour by the share of each true class (rows sum to 1), else by count. Cells carry
    their count when ``annotate`` (default: for at most 20 classes).
    """
    counts = matrix.detach().cpu().double()
    num_classes = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    shown = counts / counts.sum(dim=1, keepdim=True).clamp_min(1) if normalize else counts
    side = min(12.0, 2.5 + 0.45 * num_classes)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, label="share of true class" if normalize else "images")
    ticks = np.arange(num_classes)
    fontsize = 7 if num_classes <= 20 else 4
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({int(counts.sum())} images, accuracy {float(counts.diag().sum() / counts.sum().clamp_min(1)):.3f})")
    if annotate if annotate is not None else num_classes <= 20:
        for (i, j), count in np.ndenumerate(counts.numpy().astype(int)):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=fontsize, color="white" if shown[i, j] > 0.5 * float(shown.max()) else "black")
    return fig


def per_class_accuracy(matrix: Tensor, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Recall of every class from a ``(C, C)`` count matrix.

    Returns:
        One row per class, index ``label``: ``name``, ``support`` (true images), ``correct`` and
        ``accuracy`` (``correct / support``, NaN for a class without images), sorted by index.
    """
    counts = matrix.detach().cpu().long()
    support = counts.sum(dim=1)
    correct = counts.diag()
    names = list(class_names) if class_names is not None else [str(i) for i in range(counts.shape[0])]
    accuracy = np.where(support.numpy() > 0, correct.numpy() / np.maximum(support.numpy(), 1), np.nan)
    return pd.DataFrame(
        {"name": names, "support": support.numpy(), "correct": correct.numpy(), "accuracy": accuracy},
        index=pd.RangeIndex(counts.shape[0], name="label"),
    )


def plot_per_class_accuracy(table: pd.DataFrame) -> Figure:
    """Horizontal bars of :func:`per_class_accuracy`, worst class first, with the mean over classes
    (classes without images left out) as a dashed line."""
    ordered = table.dropna(subset=["accuracy"]).sort_values("accuracy", kind="stable")
    fig = Figure(figsize=(6, max(2.5, 0.25 * len(ordered) + 1.0)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(ordered))
    ax.barh(y, ordered["accuracy"].to_numpy(), color="C0")
    ax.set_yticks(y, [f"{n} ({s})" for n, s in zip(ordered["name"], ordered["support"])], fontsize=7)
    mean_accuracy = float(ordered["accuracy"].mean())
    ax.axvline(mean_accuracy, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (images of the class)")
    ax.set_title(f"per-class accuracy, mean {mean_accuracy:.3f}")
    return fig


def most_confused_pairs(matrix: Tensor, class_names: Sequence[str] | None = None, top_k: int = 5) -> pd.DataFrame:
    """The ``top_k`` largest off-diagonal cells of a ``(C, C)`` count matrix.

    Returns:
        Rows sorted by ``count`` (descending; ties by true then predicted index), zero cells left
        out: ``true``, ``true_name``, ``pred``, ``pred_name``, ``count`` and ``share`` (``count``
        over the true class's images).
    """
    counts = matrix.detach().cpu().long().clone()
    names = list(class_names) if class_names is not None else [str(i) for i in range(counts.shape[0])]
    support = counts.sum(dim=1)
    counts.fill_diagonal_(0)
    true, pred = np.nonzero(counts.numpy())
    rows = [(int(t), int(p), int(counts[t, p])) for t, p in zip(true, pred)]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    rows = rows[:top_k]
    return pd.DataFrame(
        {
            "true": [t for t, _, _ in rows],
            "true_name": [names[t] for t, _, _ in rows],
            "pred": [p for _, p, _ in rows],
            "pred_name": [names[p] for _, p, _ in rows],
            "count": [c for _, _, c in rows],
            "share": [c / int(support[t]) for t, _, c in rows],
        }
    )


def plot_confused_examples(
    predictions: pd.DataFrame | str | Path,
    pairs: pd.DataFrame,
    image_root: str | Path,
    examples_per_pair: int = 4,
    panel_size: float = 2.2,
) -> Figure:
    """For each confused pair (a :func:`most_confused_pairs` row), the misclassified images, then one
    correctly classified image of the predicted class to compare with.

    Args:
        predictions: the predictions table (or CSV path); its ``path`` column is relative to ``image_root``.
        pairs: :func:`most_confused_pairs` output (one figure row per pair).
        image_root: the dataset root the paths are relative to (``datamodule.image_root()``).
        examples_per_pair: misclassified images per row (the most confident mistakes first).

    Returns:
        A ``len(pairs) x (examples_per_pair + 1)`` grid; an image axis is titled
        ``<true> -> <pred> p=<prob>``, the last column ``a real <pred>`` (left empty when there is none).
    """
    table = _as_predictions(predictions)
    if len(pairs) == 0:
        raise ValueError("no confused pairs to show (every prediction is right)")
    root = Path(image_root)
    fig = Figure(figsize=(panel_size * (examples_per_pair + 1), (panel_size + 0.4) * len(pairs)), layout="constrained")
    axes = np.asarray(fig.subplots(len(pairs), examples_per_pair + 1, squeeze=False))
    for r, pair in enumerate(pairs.itertuples(index=False)):
        wrong = table[(table["label"] == pair.true) & (table["pred"] == pair.pred)]
        if "prob" in wrong:
            wrong = wrong.sort_values("prob", ascending=False, kind="stable")
        for c in range(examples_per_pair):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(wrong):
                row = wrong.iloc[c]
                prob = f" p={float(row['prob']):.2f}" if "prob" in row else ""
                show_image(ax, load_rgb(root / row["path"]), f"{pair.true_name}\n-> {pair.pred_name}{prob}", fontsize=6)
        reference = table[(table["label"] == pair.pred) & (table["pred"] == pair.pred)]
        ax = axes[r, examples_per_pair]
        ax.set_axis_off()
        if len(reference):
            show_image(ax, load_rgb(root / reference.iloc[0]["path"]), f"a real\n{pair.pred_name}", fontsize=6)
    return fig
