"""Training and inference images/s and peak memory of the linear, MGFF and two-stage models.

For every configuration (backbone x model x batch size x precision x channels-last x torch.compile):

- **train**: one optimisation step as Lightning runs it: ``forward_outputs`` and the module's own
  ``loss_terms`` under autocast, ``backward``, SGD step (parameter groups as ``configure_optimizers``
  builds them), ``zero_grad``. Random images and labels already on the device (no data loading: see
  ``benchmarks/data_pipeline.py`` for that side).
- **infer**: ``forward_outputs`` in eval mode under ``torch.inference_mode`` (the two-stage model: cropper,
  stage 1, stage 2, merge).
- **peak memory** of each (CUDA: max allocated; CPU: peak RSS delta, see ``benchmarks/measure.py``), and
  the wall seconds of the **1st** call (compilation included).
- **GFLOP/img**: forward FLOPs per image (``FlopCounterMode``, batch 1); **train TFLOP/s** = 3 x forward
  FLOPs x train images/s (the usual estimate: backward = 2 x forward) and **MFU** = that / the device's
  dense peak (``--peak-tflops``, by default from the GPU's name: H100 SXM / H200 bf16 989 TFLOP/s).
- **x linear**: the configuration's time per image over the linear model's in the same configuration;
  **x plain** (second table, with ``--channels-last both`` / ``--compile both``): over the same model eager
  and contiguous. Both are medians of per-round ratios: every variant of one backbone, batch size and
  precision is timed in turns (a ratio survives a shared machine better than images/s).

``channels_last`` and ``compile`` are the modules' own switches (``FineGrainedClassifier(channels_last=,
compile=)``): the benchmark measures what a training run with them gets. ``compile`` compiles the
classifier's forward (backbone + head); the two-stage model's cropper stays eager.

Examples::

    # CPU, tiny models (seconds per configuration)
    python benchmarks/model_throughput.py --preset tiny --precisions fp32,bf16 --channels-last both
    # one torch.compile try on the CPU (compilation takes a while)
    python benchmarks/model_throughput.py --preset tiny --backbones swin --batch-sizes 8 --compile both
    # the paper's models on a GPU
    python benchmarks/model_throughput.py --preset paper --device cuda --precisions bf16 --compile both
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import (
    PeakMemory, autocast, count_flops, default_peak_tflops, describe_machine, machine_info, num_threads,
    paired_ratio, parse_list, print_table, resolve_clock, time_interleaved, warm_up, write_json,
)
from benchmarks.presets import ATTENTION_CHOICES, MODEL_KINDS, PRESETS, backbones, build_model, image_size, set_timm_attention
from mgff.lit.optim import build_optimizer

DEFAULT_BATCH_SIZES = {"tiny": "8,32", "paper": "16,32"}

COLUMNS = [
    ("backbone", "backbone", ""),
    ("model", "model", ""),
    ("batch_size", "batch", "d"),
    ("precision", "prec", ""),
    ("channels_last", "ch-last", ""),
    ("compile", "compile", ""),
    ("train_ips", "train img/s", "rate"),
    ("train_spread_pct", "±%", ".0f"),
    ("train_cost_vs_linear", "train x linear", ".2f"),
    ("infer_ips", "infer img/s", "rate"),
    ("infer_spread_pct", "±%", ".0f"),
    ("infer_cost_vs_linear", "infer x linear", ".2f"),
    ("train_mem_mib", "train MiB", ".0f"),
    ("infer_mem_mib", "infer MiB", ".0f"),
    ("train_first_s", "1st train s", ".2f"),
    ("infer_first_s", "1st infer s", ".2f"),
    ("fwd_gflops", "GFLOP/img", ".3f"),
    ("train_tflops", "train TFLOP/s", ".4f"),
    ("mfu_pct", "MFU %", ".1f"),
]


EFFECT_COLUMNS = [
    ("backbone", "backbone", ""),
    ("model", "model", ""),
    ("batch_size", "batch", "d"),
    ("precision", "prec", ""),
    ("channels_last", "ch-last", ""),
    ("compile", "compile", ""),
    ("train_vs_plain", "train x plain", ".2f"),
    ("infer_vs_plain", "infer x plain", ".2f"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Training and inference images/s and peak memory of the linear, MGFF and two-stage models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="model sizes (see benchmarks/presets.py)")
    parser.add_argument("--backbones", default=None, help="comma list of the preset's backbones (default: all)")
    parser.add_argument("--models", default=",".join(MODEL_KINDS), help=f"comma list of {MODEL_KINDS}")
    parser.add_argument("--batch-sizes", default=None, help="comma list (default: tiny 8,32; paper 16,32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16 (bf16 = autocast)")
    parser.add_argument("--channels-last", choices=("off", "on", "both"), default="both",
                        help="channels-last input; 'both' times the two side by side")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="torch.compile the classifier (slow to compile on a CPU); 'both' times eager and compiled side by side")
    parser.add_argument("--modes", default="train,infer", help="comma list of train, infer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (the first compiles)")
    parser.add_argument("--iters", type=int, default=5, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timed blocks (one per variant); the median is reported")
    parser.add_argument("--min-block-s", type=float, default=0.2, help="more calls per block for steps faster than this")
    parser.add_argument("--timm-attention", choices=ATTENTION_CHOICES, default="default",
                        help="default: timm's (Swin window attention unfused); fused: SDPA in Swin too (TIMM_FUSED_ATTN=2)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="auto: CUDA events on a GPU, process CPU time on the CPU (robust on a shared machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU is shared)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device dense peak for MFU (default: from the GPU name, H100/H200 bf16 989; none on CPU)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def _switch(value: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[value]


def make_train_step(model, images: torch.Tensor, labels: torch.Tensor, precision: str):
    """One optimisation step of ``model`` on a fixed batch, as a zero-argument callable."""
    hp = model.hparams
    optimizer = build_optimizer(
        hp.optimizer, model.optimizer_param_groups(), hp.lr, hp.momentum, hp.nesterov
    )
    device = images.device

    def step() -> None:
        with autocast(device, precision):
            logits, aux_loss, _ = model.forward_outputs(images)
            loss = torch.stack(list(model.loss_terms(logits, aux_loss, labels).values())).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_infer_step(model, images: torch.Tensor, precision: str):
    """One inference call of ``model`` (eval mode, no autograd) on a fixed batch."""
    device = images.device

    def step() -> None:
        with torch.inference_mode(), autocast(device, precision):
            model.forward_outputs(images)

    return step


def forward_flops(preset: str, backbone: str, kind: str, device: torch.device) -> int:
    """Forward FLOPs per image of one model (batch 1, fp32, eval)."""
    model = build_model(preset, backbone, kind).to(device).eval()
    size = image_size(preset, backbone)
    images = torch.randn(1, 3, size, size, device=device)
    with torch.no_grad():
        flops, _ = count_flops(lambda: model.forward_outputs(images))
    return flops


Variant = tuple[str, bool, bool]  # (model kind, channels_last, compile)


def _allow_recompiles(variants: Sequence[Variant]) -> None:
    """Every compiled model instance recompiles ``classify`` (dynamo guards on ``self``): start from a clean
    cache and allow one entry per instance."""
    if any(compile for _, _, compile in variants):
        torch._dynamo.reset()
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 4 * len(variants)))


def measure_group(
    preset: str, backbone: str, variants: Sequence[Variant], mode: str, batch_size: int, precision: str,
    device: torch.device, warmup: int, iters: int, repeats: int, min_block_s: float = 0.0, clock: str = "wall",
) -> dict[Variant, dict[str, Any]]:
    """``mode`` (``train`` or ``infer``) images/s, spread, peak memory and first-call seconds of each variant
    (model kind, channels-last, compile) of one backbone, batch size and precision:
    ``{variant: {"<mode>_ips": ..., ...}}`` (``{"status": ...}`` where it failed).

    Each model is built and warmed up alone, inside its own :class:`PeakMemory` (weights included), then
    all are timed in turns (:func:`time_interleaved`), so that the ratios between them survive a shared
    machine's changing load: ``<mode>_cost_vs_linear`` (over the linear model with the same switches) and
    ``<mode>_vs_plain`` (over the same model eager and contiguous).
    """
    size = image_size(preset, backbone)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, 200, (batch_size,), generator=generator).to(device)
    _allow_recompiles(variants)
    results: dict[Variant, dict[str, Any]] = {}
    steps, first_s = {}, {}
    for variant in variants:
        kind, channels_last, compile = variant
        model = step = None
        try:
            with PeakMemory(device) as memory:
                model = build_model(preset, backbone, kind, channels_last=channels_last, compile=compile).to(device)
                if mode == "train":
                    step = make_train_step(model.train(), images, labels, precision)
                else:
                    step = make_infer_step(model.eval(), images, precision)
                first_s[variant] = warm_up(step, device, warmup)
        except torch.OutOfMemoryError:
            results[variant] = {"status": f"{mode}: OOM"}
        except Exception as error:  # one failing configuration (e.g. a compile error) must not end the sweep
            traceback.print_exc(file=sys.stderr)
            message = str(error).splitlines()[0][:80] if str(error) else ""
            results[variant] = {"status": f"{mode}: {type(error).__name__}: {message}"}
        else:
            steps[variant] = step  # the model lives on in its step until all are timed
            results[variant] = {f"{mode}_mem_mib": memory.mib, f"{mode}_first_s": first_s[variant]}
        finally:
            del model, step  # a model that failed must not hold memory while the others run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    try:
        timings = time_interleaved(
            steps, device, iters=iters, repeats=repeats, first_s=first_s, min_block_s=min_block_s, clock=clock
        )
    except torch.OutOfMemoryError:
        return {v: results[v] if v not in steps else {"status": f"{mode}: OOM"} for v in variants}
    for (kind, channels_last, compile), timing in timings.items():
        result = results[(kind, channels_last, compile)]
        result.update({f"{mode}_ips": timing.rate(batch_size), f"{mode}_spread_pct": 100 * timing.spread})
        linear, plain = ("linear", channels_last, compile), (kind, False, False)
        if linear in timings:
            result[f"{mode}_cost_vs_linear"] = paired_ratio(timing, timings[linear])[0]
        if plain in timings and plain != (kind, channels_last, compile):
            result[f"{mode}_vs_plain"] = paired_ratio(timing, timings[plain])[0]
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def add_mfu(rows: list[dict], flops: dict[tuple[str, str], int], peak_tflops: dict[str, float | None]) -> None:
    """Fill ``fwd_gflops``, ``train_tflops`` and ``mfu_pct`` in place."""
    for row in rows:
        fwd = flops.get((row["backbone"], row["model"]))
        if fwd is None:
            continue
        row["fwd_gflops"] = fwd / 1e9
        if row.get("train_ips"):
            row["train_tflops"] = 3 * fwd * row["train_ips"] / 1e12
            peak = peak_tflops.get(row["precision"])
            if peak:
                row["mfu_pct"] = 100 * row["train_tflops"] / peak


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep, print the table, return (and optionally write) ``{"machine", "command", "rows", ...}``."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    set_timm_attention(args.timm_attention)
    clock = resolve_clock(args.clock, device)
    names = parse_list(args.backbones, allowed=backbones(args.preset)) if args.backbones else backbones(args.preset)
    kinds = parse_list(args.models, allowed=MODEL_KINDS)
    batch_sizes = parse_list(args.batch_sizes or DEFAULT_BATCH_SIZES[args.preset], int)
    precisions = parse_list(args.precisions, allowed=("fp32", "bf16"))
    modes = parse_list(args.modes, allowed=("train", "infer"))
    command = "python benchmarks/model_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])

    with num_threads(args.threads):
        info = machine_info(device)
        print(f"# {command}\n# {describe_machine(info)}", flush=True)
        flops: dict[tuple[str, str], int] = {}
        if not args.no_flops:
            for name in names:
                for kind in kinds:
                    flops[(name, kind)] = forward_flops(args.preset, name, kind, device)
        rows = []
        for name in names:
            for batch_size in batch_sizes:
                for precision in precisions:
                    variants = [
                        (kind, channels_last, compile)
                        for channels_last in _switch(args.channels_last)
                        for compile in _switch(args.compile)
                        for kind in kinds
                    ]
                    group = {
                        v: dict(backbone=name, model=v[0], batch_size=batch_size, precision=precision,
                                channels_last="yes" if v[1] else "no", compile="yes" if v[2] else "no", status="ok")
                        for v in variants
                    }
                    for mode in modes:
                        measured = measure_group(
                            args.preset, name, variants, mode, batch_size, precision, device,
                            args.warmup, args.iters, args.repeats, args.min_block_s, clock,
                        )
                        for variant, values in measured.items():
                            row = group[variant]
                            status = values.pop("status", None)
                            if status:
                                row["status"] = status if row["status"] == "ok" else f"{row['status']}; {status}"
                            row.update(values)
                    for row in group.values():
                        rows.append(row)
                        print(f"  done {name} {row['model']} bs={batch_size} {precision} cl={row['channels_last']} "
                              f"compile={row['compile']}: train {row.get('train_ips', 0):.1f} img/s, "
                              f"infer {row.get('infer_ips', 0):.1f} img/s ({row['status']})",
                              file=sys.stderr, flush=True)
        peaks = {p: args.peak_tflops or default_peak_tflops(device, p) for p in precisions}
        add_mfu(rows, flops, peaks)
        load_after = list(os.getloadavg())

    memory_kind = PeakMemory(device).kind
    attention = f", timm attention {args.timm_attention}" if args.timm_attention != "default" else ""
    title = (f"Throughput, preset {args.preset}{attention}, {device} ({info.get('gpu', info['cpu'])}), {info['torch_threads']} "
             f"thread(s), {clock} clock, memory = {memory_kind}, load average {info['loadavg'][0]:.2f} -> {load_after[0]:.2f}")
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    table = print_table(title, columns, rows)
    effects = [r for r in rows if r.get("train_vs_plain") is not None or r.get("infer_vs_plain") is not None]
    if effects:
        table += "\n" + print_table(
            "Effect of channels-last / torch.compile: time per image over the same model eager and contiguous "
            "(< 1: faster), median of the per-round ratios",
            [c for c in EFFECT_COLUMNS if any(r.get(c[0]) is not None for r in effects)], effects,
        )
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"  not measured: {r['backbone']} {r['model']} bs={r['batch_size']} {r['precision']} "
              f"cl={r['channels_last']} compile={r['compile']}: {r['status']}")
    payload = dict(
        benchmark="model_throughput", command=command, machine=info, loadavg_after=load_after, clock=clock,
        memory_kind=memory_kind, peak_tflops=peaks, args=vars(args), rows=rows, table=table,
    )
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
