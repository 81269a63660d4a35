"""The CLI end to end on tiny generated data: fit -> test -> metrics.json, predict -> CSV, bad configs
refused at start-up, a diverging run stopped, checkpoints used without their initial weights file and on
data listing the classes in another order, predictions for a folder of new photos."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from mgff.callbacks.nonfinite_loss import NonFiniteLossError, NonFiniteStateError
from mgff.cli import main as cli_main
from mgff.fit import run as fit_run
from mgff.lit import TwoStageClassifier
from mgff.predict_folder import main as predict_folder_main

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
    """The demo model fitted from a local pretrained weights file, which is then deleted: every later use
    of the checkpoint (predict, test, resume) must do without it."""
    tmp = tmp_path_factory.mktemp("fit")
    demo_backbone = yaml.safe_load(open(DEMO))["model"]["init_args"]
    weights = tmp / "initial_weights.safetensors"
    source = timm.create_model(demo_backbone["backbone"], num_classes=0, **demo_backbone["backbone_kwargs"])
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    metrics = fit_run(tiny_args(tmp, cub_root, "--model.init_args.pretrained", str(weights)))
    weights.unlink()
    return tmp, metrics


def checkpoint_of(fitted) -> Path:
    tmp, _ = fitted
    return tmp / "demo" / "version_0" / "checkpoints" / "last.ckpt"


def test_fit_tests_best_checkpoint_and_writes_metrics_json(fitted):
    tmp, metrics = fitted
    run_dir = tmp / "demo" / "version_0"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/acc", "test/acc5", "test/stage1_acc", "test/stage2_acc", "best_val/acc", "best_checkpoint", "epochs"} <= saved.keys()
    assert 0.0 <= saved["test/acc"] <= 1.0
    assert Path(saved["best_checkpoint"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()


def test_fit_writes_the_tests_per_image_predictions(fitted):
    tmp, metrics = fitted
    rows = list(csv.DictReader(open(tmp / "demo" / "version_0" / "test_predictions.csv")))
    assert len(rows) == 24 and len({r["index"] for r in rows}) == 24  # the whole test split, once each
    assert {"index", "path", "label", "label_name", "pred", "pred_name", "prob", "correct", "box_x1"} <= rows[0].keys()
    assert all(r["correct"] == str(int(r["pred"] == r["label"])) for r in rows)
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert not (tmp / "demo" / "version_0" / "predictions.csv").exists()  # predict's file is another one


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


def test_resume_and_test_without_the_initial_weights(fitted, cub_root, tmp_path, monkeypatch):
    tmp, _ = fitted
    gone = str(tmp / "initial_weights.safetensors")
    assert not Path(gone).exists()
    metrics = fit_run(tiny_args(tmp_path, cub_root, "--model.init_args.pretrained", gone, "--ckpt_path", str(checkpoint_of(fitted)), "--trainer.max_epochs", "2"))
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test/acc"] <= 1.0
    # a config with hub weights (every paper config) on an offline node
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(builder, "load_pretrained", no_network)
    cli_main(["test", *data_args(tmp_path, cub_root, "--model.init_args.pretrained", "true", "--ckpt_path", str(checkpoint_of(fitted)), "--trainer.limit_test_batches", "1")])


def test_nonfinite_loss_stops_the_run_without_checkpoint_or_metrics(cub_root, tmp_path, capsys):
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss nan .* at global step \d+ \(epoch 0, .*loss terms: ce1=nan, ce2=nan"):
        fit_run(tiny_args(tmp_path, cub_root, "--model.init_args.lr", "1e6", "--trainer.limit_train_batches", "6"))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))
    assert "no metrics.json written" in capsys.readouterr().out


def test_one_step_divergence_seen_only_by_validation_stops_before_any_checkpoint(cub_root, tmp_path, capsys):
    """The issue's case: one training step (batch 32 > the 21 training images) with a finite loss, after which
    AdamW with lr 1e6 leaves finite weights whose forward overflows: val/loss is NaN. Before the check the run
    saved best-epoch000-acc0.2500.ckpt and last.ckpt, tested them and wrote metrics.json."""
    with pytest.raises(NonFiniteStateError, match=r"^non-finite validation loss nan on rank 0 at the end of epoch 0's validation \(global step 1\); loss terms: ce1=nan, ce2=nan"):
        fit_run(tiny_args(tmp_path, cub_root, "--model.init_args.lr", "1000000", "--data.init_args.batch_size", "32"))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))
    assert "no metrics.json written" in capsys.readouterr().out


def test_nan_only_in_validation_stops_before_any_checkpoint(cub_root, tmp_path, monkeypatch):
    forward_outputs = TwoStageClassifier.forward_outputs

    def nan_in_validation(self, images, batch=None):
        logits, aux_loss, extras = forward_outputs(self, images, batch)
        if self.trainer.validating and not self.trainer.sanity_checking:  # training and the sanity check stay finite
            logits = {name: out * float("nan") for name, out in logits.items()}
        return logits, aux_loss, extras

    monkeypatch.setattr(TwoStageClassifier, "forward_outputs", nan_in_validation)
    with pytest.raises(NonFiniteStateError, match=r"^non-finite validation loss nan on rank 0 at the end of epoch 0's validation \(global step 2\); .*parameters and buffers finite"):
        fit_run(tiny_args(tmp_path, cub_root))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))


def test_unwritable_checkpoint_folder_fails_before_training(cub_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"checkpoint.dirpath = '.*a_file/ckpts' cannot be used as an output folder: .*a_file is a file"):
        fit_run(tiny_args(tmp_path, cub_root, "--checkpoint.dirpath", str(blocker / "ckpts")))
    assert not (tmp_path / "demo").exists()  # nothing ran: no run folder, no epoch


def test_stages_out_of_range_is_named_at_startup(cub_root, tmp_path):
    with pytest.raises(ValueError, match=r"^model.init_args.stages = \[2, 3, 9\] does not fit backbone 'resnet10t': .*out of range") as err:
        fit_run(tiny_args(tmp_path, cub_root, "--model.init_args.stages", "[2, 3, 9]"))
    assert "Union" not in str(err.value)  # not buried in jsonargparse's union message


def swapped_classes_copy(cub_root: Path, target: Path, name: str) -> Path:
    """The same images and labels, with class ``name`` and another class listed in the other order."""
    shutil.copytree(cub_root, target)
    names = dict(line.split(" ", 1) for line in (target / "classes.txt").read_text().splitlines())
    first = next(i for i, n in names.items() if n == name)
    other = next(i for i in names if i != first)
    swap = {first: other, other: first}
    (target / "classes.txt").write_text("".join(f"{i} {names[swap.get(i, i)]}\n" for i in sorted(names, key=int)))
    labels = [line.split() for line in (target / "image_class_labels.txt").read_text().splitlines()]
    (target / "image_class_labels.txt").write_text("".join(f"{i} {swap.get(c, c)}\n" for i, c in labels))
    return target


def test_predict_on_data_with_classes_in_another_order_names_the_same_classes(fitted, cub_root, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mgff"), "propagate", True)  # the CLI's setup_logging turns it off

    def predict(root: Path, out: Path) -> dict[str, dict[str, str]]:
        cli_main(["predict", *data_args(tmp_path, root, "--ckpt_path", str(checkpoint_of(fitted)), "--prediction_writer.output_dir", str(out))])
        return {row["path"]: row for row in csv.DictReader(open(out / "predictions.csv"))}

    original = predict(cub_root, tmp_path / "original")
    most_predicted = max({r["pred_name"] for r in original.values()}, key=[r["pred_name"] for r in original.values()].count)
    # the class the model predicts most moves in the data's order: its images must keep their predicted name
    swapped = predict(swapped_classes_copy(cub_root, tmp_path / "swapped" / "CUB_200_2011", most_predicted), tmp_path / "swapped")
    for path, row in original.items():
        assert swapped[path]["pred_name"] == row["pred_name"] and swapped[path]["prob"] == row["prob"]
        assert swapped[path]["label_name"] == row["label_name"]  # ground truth named as in the data
    assert "another order than the data's" in caplog.text


def photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_predict_folder_of_new_photos(fitted, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mgff"), "propagate", True)
    folder = tmp_path / "new photos"
    photo(folder / "field" / "day 1" / "IMG_0001.JPG", (200, 100), 0)
    photo(folder / "IMG_0002.png", (90, 120), 1)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not a photo: ignored")
    out = tmp_path / "out" / "predictions.csv"
    predict_folder_main(["--ckpt_path", str(checkpoint_of(fitted)), "--images", str(folder), "--output", str(out), "--top_k", "3", "--num_workers", "0"])
    rows = {row["path"]: row for row in csv.DictReader(open(out))}
    assert set(rows) == {"field/day 1/IMG_0001.JPG", "IMG_0002.png", "broken.jpg"}
    class_names = torch.load(checkpoint_of(fitted), weights_only=True)["hyper_parameters"]["class_names"]
    row = rows["field/day 1/IMG_0001.JPG"]
    assert {"top1_name", "top1_prob", "top3_name", "top3_prob", "error"} <= row.keys() and "top4_name" not in row
    assert {row[f"top{k}_name"] for k in (1, 2, 3)} <= set(class_names)
    probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001 and row["error"] == ""
    # the box in the photo's pixels: the input box (64 px centre crop of an 80 px square resize) mapped back
    box = [float(row[f"box_{c}"]) for c in ("x1", "y1", "x2", "y2")]
    photo_box = [float(row[f"photo_box_{c}"]) for c in ("x1", "y1", "x2", "y2")]
    expected = [(box[0] + 8) * 200 / 80, (box[1] + 8) * 100 / 80, (box[2] + 8) * 200 / 80, (box[3] + 8) * 100 / 80]
    assert photo_box == pytest.approx(expected, abs=0.11)
    assert 0 <= photo_box[0] < photo_box[2] <= 200 and 0 <= photo_box[1] < photo_box[3] <= 100
    assert rows["broken.jpg"]["top1_name"] == "" and "cannot decode image" in rows["broken.jpg"]["error"]
    assert "1 of 3 images could not be decoded" in caplog.text


def test_predict_folder_starts_no_more_loader_workers_than_usable_cpus(fitted, tmp_path, monkeypatch):
    import mgff.predict_folder as predict_folder_module

    monkeypatch.setattr(predict_folder_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    assert predict_folder_module.default_num_workers() == 4
    monkeypatch.setattr(predict_folder_module.os, "sched_getaffinity", lambda pid: {3}, raising=False)  # e.g. taskset -c 3
    assert predict_folder_module.default_num_workers() == 1
    built = []
    real = predict_folder_module.UnlabeledFolderDataModule
    monkeypatch.setattr(predict_folder_module, "UnlabeledFolderDataModule", lambda *a, **kw: built.append(kw["num_workers"]) or real(*a, **kw))
    photo(tmp_path / "photos" / "a.jpg", (80, 80), 0)
    predict_folder_main(["--ckpt_path", str(checkpoint_of(fitted)), "--images", str(tmp_path / "photos"), "--output", str(tmp_path / "p.csv")])
    assert built == [1] and len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 1


@pytest.mark.parametrize("crop_from, expected", [("auto", 128), ("source", 128), ("view", None)])
def test_predict_folder_gives_the_source_view_to_a_model_that_crops_from_it(fitted, tmp_path, monkeypatch, crop_from, expected):
    """A model trained with ``data.source_size`` and ``crop_from: auto`` (or ``source``) gets the same source view on
    new photos; one that crops from the view does not."""
    import mgff.predict_folder as predict_folder_module

    checkpoint = torch.load(checkpoint_of(fitted), weights_only=True)
    checkpoint["hyper_parameters"]["crop_from"] = crop_from
    checkpoint[predict_folder_module.EVAL_TRANSFORM_KEY]["source_size"] = 128
    ckpt = tmp_path / "with_source.ckpt"
    torch.save(checkpoint, ckpt)
    built = []
    real = predict_folder_module.UnlabeledFolderDataModule
    monkeypatch.setattr(predict_folder_module, "UnlabeledFolderDataModule", lambda *a, **kw: built.append(kw["source_size"]) or real(*a, **kw))
    photo(tmp_path / "photos" / "a.jpg", (120, 90), 0)
    out = tmp_path / "p.csv"
    predict_folder_main(["--ckpt_path", str(ckpt), "--images", str(tmp_path / "photos"), "--output", str(out), "--num_workers", "0"])
    assert built == [expected]
    row = next(csv.DictReader(open(out)))
    assert row["error"] == "" and 0 <= float(row["photo_box_x1"]) < float(row["photo_box_x2"]) <= 120
