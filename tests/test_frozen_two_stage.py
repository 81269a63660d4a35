"""benchmarks/frozen_two_stage.py: the pooled head equals the linear head on the maps; the frozen boxes, crops and
controls are the two-stage model's own (the 224 map of stage 1, the 448 map of ``localize_size``, the crop of
``cut_crops``); the heads and averages over seeds become report run folders that pair with fine-tunes; bad
input is refused by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import frozen_two_stage as fts  # noqa: E402
from mgff.lit import TwoStageClassifier  # noqa: E402
from mgff.models.heads import LinearHead  # noqa: E402

# the config at 64 px with a 128 px source (maps 1280x2x2 and 4x4), so the benchmark takes seconds
TINY = ("--model.init_args.img_size=64", "--model.init_args.crop_size=64", "--data.init_args.resize_size=72",
        "--data.init_args.crop_size=64", "--data.init_args.source_size=128")


def args_for(root: Path, weights: Path, tmp_path: Path, *more: str) -> list[str]:
    return ["--root", str(root), "--weights", str(weights), "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *[f"--override={o}" for o in TINY], *more]


def test_the_pooled_head_is_the_linear_head_on_the_maps():
    torch.manual_seed(0)
    pooled = fts.PooledLinearHead(48, 5)
    with torch.no_grad():  # a non-trivial LayerNorm affine: it must commute with the mean over positions
        pooled.linear.norm.weight.uniform_(0.5, 2.0)
        pooled.linear.norm.bias.normal_()
    head = LinearHead([48], [32], 5)
    head.load_state_dict(pooled.linear.state_dict())
    maps = torch.randn(3, 48, 5, 6) * 3 + 1
    expected = head([maps]).logits
    got = pooled([fts.standardized_mean(maps, pooled.eps)]).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, pooled([maps.mean(dim=(2, 3))]).logits, atol=1e-3)  # plain pooling is not it


def test_boxes_and_crops_are_the_two_stage_models_own():
    torch.manual_seed(0)
    kwargs = dict(backbone="efficientnet_lite0", stages=[2, 3, 4], head="linear", num_classes=4, pretrained=False, img_size=64,
                  localization="features", crop_from="source", crop_size=64)
    model = TwoStageClassifier(**kwargs).eval()
    at_source = TwoStageClassifier(**kwargs, localize_size=128).eval()
    at_source.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    source = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        vectors, boxes = fts.photo_features(model, images, source)
        own224 = model.localize(images, source)
        own448 = at_source.localize(images, source)
        flipped = fts.flipped_features(model, images, source, boxes)
        last = lambda x: fts.standardized_mean(model.backbone(model.input_norm(x))[-1], model.head.norm.eps)  # noqa: E731
        whole = model.input_norm.data_from_unit(source.float() / 255)
        assert torch.equal(boxes["box224"], own224.boxes) and torch.equal(boxes["box448"], own448.boxes)
        assert not torch.equal(boxes["box224"], boxes["box448"])  # two maps, two boxes
        assert torch.allclose(vectors["crop224"], last(own224.crops), atol=1e-5) and torch.allclose(vectors["crop448"], last(own448.crops), atol=1e-5)
        assert torch.allclose(vectors["view"], last(images), atol=1e-5) and torch.allclose(vectors["whole448"], last(whole), atol=1e-5)
        assert torch.allclose(flipped["view"], last(images.flip(-1)), atol=1e-5)
        assert torch.allclose(flipped["crop448"], last(own448.crops.flip(-1)), atol=1e-5)
    assert {k: v.shape for k, v in vectors.items()} == {k: (2, 1280) for k in fts.FEATURES}


def test_every_head_over_two_seeds_as_report_runs(cub_root, weights, tmp_path):
    from mgff.report import main as report_main

    first = fts.main(args_for(cub_root, weights, tmp_path, "--seeds", "0,1", "--epochs", "2"))
    assert first["features"].source == "computed"
    results, out = first["results"], tmp_path / "out"
    assert set(results) == set(fts.HEADS)
    labels = first["features"].splits["test"]["labels"]
    for name, head in fts.HEADS.items():
        for seed in (0, 1):
            result, run_dir = results[name][seed], out / name / f"seed{seed}"
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert config["seed_everything"] == seed and config["probe"]["head"] == name and config["probe"]["runner"] == "frozen_two_stage"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert metrics["head_definition"]["features"] == list(head.features)
            assert metrics["test/acc"] == pytest.approx(result["test_acc"], abs=1e-4) and len(result["test_correct"]) == 24
            if head.average:  # the mean of its parts' probabilities
                parts = [results[p][seed]["test_probs"] for p in head.average]
                assert torch.allclose(result["test_probs"], sum(parts) / len(parts))
                assert result["test_correct"] == (result["test_probs"].argmax(-1) == labels).int().tolist()
    # the concatenated head reads 2 x 1280 features, the crop head 1280
    assert results["concat_box224"][0]["params"] > results["crop_box224"][0]["params"]
    table = (out / "results.md").read_text()
    assert all(f"| {name} | 2 |" in table for name in fts.HEADS) and "box224: mIoU" in table and "box448: mIoU" in table
    text = report_main([str(out), "--compare", "probe:head=view", "probe:head=avg_box224", "--samples", "500"])
    assert "**probe:head=avg_box224 - probe:head=view**" in text

    # the second run reads the cache; other sizes compute again
    second = fts.main(args_for(cub_root, weights, tmp_path, "--heads", "view", "--seeds", "0", "--epochs", "1"))
    assert second["features"].source == "disk" and set(second["results"]) == {"view"}
    third = fts.main(args_for(cub_root, weights, tmp_path, "--heads", "flip_avg", "--seeds", "0", "--epochs", "1",
                              "--override=--data.init_args.source_size=96"))
    assert third["features"].source == "computed" and list(third["results"]) == ["view", "flipped_view", "flip_avg"]


def test_the_heads_learn_on_features_that_carry_the_class():
    """Features that are the one-hot label plus noise are learnt well above chance (0.25) by every head."""
    torch.manual_seed(0)
    n, classes = {"train": 80, "val": 20, "test": 40}, 4

    def split(count):
        labels = torch.arange(count) % classes
        signal = torch.nn.functional.one_hot(labels, 16).float() * 5
        vectors = {f: signal + torch.randn(count, 16) for f in fts.FEATURES}
        return dict(as_is=vectors, flipped={f: v + 0.1 * torch.randn_like(v) for f, v in vectors.items()}, labels=labels,
                    boxes={}, gt_boxes=torch.zeros(count, 4), paths=[f"{i}.jpg" for i in range(count)])

    features = fts.Features({k: split(v) for k, v in n.items()}, {}, "computed", 0.0, 0.0, Path("x"), tuple("abcd"))
    results = fts.run_heads(features, ["avg_box224", "concat_box448"], [0], fts.Recipe(lr=1e-2, epochs=20), log=lambda *a, **k: None)
    assert {name: results[name][0]["test_acc"] > 0.75 for name in results} == dict.fromkeys(["view", "crop_box224", "avg_box224", "concat_box448"], True)


def test_a_missing_root_or_an_unknown_head_is_refused(tmp_path, weights):
    with pytest.raises(SystemExit, match="missing: --root"):
        fts.main(["--root", str(tmp_path / "nowhere"), "--weights", str(weights)])
    with pytest.raises(SystemExit, match="unknown head.*crop_box999.*known: view"):
        fts.main(["--heads", "view,crop_box999"])
    with pytest.raises(SystemExit, match="--epochs"):
        fts.main(["--epochs", "0", "--root", str(tmp_path), "--weights", str(weights)])
