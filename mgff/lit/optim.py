"""Optimiser and learning-rate schedule shared by mgff's LightningModules.

Parameters are trained in three **roles**, each with its own lr, weight decay and warmup
(:class:`GroupRecipe`), inside one optimiser (Lightning allows several only with manual optimisation,
which gives up ``gradient_clip_val``):

``backbone``    the pretrained network (and a second stage's copy);
``fusion``      the fresh layers of a head's fused path (the MGFF head's align convs, attention, SE, GCN,
                pooling, every norm inside them, and the residual head's ``fusion_classifier``, the end of
                that branch);
``classifier``  the layers that turn the backbone's pooled map into logits (a head's ``classifier_modules()``:
                the linear head's norm and linear layer, the same base path inside the residual MGFF head, or
                the plain MGFF head's classifier).

Why the residual head's fused classifier is ``fusion``: it reads the fresh fused features, which are random at
the start; at the classifier's 10x lr it learned on them faster than they became useful (real photos,
EfficientNet-Lite0 at 224 px: its validation after the first epoch stayed well below the linear head's; BENCHMARKS.md,
"Recipe search: 3 epochs, seed 0, chosen on validation"; unmeasured for Swin-B at 384 px), so the whole residual
branch gets one lr (``fusion_lr_scale``).

Within a role, 1-D parameters (biases, norm weights, layer scales) get no weight decay. A role may also
carry per-parameter lr scales (:func:`layer_lr_scales`: timm's layer-wise lr decay over the backbone's
blocks), each scale a group of its own; and a start epoch (``start_epochs``: a backbone held frozen for
the first epochs gets lr 0 until then, and its warmup and cosine run from that epoch to the end).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

PARAM_ROLES = ("backbone", "fusion", "classifier")


@dataclass(frozen=True)
class GroupRecipe:
    """How one role is trained: ``lr`` (peak, before the schedule's factor), ``weight_decay``,
    ``warmup_epochs`` (linear warmup of this role's lr from near 0, then the shared cosine) and
    ``start_epochs`` (the role's lr is 0 before this epoch; its warmup and cosine start there)."""

    lr: float
    weight_decay: float
    warmup_epochs: float = 0.0
    start_epochs: float = 0.0


def head_parameter_roles(head: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """``[("fusion", ...), ("classifier", ...)]``: the parameters of the head's ``classifier_modules()``
    are ``classifier``, the rest ``fusion`` (a head without that method is all ``classifier``)."""
    modules = head.classifier_modules() if hasattr(head, "classifier_modules") else [head]
    classifier = list(dict.fromkeys(p for m in modules for p in m.parameters()))
    chosen = {id(p) for p in classifier}
    fusion = [p for p in head.parameters() if id(p) not in chosen]
    return [("fusion", fusion), ("classifier", classifier)]


def param_groups(
    parameters_by_role: Iterable[tuple[str, Iterable[nn.Parameter]]],
    recipes: Mapping[str, GroupRecipe],
    lr_scales: Mapping[int, float] | None = None,
) -> list[dict]:
    """Optimiser parameter groups: per role (and lr scale), one group with weight decay (``ndim >= 2``) and one without.

    Args:
        parameters_by_role: ``(role, parameters)`` pairs; a role may come several times (e.g. two backbones).
        recipes: the :class:`GroupRecipe` of every role named.
        lr_scales: ``{id(parameter): scale}``: such a parameter's group has ``lr = recipe.lr * scale`` (e.g.
            :func:`layer_lr_scales`); parameters not in it have scale 1.

    Returns:
        groups with ``params``, ``lr``, ``weight_decay``, ``role``, ``lr_scale``, ``warmup_epochs`` and
        ``start_epochs`` (read by :func:`group_lr_factors`); frozen parameters are left out, a parameter given
        twice is refused.
    """
    lr_scales = lr_scales or {}
    params: dict[tuple[str, bool, float], list[nn.Parameter]] = {}
    seen: dict[int, str] = {}
    for role, parameters in parameters_by_role:
        if role not in recipes:
            raise ValueError(f"no recipe for parameter role {role!r}; known: {sorted(recipes)}")
        for p in parameters:
            if not p.requires_grad:
                continue
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in role {seen[id(p)]!r} and again in {role!r}")
            seen[id(p)] = role
            params.setdefault((role, p.ndim >= 2, float(lr_scales.get(id(p), 1.0))), []).append(p)
    groups = []
    for (role, decay, scale), members in params.items():
        recipe = recipes[role]
        groups.append(
            {"params": members, "lr": recipe.lr * scale, "weight_decay": recipe.weight_decay if decay else 0.0, "role": role,
             "lr_scale": scale, "warmup_epochs": recipe.warmup_epochs, "start_epochs": recipe.start_epochs}
        )
    return groups


def layer_lr_scales(model: nn.Module, layer_decay: float) -> dict[int, float]:
    """``{id(parameter): layer_decay ** (depth - layer)}`` over a timm model's layers (layer-wise lr decay).

    The layers are timm's: :func:`timm.optim.param_groups_layer_decay` numbers them by the model's
    ``group_matcher`` (EfficientNet: the stem 0, each block, then ``conv_head``/``bn2``; Swin and ViT: the
    patch embedding, each block, the final norm) and gives the last layer scale 1 and the stem
    ``layer_decay ** depth``. timm puts the scale in a group's ``lr_scale``, which neither torch's optimisers
    nor this project's schedule read, so :func:`param_groups` multiplies it into the role's lr.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"{type(model).__name__} has no group_matcher: timm cannot number its layers for layer_decay")
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=layer_decay)
    return {id(p): float(g["lr_scale"]) for g in groups for p in g["params"]}


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


def delayed(factor, start: int):
    """``factor`` started at step (or epoch) ``start``: 0 before it, ``factor(s - start)`` from it."""
    if start <= 0:
        return factor
    return lambda s: 0.0 if s < start else factor(s - start)


def cosine_schedule(
    interval: str, total_steps: int, max_epochs: int, warmup_epochs: float, min_lr_ratio: float = 0.0, start_epochs: float = 0.0
) -> tuple:
    """``(factor, interval)`` for a ``LambdaLR`` stepped by Lightning every ``interval``.

    ``epoch``: the paper's "使用函数cos(x)调整每轮的学习率" ("the lr of each epoch is set by cos(x)"): the
    lr is constant within an epoch and follows the cosine over ``max_epochs``; warmup is rounded to
    whole epochs. ``step``: the cosine (and warmup) advance every optimiser step. With ``start_epochs``
    the factor is 0 before that epoch and the warmup and cosine run from it to the end of training.
    """
    if interval not in SCHEDULER_INTERVALS:
        raise ValueError(f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {interval!r}")
    max_epochs = max(int(max_epochs or 1), 1)
    if not 0 <= start_epochs < max_epochs:
        raise ValueError(f"a role that starts at epoch {start_epochs} never trains in {max_epochs} epochs")
    if interval == "epoch":
        start = round(start_epochs)
        return delayed(warmup_cosine(max_epochs - start, round(warmup_epochs), min_lr_ratio), start), "epoch"
    steps_per_epoch = total_steps / max_epochs
    start = round(start_epochs * steps_per_epoch)
    return delayed(warmup_cosine(total_steps - start, round(warmup_epochs * steps_per_epoch), min_lr_ratio), start), "step"


def group_lr_factors(groups: list[dict], interval: str, total_steps: int, max_epochs: int, min_lr_ratio: float = 0.0) -> tuple[list, str]:
    """One :func:`cosine_schedule` factor per parameter group (its own ``warmup_epochs`` and ``start_epochs``), for a
    ``LambdaLR`` over all groups: ``(factors, interval)``."""
    factors = [
        cosine_schedule(interval, total_steps, max_epochs, g.get("warmup_epochs", 0.0), min_lr_ratio, g.get("start_epochs", 0.0))[0]
        for g in groups
    ]
    return factors, interval
