"""benchmarks/head_probe.py: the frozen backbone's maps are computed once and read back from the disk cache (a changed
input computes them again); every head trains over the seeds and is reported; the reported test top-1 is that of the
best-validation epoch; every head and seed is a run folder that ``mgff.report`` groups by head and pairs, image by
image, with an ``mgff.fit`` fine-tune of the same photos; a missing root is refused by name."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import head_probe, real_data, real_photos  # noqa: E402


def at_side(side: int, resize: int) -> real_photos.Run:
    """The probe's run with its data and model at ``side`` px."""
    return real_photos.RUNS["linear_best"].with_overrides(*real_photos.data_options(resize_size=resize, crop_size=side),
                                                          *real_photos.model_options(img_size=side))


@pytest.fixture
def tiny_inputs(monkeypatch):
    """The runner's data and model at 64 px (maps 40x8x8, 112x4x4, 1280x2x2), so the probe takes seconds."""
    monkeypatch.setattr(head_probe, "PROBE_RUN", at_side(64, 72))


def probe_args(root: Path, weights: Path, tmp_path: Path, *more: str) -> list[str]:
    return ["--root", str(root), "--weights", str(weights), "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *more]


def test_every_head_over_two_seeds_with_the_maps_computed_once(tiny_inputs, cub_root, weights, tmp_path, monkeypatch):
    computed = []
    compute = head_probe.compute_maps
    monkeypatch.setattr(head_probe, "compute_maps", lambda model, data: computed.append(1) or compute(model, data))
    first = head_probe.main(probe_args(cub_root, weights, tmp_path, "--heads", ",".join(head_probe.HEADS), "--epochs", "2", "--seeds", "0,1"))
    assert len(computed) == 1 and first["maps"]["source"] == "computed"
    # the generated CUB: 4 classes x 12 photos, half for training, of which 20 % (1 per class) for validation
    splits = {name: (s.num_images, s.views) for name, s in head_probe.load_or_compute_maps(real_data.RealData(cub_root, weights), tmp_path / "cache")[0].splits.items()}
    assert splits == {"train": (20, 2), "val": (4, 1), "test": (24, 1)} and len(computed) == 1
    cache_files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cache_files) == 1 and cache_files[0].parent == real_data.RealData(cub_root).cache_dir(tmp_path / "cache")
    assert all(m.dtype == torch.float16 for s in torch.load(cache_files[0], weights_only=True)["splits"].values() for m in s["maps"])

    table = (tmp_path / "out" / "results.md").read_text()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in head_probe.HEADS:
        assert f"| {name} | 2 |" in table
        assert sorted(saved["results"][name]) == ["0", "1"]
        for result in saved["results"][name].values():
            assert len(result["val_acc"]) == 2 and result["best_epoch"] == 1 + result["val_acc"].index(max(result["val_acc"]))
            assert len(result["test_correct"]) == 24 and result["test_acc"] == pytest.approx(sum(result["test_correct"]) / 24, abs=1e-4)
    assert "| linear | 2 |" in table and "vs linear" in table and "maps" in table.lower()
    # the control head reads the last map alone: its fused path has one align conv, not three
    assert saved["results"]["fused_last_map"]["0"]["params"] < saved["results"]["multiscale_linear"]["0"]["params"]
    assert table.count("[") >= len(head_probe.HEADS) - 1  # every head but linear has its interval against linear

    # a second run reads the disk cache instead of computing
    second = head_probe.main(probe_args(cub_root, weights, tmp_path, "--heads", "linear", "--epochs", "1", "--seeds", "0"))
    assert len(computed) == 1 and second["maps"]["source"] == "disk"
    assert "read from the disk cache" in (tmp_path / "out" / "results.md").read_text()
    # another image size or other weights: other maps, computed again into their own file
    monkeypatch.setattr(head_probe, "PROBE_RUN", at_side(56, 72))
    third = head_probe.main(probe_args(cub_root, weights, tmp_path, "--heads", "linear", "--epochs", "1", "--seeds", "0"))
    assert len(computed) == 2 and third["maps"]["source"] == "computed" and len(list((tmp_path / "cache").rglob("*.pt"))) == 2


