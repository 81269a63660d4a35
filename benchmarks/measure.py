"""How the benchmarks measure: timing, peak memory, FLOPs, the machine, and aligned tables.

Shared by ``model_throughput.py`` and ``flops.py`` so both time, count and report the same way.

- **Time**: CUDA events around ``iters`` steps, then a synchronize (the GPU runs ahead of Python). On the
  CPU, by default the process's CPU time (``time.process_time``), not the wall time: on a shared 2-core
  machine with a load average of 5-10 the wall time mostly measures the scheduler, while the CPU time of a
  one-thread torch process is what the work costs (= its wall time on an idle machine); ``--clock wall``
  gives the wall time. ``repeats`` timed blocks after warm-up, models compared in turns (one block of each
  per round); the median is reported with the spread ``(max - min) / median``, and ratios between models
  are the median of the per-round ratios (:func:`paired_ratio`).
- **Peak memory**, over building a model and its warm-up steps (the peak is reached in the first steps),
  relative to what was allocated before, so other live models do not count: weights, gradients,
  optimizer state and activations. On CUDA ``torch.cuda.max_memory_allocated``. On the CPU there is no
  allocator counter: a thread samples the resident set size (RSS) every 5 ms, after ``malloc_trim`` so
  memory freed by earlier runs is given back first; approximate (sampling, allocator caching).
- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2; matmuls, convs and
  attention only: interpolation, ``roi_align``, norms and element-wise ops are not counted).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "PeakMemory", "Timing", "autocast", "count_flops", "count_params", "default_peak_tflops", "describe_machine",
    "machine_info", "num_threads", "paired_ratio", "parse_list", "peak_tflops_for_name", "print_table",
    "resolve_clock", "synchronize", "time_block", "time_interleaved", "time_steps", "warm_up", "write_json",
]

MIB = 2**20

# Dense peak TFLOP/s by GPU name (first match wins): (bf16/fp16 tensor cores, fp32 without TF32).
# H100 SXM and H200 (same GH100 compute): 989 bf16 dense, 67 fp32. H100 PCIe: 756, 51. A100: 312, 19.5.
_PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
)


# ----- configuration helpers ---------------------------------------------------------------------
def parse_list(text: str, kind: type = str, allowed: Sequence | None = None) -> list:
    """``"a,b"`` -> ``["a", "b"]`` (cast by ``kind``), checked against ``allowed``."""
    values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(f"empty list: {text!r}")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{bad} not among {list(allowed)}")
    return values


def autocast(device: torch.device, precision: str):
    """``bf16``: autocast to bfloat16 on ``device``; ``fp32``: a disabled autocast (plain fp32)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def default_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Dense peak TFLOP/s of the device for ``precision``, from its name; ``None`` when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return peak_tflops_for_name(name, precision)


