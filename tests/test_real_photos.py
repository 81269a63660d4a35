"""benchmarks/real_photos.py: every named run is a config + overrides that the project's CLI parses, and builds its
model and data through it; the historical runs keep the dict runner's settings over the lite0 recipe, and train what
``python -m mgff.fit`` with the recorded command trains; the runner on anyone's photos and weights (--root,
--weights, a generated CUB and random Lite0 weights saved as safetensors), over seeds (--seeds, seed<k>/ folders),
with overrides for every run after ``--``, the pooled paired interval (--compare) and --report-only reading every
seed; a diverged run is reported as such; the resized cache lives per source root; the run folders are ones that
``python -m mgff.report`` reads (metrics.json in mgff.fit's format)."""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import real_data, real_photos  # noqa: E402
from mgff.report import main as report_main  # noqa: E402
from mgff.stats import pooled_paired_bootstrap  # noqa: E402

# the runner's data and model at 64 px and batch 4, so that a run on the generated CUB takes seconds
TINY = ["--data.init_args.batch_size=4", "--data.init_args.resize_size=72", "--data.init_args.crop_size=64", "--model.init_args.img_size=64"]
# what the dict runner gave every historical run (its COMMON and DATA), and what it left at the class defaults that
# experiments/lite0/recipe.yaml sets otherwise
DICT_RUNNER_MODEL = dict(backbone="efficientnet_lite0", img_size=224, stages=[2, 3, 4], optimizer="sgd", lr=0.01, head_lr_scale=10.0, momentum=0.9,
                         weight_decay=5e-4, warmup_epochs=0.0, scheduler_interval="step", dropout=0.1, label_smoothing=0.0,
                         fusion_lr_scale=None, bn_mode="train", freeze_backbone_epochs=0)
DICT_RUNNER_DATA = dict(batch_size=32, resize_size=256, crop_size=224, val_fraction=0.2, split_seed=0, num_workers=0)


@pytest.fixture(scope="module")
def source(cub_root, weights) -> real_data.RealData:
    return real_data.RealData(root=cub_root, weights=weights)


def test_unknown_run_names_and_bad_seeds_are_refused():
    with pytest.raises(SystemExit, match="unknown run"):
        real_photos.parse_names("linear,not_a_run", ())
    with pytest.raises(SystemExit, match="distinct seeds"):
        real_photos.parse_seeds("0,0")
    with pytest.raises(SystemExit, match="integers"):
        real_photos.parse_seeds("0,one")


def test_every_run_is_an_existing_config_and_overrides_that_the_cli_parses(source):
    for name, run in real_photos.RUNS.items():
        assert run.config_path.is_file() and all(o.startswith("--") for o in run.overrides), name
        config = real_photos.resolve(real_photos.run_args(run, source))
        assert config["model"]["init_args"]["pretrained"] == str(source.weights), name
        assert config["data"]["init_args"]["root"] == str(source.root), name


