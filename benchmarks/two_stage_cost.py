"""Inference cost of the real-photo runs of ``benchmarks/real_photos.py`` against single-stage (issue 13 §4).

Builds each named run's model and data exactly as the runner does, from the run's config by the project's CLI
(:func:`benchmarks.real_photos.build`: EfficientNet-Lite0 at 224 with ``--weights`` and ``--mean``/``--std``, its
settings and data on ``--root``, :mod:`benchmarks.real_data`), feeds it one real batch of
``--batch-size`` test photos (the view and, where the data yields it, the 448 px source view), and reports, per
image, in eval mode under ``torch.inference_mode``:

- FLOPs of ``forward_outputs`` (``FlopCounterMode``: convs and matmuls; roi_align, interpolation and
  element-wise ops are not counted) and their ratio to the single-stage run's;
- the measured forward time, timed in turns with the single-stage model
  (:func:`benchmarks.measure.time_interleaved`, process CPU time, one thread): the median per-round ratio
  with its range.

    python benchmarks/two_stage_cost.py --runs ts_single,ts_features_view,ts_features_source,ts_oracle_source
    python benchmarks/two_stage_cost.py --root /data/CUB_200_2011 --weights my_lite0.safetensors --runs ts_single,ts_features_source
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import real_data, real_photos  # noqa: E402
from benchmarks.measure import count_flops, describe_machine, machine_info, paired_ratio, time_interleaved, warm_up  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402


def build(name: str, source: RealData, batch_size: int = 8, cache: Path = real_data.DEFAULT_CACHE):
    """Run ``name``'s model (eval mode) and one batch of ``batch_size`` test photos of ``source`` as the runner's data
    yields them (through ``source``'s resized cache under ``cache`` unless the run reads the originals)."""
    options = real_photos.data_options(batch_size=batch_size, num_workers=0)
    model, data = real_photos.build(real_photos.RUNS[name], source, cache, extra=options)
    data.prepare_data()  # writes the resized cache of a run that reads one, when it is not there yet
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    return model.eval(), batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="ts_single,ts_features_view,ts_features_source,ts_oracle_source")
    parser.add_argument("--baseline", default="ts_single")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="test photos per timed forward")
    parser.add_argument("--cache", type=Path, default=real_data.DEFAULT_CACHE, help="where the per-root resized caches live (runs that read them)")
    real_data.add_arguments(parser)
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    if args.baseline not in names:
        names.insert(0, args.baseline)
    real_photos.parse_names(",".join(names), ())  # exits naming an unknown run
    source = real_data.from_args(args).check()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    steps, flops, batch_size = {}, {}, None
    for name in names:
        model, batch = build(name, source, args.batch_size, args.cache)
        batch_size = batch["image"].shape[0]
        step = (lambda m, b: lambda: m.forward_outputs(b["image"], b))(model, batch)
        with torch.inference_mode():
            flops[name] = count_flops(step)[0] / batch_size
            warm_up(step, device)
        steps[name] = step
    with torch.inference_mode():
        timings = time_interleaved(steps, device, iters=1, repeats=args.repeats, clock="cpu")
    print(describe_machine(machine_info(device)))
    print(f"Command: python benchmarks/two_stage_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip())
    print(f"batch {batch_size} test photos of {source.root}, per image, eval mode, 1 thread, CPU time\n")
    print("| run | GFLOPs | FLOPs ratio | forward ms | time ratio (range) |")
    print("|---|---|---|---|---|")
    for name in names:
        t = timings[name]
        ratio, low, high = paired_ratio(t, timings[args.baseline])
        print(f"| {name} | {flops[name] / 1e9:.3f} | {flops[name] / flops[args.baseline]:.2f}x | {t.per_call_s / batch_size * 1000:.1f} | {ratio:.2f}x ({low:.2f}-{high:.2f}) |")


if __name__ == "__main__":
    main()