def peak_tflops_for_name(name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s for a GPU name such as ``"NVIDIA H100 80GB HBM3"``; ``None`` when unknown."""
    for key, peaks in _PEAK_TFLOPS:
        if key in name:
            return peaks[precision]
    return None


# ----- timing --------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of the first call (compilation included), and of each timed block of ``iters`` calls."""

    first_s: float
    block_s: list[float]
    iters: int

    @property
    def per_call_s(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.block_s) / self.iters

    @property
    def spread(self) -> float:
        """``(max - min) / median`` of the blocks: 0.05 = the blocks differ by 5 %."""
        median = statistics.median(self.block_s)
        return (max(self.block_s) - min(self.block_s)) / median if median > 0 else 0.0

    def rate(self, items_per_call: int) -> float:
        """Median items per second (e.g. images/s with ``items_per_call = batch size``)."""
        return items_per_call / self.per_call_s


def paired_ratio(a: Timing, b: Timing) -> tuple[float, float, float]:
    """Per-call time of ``a`` over ``b`` round by round (they were timed in turns, see
    :func:`time_interleaved`): ``(median, min, max)`` over the rounds. A round's two blocks ran seconds
    apart under about the same load, so this is steadier than the ratio of the two medians."""
    if len(a.block_s) != len(b.block_s):
        raise ValueError("paired_ratio needs timings of the same rounds")
    ratios = [(ta / a.iters) / (tb / b.iters) for ta, tb in zip(a.block_s, b.block_s)]
    return statistics.median(ratios), min(ratios), max(ratios)


def warm_up(step: Callable[[], Any], device: torch.device, warmup: int = 2) -> float:
    """Call ``step`` ``max(warmup, 1)`` times; return the seconds of the first call (compilation included)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step()
    synchronize(device)
    return first


CLOCKS = ("auto", "wall", "cpu")


def resolve_clock(clock: str, device: torch.device) -> str:
    """``auto`` -> ``cpu`` on a CPU device, ``wall`` (CUDA events) on a GPU."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "auto":
        return "wall" if device.type == "cuda" else "cpu"
    if clock == "cpu" and device.type == "cuda":
        raise ValueError("the cpu clock cannot time GPU work: use wall (CUDA events)")
    return clock


def time_block(step: Callable[[], Any], device: torch.device, iters: int, clock: str = "wall") -> float:
    """Seconds of ``iters`` back-to-back calls of ``step``.

    ``clock``: ``wall`` (CUDA events on a GPU, ``perf_counter`` on the CPU) or ``cpu`` (the process's CPU
    time, ``time.process_time``: on a shared machine it leaves out the time spent waiting for a core, and
    equals the wall time of an idle machine when torch runs one thread).
    """
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0
    timer = time.process_time if clock == "cpu" else time.perf_counter
    start = timer()
    for _ in range(iters):
        step()
    return timer() - start


def time_interleaved(
    steps: dict[str, Callable[[], Any]], device: torch.device, *, iters: int = 5, repeats: int = 5,
    first_s: dict[str, float] | None = None, min_block_s: float = 0.0, clock: str = "wall",
) -> dict[str, Timing]:
    """Time several already warmed-up steps in turns: ``repeats`` rounds, one block of calls of each per
    round. Load changes on a shared machine then hit all of them alike, so their ratios hold better than
    their absolute rates.

    Args:
        iters: calls per block (at least).
        min_block_s: raise a step's calls per block until a block lasts about this long (judged from one
            timed call), so that millisecond steps are not timed one timer tick at a time.
        clock: ``wall`` or ``cpu`` (see :func:`time_block`).
    """
    if iters < 1 or repeats < 1:
        raise ValueError(f"iters and repeats must be >= 1, got {iters} and {repeats}")
    counts = {}
    for name, step in steps.items():
        counts[name] = iters
        if min_block_s > 0:
            one = time_block(step, device, 1, clock)
            counts[name] = max(iters, math.ceil(min_block_s / max(one, 1e-6)))
    blocks: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            blocks[name].append(time_block(step, device, counts[name], clock))
    return {name: Timing((first_s or {}).get(name, float("nan")), b, counts[name]) for name, b in blocks.items()}


def time_steps(
    step: Callable[[], Any], device: torch.device, *, warmup: int = 2, iters: int = 5, repeats: int = 5,
    min_block_s: float = 0.0, clock: str = "wall",
) -> Timing:
    """Time one ``step``: warm-up (the first call timed alone), then ``repeats`` blocks of ``iters`` calls."""
    first = warm_up(step, device, warmup)
    timings = time_interleaved({"step": step}, device, iters=iters, repeats=repeats, first_s={"step": first}, min_block_s=min_block_s,
                               clock=clock)
    return timings["step"]


# ----- memory --------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring the peak memory of what runs inside it (see the module docstring).

    The peak is taken relative to what was allocated on entry, so memory of other live models does not
    count: enter it before building a model to include the model's weights. After the block, ``mib`` is
    the peak in MiB (``None`` where it cannot be measured) and ``kind`` says what it is.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.mib: float | None = None
        self.kind = "cuda max allocated" if device.type == "cuda" else "cpu peak RSS delta"
        self._stop = threading.Event()
        self._base: int | None = None
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_memory()
        self._base = _rss_bytes()
        if self._base is not None:
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / MIB
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.mib = (max(self._peak, _rss_bytes() or 0) - self._base) / MIB


# ----- FLOPs ---------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``fn`` (whatever it runs: forward, or forward + backward) and the count per
    aten op."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ----- reporting -----------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, threads, GPU, versions, load average."""
    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "loadavg": list(os.getloadavg()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    text = f"{info['date']}  {info['cpu']} ({info['cpu_cores']} cores, torch threads {info['torch_threads']})"
    if "gpu" in info:
        text += f"  GPU {info['gpu']} ({info['gpu_memory_gib']} GiB, CUDA {info['cuda']})"
    load = ", ".join(f"{x:.2f}" for x in info["loadavg"])
    return f"{text}  torch {info['torch']}  load average {load}"


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if fmt == "rate":  # one decimal, but three significant digits for slow rates (0.227 img/s)
        return format(value, ".1f" if abs(value) >= 10 else "#.3g")
    return format(value, fmt)


def print_table(title: str, columns: Sequence[tuple[str, str, str]], rows: Sequence[dict], file=None) -> str:
    """Print ``rows`` as an aligned Markdown table and return it.

    Args:
        columns: ``(key, header, format spec)``, the spec of ``format()`` or ``"rate"``; text columns are
            left-aligned, numbers right-aligned; ``None`` prints as ``n/a``.
    """
    cells = [[_format(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows) for key, _, _ in columns]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    text = "\n".join([f"\n{title}\n", line(headers), rule, *(line(c) for c in cells)])
    print(text, file=file or sys.stdout, flush=True)
    return text


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


@contextmanager
def num_threads(threads: int):
    """Run with ``threads`` intra-op threads (1 by default in the benchmarks: the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
