"""benchmarks/real_photos.py: every named run builds; the runner on anyone's photos and weights (--root, --weights),
over seeds (--seeds, seed<k>/ folders), with the pooled paired interval (--compare) and --report-only reading every
seed; a diverged run is reported as such; the resized cache lives per source root."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import real_data, real_photos  # noqa: E402
from mgff.stats import pooled_paired_bootstrap  # noqa: E402

SHARED_WEIGHTS = real_data.DEFAULT_WEIGHTS
needs_shared = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"shared weights not found at {SHARED_WEIGHTS} (../shared absent)")


class Data:  # the class facts the runner takes from the DataModule
    num_classes, mean, std = 25, real_data.DEFAULT_MEAN, real_data.DEFAULT_STD


def test_unknown_run_names_and_bad_seeds_are_refused():
    with pytest.raises(SystemExit, match="unknown run"):
        real_photos.parse_names("linear,not_a_run", ())
    with pytest.raises(SystemExit, match="distinct seeds"):
        real_photos.parse_seeds("0,0")
    with pytest.raises(SystemExit, match="integers"):
        real_photos.parse_seeds("0,one")


@needs_shared
@pytest.mark.parametrize("name", ["linear", "mgff", "linear_best", "mgff_best", "ts_single_two_views", "ts_features_source_mgff_own_head", "ts_single_384"])
def test_runs_load_the_shared_weights_and_run_a_forward(name):
    run = real_photos.RUNS[name]
    model = real_photos.import_class(run.model_class)(**real_photos.model_kwargs(run, Data())).eval()
    assert model.backbone.feature_channels[-1] == 1280  # the pretrained conv_head/bn2 map is kept
    with torch.no_grad():
        batch = {"source": torch.zeros(2, 3, 96, 96, dtype=torch.uint8)}
        logits, _, _ = model.forward_outputs(torch.zeros(2, 3, 64, 64), batch)
    assert logits["main"].shape == (2, 25)


@needs_shared
def test_the_old_fusion_runs_keep_the_plain_head_and_the_new_ones_are_residual():
    build = lambda name: real_photos.import_class(real_photos.RUNS[name].model_class)(**real_photos.model_kwargs(real_photos.RUNS[name], Data()))  # noqa: E731
    assert not build("mgff").head.residual and not build("mgff_no_residual").head.residual
    assert build("mgff_best").head.residual


@needs_shared
@pytest.mark.parametrize("name, localization, response", [
    ("ts_features_source", "features", "refined"), ("ts_energy_source", "features", "energy"), ("ts_oracle_source", "ground_truth", None),
])
def test_two_stage_runs_build_the_localiser_they_name(name, localization, response):
    run = real_photos.RUNS[name]
    model = real_photos.import_class(run.model_class)(**real_photos.model_kwargs(run, Data()))
    assert model.hparams.localization == localization and model.hparams.crop_from == "source"
    assert (model.feature_localizer.response if response else model.feature_localizer) == response


def write_predictions(run_dir: Path, correct: np.ndarray) -> None:
    run_dir.mkdir(parents=True)
    with open(run_dir / "test_predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["index", "path", "label", "pred", "correct"])
        writer.writeheader()
        writer.writerows(dict(index=i, path=f"{i}.jpg", label=0, pred=1 - int(c), correct=int(c)) for i, c in enumerate(correct))


def test_compare_pools_the_seeds_where_both_runs_finished(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for seed in (0, 1):
        a = (rng.random(200) < 0.5).astype(int)
        b = np.maximum(a, (rng.random(200) < 0.2).astype(int))
        write_predictions(tmp_path / f"seed{seed}" / "a", a)
        write_predictions(tmp_path / f"seed{seed}" / "b", b)
        pairs.append((a, b))
    write_predictions(tmp_path / "seed2" / "a", np.ones(200, dtype=int))  # b never finished seed 2: left out
    text = real_photos.compare(tmp_path, [0, 1, 2], "a", "b")
    diff, low, high = pooled_paired_bootstrap(pairs)
    assert f"{diff:+.3f} top-1, pooled paired bootstrap 95 % interval [{low:+.3f}, {high:+.3f}]" in text
    assert "seed 0,1;" in text and diff == pytest.approx(np.mean([b.mean() - a.mean() for a, b in pairs]))


def test_the_cache_lives_per_source_root(tmp_path):
    one, other = real_data.RealData(root=tmp_path / "a" / "CUB"), real_data.RealData(root=tmp_path / "b" / "CUB")
    assert one.cache_dir(tmp_path) != other.cache_dir(tmp_path)
    assert one.cache_dir(tmp_path).name.startswith("CUB-") and one.cache_dir(tmp_path) == real_data.RealData(root=one.root).cache_dir(tmp_path)


def test_a_missing_root_or_weights_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"--root .*nowhere.*--weights .*none.safetensors"):
        real_data.RealData(root=tmp_path / "nowhere", weights=tmp_path / "none.safetensors").check()


@pytest.fixture
def tiny_recipe(monkeypatch):
    """The runner's data and recipe at 64 px and batch 4, so that a run on the generated CUB takes seconds."""
    monkeypatch.setitem(real_photos.DATA, "batch_size", 4)
    monkeypatch.setitem(real_photos.DATA, "resize_size", 72)
    monkeypatch.setitem(real_photos.DATA, "crop_size", 64)
    monkeypatch.setitem(real_photos.DATA, "cache_size", 72)
    monkeypatch.setitem(real_photos.COMMON, "img_size", 64)


