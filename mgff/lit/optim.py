"""Optimiser and learning-rate schedule shared by mgff's LightningModules."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def param_groups(modules_and_lr: Iterable[tuple[nn.Module, float]], weight_decay: float) -> list[dict]:
    """Parameter groups: each module at its own lr; biases and norm weights (1-D) without weight decay."""
    groups = []
    for module, lr in modules_and_lr:
        decay, no_decay = [], []
        for p in module.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    """``sgd`` (momentum, optional Nesterov) or ``adamw``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """Multiplier of the base lr at step ``s``: linear warmup to 1, then cosine down to ``min_lr_ratio``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


SCHEDULER_INTERVALS = ("epoch", "step")


def cosine_schedule(
    interval: str, total_steps: int, max_epochs: int, warmup_epochs: float, min_lr_ratio: float = 0.0
) -> tuple:
    """``(factor, interval)`` for a ``LambdaLR`` stepped by Lightning every ``interval``.

    ``epoch``: the paper's "使用函数cos(x)调整每轮的学习率" ("the lr of each epoch is set by cos(x)"): the
    lr is constant within an epoch and follows the cosine over ``max_epochs``; warmup is rounded to
    whole epochs. ``step``: the cosine (and warmup) advance every optimiser step.
    """
    if interval not in SCHEDULER_INTERVALS:
        raise ValueError(f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {interval!r}")
    max_epochs = max(int(max_epochs or 1), 1)
    if interval == "epoch":
        return warmup_cosine(max_epochs, round(warmup_epochs), min_lr_ratio), "epoch"
    steps_per_epoch = total_steps / max_epochs
    return warmup_cosine(total_steps, round(warmup_epochs * steps_per_epoch), min_lr_ratio), "step"