@pytest.mark.parametrize("name, entry, model, data", [
    ("linear_best", "single.yaml", dict(head="linear"), {}),
    ("mgff_best", "single.yaml", dict(head="mgff", fusion_residual=True, fusion_lr_scale=1.0), {}),
    ("ts_features_source", "two_stage.yaml", dict(head="linear", crop_size=224, localization="features", crop_from="source"), dict(source_size=448)),
    ("ts_single_equal_flops", "single.yaml", dict(head="linear", img_size=320), dict(source_size=448, resize_size=366, crop_size=320)),
])
def test_the_historical_runs_keep_the_dict_runners_settings_over_the_recipe(source, name, entry, model, data):
    run = real_photos.RUNS[name]
    assert run.config == f"experiments/lite0/{entry}"
    config = real_photos.resolve(real_photos.run_args(run, source))
    expected_model = {**DICT_RUNNER_MODEL, **model, "backbone_mean": [0.5] * 3, "backbone_std": [0.5] * 3}
    assert {k: config["model"]["init_args"][k] for k in expected_model} == expected_model
    expected_data = {**DICT_RUNNER_DATA, **data, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert {k: config["data"]["init_args"][k] for k in expected_data} == expected_data
    trainer = config["trainer"]
    assert not trainer["callbacks"] and trainer["max_epochs"] == 6 and trainer["accelerator"] == "cpu"  # no EMA, 6 epochs, CPU


def test_the_lite0_runs_are_the_entry_configs_as_they_are(source):
    run = real_photos.RUNS["lite0_full"]
    assert run.config == "experiments/lite0/full.yaml" and run.overrides == ()
    config = real_photos.resolve(real_photos.run_args(run, source))
    assert config["model"]["init_args"]["optimizer"] == "adamw" and config["model"]["init_args"]["head"] == "mgff"
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["mgff.callbacks.EMAWeights"]


def test_the_resized_cache_is_read_where_the_data_needs_no_more(source, tmp_path):
    cached = real_photos.data_options(cache_dir=str(source.cache_dir(tmp_path)), cache_size=real_photos.RESIZED_CACHE_SIZE)
    for name in ("linear_best", "lite0_single"):  # no source view, resize 256
        assert real_photos.build_args(real_photos.RUNS[name], source, tmp_path)[-2:] == list(cached), name
    for name in ("ts_single", "ts_features_source", "ts_single_384"):  # a source view: the originals
        assert real_photos.build_args(real_photos.RUNS[name], source, tmp_path) == real_photos.run_args(real_photos.RUNS[name], source), name
    assert "--data.init_args.cache_dir" not in " ".join(real_photos.build_args(real_photos.RUNS["linear_best"], source, None))


@pytest.mark.parametrize("name", ["linear", "mgff", "linear_best", "mgff_best", "ts_single_two_views", "ts_features_source_mgff_own_head", "ts_single_384"])
def test_runs_build_through_the_cli_load_the_weights_and_run_a_forward(source, weights, name):
    model, data = real_photos.build(real_photos.RUNS[name], source, cache=None)
    model.eval()
    assert model.backbone.feature_channels[-1] == 1280  # the pretrained conv_head/bn2 map is kept
    assert torch.equal(model.backbone.model.conv_stem.weight, load_file(weights)["conv_stem.weight"])  # --weights loaded
    assert data.num_classes == 4 and model.hparams.num_classes == 4  # the class count from the data, by the CLI's link
    with torch.no_grad():
        batch = {"source": torch.zeros(2, 3, 96, 96, dtype=torch.uint8)}
        logits, _, _ = model.forward_outputs(torch.zeros(2, 3, 64, 64), batch)
    assert logits["main"].shape == (2, 4)


def test_the_old_fusion_runs_keep_the_plain_head_and_the_new_ones_are_residual(source):
    build = lambda name: real_photos.build(real_photos.RUNS[name], source, cache=None, weights=False)[0]  # noqa: E731
    assert not build("mgff").head.residual and not build("mgff_no_residual").head.residual
    assert build("mgff_best").head.residual


@pytest.mark.parametrize("name, localization, response", [
    ("ts_features_source", "features", "refined"), ("ts_energy_source", "features", "energy"), ("ts_oracle_source", "ground_truth", None),
])
def test_two_stage_runs_build_the_localiser_they_name(source, name, localization, response):
    model = real_photos.build(real_photos.RUNS[name], source, cache=None, weights=False)[0]
    assert model.hparams.localization == localization and model.hparams.crop_from == "source"
    assert (model.feature_localizer.response if response else model.feature_localizer) == response


def test_list_prints_each_runs_config_and_overrides(capsys):
    real_photos.main(["--list", "--runs", "linear_best,lite0_two_stage"])
    text = capsys.readouterr().out
    assert "linear_best: linear head at its best recipe\n  python -m mgff.fit --config experiments/lite0/single.yaml " in text
    assert "--model.init_args.optimizer=sgd" in text and "--model.init_args.head=linear" in text
    assert "lite0_two_stage:" in text and "python -m mgff.fit --config experiments/lite0/two_stage.yaml --data.init_args.root=" in text


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


@pytest.mark.slow
def test_the_runner_on_other_photos_and_weights_over_two_seeds(source, tmp_path, capsys):
    # anyone's photos (a generated CUB of 4 classes) and weights (a saved random EfficientNet-Lite0 state dict); the
    # sizes for every run after --
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--root", str(source.root), "--weights", str(source.weights), "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
            "--runs", "linear_best,mgff_best", "--epochs", "1", "--seeds", "0,1", "--out", str(out), "--cache", str(cache)]
    real_photos.main(args + ["--compare", "linear_best,mgff_best", "--", *TINY])
    for seed in (0, 1):
        for name in ("linear_best", "mgff_best"):
            run_dir = out / f"seed{seed}" / name
            result = json.loads((run_dir / "result.json").read_text())
            assert result["seed"] == seed and result["root"] == str(source.root) and 0 <= result["test_acc"] <= 1
            assert result["train_ms_per_image"] > 0 and result["epochs"] == 1 and result["overrides"][-len(TINY):] == TINY
            assert len(real_photos.load_rows(run_dir / "test_predictions.csv")) == 24  # the generated test split (half of 4 x 12)
            # the run folder is an mgff.fit run folder: the resolved config, with the overrides after -- and the seed
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert config["seed_everything"] == seed and config["model"]["init_args"]["img_size"] == 64
            assert config["model"]["init_args"]["lr"] == 0.01 and config["data"]["init_args"]["batch_size"] == 4
            assert (run_dir / "metrics.csv").is_file() and (run_dir / "best.ckpt").is_file()
    assert [p.name for p in cache.iterdir()] == [source.cache_dir(cache).name]
    # every run folder is also one that mgff.report reads: metrics.json in mgff.fit's format, one group per run over its seeds
    for seed in (0, 1):
        for name in ("linear_best", "mgff_best"):
            run_dir = out / f"seed{seed}" / name
            result, metrics = (json.loads((run_dir / f).read_text()) for f in ("result.json", "metrics.json"))
            assert metrics["test/acc"] == pytest.approx(result["test_acc"], abs=1e-4) and metrics["best_val/acc"] == pytest.approx(result["best_val_acc"], abs=1e-4)
            # 1 epoch of the 20 training photos in batches of 4; the test's top-5 too, as mgff.fit records it
            assert (metrics["epochs"], metrics["global_step"], metrics["num_classes"], metrics["torch_threads"]) == (1, 5, 4, 1)
            assert metrics["best_checkpoint"] == str(run_dir / "best.ckpt") == metrics["tested_checkpoints"]["best"] and "test/acc5" in metrics
            assert metrics["fit_seconds"] > 0 and metrics["cpu_seconds"] > 0
    report = report_main([str(out)])
    groups = [line.split("|")[1:4] for line in report.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    assert len(groups) == 2 and all([c.strip() for c in cells[1:]] == ["2", "0 1"] for cells in groups) and "Skipped" not in report
    table = (out / "results.md").read_text()
    assert "| linear_best | 2 |" in table and "| mgff_best | 2 |" in table
    assert "mgff_best - linear_best:" in table and "seed 0,1;" in table
    # --report-only rebuilds the same rows from the seed folders without training
    capsys.readouterr()
    real_photos.main(args + ["--report-only", "--compare", "linear_best,mgff_best"])
    assert table.split("\n", 2)[2] == (out / "results.md").read_text().split("\n", 2)[2]


@pytest.mark.slow
def test_a_run_trains_what_mgff_fit_trains_with_its_recorded_command(source, tmp_path):
    """One way to build: ``python -m mgff.fit`` with the command in result.json (its folder moved) trains the same
    weights and tests the same top-1."""
    from mgff.fit import run as fit

    out = tmp_path / "out"
    real_photos.main(["--root", str(source.root), "--weights", str(source.weights), "--runs", "mgff_best", "--epochs", "1", "--seed", "0",
                      "--out", str(out), "--cache", str(tmp_path / "cache"), "--", *TINY])
    result = json.loads((out / "mgff_best" / "result.json").read_text())
    command = shlex.split(result["fit_command"])
    assert command[:5] == ["python", "-m", "mgff.fit", "--config", "experiments/lite0/single.yaml"]
    args = [a.replace("experiments/", str(real_photos.REPO_ROOT / "experiments") + "/", 1) if a.startswith("experiments/") else a for a in command[3:]]
    metrics = fit(args + real_photos.location_options(tmp_path / "fit" / "mgff_best", also_last=False))
    assert metrics["test/acc"] == pytest.approx(result["test_metrics"]["test/acc"], abs=1e-4)
    ours = torch.load(out / "mgff_best" / "best.ckpt", weights_only=True)["state_dict"]
    theirs = torch.load(tmp_path / "fit" / "mgff_best" / "best.ckpt", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_a_diverged_run_is_reported_not_tested(source, tmp_path, monkeypatch):
    blow_up = real_photos.held_back(real_photos.SINGLE, "lr 1e6", head="linear", lr=1e6, optimizer="adamw")
    monkeypatch.setitem(real_photos.RUNS, "blow_up", blow_up)
    out = tmp_path / "out"
    real_photos.main(["--root", str(source.root), "--weights", str(source.weights), "--runs", "blow_up", "--epochs", "2", "--seed", "0",
                      "--out", str(out), "--cache", str(tmp_path / "cache"), "--", *TINY])
    result = json.loads((out / "blow_up" / "result.json").read_text())
    assert "test_acc" not in result and "non-finite" in result["diverged"]
    assert not list((out / "blow_up").glob("*.ckpt")) and not (out / "blow_up" / "test_predictions.csv").exists()
    assert "diverged: seed 0" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_two_stage_run_records_each_stages_top1_and_the_last_epochs(source, tmp_path):
    out = tmp_path / "out"
    real_photos.main(["--root", str(source.root), "--weights", str(source.weights), "--runs", "ts_features_source", "--epochs", "2",
                      "--seed", "0", "--out", str(out), "--cache", str(tmp_path / "cache"), "--also-last",
                      "--", *TINY, "--model.init_args.crop_size=64", "--data.init_args.source_size=128"])
    run_dir = out / "ts_features_source"
    result = json.loads((run_dir / "result.json").read_text())
    metrics = result["test_metrics"]
    assert {"test/acc", "test/stage1_acc", "test/stage2_acc"} <= set(metrics)
    assert metrics["test/acc"] == pytest.approx(result["test_acc"], abs=1e-4)  # the test pass and its per-image rows agree
    assert 0 <= result["last_test_acc"] <= 1 and (run_dir / "last_epoch.ckpt").is_file()
    assert len(real_photos.load_rows(run_dir / "last_epoch_test_predictions.csv")) == 24
    # the best checkpoint's rows were not replaced by the last epoch's
    correct = [int(r["correct"]) for r in real_photos.load_rows(run_dir / "test_predictions.csv")]
    assert np.mean(correct) == pytest.approx(result["test_acc"], abs=1e-4)
