"""Pretrained weights for timm models: from the hub or from a local file.

Weights cannot always be downloaded (clusters without network, this workplace), so every model the
project builds can take its weights from a file on disk instead. The file is loaded the way timm
loads hub weights: the architecture's own ``checkpoint_filter_fn`` adapts it (official key names,
resized position embeddings and relative position tables for another input or window size), a
classifier of another size is dropped, and everything that does not load is logged by name.

A model rebuilt to receive a checkpoint's weights needs no initial weights: inside
:func:`skip_pretrained_weights` every ``pretrained`` argument is ignored, so loading, resuming, testing
and predicting from a checkpoint neither read a local weights file (it may be gone) nor contact the
hub (compute nodes are often offline).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import timm
import torch
from torch import nn

__all__ = ["create_timm_model", "load_pretrained_file", "pretrained_weights_skipped", "skip_pretrained_weights"]

logger = logging.getLogger(__name__)

_SKIP_PRETRAINED: ContextVar[bool] = ContextVar("mgff_skip_pretrained", default=False)


@contextmanager
def skip_pretrained_weights() -> Iterator[None]:
    """Build models without their initial weights (a checkpoint's weights will replace them)."""
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


def pretrained_weights_skipped() -> bool:
    """Whether models are being built inside :func:`skip_pretrained_weights`."""
    return _SKIP_PRETRAINED.get()

# Keys that wrap the tensors in common checkpoint formats (Lightning, DeiT/Swin releases, DDP saves).
_CONTAINER_KEYS = ("state_dict", "model", "module")
# Prefixes added by wrappers around the model: DDP / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SUFFIXES_SAFETENSORS = (".safetensors",)
_SUFFIXES_PICKLE = (".pth", ".pt", ".bin", ".ckpt")
# Below this fraction of the model's tensors found in the file (same name and shape), the file is
# taken for a checkpoint of another architecture and refused instead of loading a few stray tensors.
_MIN_MATCHED_FRACTION = 0.5


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    return f"{arch} ({type(model).__name__})" if arch else type(model).__name__


def _read_file(path: Path) -> object:
    if path.name.endswith(_SUFFIXES_SAFETENSORS):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.name.endswith(_SUFFIXES_PICKLE):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types; name the file in one message
            raise ValueError(
                f"cannot read {path} as a state dict with torch.load(weights_only=True): {err}"
            ) from err
    raise ValueError(
        f"unknown weights file type {path.suffix!r} for {path}; "
        f"expected one of {_SUFFIXES_SAFETENSORS + _SUFFIXES_PICKLE}"
    )


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensors inside a checkpoint container and strip wrapper prefixes."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path} does not hold a state dict: entries {not_tensors[:5]} are not tensors"
        )
    state_dict = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    return tuple(f"{name}." for name in classifier)


def load_pretrained_file(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into a timm model, the way timm loads hub weights.

    Args:
        model: a timm model (built with ``pretrained=False``).
        path: ``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` read with
            ``torch.load(weights_only=True)``; the tensors may sit under ``state_dict`` / ``model`` /
            ``module`` and carry a ``module.`` or ``_orig_mod.`` prefix.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a state dict, or fewer than half of the model's tensors are in it
            with the same name and shape (a checkpoint of another architecture).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state_dict = _unwrap_state_dict(_read_file(path), path)
    model_state = model.state_dict()

    def refuse(matched: int) -> ValueError:
        return ValueError(
            f"{path} does not fit model {_model_name(model)}: only {matched} of {len(model_state)} "
            "model tensors are in the file with the same name and shape; "
            "is it a checkpoint of another architecture?"
        )

    # The architecture's filter maps official key names to timm's and resizes position tables; it is
    # written for checkpoints of its own architecture and may fail on anything else.
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as err:
            raw_matched = sum(k in model_state for k in state_dict)
            if raw_matched < _MIN_MATCHED_FRACTION * len(model_state):
                raise refuse(raw_matched) from err
            raise

    classifier = _classifier_prefixes(model)
    head_resized, shape_mismatch, head_unused = [], [], []
    for key in list(state_dict):
        is_head = key.startswith(classifier) if classifier else False
        if key not in model_state:
            if is_head:  # e.g. a backbone built with num_classes=0
                head_unused.append(key)
                del state_dict[key]
        elif state_dict[key].shape != model_state[key].shape:
            (head_resized if is_head else shape_mismatch).append(key)
            del state_dict[key]

    matched = sum(k in model_state for k in state_dict)
    if matched < _MIN_MATCHED_FRACTION * len(model_state):
        raise refuse(matched)

    if head_resized:
        logger.info("%s: head of another size dropped: %s", path.name, head_resized)
    if head_unused:
        logger.info("%s: classifier not used by the model (no head): %s", path.name, head_unused)
    if shape_mismatch:
        logger.warning("%s: tensors of another shape dropped: %s", path.name, shape_mismatch)

    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys:
        logger.warning("%s: missing keys (left at init): %s", path.name, result.missing_keys)
    if result.unexpected_keys:
        logger.warning("%s: unexpected keys (ignored): %s", path.name, result.unexpected_keys)
    logger.info("loaded %d tensors from %s into %s", matched, path, _model_name(model))


def create_timm_model(name: str, pretrained: bool | str | Path | None = False, **kwargs) -> nn.Module:
    """Build a timm model with weights from the hub (``pretrained=True``) or a local file (a path).

    Extra keyword arguments go to ``timm.create_model`` (``num_classes``, ``img_size``, ...). Inside
    :func:`skip_pretrained_weights` the model is built without weights, whatever ``pretrained`` says.
    """
    if pretrained_weights_skipped():
        kwargs.pop("pretrained_cfg_overlay", None)  # may name a weights file that is gone
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is None or isinstance(pretrained, bool):
        return timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_pretrained_file(model, pretrained)
    return model
