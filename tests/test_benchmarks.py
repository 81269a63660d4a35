"""Smoke tests of the benchmark scripts: their main functions on the tiny preset, one call per timed block,
and the fields they print and return; plus the measuring helpers they share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import flops, model_throughput  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    PeakMemory, Timing, paired_ratio, parse_list, peak_tflops_for_name, print_table, time_interleaved,
)
from benchmarks.presets import build_model, preset_kwargs  # noqa: E402

FAST = ["--warmup", "1", "--iters", "1", "--repeats", "1", "--min-block-s", "0"]
SINGLE = "single-stage (backbone + mgff head)"
TWO = "two-stage (cropper + 2 x single-stage)"
CROPPER = "cropper (ViT + box + crop)"


def test_model_throughput_measures_the_three_models(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    payload = model_throughput.main(
        ["--preset", "tiny", "--backbones", "swin", "--batch-sizes", "2", "--channels-last", "off",
         "--peak-tflops", "0.5", "--json", str(out), *FAST]
    )
    rows = payload["rows"]
    assert [r["model"] for r in rows] == ["linear", "mgff", "two_stage"]
    for row in rows:
        assert row["status"] == "ok", row
        for key in ("train_ips", "infer_ips", "fwd_gflops", "train_tflops"):
            assert row[key] > 0, (key, row)
        assert "train_mem_mib" in row and "infer_mem_mib" in row  # an RSS delta: None off Linux, may be ~0
        assert row["train_tflops"] == pytest.approx(3 * row["fwd_gflops"] * row["train_ips"] / 1000)
        assert row["mfu_pct"] == pytest.approx(100 * row["train_tflops"] / 0.5)
    assert rows[0]["train_cost_vs_linear"] == 1.0 and rows[0]["infer_cost_vs_linear"] == 1.0
    assert rows[0]["fwd_gflops"] < rows[1]["fwd_gflops"] < rows[2]["fwd_gflops"]
    printed = capsys.readouterr().out
    for header in ("train img/s", "infer img/s", "train x linear", "GFLOP/img", "MFU %", "two_stage", "load average"):
        assert header in printed
    assert json.loads(out.read_text())["rows"][2]["model"] == "two_stage"


def test_model_throughput_times_channels_last_beside_contiguous(capsys):
    payload = model_throughput.main(
        ["--preset", "tiny", "--backbones", "resnet10t", "--models", "linear", "--batch-sizes", "2", "--modes", "infer",
         "--channels-last", "both", "--no-flops", *FAST]
    )
    plain, channels_last = payload["rows"]
    assert (plain["channels_last"], channels_last["channels_last"]) == ("no", "yes")
    assert "infer_vs_plain" not in plain and channels_last["infer_vs_plain"] > 0
    assert "Effect of channels-last / torch.compile" in capsys.readouterr().out


def test_flops_reports_shares_ratios_training_flops_and_a_profile(capsys):
    payload = flops.main(
        ["--preset", "tiny", "--train-flops", "--profile", "--profile-calls", "1", "--profile-rows", "3", *FAST]
    )
    parts = {p["part"]: p for p in payload["parts"]}
    backbone, head, single = parts["backbone"], parts["mgff head"], parts[SINGLE]
    # the parts add up: interpolation, roi_align and the merge are not counted by FlopCounterMode
    assert single["gflops"] == pytest.approx(backbone["gflops"] + head["gflops"], rel=1e-6)
    assert parts[TWO]["gflops"] == pytest.approx(parts[CROPPER]["gflops"] + 2 * single["gflops"], rel=1e-6)
    assert parts[CROPPER]["trainable_m"] == 0  # the cropper is frozen
    share = payload["head_share"]
    assert share["flops_pct"] == pytest.approx(100 * head["gflops"] / backbone["gflops"])
    assert share["verdict"].startswith(("meets", "misses by"))
    two = payload["two_stage"]
    assert two["flop_ratio"] == pytest.approx(2 + two["cropper_over_classifier_flops"], rel=1e-6)
    training = {r["model"]: r for r in payload["training"]}
    # a fully trainable model costs about 3x its forward; the frozen cropper has no backward
    assert 2.5 < training["mgff"]["counted_over_fwd"] <= 3.05
    assert training["two_stage"]["counted_over_fwd"] < training["mgff"]["counted_over_fwd"]
    assert set(payload["profiles"]) == {"mgff head", TWO}
    assert all(len(top) == 3 for top in payload["profiles"].values())
    printed = capsys.readouterr().out
    for title in ("Issue 3", "Issue 4", "Training FLOPs", "Profile: mgff head"):
        assert title in printed


def test_paper_preset_reads_the_cub_config():
    kwargs = preset_kwargs("paper")["swin_b_384"]
    assert kwargs["backbone"] == "swin_base_patch4_window12_384" and kwargs["img_size"] == 384
    assert kwargs["cropper"].startswith("vit_base_patch16") and kwargs["pretrained"] is False


def test_build_model_kinds_and_overrides():
    linear = build_model("tiny", "resnet10t", "linear")
    assert linear.hparams.head == "linear" and not hasattr(linear, "cropper")
    two = build_model("tiny", "swin", "two_stage", overrides={"localize_size": 64})
    assert two.cropper.localize_size == (64, 64)
    with pytest.raises(ValueError, match="no backbone"):
        build_model("tiny", "vit", "mgff")


@pytest.mark.parametrize(
    "name, precision, peak",
    [("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H200", "bf16", 989.0),
     ("NVIDIA H100 80GB HBM3", "fp32", 67.0), ("NVIDIA GeForce RTX 3090", "bf16", None)],
)
def test_peak_tflops_by_gpu_name(name, precision, peak):
    assert peak_tflops_for_name(name, precision) == peak


def test_helpers_time_in_turns_and_print_aligned_tables(capsys):
    calls = {"a": 0, "b": 0}
    timings = time_interleaved(
        {"a": lambda: calls.__setitem__("a", calls["a"] + 1), "b": lambda: calls.__setitem__("b", calls["b"] + 1)},
        torch.device("cpu"), iters=2, repeats=3,
    )
    assert calls == {"a": 6, "b": 6} and len(timings["a"].block_s) == 3 and timings["a"].rate(4) > 0
    # round by round: a slow round (load) slows both and leaves their ratio alone
    slow, fast = Timing(0.0, [2.0, 8.0, 2.2], iters=2), Timing(0.0, [1.0, 4.0, 1.0], iters=1)
    assert paired_ratio(slow, fast) == pytest.approx((1.0, 1.0, 1.1))
    text = print_table(
        "T", [("name", "name", ""), ("x", "x", ".1f"), ("ips", "img/s", "rate")],
        [{"name": "long name", "x": 1.0, "ips": 0.2273}, {"name": "b", "x": None, "ips": 177.44}],
    )
    lines = text.strip().splitlines()[-4:]
    assert len({len(line) for line in lines}) == 1 and "n/a" in lines[-1]
    assert "0.227" in lines[-2] and "177.4" in lines[-1]
    assert print_table("T", [("ips", "img/s", "rate")], [{"ips": 1.0}]).strip().endswith("1.00 |")
    assert parse_list("8, 32", int) == [8, 32]
    with pytest.raises(ValueError):
        parse_list("fp16", allowed=("fp32", "bf16"))
    with PeakMemory(torch.device("cpu")) as memory:
        torch.ones(2**22).sum()
    assert memory.mib is None or memory.mib >= 0
