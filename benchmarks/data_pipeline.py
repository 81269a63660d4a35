"""Images per second of the training data pipeline in ONE worker process: full-size JPEGs vs the
resized cache (:mod:`data_modules.resized_cache`).

One loader worker does, per image: decode the JPEG (PIL) and run the training transform (resize to
``resize x resize``, random crop ``crop``, flip, normalise, to tensor; albumentations). The loader's
throughput is about this rate times ``data.num_workers`` while the CPU has a core per worker.

The images are generated scenes (:func:`data_modules.synthetic.render_scene`: gradient, noise,
clutter, one object) saved as JPEG at the sizes of the real datasets: 500x375 is typical of CUB and
Oxford-IIIT Pets, 1200x900 of NA-Birds and the larger Stanford Cars photos. Each size is measured
read from the full-size files and from a cache prepared at ``--cache-side`` px (images whose shorter
side is already at most that are copied as they are, so they gain nothing).

Timings: one pass to warm the page cache, then ``--repeats`` timed passes; the median is reported.
``torch`` and OpenCV are held to one thread, as in a loader worker.

    python benchmarks/data_pipeline.py --images 64 --sizes 500x375,1200x900
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.dataset import FineGrainedDataset, load_rgb  # noqa: E402
from data_modules.resized_cache import ResizedImageCache  # noqa: E402
from data_modules.samples import Sample  # noqa: E402
from data_modules.synthetic import SyntheticSpec, render_scene  # noqa: E402
from data_modules.transforms import apply_transform, build_train_transform  # noqa: E402

SOURCE_JPEG_QUALITY = 90


def write_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Sample]:
    """``count`` generated scenes as ``width x height`` JPEGs in ``folder``; their samples (box in pixels)."""
    spec = SyntheticSpec(num_classes=2, images_per_class=2, min_side=min(width, height), max_side=max(width, height), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        image, (x1, y1, x2, y2) = render_scene(np.random.default_rng([seed, width, height, i]), i % 2, spec)
        h, w = image.shape[:2]
        Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.jpg", quality=SOURCE_JPEG_QUALITY)
        sx, sy = width / w, height / h
        samples.append(Sample(path=f"{i:04d}.jpg", label=i % 2, box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy)))
    return samples


def median_seconds(run, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(root: Path, samples: list[Sample], resize: int, crop: int, repeats: int) -> dict[str, float]:
    """Per-image decode time and decode + train transform time (ms) reading ``samples`` under ``root``."""
    dataset = FineGrainedDataset(root, samples, partial(apply_transform, build_train_transform(resize, crop)))
    decode = median_seconds(lambda: [load_rgb(root / s.path) for s in samples], repeats)
    pipeline = median_seconds(lambda: [dataset[i] for i in range(len(dataset))], repeats)
    n = len(samples)
    return {
        "kib": sum((root / s.path).stat().st_size for s in samples) / n / 1024,
        "decode_ms": 1000 * decode / n,
        "pipeline_ms": 1000 * pipeline / n,
        "per_s": n / pipeline,
    }


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        w, _, h = item.strip().lower().partition("x")
        sizes.append((int(w), int(h)))
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per size")
    parser.add_argument("--sizes", default="500x375,1200x900", help="comma-separated WxH of the source JPEGs")
    parser.add_argument("--resize", type=int, default=512, help="square resize of the train transform (data.resize_size)")
    parser.add_argument("--crop", type=int, default=384, help="random crop of the train transform (data.crop_size)")
    parser.add_argument("--cache-side", type=int, default=512, help="shorter side of the cached images (data.cache_size)")
    parser.add_argument("--cache-workers", type=int, default=os.cpu_count() or 1, help="processes that prepare the cache")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument("--workdir", default=None, help="where to write the images (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mgff-data-bench-"))
    rows, preparation = [], []
    try:
        for width, height in parse_sizes(args.sizes):
            source = workdir / f"full-{width}x{height}"
            samples = write_images(source, args.images, width, height)
            cache = ResizedImageCache(workdir / f"cache-{width}x{height}-{args.cache_side}", args.cache_side)
            start = time.perf_counter()
            manifest = cache.prepare(source, [s.path for s in samples], workers=args.cache_workers, progress=False)
            preparation.append((width, height, args.images / (time.perf_counter() - start), manifest[samples[0].path][2:]))
            full = measure(source, samples, args.resize, args.crop, args.repeats)
            cached = measure(cache.cache_dir, cache.cached_samples(samples), args.resize, args.crop, args.repeats)
            cw, ch = manifest[samples[0].path][2:]
            for label, result in ((f"full-size {width}x{height}", full), (f"cache {cw}x{ch}", cached)):
                rows.append([
                    f"{width}x{height}", label, f"{result['kib']:.0f}", f"{result['decode_ms']:.1f}",
                    f"{result['pipeline_ms']:.1f}", f"{result['per_s']:.1f}", f"{result['per_s'] / full['per_s']:.2f}x",
                ])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"Data pipeline, one worker process: decode (PIL) + train transform (resize {args.resize}x{args.resize}, "
        f"random crop {args.crop}, flip, normalise; albumentations)"
    )
    print(
        f"{args.images} generated JPEGs per size (quality {SOURCE_JPEG_QUALITY}), median of {args.repeats} passes after one warm-up; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print_table(
        ["source", "read from", "KiB/img", "decode ms/img", "pipeline ms/img", "images/s/worker", "vs full-size"],
        rows,
    )
    print()
    for width, height, per_s, (cw, ch) in preparation:
        print(f"cache preparation {width}x{height} -> {cw}x{ch}: {per_s:.1f} images/s with {args.cache_workers} worker processes (one-off)")


if __name__ == "__main__":
    main()
