"""What the source view costs (issue 13 §3): data loading, bytes to the device, and the crop itself.

Stage 2 can cut its crop from ``batch["source"]``, the same view as stage 1's at ``source_size``
(uint8, :class:`data_modules.transforms.ViewWithSource`), instead of from the ``crop_size`` network
input. On the real photos of ``--root`` (default ``../shared/realdata/CUB_200_2011_first25``,
:mod:`benchmarks.real_data`; originals, no resized cache) this measures, per image:

- loading: decode + training transform in one process, one thread (a loader worker's work), without
  and with the source view: the median over ``--repeats`` passes of the CPU time per image;
- host -> device: the bytes of the batch's image tensors (float32 view, uint8 source), and, where a
  GPU is present, the time to copy a pinned batch of ``--batch`` images (CUDA events);
- the crop: ``TwoStageClassifier.cut_crops`` for a batch (one ``roi_align``) from the view and from the
  source, CPU time per image.

No weights are read (the crop's cost does not depend on them), so it takes ``--root`` alone.

    python benchmarks/source_view_cost.py --images 128 --source-size 448
    python benchmarks/source_view_cost.py --root /data/CUB_200_2011
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import real_data  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402
from data_modules.dataset import FineGrainedDataset  # noqa: E402
from data_modules.resumable import SeededTransform  # noqa: E402
from data_modules.transforms import build_train_transform  # noqa: E402


def samples(source: RealData, count: int):
    """The first ``count`` training samples of ``source`` (all of its training photos, no validation split)."""
    return source.datamodule(cache=None, val_fraction=0.0).splits.train[:count]


def loading_ms(root: Path, items, resize: int, crop: int, source_size: int | None, repeats: int) -> float:
    """Median CPU ms per image of decode + training transform (one thread) of ``items`` under ``root``."""
    dataset = FineGrainedDataset(root, items, SeededTransform(build_train_transform(resize, crop, 0.5, source_size=source_size)))
    times = []
    for r in range(repeats + 1):  # the first pass warms the page cache
        start = time.process_time()
        for i in range(len(dataset)):
            dataset.transform.reseed(i)
            dataset[i]
        if r:
            times.append((time.process_time() - start) / len(dataset) * 1000)
    return statistics.median(times)


def copy_ms(tensor: torch.Tensor, repeats: int) -> float | None:
    """Median ms of a pinned host -> device copy of ``tensor``, or ``None`` without a GPU."""
    if not torch.cuda.is_available():
        return None
    pinned = tensor.pin_memory()
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pinned.to("cuda", non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def crop_ms(batch: int, crop: int, source_size: int, repeats: int) -> tuple[float, float]:
    """CPU ms per image of stage 2's crop (one roi_align on the batch) from the view and from the source."""
    from mgff.lit import TwoStageClassifier

    tiny = dict(backbone="resnet10t", img_size=crop, stages=[2, 3, 4], head="linear", crop_size=crop)  # features: no ViT
    view = torch.randn(batch, 3, crop, crop)
    source = torch.randint(0, 256, (batch, 3, source_size, source_size), dtype=torch.uint8)
    boxes = torch.tensor([[crop * 0.2, crop * 0.25, crop * 0.7, crop * 0.75]]).repeat(batch, 1)
    result = []
    for crop_from in ("view", "source"):
        model = TwoStageClassifier(num_classes=2, crop_from=crop_from, **tiny)
        args = (view, boxes) if crop_from == "view" else (view, boxes, source)
        times = []
        for _ in range(repeats + 1):
            start = time.process_time()
            model.cut_crops(*args)
            times.append((time.process_time() - start) / batch * 1000)
        result.append(statistics.median(times[1:]))
    return result[0], result[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    real_data.add_arguments(parser, weights=False)
    args = parser.parse_args(argv)
    source = real_data.from_args(args).check(weights=False)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    items = samples(source, args.images)
    plain = loading_ms(source.root, items, args.resize, args.crop, None, args.repeats)
    with_source = loading_ms(source.root, items, args.resize, args.crop, args.source_size, args.repeats)
    view_bytes = 3 * args.crop * args.crop * 4
    source_bytes = 3 * args.source_size * args.source_size
    h2d_view = copy_ms(torch.zeros(args.batch, 3, args.crop, args.crop), args.repeats)
    h2d_source = copy_ms(torch.zeros(args.batch, 3, args.source_size, args.source_size, dtype=torch.uint8), args.repeats)
    from_view, from_source = crop_ms(args.batch, args.crop, args.source_size, args.repeats)
    fmt = lambda v: "n/a (no GPU)" if v is None else f"{v / args.batch * 1000:.1f} us"  # noqa: E731
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}; torch {torch.__version__}")
    print(f"Command: python benchmarks/source_view_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip())
    print(f"{len(items)} CUB photos of {source.root} (originals), train transform resize {args.resize} -> crop {args.crop}, source {args.source_size}\n")
    print("| per image | view only | view + source | extra |")
    print("|---|---|---|---|")
    print(f"| decode + transform, CPU ms (1 thread) | {plain:.2f} | {with_source:.2f} | {with_source - plain:+.2f} ({with_source / plain - 1:+.0%}) |")
    print(f"| bytes to the device | {view_bytes:,} | {view_bytes + source_bytes:,} | {source_bytes:,} ({source_bytes / view_bytes:+.0%}) |")
    print(f"| pinned host -> device copy (batch {args.batch}) | {fmt(h2d_view)} | {fmt(None if h2d_view is None else h2d_view + h2d_source)} | {fmt(h2d_source)} |")
    print(f"| stage-2 crop (one roi_align), CPU ms | {from_view:.3f} (from view) | {from_source:.3f} (from source) | {from_source - from_view:+.3f} |")


if __name__ == "__main__":
    main()
