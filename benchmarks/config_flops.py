"""FLOPs of a config's whole evaluation forward, and the input side at which a single-stage config costs the same.

The model is built from the config through the project's CLI (the same path as ``python -m mgff.fit``), in eval
mode, and one image of the config's sizes goes through ``forward_outputs``: for a two-stage model that is stage 1,
the localisation (the ``features`` box read from stage 1's maps, or a ViT cropper), the crop cut from the source
view (``data.source_size``) and stage 2; FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
multiplies and convolutions; element-wise ops are not counted, as in every FLOP table of the field).

``--match CONFIG`` then measures ``CONFIG`` (a single-stage config) at input sides ``--sides`` (multiples of 32,
with the resize keeping the config's resize/crop ratio) and prints the side whose FLOPs come closest to the first
config's: the side ``experiments/lite0/single_equal_flops.yaml`` is written with.

    python benchmarks/config_flops.py experiments/lite0/full.yaml --match experiments/lite0/single.yaml
    python benchmarks/config_flops.py experiments/lite0/two_stage.yaml experiments/lite0/single.yaml
    python benchmarks/config_flops.py experiments/lite0/full.yaml -- --data.init_args.root /data/CUB_200_2011
    python benchmarks/config_flops.py experiments/lite0/full.yaml experiments/lite0/full.yaml+experiments/ablation/no_gcn.yaml

A config ``a.yaml+b.yaml`` stacks configs as ``mgff.sweep`` does (``--config a.yaml --config b.yaml``). Arguments
after ``--`` are CLI overrides given to every config.

The initial pretrained weights are not read (they do not change FLOPs); the data root must exist (the number of
classes comes from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import count_flops  # noqa: E402
from mgff.cli import MGFFCLI  # noqa: E402
from mgff.models.pretrained import skip_pretrained_weights  # noqa: E402
from mgff.sweep import STACK, parse_config_spec  # noqa: E402


def build(config: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """``(model, datamodule)`` of ``config`` (``a.yaml+b.yaml`` stacks) plus CLI ``overrides``, as ``mgff.fit``
    builds them (no weights read)."""
    stacked = [a for part in parse_config_spec(str(config)) for a in ("--config", str(part))]
    args = [*stacked, "--trainer.logger", "false", *overrides]
    with skip_pretrained_weights():
        cli = MGFFCLI(run=False, args=args)
    return cli.model, cli.datamodule


def forward_flops(model: Any, datamodule: Any) -> int:
    """FLOPs of the model's evaluation forward on one image of the datamodule's sizes (and its source view)."""
    crop = datamodule.crop_size
    images = torch.zeros(1, 3, crop, crop)
    batch: dict[str, Any] = {"image": images}
    if datamodule.source_size is not None:
        batch["source"] = torch.zeros(1, 3, datamodule.source_size, datamodule.source_size, dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        flops, _ = count_flops(lambda: model.forward_outputs(images, batch))
    return flops


def config_flops(config: str | Path, overrides: Sequence[str] = ()) -> int:
    return forward_flops(*build(config, overrides))


def side_overrides(side: int, resize_ratio: float) -> list[str]:
    """CLI overrides that set a single-stage config's input side (and its resize at the same ratio)."""
    return ["--model.init_args.img_size", str(side), "--data.init_args.crop_size", str(side),
            "--data.init_args.resize_size", str(int(round(side * resize_ratio)))]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help=f"configs to measure (the first is the one --match compares with); 'a.yaml{STACK}b.yaml' stacks configs")
    parser.add_argument("--match", help="a single-stage config: find the input side whose FLOPs equal the first config's")
    parser.add_argument("--sides", default="224,256,288,320,352,384,416,448", help="sides tried by --match (comma separated)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for config in args.configs:
        results[config] = config_flops(config, overrides)
        print(f"{config}: {results[config] / 1e9:.3f} GFLOPs per image (evaluation forward)")
    if args.match:
        target = results[args.configs[0]]
        _, dm = build(args.match, overrides)
        ratio = dm.resize_size / dm.crop_size
        sides = {}
        for side in (int(s) for s in args.sides.split(",")):
            sides[side] = config_flops(args.match, [*overrides, *side_overrides(side, ratio)])
            print(f"{args.match} at {side} px: {sides[side] / 1e9:.3f} GFLOPs ({sides[side] / target:.2f}x {args.configs[0]})")
        best = min(sides, key=lambda s: abs(sides[s] - target))
        print(f"closest side: {best} px, {sides[best] / 1e9:.3f} GFLOPs against {target / 1e9:.3f} ({sides[best] / target:.2f}x)")
        results["match"] = {"side": best, "flops": sides[best], "target": target, "sides": sides}
    return results


if __name__ == "__main__":
    main()
