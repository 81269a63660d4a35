"""Parameters, FLOPs and forward time of the model's parts, against the cost targets of issues 3 and 4.

- **Issue 3**: the MGFF head's share of the backbone's parameters, FLOPs and forward time
  (target: the head adds at most 10 % to the backbone's forward time).
- **Issue 4**: the two-stage model against the single-stage one with the same classifier (backbone +
  MGFF head): FLOP ratio and measured inference-time ratio (target: at most 2.3x). Two-stage =
  cropper (ViT on the image resized to ``localize_size``, rollout, box, ``roi_align`` crop) + the
  classifier on the image + the same classifier on the crop, so ``ratio = 2 + cropper / classifier``
  (in FLOPs; time adds what FLOPs do not see).
- **MFU**: training FLOPs per image, as the usual estimate ``3 x forward`` and, with ``--train-flops``,
  as counted over a real forward + backward (the frozen cropper has no backward), and the training
  images/s a device must reach for a given MFU (``--peak-tflops``, ``--mfu-target``).
- ``--profile``: ``torch.profiler`` top ops of the head and of the two-stage forward: where the time goes.

All parts are timed in turns (:func:`benchmarks.measure.time_interleaved`) in eval mode under
``torch.inference_mode``; FLOPs are counted by ``FlopCounterMode`` on the same calls.

Examples::

    python benchmarks/flops.py --preset paper                    # CPU, batch 1, about 2 minutes
    python benchmarks/flops.py --preset paper --profile --train-flops
    python benchmarks/flops.py --preset paper --set localize_size=160   # what if the ViT saw 160 px
    python benchmarks/flops.py --preset paper --device cuda --precision bf16 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import (
    autocast, count_flops, count_params, default_peak_tflops, describe_machine, machine_info, num_threads,
    paired_ratio, print_table, resolve_clock, synchronize, time_interleaved, warm_up, write_json,
)
from benchmarks.model_throughput import make_train_step
from benchmarks.presets import ATTENTION_CHOICES, PRESETS, backbones, build_model, image_size, set_timm_attention
from mgff.models.heads import LinearHead

HEAD_TIME_TARGET = 0.10  # issue 3: the head adds at most 10 % to the backbone's time
TWO_STAGE_TARGET = 2.3  # issue 4: two-stage inference at most 2.3x the single-stage one
H100_BF16_TFLOPS = 989.0
SINGLE = "single-stage (backbone + mgff head)"
TWO = "two-stage (cropper + 2 x single-stage)"
CROPPER = "cropper (ViT + box + crop)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Params, FLOPs and forward time of backbone, heads, cropper, single- and two-stage model "
        "against the issue 3 (head <= 10%% of backbone time) and issue 4 (two-stage <= 2.3x) targets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=PRESETS, default="paper", help="model sizes (see benchmarks/presets.py)")
    parser.add_argument("--backbone", default=None, help="a backbone of the preset (default: its first)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--batch-size", type=int, default=1, help="images per timed call")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per part before timing")
    parser.add_argument("--iters", type=int, default=1, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timed blocks; the median is reported")
    parser.add_argument("--min-block-s", type=float, default=0.2, help="more calls per block for parts faster than this")
    parser.add_argument("--timm-attention", choices=ATTENTION_CHOICES, default="default",
                        help="default: timm's (Swin window attention unfused); fused: SDPA in Swin too (TIMM_FUSED_ATTN=2)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="auto: CUDA events on a GPU, process CPU time on the CPU (robust on a shared machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU is shared)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model argument for a what-if run, e.g. localize_size=160 (YAML value)")
    parser.add_argument("--train-flops", action="store_true",
                        help="also count the FLOPs of a training step (forward + backward) at batch 1")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device dense peak for the MFU section (default: from the GPU name; else H100 bf16 989)")
    parser.add_argument("--mfu-target", type=float, default=0.40, help="MFU the training throughput is asked for")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops of the head and two-stage forward")
    parser.add_argument("--profile-rows", type=int, default=12, help="ops per profile table")
    parser.add_argument("--profile-calls", type=int, default=3, help="profiled calls (the table gives per-call means)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["localize_size=160", "cropper=vit_small_patch16_224"]`` -> ``{"localize_size": 160, ...}``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def verdict(value: float, target: float, unit: str = "x") -> str:
    """``"meets (<= 2.3x)"`` or ``"misses by 12% (> 2.3x)"``: how far ``value`` is over ``target``, relatively."""
    if value <= target:
        return f"meets (<= {target:g}{unit})"
    return f"misses by {100 * (value / target - 1):.0f}% (> {target:g}{unit})"


def profile_top_ops(fn: Callable[[], Any], device: torch.device, calls: int = 2, rows: int = 12) -> list[dict[str, Any]]:
    """Top ops by self time over ``calls`` calls of ``fn``: name, calls, self ms per call, share of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        dict(op=e.key, calls=e.count // calls, self_ms=getattr(e, attr) / 1000 / calls, share_pct=100 * getattr(e, attr) / total)
        for e in events[:rows]
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print the tables, return (and optionally write) the results."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    set_timm_attention(args.timm_attention)
    backbone = args.backbone or backbones(args.preset)[0]
    overrides = parse_overrides(args.set)
    clock = resolve_clock(args.clock, device)
    command = "python benchmarks/flops.py " + " ".join(argv if argv is not None else sys.argv[1:])

    with num_threads(args.threads):
        info = machine_info(device)
        print(f"# {command}\n# {describe_machine(info)}", flush=True)
        size = image_size(args.preset, backbone)
        batch = args.batch_size
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        model = build_model(args.preset, backbone, "two_stage", overrides=overrides).to(device).eval()
        linear_head = LinearHead(model.backbone.feature_channels, model.backbone.feature_reductions, model.hparams.num_classes).to(device).eval()
        with torch.inference_mode(), autocast(device, args.precision):  # the heads get what they get in the model
            features = [f.clone() for f in model.backbone(images)]

        def run(fn):
            def call():
                with torch.inference_mode(), autocast(device, args.precision):
                    return fn()
            return call

        parts = {  # name: (forward call, the modules whose parameters it uses)
            "backbone": (lambda: model.backbone(images), model.backbone),
            "linear head": (lambda: linear_head(features), linear_head),
            "mgff head": (lambda: model.head(features), model.head),
            SINGLE: (lambda: model.classify(images), [model.backbone, model.head]),
            CROPPER: (lambda: model.localize(images), model.cropper),
            TWO: (lambda: model.forward_outputs(images), model),
        }
        calls = {name: run(fn) for name, (fn, _) in parts.items()}
        flops, first_s = {}, {}
        for name, call in calls.items():
            flops[name] = count_flops(call)[0] / batch  # the first call, also a warm-up
            first_s[name] = warm_up(call, device, args.warmup)
        timings = time_interleaved(
            calls, device, iters=args.iters, repeats=args.repeats, first_s=first_s, min_block_s=args.min_block_s,
            clock=clock,
        )
        load_after = list(os.getloadavg())

        rows = []
        for name, (_, modules) in parts.items():
            modules = modules if isinstance(modules, list) else [modules]
            t = timings[name]
            rows.append(dict(
                part=name,
                params_m=sum(count_params(m) for m in modules) / 1e6,
                trainable_m=sum(count_params(m, trainable_only=True) for m in modules) / 1e6,
                gflops=flops[name] / 1e9,
                ms=1000 * t.per_call_s,
                ms_per_image=1000 * t.per_call_s / batch,
                spread_pct=100 * t.spread,
            ))
        by = {r["part"]: r for r in rows}

        # ----- issue 3 and issue 4 ratios
        bb, head, lin = by["backbone"], by["mgff head"], by["linear head"]
        single, two, crop = by[SINGLE], by[TWO], by[CROPPER]
        head_time = paired_ratio(timings["mgff head"], timings["backbone"])
        lin_time = paired_ratio(timings["linear head"], timings["backbone"])
        two_time = paired_ratio(timings[TWO], timings[SINGLE])
        crop_time = paired_ratio(timings[CROPPER], timings[SINGLE])
        head_share = dict(
            params_pct=100 * head["params_m"] / bb["params_m"],
            flops_pct=100 * head["gflops"] / bb["gflops"],
            time_pct=100 * head_time[0],
            time_pct_range=f"{100 * head_time[1]:.1f}-{100 * head_time[2]:.1f}",
            linear_time_pct=100 * lin_time[0],
        )
        head_share["verdict"] = verdict(head_share["time_pct"], 100 * HEAD_TIME_TARGET, unit="%")
        two_stage = dict(
            flop_ratio=two["gflops"] / single["gflops"],
            time_ratio=two_time[0],
            time_ratio_range=f"{two_time[1]:.2f}-{two_time[2]:.2f}",
            cropper_over_classifier_flops=crop["gflops"] / single["gflops"],
            cropper_over_classifier_time=crop_time[0],
            cropper_over_classifier_time_range=f"{crop_time[1]:.2f}-{crop_time[2]:.2f}",
        )
        two_stage["flop_verdict"] = verdict(two_stage["flop_ratio"], TWO_STAGE_TARGET)
        two_stage["time_verdict"] = verdict(two_stage["time_ratio"], TWO_STAGE_TARGET)

        # ----- training FLOPs and MFU
        peak = args.peak_tflops or default_peak_tflops(device, args.precision) or H100_BF16_TFLOPS
        train_rows = []
        for kind in ("linear", "mgff", "two_stage"):
            fwd = {"linear": (bb["gflops"] + lin["gflops"]), "mgff": single["gflops"], "two_stage": two["gflops"]}[kind]
            row = dict(model=kind, fwd_gflops=fwd, train_gflops_3x=3 * fwd)
            if args.train_flops:
                m = build_model(args.preset, backbone, kind, overrides=overrides).to(device).train()
                one = images[:1]
                step = make_train_step(m, one, torch.zeros(1, dtype=torch.long, device=device), "fp32")
                row["train_gflops_counted"] = count_flops(step)[0] / 1e9
                row["counted_over_fwd"] = row["train_gflops_counted"] / fwd
                del m, step
            row["ips_for_mfu_target"] = args.mfu_target * peak * 1e12 / (3 * fwd * 1e9)
            if args.train_flops:
                row["ips_for_mfu_target_counted"] = args.mfu_target * peak * 1e12 / (row["train_gflops_counted"] * 1e9)
            train_rows.append(row)

        profiles = {}
        if args.profile:
            for name in ("mgff head", TWO):
                profiles[name] = profile_top_ops(calls[name], device, calls=args.profile_calls, rows=args.profile_rows)

    # ----- print
    load = f"load average {info['loadavg'][0]:.2f} -> {load_after[0]:.2f}"
    where = (f"{device} ({info.get('gpu', info['cpu'])}), {args.precision}, batch {batch}, {info['torch_threads']} thread(s), "
             f"{clock} clock")
    notes = list(args.set) + ([f"timm attention {args.timm_attention}"] if args.timm_attention != "default" else [])
    setting = f"preset {args.preset} ({', '.join([backbone, *notes])})"
    tables = [print_table(
        f"Parts of the model, {setting}, {size} px; {where}; {load}",
        [("part", "part", ""), ("params_m", "params M", ".2f"), ("trainable_m", "trainable M", ".2f"),
         ("gflops", "GFLOP/img", ".3f"), ("ms", "fwd ms/call", ".1f"), ("spread_pct", "±%", ".0f")],
        rows,
    )]
    tables.append(print_table(
        "Issue 3: MGFF head vs backbone (target: head time <= 10% of backbone time); time: median over rounds (min-max)",
        [("what", "", ""), ("params_pct", "params %", ".2f"), ("flops_pct", "FLOPs %", ".2f"), ("time_pct", "time %", ".1f"),
         ("range", "time % rounds", ""), ("verdict", "time target", "")],
        [dict(what="mgff head / backbone", range=head_share["time_pct_range"],
              **{k: head_share[k] for k in ("params_pct", "flops_pct", "time_pct", "verdict")}),
         dict(what="linear head / backbone", params_pct=100 * lin["params_m"] / bb["params_m"],
              flops_pct=100 * lin["gflops"] / bb["gflops"], time_pct=head_share["linear_time_pct"], range="", verdict="")],
    ))
    tables.append(print_table(
        "Issue 4: two-stage vs single-stage, same classifier (target: <= 2.3x); time: median over rounds (min-max)",
        [("what", "", ""), ("ratio", "two / single", ".2f"), ("range", "rounds", ""), ("cropper", "cropper / classifier", ".2f"),
         ("verdict", "target", "")],
        [dict(what="FLOPs", ratio=two_stage["flop_ratio"], range="", cropper=two_stage["cropper_over_classifier_flops"],
              verdict=two_stage["flop_verdict"]),
         dict(what="time", ratio=two_stage["time_ratio"], range=two_stage["time_ratio_range"],
              cropper=two_stage["cropper_over_classifier_time"], verdict=two_stage["time_verdict"]),
         dict(what="time, parts summed (2 + cropper / classifier)", ratio=2 + two_stage["cropper_over_classifier_time"],
              range="", cropper=two_stage["cropper_over_classifier_time"], verdict="")],
    ))
    train_columns = [("model", "model", ""), ("fwd_gflops", "fwd GFLOP/img", ".2f"), ("train_gflops_3x", "train 3x fwd", ".2f")]
    if args.train_flops:
        train_columns += [("train_gflops_counted", "train counted", ".2f"), ("counted_over_fwd", "counted / fwd", ".2f")]
    target = f"{100 * args.mfu_target:.0f}% MFU @ {peak:g} TFLOP/s"
    train_columns.append(("ips_for_mfu_target", f"img/s for {target}", ".0f"))
    if args.train_flops:
        train_columns.append(("ips_for_mfu_target_counted", "same, counted FLOPs", ".0f"))
    tables.append(print_table("Training FLOPs per image and the throughput an MFU target asks for", train_columns, train_rows))
    for name, top in profiles.items():
        tables.append(print_table(
            f"Profile: {name}, top ops by self {'CUDA' if device.type == 'cuda' else 'CPU'} time ({args.precision}, batch {batch})",
            [("op", "op", ""), ("calls", "calls/fwd", "d"), ("self_ms", "self ms/fwd", ".2f"), ("share_pct", "share %", ".1f")],
            top,
        ))

    payload = dict(
        benchmark="flops", command=command, machine=info, loadavg_after=load_after, clock=clock, args=vars(args), overrides=overrides,
        parts=rows, head_share=head_share, two_stage=two_stage, training=train_rows, peak_tflops=peak,
        profiles=profiles, tables=tables,
    )
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