def test_the_reported_test_accuracy_is_that_of_the_best_validation_epoch(monkeypatch):
    """Known answer: validation top-1 per epoch 0.25, 0.75, 0.5, 0.75 -> epoch 2 (the first of the best), whose test
    top-1 was 0.5 (the last epoch's was 1.0, the best test 1.0)."""
    val_script, test_script = [0.25, 0.75, 0.5, 0.75], [0.0, 0.5, 0.25, 1.0]
    fingerprints: list[float] = []  # the head's weights at each epoch's validation

    def scripted_predict(head, split, batch_size=head_probe.EVAL_BATCH):
        fingerprint = head.classifier.weight.detach().double().sum().item()
        if split.name == "val":
            fingerprints.append(fingerprint)
            accuracy = val_script[len(fingerprints) - 1]
        else:  # which epoch's weights are being tested
            accuracy = test_script[fingerprints.index(fingerprint)]
        n = split.num_images
        right = torch.arange(n) < round(accuracy * n)
        labels = split.labels[:n]
        return torch.nn.functional.one_hot(torch.where(right, labels, 1 - labels), 2).float()  # 2 classes

    monkeypatch.setattr(head_probe, "predict", scripted_predict)
    torch.manual_seed(0)
    maps = lambda n, views: [torch.randn(views * n, 8, 4, 4).half(), torch.randn(views * n, 16, 2, 2).half()]  # noqa: E731
    splits = {
        "train": head_probe.MapSplit("train", maps(8, 2), torch.arange(8).remainder(2).repeat(2), views=2),
        "val": head_probe.MapSplit("val", maps(4, 1), torch.tensor([0, 1, 0, 1])),
        "test": head_probe.MapSplit("test", maps(4, 1), torch.tensor([0, 1, 0, 1])),
    }
    from mgff.models.heads import LinearHead

    class Model(torch.nn.Module):  # what train_head uses of the classifier: its head and its loss
        def __init__(self):
            super().__init__()
            self.head = LinearHead([8, 16], [2, 4], 2)

        def loss_terms(self, logits, aux_loss, labels):
            return {"ce": torch.nn.functional.cross_entropy(logits["main"], labels)}

    result = head_probe.train_head(Model(), splits, head_probe.Recipe(epochs=4, batch_size=4, lr=0.05), seed=0)
    assert len(set(fingerprints)) == 4  # the weights moved every epoch, so each test call names one epoch
    assert result["val_acc"] == val_script and result["best_epoch"] == 2
    assert result["best_val_acc"] == 0.75 and result["test_acc"] == 0.5
    metrics = result["fit_metrics"]  # the run folder's metrics.json: mgff.fit's names
    assert (metrics["test/acc"], metrics["best_val/acc"], metrics["best_epoch"], metrics["epochs"]) == (0.5, 0.75, 2, 4)
    assert metrics["global_step"] == 4 * 2 and metrics["num_classes"] == 2 and result["test_probs"].shape == (4, 2)


def test_a_missing_root_or_unknown_head_is_refused(tmp_path, weights):
    with pytest.raises(SystemExit, match=r"--root .*nowhere"):
        head_probe.main(["--root", str(tmp_path / "nowhere"), "--weights", str(weights), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="unknown head.*mgff_wide.*known: linear"):
        head_probe.parse_heads("linear,mgff_wide")
    assert not (tmp_path / "out").exists()


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(text: str) -> dict[str, list[str]]:
    """``{group label: cells}`` of the table ``mgff.report`` prints."""
    return {cells[0]: cells for line in text.splitlines() if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])[0] != "group"}


