"""experiments/*.yaml: every dataset config, alone and with each stackable variant, parses through the CLI;
one model of each kind (paper, tuned, each ablation) is built with a tiny backbone and runs a forward.

Parsing checks every key against the classes' signatures (a typo or a key of a removed argument fails).
Building Swin-B + ViT-B for every stack would not fit the test budget, so the instantiated models keep
each config's structure (taps, head switches, stages, localiser) with tiny widths and 96 px inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mgff.cli import MGFFCLI

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DATASETS = ["cub", "nabirds", "cars", "pets"]
VARIANTS = [None, "tuned.yaml"] + [f"ablation/{p.name}" for p in sorted((EXPERIMENTS / "ablation").glob("*.yaml"))] + [
    f"backbones/{p.name}" for p in sorted((EXPERIMENTS / "backbones").glob("*.yaml"))
]
TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 6}
TINY_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 2}


class ParseOnlyCLI(MGFFCLI):
    """The project's CLI without building anything: ``self.config`` is the parsed, type-checked config."""

    def instantiate_classes(self) -> None:
        pass


def stack(dataset: str, variant: str | None) -> list[str]:
    args = ["--config", str(EXPERIMENTS / f"{dataset}.yaml")]
    return args + (["--config", str(EXPERIMENTS / variant)] if variant else [])


@pytest.fixture(scope="module")
def parse():
    """``parse(dataset, variant) -> dict``: the CLI's parser, built once (building it is the slow part)."""
    cli = ParseOnlyCLI(run=False, args=stack("cub", None))

    def run(dataset: str, variant: str | None) -> dict:
        return cli.parser.parse_args(stack(dataset, variant)).as_dict()

    return run


def test_every_stacked_config_parses(parse):
    for dataset in DATASETS:
        for variant in VARIANTS:
            config = parse(dataset, variant)
            assert config["model"]["class_path"] in ("mgff.lit.TwoStageClassifier", "mgff.lit.FineGrainedClassifier"), variant
            assert config["data"]["init_args"]["crop_size"] == 384


