"""What a checkpoint may bring in: plain hyperparameters (never code) and its class names.

Checkpoints travel between labs, so a checkpoint is untrusted input. ``torch.load(weights_only=True)``
keeps pickled code out of the tensors, but the hyperparameters are a second way in: Lightning hands
them to jsonargparse (``load_from_checkpoint`` through the ``_instantiator`` the CLI stores, and
``LightningCLI`` when it re-parses a ``--ckpt_path``'s hyperparameters into the config), and
jsonargparse builds any ``{"class_path": ..., "init_args": ...}`` it finds in a field typed ``Any``
or ``dict`` -- ``subprocess.Popen`` included. So every load path of mgff first passes the
hyperparameters through :func:`plain_hyperparameters`: plain data only, no class to build anywhere
except the checkpoint's own model class, and that one only when it is already imported.

The class names of a checkpoint are compared with the data's by :func:`class_order_map`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["UntrustedCheckpointError", "class_order_map", "plain_hyperparameters", "resolve_model_class"]

# keys that make jsonargparse import and build a class, or load a file, wherever they appear
CONFIG_MARKERS = ("class_path", "init_args", "dict_kwargs", "__path__", "_instantiator", "_class_path")
_PLAIN = (str, int, float, bool, type(None))


class UntrustedCheckpointError(ValueError):
    """A checkpoint's hyperparameters ask for something other than plain values."""


def plain_hyperparameters(hparams: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The hyperparameters of a checkpoint as plain data, or :class:`UntrustedCheckpointError`.

    Allowed: ``None``, ``bool``, ``int``, ``float``, ``str`` and lists, tuples and string-keyed dicts of
    them. Refused, naming the key: any value of another type, and a ``class_path``/``init_args``/
    ``dict_kwargs``/``__path__`` key at any depth (an object jsonargparse would build). At the top
    level, Lightning's ``_instantiator`` is dropped (mgff never lets a checkpoint choose how it is
    built) and ``_class_path`` is kept for :func:`resolve_model_class`.

    Args:
        hparams: ``checkpoint["hyper_parameters"]``.
        source: the checkpoint's name for messages (its path).
    """
    if not isinstance(hparams, Mapping):
        raise UntrustedCheckpointError(f"{source}: hyper_parameters is a {type(hparams).__name__}, expected a dict")
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if key == "_instantiator":
            continue
        if key == "_class_path":
            if not isinstance(value, str):
                raise UntrustedCheckpointError(f"{source}: hyper_parameters._class_path is a {type(value).__name__}, expected a str")
            out[key] = value
            continue
        out[key] = _plain(value, f"hyper_parameters.{key}", source)
    return out


def _plain(value: Any, where: str, source: str) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]", source) for i, v in enumerate(value))
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UntrustedCheckpointError(f"{source}: {where} has a key of type {type(k).__name__}, expected str")
            if k in CONFIG_MARKERS:
                raise UntrustedCheckpointError(
                    f"{source}: {where}.{k} = {v!r} asks to build an object; a checkpoint may only hold plain values "
                    "(numbers, strings, lists, dicts), so it was refused before anything was built"
                )
            out[k] = _plain(v, f"{where}.{k}", source)
        return out
    raise UntrustedCheckpointError(f"{source}: {where} is a {type(value).__module__}.{type(value).__qualname__}; only plain values are allowed")


def resolve_model_class(class_path: str, base: type, source: str) -> type:
    """The class a checkpoint's ``_class_path`` names, when it is an already imported subclass of ``base``.

    Only ``sys.modules`` is read: naming a class never imports a module (importing runs its code).
    """
    module, _, name = class_path.rpartition(".")
    target = getattr(sys.modules.get(module), name, None)
    if not (isinstance(target, type) and issubclass(target, base)):
        raise UntrustedCheckpointError(
            f"{source}: hyper_parameters._class_path {class_path!r} is not an imported subclass of {base.__qualname__}; "
            "refused (naming it must not import code)"
        )
    return target


def class_order_map(checkpoint_names: Sequence[str], data_names: Sequence[str], source: str = "checkpoint") -> list[int] | None:
    """How the data's labels map to the checkpoint's outputs.

    Returns:
        ``None`` when both list the same names in the same order; else ``m`` with
        ``m[data_label] = checkpoint_label`` (same names in another order).

    Raises:
        ValueError: the two name sets differ; the message lists the names only on each side.
    """
    checkpoint_names, data_names = list(checkpoint_names), list(data_names)
    if checkpoint_names == data_names:
        return None
    if len(set(checkpoint_names)) != len(checkpoint_names) or len(set(data_names)) != len(data_names):
        raise ValueError(f"{source}: class names must be unique to be matched (checkpoint or data repeats a name)")
    only_ckpt = [n for n in checkpoint_names if n not in set(data_names)]
    only_data = [n for n in data_names if n not in set(checkpoint_names)]
    if only_ckpt or only_data:
        raise ValueError(
            f"{source} was trained on other classes than the data has ({len(checkpoint_names)} vs {len(data_names)} classes): "
            f"only in the {source.removeprefix('the ')}: {_short(only_ckpt)}; only in the data: {_short(only_data)}"
        )
    position = {n: i for i, n in enumerate(checkpoint_names)}
    return [position[n] for n in data_names]


def _short(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"
