"""The CLI end to end on tiny generated data: fit -> test -> metrics.json, predict -> CSV, bad configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from mgff.cli import main as cli_main
from mgff.fit import run as fit_run

DEMO = str(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml")


def data_args(tmp_path: Path, cub_root: Path, *extra: str) -> list[str]:
    """The demo config on the session's generated data, tiny batches, outputs under ``tmp_path``."""
    return [
        "--config", DEMO,
        "--data.class_path", "data_modules.CUB200DataModule",
        "--data.init_args.root", str(cub_root),
        "--data.init_args.resize_size", "80",
        "--data.init_args.crop_size", "64",
        "--data.init_args.batch_size", "8",
        "--data.init_args.num_workers", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        *extra,
    ]


def tiny_args(tmp_path: Path, cub_root: Path, *extra: str) -> list[str]:
    """:func:`data_args` shrunk to two training steps."""
    limits = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]
    return data_args(tmp_path, cub_root, *limits, *extra)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, cub_root):
    tmp = tmp_path_factory.mktemp("fit")
    metrics = fit_run(tiny_args(tmp, cub_root))
    return tmp, metrics


def test_fit_tests_best_checkpoint_and_writes_metrics_json(fitted):
    tmp, metrics = fitted
    run_dir = tmp / "demo" / "version_0"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/acc", "test/acc5", "test/stage1_acc", "test/stage2_acc", "best_val/acc", "best_checkpoint", "epochs"} <= saved.keys()
    assert 0.0 <= saved["test/acc"] <= 1.0
    assert Path(saved["best_checkpoint"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()


def test_num_classes_linked_from_data(fitted):
    tmp, _ = fitted
    ckpt = torch.load(tmp / "demo" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["num_classes"] == 4 and len(hp["class_names"]) == 4


def test_predict_writes_csv(fitted, cub_root, tmp_path):
    tmp, _ = fitted
    ckpt = tmp / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "pred"
    cli_main(["predict", *data_args(tmp_path, cub_root, "--ckpt_path", str(ckpt), "--prediction_writer.output_dir", str(out))])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 24  # the whole test split, once each
    assert rows[0]["path"].startswith("images/") and rows[0]["pred_name"].endswith("_Bird")
    assert 0.0 < float(rows[0]["prob"]) <= 1.0
    x1, y1, x2, y2 = (float(rows[0][k]) for k in ("box_x1", "box_y1", "box_x2", "box_y2"))
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64  # the cropper's box, in input pixels


def test_print_config_lists_linked_model(cub_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit_run(tiny_args(tmp_path, cub_root, "--print_config"))
    out = capsys.readouterr().out
    assert "class_path: mgff.lit.TwoStageClassifier" in out and "fusion_dim: 64" in out
    model_args = yaml.safe_load(open(DEMO))["model"]["init_args"]
    assert "num_classes" not in model_args and "class_names" not in model_args  # linked from the data


def test_wrong_config_value_is_named(cub_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit_run(tiny_args(tmp_path, cub_root, "--model.init_args.head", "transformer"))
    assert "head" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(fitted, cub_root, tmp_path):
    tmp, _ = fitted
    ckpt = tmp / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"head: checkpoint 'mgff' vs this model 'linear'"):
        fit_run(tiny_args(tmp_path, cub_root, "--model.init_args.head", "linear", "--ckpt_path", str(ckpt)))
