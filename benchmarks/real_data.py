"""The real photos and weights a real-photo benchmark reads: the defaults, defined once, and the options that
point any benchmark at anyone's photos and weights.

By default: ``../shared/realdata/CUB_200_2011_first25`` (real CUB photos of classes 1-25 in the official layout)
and ``../shared/weights/efficientnet_lite0_imagenet.safetensors`` (ImageNet EfficientNet-Lite0 under timm's
names, expecting inputs at mean = std = 0.5). Every real-photo benchmark takes

    --root DIR       any folder in the CUB_200_2011 layout, with any subset of the class ids (they become labels
                     0..C-1 in id order, see data_modules/cub.py)
    --weights FILE   EfficientNet-Lite0 weights under timm's names (.safetensors or .pth)
    --mean M M M / --std S S S   the input normalisation those weights expect

(:meth:`RealData.cli_options` gives the same as overrides of a config: ``--data.init_args.root`` ...), and keeps one
resized image cache per source root (``runs/cache/<folder name>-<hash of its absolute path>``), so
runs on two roots never share or refuse each other's cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
DEFAULT_ROOT = SHARED / "realdata" / "CUB_200_2011_first25"
DEFAULT_WEIGHTS = SHARED / "weights" / "efficientnet_lite0_imagenet.safetensors"
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)  # the shared weights' TF-Lite convention (../shared/weights/README.md)
DEFAULT_CACHE = REPO_ROOT / "runs" / "cache"


@dataclass(frozen=True)
class RealData:
    """Where the photos and the weights are, and the normalisation the weights expect."""

    root: Path = DEFAULT_ROOT
    weights: Path = DEFAULT_WEIGHTS
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD

    def check(self, weights: bool = True) -> "RealData":
        """Exit with a message naming what is missing (a benchmark cannot run without it)."""
        missing = [f"--root {self.root} (a CUB_200_2011-layout folder: images.txt, classes.txt, ... images/)"] if not (self.root / "images.txt").is_file() else []
        if weights and not self.weights.is_file():
            missing.append(f"--weights {self.weights} (EfficientNet-Lite0 weights under timm's names)")
        if missing:
            raise SystemExit("missing: " + "; ".join(missing) + f". The defaults are the shared real photos and weights under {SHARED}")
        return self

    def cache_dir(self, base: Path = DEFAULT_CACHE) -> Path:
        """The resized image cache of this root: ``base/<folder name>-<10 hex digits of its absolute path>``."""
        resolved = str(Path(self.root).resolve())
        return Path(base) / f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"

    def datamodule(self, cache: Path | None = DEFAULT_CACHE, **kwargs: Any):
        """A :class:`~data_modules.CUB200DataModule` on ``root`` normalised with ``mean``/``std``; images read through
        this root's resized cache under ``cache`` (``None``: the originals)."""
        from data_modules import CUB200DataModule

        kwargs.setdefault("cache_dir", str(self.cache_dir(cache)) if cache is not None else None)
        return CUB200DataModule(root=str(self.root), mean=self.mean, std=self.std, **kwargs)

    def model_kwargs(self) -> dict[str, Any]:
        """What a model built on these weights needs: the weights file and both normalisations (the data's and the
        backbone's are the same, so the model's conversion is the identity)."""
        return dict(pretrained=str(self.weights), data_mean=list(self.mean), data_std=list(self.std),
                    backbone_mean=list(self.mean), backbone_std=list(self.std))

    def cli_options(self) -> list[str]:
        """The same as command-line overrides of a config (``python -m mgff.fit --config ... <these>``): the root,
        the weights file, and the normalisation on the data (the model's ``data_mean``/``data_std`` follow it by
        the CLI's links) and on the backbone."""
        mean, std = json.dumps([float(m) for m in self.mean]), json.dumps([float(s) for s in self.std])
        return [f"--data.init_args.root={self.root}", f"--data.init_args.mean={mean}", f"--data.init_args.std={std}",
                f"--model.init_args.pretrained={self.weights}", f"--model.init_args.backbone_mean={mean}", f"--model.init_args.backbone_std={std}"]


def add_arguments(parser: argparse.ArgumentParser, weights: bool = True) -> argparse.ArgumentParser:
    """Add ``--root`` (and ``--weights``, ``--mean``, ``--std`` when the benchmark builds a pretrained model)."""
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"a CUB_200_2011-layout folder, any subset of classes (default {DEFAULT_ROOT})")
    if weights:
        parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help=f"EfficientNet-Lite0 weights under timm's names (default {DEFAULT_WEIGHTS})")
        parser.add_argument("--mean", type=float, nargs=3, default=DEFAULT_MEAN, metavar="M", help="input mean the weights expect (default 0.5 0.5 0.5)")
        parser.add_argument("--std", type=float, nargs=3, default=DEFAULT_STD, metavar="S", help="input std the weights expect (default 0.5 0.5 0.5)")
    return parser


def from_args(args: argparse.Namespace) -> RealData:
    """The :class:`RealData` that :func:`add_arguments`' options name."""
    return RealData(
        root=args.root,
        weights=getattr(args, "weights", DEFAULT_WEIGHTS),
        mean=tuple(getattr(args, "mean", DEFAULT_MEAN)),
        std=tuple(getattr(args, "std", DEFAULT_STD)),
    )


def read_checkpoint(path: Path | str, option: str = "--checkpoint") -> dict[str, Any]:
    """A fine-tuned checkpoint a benchmark reads, as untrusted input: ``torch.load(weights_only=True)`` (tensors and
    plain containers, no pickled code), a dict with a ``state_dict`` of tensors and plain ``hyper_parameters``
    (:func:`mgff.lit.checkpoint.plain_hyperparameters`, ``{}`` when absent). Exits naming ``option``, the file and
    what was expected when it is not such a file."""
    import pickle

    import torch

    from mgff.lit.checkpoint import plain_hyperparameters

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{option} {path}: no such file (expected a Lightning checkpoint of an mgff classifier)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise SystemExit(f"{option} {path}: not a checkpoint torch.load(weights_only=True) can read ({type(err).__name__}: {err})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"{option} {path}: expected a Lightning checkpoint (a dict whose 'state_dict' maps names to tensors)")
    try:
        checkpoint["hyper_parameters"] = plain_hyperparameters(checkpoint.get("hyper_parameters", {}), str(path))
    except ValueError as err:  # UntrustedCheckpointError: it names the file and the key
        raise SystemExit(f"{option}: {err}") from None
    return checkpoint
