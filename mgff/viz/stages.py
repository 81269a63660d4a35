"""Figures and tables of the two stages' predictions: what stage 1, stage 2 and the merge say per image."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgff.viz.drawing import show_image, to_display

if TYPE_CHECKING:
    from mgff.lit.classifier import FineGrainedClassifier

__all__ = ["OUTPUT_LABELS", "stage_logits", "stage_predictions", "plot_stage_predictions"]

# names of the model's outputs (``forward_outputs``) as the tables and figures call them
OUTPUT_LABELS = {"stage1": "stage1", "stage2": "stage2", "main": "merged", "cropper": "cropper"}


@torch.no_grad()
def stage_logits(model: FineGrainedClassifier, images: Tensor) -> dict[str, Tensor]:
    """Every prediction the model makes for ``images (B, 3, H, W)``, in eval mode without gradients.

    Returns:
        ``{output: logits (B, C)}`` on the CPU: ``main`` (the final, merged prediction), and for a
        :class:`~mgff.lit.two_stage.TwoStageClassifier` also ``stage1``, ``stage2`` (and ``cropper``
        when the ViT has its own head). The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        logits, _, _ = model.forward_outputs(images.to(model.device))
    finally:
        model.train(was_training)
    return {name: value.detach().float().cpu() for name, value in logits.items()}


def stage_predictions(logits: dict[str, Tensor], labels: Tensor, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per image, what each output predicts and whether it is right.

    Args:
        logits: ``{output: (B, C)}`` as :func:`stage_logits` returns (log-probabilities are fine:
            the softmax of log-probabilities is the probabilities).
        labels: ``(B,)`` ground-truth classes.
        class_names: names by class index (default the indices as strings).

    Returns:
        One row per image: ``label``, ``label_name``, then for each output, in the order ``stage1``,
        ``stage2``, ``merged``, ``cropper`` (those present; ``main`` is called ``merged``):
        ``<out>_pred``, ``<out>_name``, ``<out>_prob`` (softmax probability of the predicted class)
        and ``<out>_correct`` (bool).
    """
    labels = labels.detach().cpu().long()
    names = list(class_names) if class_names is not None else [str(i) for i in range(next(iter(logits.values())).shape[1])]
    table = pd.DataFrame({"label": labels.numpy(), "label_name": [names[i] for i in labels.tolist()]})
    for key in sorted(logits, key=lambda k: list(OUTPUT_LABELS).index(k) if k in OUTPUT_LABELS else len(OUTPUT_LABELS)):
        values = logits[key].detach().float().cpu()
        if values.shape[0] != len(labels):
            raise ValueError(f"logits[{key!r}] has {values.shape[0]} rows for {len(labels)} labels")
        prob, pred = values.softmax(dim=-1).max(dim=-1)
        out = OUTPUT_LABELS.get(key, key)
        table[f"{out}_pred"] = pred.numpy()
        table[f"{out}_name"] = [names[i] for i in pred.tolist()]
        table[f"{out}_prob"] = prob.numpy()
        table[f"{out}_correct"] = (pred == labels).numpy()
    return table


def _output_columns(table: pd.DataFrame) -> list[str]:
    return [column[: -len("_correct")] for column in table.columns if column.endswith("_correct")]


def plot_stage_predictions(
    images: Tensor,
    table: pd.DataFrame,
    ncols: int = 4,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Figure:
    """The batch with each output's prediction in the title, and a bar chart of their accuracies.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        table: :func:`stage_predictions` of the same images.

    Returns:
        ``B`` image axes (title: true class, then one ``✓``/``✗`` line per output, red when the merged
        prediction is wrong), then one bar axis titled ``accuracy on these B images`` with one bar
        per output (height = share of correct rows).
    """
    shown = to_display(images, mean, std)
    if len(table) != len(shown):
        raise ValueError(f"table has {len(table)} rows for {len(shown)} images")
    outputs = _output_columns(table)
    ncols = max(1, min(ncols, len(shown)))
    nrows = math.ceil(len(shown) / ncols) + 1
    fig = Figure(figsize=(2.6 * ncols, 3.0 * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    for i, image in enumerate(shown):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        row = table.iloc[i]
        lines = [f"true: {row['label_name']}"]
        lines += [f"{'✓' if row[f'{out}_correct'] else '✗'} {out}: {row[f'{out}_name']} {row[f'{out}_prob']:.2f}" for out in outputs]
        show_image(ax, image, "\n".join(lines), fontsize=6)
        final = "merged" if "merged" in outputs else outputs[-1]
        ax.title.set_color("black" if row[f"{final}_correct"] else "red")
    bar_ax = fig.add_subplot(grid[nrows - 1, :])
    accuracy = [float(table[f"{out}_correct"].mean()) for out in outputs]
    bars = bar_ax.bar(outputs, accuracy, color=["C0", "C1", "C2", "C3"][: len(outputs)])
    bar_ax.bar_label(bars, labels=[f"{a:.2f}" for a in accuracy], fontsize=7)
    bar_ax.set_ylim(0, 1.1)
    bar_ax.set_ylabel("accuracy")
    bar_ax.set_title(f"accuracy on these {len(shown)} images")
    return fig
