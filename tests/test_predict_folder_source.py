"""``python -m mgff.predict_folder`` on a checkpoint of a two-stage model trained with ``data.source_size``
(stage 2 cuts its crops from the source view): the run's own test photos, put in a folder of class-named
subfolders, get exactly the run's test predictions and accuracy from the checkpoint alone; a checkpoint
without the record takes ``--source_size``, and one that needs a source and has none is refused.

One tiny sweep-trained fit on generated data (two steps, CPU: the module runs in about 20 s on one core), shared by the module."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mgff.predict_folder as predict_folder_module
from mgff.callbacks.eval_transform import EVAL_TRANSFORM_KEY, EvalTransformInCheckpoint
from mgff.predict_folder import main as predict_folder_main
from mgff.sweep import main as sweep_main

DEMO = str(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml")
RESIZE, CROP, SOURCE = 80, 64, 128


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """The demo's two-stage model (``crop_from: auto``) trained by ``python -m mgff.sweep`` (one seed, as a
    researcher's sweep trains it) for two steps on generated CUB-layout data with ``data.source_size: 128`` (twice
    the 64 px input); the generated data goes under a private ``$MGFF_CACHE_DIR``."""
    tmp = tmp_path_factory.mktemp("source_fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MGFF_CACHE_DIR", str(tmp / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        status = sweep_main([
            "--configs", DEMO, "--seeds", "0", "--out", str(tmp / "sweep"), "--workers", "0", "--",
            "--data.init_args.num_classes", "4",
            "--data.init_args.images_per_class", "10",  # 5 test photos per class
            "--data.init_args.min_side", "96",
            "--data.init_args.max_side", "128",
            "--data.init_args.resize_size", str(RESIZE),
            "--data.init_args.crop_size", str(CROP),
            "--data.init_args.source_size", str(SOURCE),
            "--data.init_args.batch_size", "8",
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false",
        ])
    assert status == 0
    run_dir = tmp / "sweep" / "demo" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (data_root,) = (tmp / "cache" / "synthetic").glob("cub-*/CUB_200_2011")
    return SimpleNamespace(tmp=tmp, run_dir=run_dir, metrics=metrics, ckpt=Path(metrics["best_checkpoint"]), data_root=data_root)


def read_table(path: Path) -> dict[int, str]:
    """A CUB metadata file ``<id> <value>`` -> ``{id: value}``."""
    return {int(i): v for i, v in (line.split(" ", 1) for line in path.read_text().splitlines() if line.strip())}


@pytest.fixture(scope="module")
def test_photos(source_run, tmp_path_factory) -> Path:
    """The generated dataset's test photos (labels and split from its metadata, not from the run), copied into
    ``<class name>/<file>`` folders."""
    root = source_run.data_root
    images, labels = read_table(root / "images.txt"), read_table(root / "image_class_labels.txt")
    is_train, classes = read_table(root / "train_test_split.txt"), read_table(root / "classes.txt")
    folder = tmp_path_factory.mktemp("test_photos")
    for image_id, rel in images.items():
        if is_train[image_id] == "0":
            target = folder / classes[int(labels[image_id])] / Path(rel).name  # CUB's class names: "001.Crimson_Patched_Bird"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(root / "images" / rel, target)
    return folder


def predict(ckpt: Path, images: Path, out: Path, *extra: str) -> dict[str, dict[str, str]]:
    predict_folder_main(["--ckpt_path", str(ckpt), "--images", str(images), "--output", str(out), "--num_workers", "0",
                         "--batch_size", "8", "--accelerator", "cpu", *extra])
    return {row["path"]: row for row in csv.DictReader(open(out))}


def run_predictions(source_run) -> dict[str, dict[str, str]]:
    """The run's final test, per photo, keyed by ``<class name>/<file>`` as :func:`test_photos` lays them out."""
    rows = csv.DictReader(open(source_run.run_dir / "test_predictions.csv"))
    return {f"{row['label_name']}/{Path(row['path']).name}": row for row in rows}


def resaved(source_run, tmp_path: Path, *, record: bool = True, crop_from: str | None = None) -> Path:
    """The run's checkpoint saved again, optionally without its evaluation-transform record (as one written
    before mgff recorded it) and with another ``crop_from``."""
    checkpoint = torch.load(source_run.ckpt, map_location="cpu", weights_only=True)
    if not record:
        del checkpoint[EVAL_TRANSFORM_KEY]
    if crop_from is not None:
        checkpoint["hyper_parameters"]["crop_from"] = crop_from
    path = tmp_path / "resaved.ckpt"
    torch.save(checkpoint, path)
    return path


def prob_of(row: dict[str, str], name: str) -> float:
    """The probability a predict_folder row gives class ``name`` (all 4 classes are in its top 5)."""
    return next(float(row[f"top{k}_prob"]) for k in range(1, 5) if row[f"top{k}_name"] == name)


def assert_same_as_the_run(rows: dict[str, dict[str, str]], source_run) -> None:
    expected = run_predictions(source_run)
    assert set(rows) == set(expected)
    for path, row in rows.items():
        assert row["error"] == ""
        assert row["top1_name"] == expected[path]["pred_name"], path
        assert float(row["top1_prob"]) == pytest.approx(float(expected[path]["prob"]), abs=1e-5), path


def test_the_checkpoint_records_the_source_size(source_run):
    checkpoint = torch.load(source_run.ckpt, map_location="cpu", weights_only=True)
    record = checkpoint[EVAL_TRANSFORM_KEY]
    assert record["resize_size"] == RESIZE and record["crop_size"] == CROP and record["source_size"] == SOURCE
    assert len(record["mean"]) == 3 and len(record["std"]) == 3
    assert checkpoint["hyper_parameters"]["crop_from"] == "auto"