@pytest.mark.slow
def test_the_runner_on_other_photos_and_weights_over_two_seeds(tiny_recipe, cub_root, tmp_path, capsys):
    # anyone's photos (a generated CUB of 4 classes) and weights (a saved random EfficientNet-Lite0 state dict)
    weights = tmp_path / "lite0.safetensors"
    save_file(timm.create_model("efficientnet_lite0").state_dict(), weights)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--root", str(cub_root), "--weights", str(weights), "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
            "--runs", "linear_best,mgff_best", "--epochs", "1", "--seeds", "0,1", "--out", str(out), "--cache", str(cache)]
    real_photos.main(args + ["--compare", "linear_best,mgff_best"])
    for seed in (0, 1):
        for name in ("linear_best", "mgff_best"):
            result = json.loads((out / f"seed{seed}" / name / "result.json").read_text())
            assert result["seed"] == seed and result["root"] == str(cub_root) and 0 <= result["test_acc"] <= 1
            assert result["train_ms_per_image"] > 0
            with open(out / f"seed{seed}" / name / "test_predictions.csv") as f:
                assert len(list(csv.DictReader(f))) == 24  # the generated test split (half of 4 x 12)
    assert [p.name for p in cache.iterdir()] == [real_data.RealData(root=cub_root).cache_dir(cache).name]
    table = (out / "results.md").read_text()
    assert "| linear_best | 2 |" in table and "| mgff_best | 2 |" in table
    assert "mgff_best - linear_best:" in table and "seed 0,1;" in table
    # --report-only rebuilds the same rows from the seed folders without training
    capsys.readouterr()
    real_photos.main(args + ["--report-only", "--compare", "linear_best,mgff_best"])
    assert table.split("\n", 2)[2] == (out / "results.md").read_text().split("\n", 2)[2]


@pytest.mark.slow
def test_a_diverged_run_is_reported_not_tested(tiny_recipe, cub_root, tmp_path, monkeypatch):
    weights = tmp_path / "lite0.safetensors"
    save_file(timm.create_model("efficientnet_lite0").state_dict(), weights)
    monkeypatch.setitem(real_photos.RUNS, "blow_up", real_photos.Run(real_photos.CLASSIFIER, dict(head="linear", lr=1e6, optimizer="adamw"), "lr 1e6"))
    out = tmp_path / "out"
    real_photos.main(["--root", str(cub_root), "--weights", str(weights), "--runs", "blow_up", "--epochs", "2", "--seed", "0",
                      "--out", str(out), "--cache", str(tmp_path / "cache")])
    result = json.loads((out / "blow_up" / "result.json").read_text())
    assert "test_acc" not in result and "non-finite" in result["diverged"]
    assert not list((out / "blow_up").glob("*.ckpt")) and not (out / "blow_up" / "test_predictions.csv").exists()
    assert "diverged: seed 0" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_two_stage_run_records_each_stages_top1(tiny_recipe, cub_root, tmp_path):
    weights = tmp_path / "lite0.safetensors"
    save_file(timm.create_model("efficientnet_lite0").state_dict(), weights)
    out = tmp_path / "out"
    real_photos.main(["--root", str(cub_root), "--weights", str(weights), "--runs", "ts_features_source", "--epochs", "1",
                      "--seed", "0", "--out", str(out), "--cache", str(tmp_path / "cache")])
    result = json.loads((out / "ts_features_source" / "result.json").read_text())
    metrics = result["test_metrics"]
    assert {"test/acc", "test/stage1_acc", "test/stage2_acc"} <= set(metrics)
    assert metrics["test/acc"] == pytest.approx(result["test_acc"], abs=1e-4)  # the test pass and the predict pass agree