def test_a_wrong_key_in_a_config_is_refused(parse, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    fusion_dimm: 3\n")
    with pytest.raises(SystemExit):
        parse("cub", str(bad))


def test_dataset_configs_state_the_papers_recipe(parse):
    for dataset in DATASETS:
        config = parse(dataset, None)
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        assert (model["optimizer"], model["momentum"], model["lr"]) == ("sgd", 0.99, 2e-4), dataset
        assert (model["scheduler_interval"], model["head_lr_scale"], model["warmup_epochs"]) == ("epoch", 1.0, 0), dataset
        assert (model["fusion_dim"], model["align_last"], list(model["stages"]), list(model["stage_inputs"])) == (1024, False, [3], [1, 2, 3])
        assert config["trainer"]["max_epochs"] == 50 and (data["resize_size"], data["crop_size"]) == (512, 384)


def test_tuned_variant_changes_only_the_recipe(parse):
    base = parse("cub", None)["model"]["init_args"]
    tuned = parse("cub", "tuned.yaml")["model"]["init_args"]
    changed = {k for k in base if base[k] != tuned[k]}
    assert changed == {
        "backbone_kwargs", "stages", "stage_inputs", "fusion_dim", "align_last", "momentum", "head_lr_scale",
        "fusion_lr_scale", "warmup_epochs", "scheduler_interval", "cropper", "localize_size", "localization",
    }
    # stage 2 cuts its crop from a 2x source view (crop_from: auto, the default, uses the batch's source)
    base_data, tuned_data = parse("cub", None)["data"]["init_args"], parse("cub", "tuned.yaml")["data"]["init_args"]
    assert {k for k in base_data if base_data[k] != tuned_data[k]} == {"source_size"}
    assert (base_data["source_size"], tuned_data["source_size"], tuned["crop_from"]) == (None, 768, "auto")


def test_the_single_stage_ablation_drops_only_the_source_view_and_the_second_stage(parse):
    """Stacked on a two-stage config that crops from a source view, the single-stage ablation keeps every data
    setting but the source view (only stage 2 reads it) and every shared model setting."""
    full, single = parse("lite0/full", None), parse("lite0/full", "ablation/single_stage.yaml")
    full_data, single_data = full["data"]["init_args"], single["data"]["init_args"]
    assert (full_data["source_size"], single_data["source_size"]) == (448, None)
    assert {k: v for k, v in full_data.items() if k != "source_size"} == {k: v for k, v in single_data.items() if k != "source_size"}
    assert single["model"]["class_path"] == "mgff.lit.FineGrainedClassifier"
    full_model, single_model = full["model"]["init_args"], single["model"]["init_args"]
    assert {k: full_model[k] for k in single_model} == single_model  # the stage classifier's settings, unchanged


# kind -> (variant, what the built model must show)
KINDS = {
    "paper": (None, dict(two_stage=True, head="MGFFHead", attention=True, se=True, gcn=True, maps=4)),
    "no_residual": ("ablation/no_residual.yaml", dict(two_stage=True, head="MGFFHead", attention=True, se=True, gcn=True, maps=4, residual=False)),
    "tuned": ("tuned.yaml", dict(two_stage=True, head="MGFFHead", attention=True, se=True, gcn=True, maps=3)),
    "no_attention": ("ablation/no_attention.yaml", dict(two_stage=True, head="MGFFHead", attention=False, se=True, gcn=True, maps=4)),
    "no_se": ("ablation/no_se.yaml", dict(two_stage=True, head="MGFFHead", attention=True, se=False, gcn=True, maps=4)),
    "no_gcn": ("ablation/no_gcn.yaml", dict(two_stage=True, head="MGFFHead", attention=True, se=True, gcn=False, maps=4)),
    "single_stage": ("ablation/single_stage.yaml", dict(two_stage=False, head="MGFFHead", attention=True, se=True, gcn=True, maps=4)),
    "linear_baseline": ("ablation/linear_baseline.yaml", dict(two_stage=False, head="LinearHead", maps=1)),
}


def test_every_ablation_config_is_a_kind():
    assert {f"ablation/{p.name}" for p in (EXPERIMENTS / "ablation").glob("*.yaml")} == {
        v for v, _ in KINDS.values() if v and v.startswith("ablation/")
    }


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_builds_with_a_tiny_backbone_and_runs(kind, cub_root, tmp_path):
    variant, expect = KINDS[kind]
    torch.manual_seed(0)
    tiny = [
        "--model.init_args.pretrained", "false",
        "--model.init_args.img_size", "96",
        "--model.init_args.backbone_kwargs", json.dumps(TINY_SWIN),
        "--data.init_args.root", str(cub_root),
        "--data.init_args.resize_size", "112",
        "--data.init_args.crop_size", "96",
        "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.precision", "32-true",
    ]
    if kind != "tuned" and expect["head"] == "MGFFHead":
        tiny += ["--model.init_args.fusion_dim", "128", "--model.init_args.num_heads", "4"]  # = the tiny Swin's last width
    if expect["two_stage"]:
        tiny += [
            "--model.init_args.cropper_pretrained", "false",
            "--model.init_args.cropper_kwargs", json.dumps(TINY_VIT),
            "--model.init_args.localize_size", "96",
            "--model.init_args.crop_size", "96",
        ]
    cli = MGFFCLI(run=False, args=stack("cub", variant) + tiny)
    model = cli.model
    assert type(model).__name__ == ("TwoStageClassifier" if expect["two_stage"] else "FineGrainedClassifier")
    head = model.head
    assert type(head).__name__ == expect["head"]
    assert len(model.backbone.feature_channels) == expect["maps"]
    if expect["head"] == "MGFFHead":
        assert (head.attention is not None, head.se is not None, head.graph is not None) == (
            expect["attention"], expect["se"], expect["gcn"]
        )
        assert head.residual is expect.get("residual", True)
    if kind == "paper":
        assert model.backbone.feature_modules[-1] == "layers.3 + norm"
        assert isinstance(head.align[-1], torch.nn.Identity)
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert ("source" in batch) is (kind == "tuned")  # the tuned recipe crops from a source view (768 px here)
    if expect["two_stage"]:
        assert model.crop_frame(batch.get("source")) == ("source" if kind == "tuned" else "view")
    logits, aux, _ = model.forward_outputs(batch["image"], batch)
    assert logits["main"].shape == (2, 4) and torch.isfinite(logits["main"]).all() and torch.isfinite(aux)