def test_no_source_view_is_recorded_as_none():
    """A run without a source view says so (``source_size: None``), so that predict_folder knows a
    ``crop_from: auto`` model cropped from the view; fields a DataModule lacks are left out."""
    datamodule = SimpleNamespace(resize_size=80, crop_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), source_size=None)
    checkpoint: dict = {}
    EvalTransformInCheckpoint().on_save_checkpoint(SimpleNamespace(datamodule=datamodule), None, checkpoint)
    assert checkpoint[EVAL_TRANSFORM_KEY] == {"resize_size": 80, "crop_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "source_size": None}
    checkpoint = {}
    EvalTransformInCheckpoint().on_save_checkpoint(SimpleNamespace(datamodule=SimpleNamespace(crop_size=64)), None, checkpoint)
    assert checkpoint[EVAL_TRANSFORM_KEY] == {"crop_size": 64}
    checkpoint = {}
    EvalTransformInCheckpoint().on_save_checkpoint(SimpleNamespace(datamodule=None), None, checkpoint)
    assert checkpoint == {}


def test_the_runs_test_photos_get_its_test_predictions_and_accuracy(source_run, test_photos, tmp_path, monkeypatch):
    built = []
    real = predict_folder_module.UnlabeledFolderDataModule
    monkeypatch.setattr(predict_folder_module, "UnlabeledFolderDataModule", lambda *a, **kw: built.append(kw["source_size"]) or real(*a, **kw))
    rows = predict(source_run.ckpt, test_photos, tmp_path / "p.csv")
    assert built == [SOURCE]
    assert len(rows) == 20
    correct = sum(row["top1_name"] == path.split("/")[0] for path, row in rows.items())
    saved = json.loads((source_run.run_dir / "metrics.json").read_text())
    assert correct / len(rows) == pytest.approx(saved["test/acc"], abs=1e-6)  # k / 20 in float32
    assert correct == round(saved["test/acc"] * len(rows))
    assert_same_as_the_run(rows, source_run)


@pytest.mark.parametrize("crop_from", ["auto", "source"])
def test_a_checkpoint_without_the_record_takes_source_size(source_run, test_photos, tmp_path, crop_from):
    ckpt = resaved(source_run, tmp_path, record=False, crop_from=crop_from)
    sizes = ["--resize_size", str(RESIZE), "--crop_size", str(CROP)]
    rows = predict(ckpt, test_photos, tmp_path / "p.csv", *sizes, "--source_size", str(SOURCE))
    assert_same_as_the_run(rows, source_run)


def test_a_model_that_crops_from_the_source_without_one_is_refused(source_run, test_photos, tmp_path):
    ckpt = resaved(source_run, tmp_path, record=False, crop_from="source")
    with pytest.raises(ValueError) as err:
        predict(ckpt, test_photos, tmp_path / "p.csv", "--resize_size", str(RESIZE), "--crop_size", str(CROP))
    assert str(ckpt) in str(err.value) and "--source_size" in str(err.value) and "crop_from='source'" in str(err.value)
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(ValueError, match="--resize_size and --crop_size \\(and --source_size"):
        predict(ckpt, test_photos, tmp_path / "p.csv")


def test_auto_without_the_record_crops_from_the_view_and_says_so(source_run, test_photos, tmp_path, caplog, monkeypatch):
    """As before the option: the photos are predicted (from the view, so not as in the run), with a warning
    naming the checkpoint and ``--source_size``."""
    monkeypatch.setattr(logging.getLogger("mgff"), "propagate", True)
    ckpt = resaved(source_run, tmp_path, record=False)
    rows = predict(ckpt, test_photos, tmp_path / "p.csv", "--resize_size", str(RESIZE), "--crop_size", str(CROP))
    assert f"{ckpt} does not record whether its training run had a source view" in caplog.text and "--source_size" in caplog.text
    expected = run_predictions(source_run)
    assert all(row["error"] == "" for row in rows.values())
    # stage 2 saw other crops: the probabilities are not the run's (so the comparisons above see the source)
    assert max(abs(prob_of(row, expected[p]["pred_name"]) - float(expected[p]["prob"])) for p, row in rows.items()) > 1e-3


def test_source_size_overrides_the_record(source_run, test_photos, tmp_path, monkeypatch):
    built = []
    real = predict_folder_module.UnlabeledFolderDataModule
    monkeypatch.setattr(predict_folder_module, "UnlabeledFolderDataModule", lambda *a, **kw: built.append(kw["source_size"]) or real(*a, **kw))
    rows = predict(source_run.ckpt, test_photos, tmp_path / "p.csv", "--source_size", "96")
    assert built == [96] and len(rows) == 20 and all(row["error"] == "" for row in rows.values())
    with pytest.raises(ValueError, match=r"--source_size \(32\) must be at least the crop size \(64\)"):
        predict(source_run.ckpt, test_photos, tmp_path / "p.csv", "--source_size", "32")


def test_source_size_is_ignored_by_a_model_that_crops_from_the_view(source_run, test_photos, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mgff"), "propagate", True)
    built = []
    real = predict_folder_module.UnlabeledFolderDataModule
    monkeypatch.setattr(predict_folder_module, "UnlabeledFolderDataModule", lambda *a, **kw: built.append(kw["source_size"]) or real(*a, **kw))
    ckpt = resaved(source_run, tmp_path, crop_from="view")
    rows = predict(ckpt, test_photos, tmp_path / "p.csv", "--source_size", str(SOURCE))
    assert built == [None] and len(rows) == 20
    assert "--source_size 128 ignored" in caplog.text