@pytest.mark.slow
def test_run_folders_are_report_runs_paired_image_by_image_with_a_fine_tune_of_the_same_photos(tiny_inputs, cub_root, weights, tmp_path):
    from mgff.fit import run as fit_run
    from mgff.report import main as report_main, read_run, val_acc_by_epoch
    from mgff.stats import pooled_paired_bootstrap

    head_probe.main(probe_args(cub_root, weights, tmp_path, "--heads", "linear,fused_last_map", "--epochs", "2", "--seeds", "0,1"))
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())["results"]
    for name in ("linear", "fused_last_map"):
        for seed in (0, 1):
            run_dir = out / name / f"seed{seed}"
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert config["seed_everything"] == seed and config["probe"]["head"] == name
            assert config["probe"]["head_overrides"] == head_probe.HEADS[name].overrides and config["probe"]["recipe"]["epochs"] == 2
            assert config["probe"]["maps"]["root"] == str(cub_root.resolve()) and config["probe"]["maps"]["mean"] == [0.5] * 3
            metrics = json.loads((run_dir / "metrics.json").read_text())
            result = saved[name][str(seed)]
            # 20 training photos, batch 64: one step per epoch
            assert (metrics["epochs"], metrics["global_step"], metrics["num_classes"], metrics["best_checkpoint"]) == (2, 2, 4, None)
            assert metrics["test/acc"] == pytest.approx(result["test_acc"], abs=1e-4) and metrics["best_val/acc"] == pytest.approx(result["best_val_acc"], abs=1e-4)
            assert metrics["cpu_seconds"] >= 0 and metrics["fit_seconds"] >= 0 and metrics["best_epoch"] == result["best_epoch"]
            rows = read_rows(run_dir / "test_predictions.csv")
            assert [int(r["correct"]) for r in rows] == result["test_correct"] and [int(r["index"]) for r in rows] == list(range(24))
            assert sum(int(r["correct"]) for r in rows) / 24 == metrics["test/acc"]
            assert val_acc_by_epoch(read_run(run_dir)) == dict(enumerate(result["val_acc"]))  # metrics.csv, for --plot

    # a fine-tune of the same photos: the probe's own run (backbone, data, split) through mgff.fit, seed 0, read through
    # the runner's resized cache (other files, the same relative paths)
    source = real_data.RealData(cub_root, weights, (0.5,) * 3, (0.5,) * 3)
    fit_dir = tmp_path / "sweep" / "linear_best" / "seed0"
    # its best-validation checkpoint tested, as the probe tests its best-validation epoch (recipe.yaml tests the last)
    fit_run(real_photos.training_args(head_probe.PROBE_RUN, fit_dir, source, tmp_path / "resized", seed=0, epochs=1, extra=["--test_checkpoints=[best]"]))
    probe_rows, fit_rows = read_rows(out / "linear" / "seed0" / "test_predictions.csv"), read_rows(fit_dir / "test_predictions.csv")
    assert list(probe_rows[0]) == list(fit_rows[0])  # the same columns, top-4 of the 4 classes included
    assert [(r["index"], r["path"], r["label"], r["label_name"]) for r in probe_rows] == [(r["index"], r["path"], r["label"], r["label_name"]) for r in fit_rows]

    text = report_main([str(out), str(tmp_path / "sweep"), "--compare", "probe:head=linear", "fit", "--samples", "2000"])
    rows = table_rows(text)
    assert set(rows) == {"probe:head=linear", "probe:head=fused_last_map", "fit"} and "Skipped" not in text
    assert rows["probe:head=linear"][1:3] == ["2", "0 1"] and rows["probe:head=fused_last_map"][1:3] == ["2", "0 1"] and rows["fit"][1:3] == ["1", "0"]
    correct = lambda rows: np.array([r["correct"] == "1" for r in rows])  # noqa: E731  (both in index order)
    diff, low, high = pooled_paired_bootstrap([(correct(probe_rows), correct(fit_rows))], samples=2000, seed=0)
    assert (f"**fit - probe:head=linear**: test/acc {diff:+.4f}, pooled paired bootstrap 95 % interval [{low:+.4f}, {high:+.4f}] "
            "(1 seed pair: 0; 24 test images; 2000 resamples)") in text
    assert "seed 1 of probe:head=linear has no run in the other group" in text

    # known answer: a fine-tune whose every test image is right or wrong as the probe's (its rows in reverse order) differs
    # by 0, and every resample too, since the pairs are made by image, not by row
    same = tmp_path / "same" / "seed0"
    shutil.copytree(fit_dir, same)
    with open(same / "test_predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(probe_rows[0]))
        writer.writeheader()
        writer.writerows(probe_rows[::-1])
    assert 0 < correct(probe_rows).sum() < 24 and not np.array_equal(correct(probe_rows), correct(probe_rows[::-1]))
    text = report_main([str(out / "linear"), str(tmp_path / "same"), "--compare", "probe", "fit", "--samples", "2000"])
    assert set(table_rows(text)) == {"probe", "fit"}  # one group each
    assert "**fit - probe**: test/acc +0.0000, pooled paired bootstrap 95 % interval [+0.0000, +0.0000] (1 seed pair: 0; 24 test images" in text
