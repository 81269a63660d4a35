"""experiments/lite0/: the real-photo entry configs and the training recipe they share (recipe.yaml).

Every ``*.yaml`` of that folder except ``recipe.yaml`` is an entry: it gives its model's and data module's
class_path and structure, then includes the recipe with a last ``config: recipe.yaml`` key. Here:

- each entry (and each ablation stacked on ``full.yaml``) goes through ``python -m mgff.fit --print_config``
  (:class:`mgff.fit.FitCLI`) with the recipe resolved and its own structure kept;
- the recipe is written once: no entry repeats one of its keys (jsonargparse would let the recipe, read last,
  silently replace the entry's value), and a command-line override after the config wins;
- each entry fits end to end on generated photos in the CUB_200_2011 layout with its own recipe (AdamW, the
  head-first phase, ``bn_mode: eval``, the EMA of the weights, the recipe's ``test_checkpoints``), only epochs, the
  head-first phase, the batch and the sizes shrunk, and learns;
- a missing weights file and a missing photo folder are refused naming the path;
- the recipe's default photos and weights (../shared, relative to the repository root) exist: skipped without
  ../shared.

No test reads ../shared/realdata's photos.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from mgff.fit import FitCLI, run as fit_run

REPO = Path(__file__).resolve().parents[1]
LITE0 = REPO / "experiments" / "lite0"
RECIPE = LITE0 / "recipe.yaml"
ENTRIES = sorted(p.name for p in LITE0.glob("*.yaml") if p.name != RECIPE.name)
ABLATIONS = sorted(p.name for p in (REPO / "experiments" / "ablation").glob("*.yaml"))
SHARED = REPO.parent / "shared"
TWO_STAGE = "mgff.lit.TwoStageClassifier"
# keys of the recipe an entry must never set (besides every key path the recipe itself sets)
RECIPE_KEYS = (
    "optimizer", "lr", "bn_mode", "freeze_backbone_epochs", "layer_decay", "max_epochs", "callbacks", "weight_decay", "test_checkpoints",
    "seed_everything",
)
NUM_CLASSES = 4


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def own_keys(entry: str) -> dict:
    """The entry's own settings: its YAML without the ``config`` include."""
    return {k: v for k, v in read_yaml(LITE0 / entry).items() if k != "config"}


def leaf_paths(tree, prefix=()) -> dict[tuple, object]:
    """``{("model", "init_args", "lr"): 2e-4, ...}``; a list is a leaf."""
    if isinstance(tree, dict):
        return {p: v for k, sub in tree.items() for p, v in leaf_paths(sub, (*prefix, k)).items()}
    return {prefix: tree}


def same_value(expected, actual) -> bool:
    """``expected`` (as PyYAML reads the file) equals ``actual`` (as the CLI prints it): numbers as numbers
    (PyYAML reads ``5e-4`` without a dot as a string), a printed list or dict may hold more defaults."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and same_value(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(map(same_value, expected, actual))
    if isinstance(expected, str) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(expected) == actual
        except ValueError:
            return False
    return expected == actual


def assert_contains(expected: dict, actual: dict, what: str, besides: dict | None = None) -> None:
    """Every leaf of ``expected`` has its value in ``actual``, except the key paths that ``besides`` sets."""
    for path, value in leaf_paths(expected).items():
        if besides is not None and path in leaf_paths(besides):
            continue
        node = actual
        for key in path:
            assert isinstance(node, dict) and key in node, f"{what}: {'.'.join(path)} missing from the resolved config"
            node = node[key]
        assert same_value(value, node), f"{what}: {'.'.join(path)} = {node!r}, the file says {value!r}"


def print_config(capsys, *configs: Path, extra: tuple[str, ...] = ()) -> dict:
    """What ``python -m mgff.fit --config A [--config B] [extra] --print_config`` prints, as a dict."""
    args = [a for c in configs for a in ("--config", str(c))] + list(extra) + ["--print_config"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        FitCLI(run=False, args=args)
    out = capsys.readouterr()
    assert done.value.code in (0, None), out.err
    return yaml.safe_load(out.out)


def ema_callbacks(config: dict) -> list[dict]:
    return [cb for cb in config["trainer"].get("callbacks") or [] if cb["class_path"] == "mgff.callbacks.EMAWeights"]


# ----- 1. every entry, and every ablation stacked on full.yaml, resolves the recipe and keeps its structure ------

def test_the_folder_has_the_entries_the_readme_names():
    assert {"single.yaml", "two_stage.yaml", "full.yaml"} <= set(ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES)
def test_each_entry_prints_its_structure_and_the_recipe(entry, capsys):
    config = print_config(capsys, LITE0 / entry)
    assert_contains(read_yaml(RECIPE), config, f"{entry} (recipe)")
    assert_contains(own_keys(entry), config, f"{entry} (own keys)")
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    # the recipe's named parts, spelled out
    assert (model["optimizer"], model["bn_mode"], model["backbone"]) == ("adamw", "eval", "efficientnet_lite0")
    assert model["freeze_backbone_epochs"] >= 1 and model["lr"] > 0
    assert [cb["init_args"]["horizon_epochs"] for cb in ema_callbacks(config)] == [read_yaml(RECIPE)["trainer"]["callbacks"][0]["init_args"]["horizon_epochs"]]
    assert config["data"]["class_path"] == "data_modules.CUB200DataModule" and data["root"].endswith("CUB_200_2011_first25")
    assert model["pretrained"].endswith("efficientnet_lite0_imagenet.safetensors")
    if config["model"]["class_path"] == TWO_STAGE:
        assert data["source_size"] is not None and model["crop_from"] == "source"


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_stacks_on_full_and_keeps_the_recipe(ablation, capsys):
    path = REPO / "experiments" / "ablation" / ablation
    config = print_config(capsys, LITE0 / "full.yaml", path)
    assert_contains(read_yaml(RECIPE), config, f"full + {ablation} (recipe)", besides=read_yaml(path))  # linear_baseline: stages
    assert_contains(read_yaml(path), config, f"full + {ablation} (ablation)")
    full = own_keys("full.yaml")
    # what the ablation does not change stays full.yaml's
    assert config["data"]["init_args"]["crop_size"] == full["data"]["init_args"]["crop_size"]
    assert config["model"]["init_args"]["img_size"] == full["model"]["init_args"]["img_size"]
    if "class_path" not in read_yaml(path).get("model", {}):
        assert config["model"]["class_path"] == full["model"]["class_path"]
        assert config["model"]["init_args"]["head"] == full["model"]["init_args"]["head"]


# ----- 2. the mechanism: the recipe written once, overrides after the config win ---------------------------------

@pytest.mark.parametrize("entry", ENTRIES)
def test_the_entry_sets_no_recipe_key_and_includes_the_recipe_last(entry):
    text = read_yaml(LITE0 / entry)
    # `config` last: keys before it that the recipe also sets would be silently replaced by the recipe's
    assert list(text)[-1] == "config" and text["config"] == RECIPE.name, f"{entry} must end with `config: {RECIPE.name}`"
    own = leaf_paths(own_keys(entry))
    repeated = sorted(".".join(p) for p in own.keys() & leaf_paths(read_yaml(RECIPE)).keys())
    assert not repeated, f"{entry} repeats the recipe's {repeated}: set it in recipe.yaml or on the command line"
    named = sorted(".".join(p) for p in own if p[-1] in RECIPE_KEYS)
    assert not named, f"{entry} sets recipe keys {named}"
    assert not [p for p in own if "config" in p], f"{entry} includes a config elsewhere than its last key"


def test_the_recipe_sets_no_structure():
    recipe = read_yaml(RECIPE)
    assert "config" not in recipe
    for part in ("model", "data"):
        assert "class_path" not in recipe[part], f"recipe.yaml sets {part}.class_path: the entries' structure"
    assert not {"head", "img_size", "crop_size", "resize_size", "source_size", "localization"} & set(leaf_p[-1] for leaf_p in leaf_paths(recipe))


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_override_after_the_config_wins(entry, capsys, tmp_path):
    config = print_config(capsys, LITE0 / entry, extra=("--model.init_args.lr", "0.5", "--model.init_args.bn_mode", "frozen"))
    model = config["model"]["init_args"]
    assert (model["lr"], model["bn_mode"]) == (0.5, "frozen")
    assert model["optimizer"] == "adamw" and config["trainer"]["max_epochs"] == read_yaml(RECIPE)["trainer"]["max_epochs"]
    later = tmp_path / "later.yaml"
    later.write_text("trainer:\n  max_epochs: 3\nmodel:\n  init_args:\n    freeze_backbone_epochs: 0\n")
    config = print_config(capsys, LITE0 / entry, later)
    assert (config["trainer"]["max_epochs"], config["model"]["init_args"]["freeze_backbone_epochs"]) == (3, 0)
    assert config["model"]["init_args"]["bn_mode"] == "eval" and len(ema_callbacks(config)) == 1


# ----- 3. each entry fits on generated photos with its recipe and learns ------------------------------------------

COLORS = [(220, 20, 40), (20, 90, 230), (245, 200, 10), (170, 30, 210)]


def easy_scene(rng, label, spec):
    """A disc of the class's colour (60-90 % of the short side) at a random place on grey noise: a task that a
    randomly initialised Lite0 with a trained head learns in a few epochs (the default scenes' small wing mark
    needs pretrained features)."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    grey = np.clip(rng.integers(70, 190) + rng.normal(0, 15, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(grey)
    side = min(w, h) * rng.uniform(0.6, 0.9)
    x1, y1 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    box = (float(x1), float(y1), float(x1 + side), float(y1 + side))
    ImageDraw.Draw(image).ellipse(box, fill=COLORS[label])
    return np.asarray(image), box


@pytest.fixture(scope="module")
def easy_root(tmp_path_factory) -> Path:
    """The project's CUB_200_2011 layout writer with :func:`easy_scene` as the scene."""
    import data_modules.synthetic as synthetic

    spec = synthetic.SyntheticSpec(num_classes=NUM_CLASSES, images_per_class=24, test_fraction=0.25, min_side=96, max_side=128)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "render_scene", easy_scene)
        return synthetic.write_synthetic_cub(tmp_path_factory.mktemp("easy") / "CUB_200_2011", spec)


@pytest.fixture(scope="module")
def lite0_weights(tmp_path_factory) -> Path:
    """A randomly initialised timm efficientnet_lite0 as a safetensors file, standing in for the ImageNet one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "efficientnet_lite0_random.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("efficientnet_lite0").state_dict().items()}, str(path))
    return path


class RecipeProbe(Callback):
    """Records the backbone role's lr at every training step and, at every training epoch's end, whether the backbone
    was frozen, how far its weights and BatchNorm statistics are from the loaded file, the optimiser and the EMA decay."""

    def __init__(self, weights: Path) -> None:
        self.loaded = load_file(str(weights))
        self.epochs: list[dict] = []
        self.backbone_lrs: list[tuple[int, float]] = []  # (epoch, the lr of each training step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.backbone_lrs.append((trainer.current_epoch, max(g["lr"] for g in groups if g.get("role") == "backbone")))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        moved = {"weights": 0.0, "bn_stats": 0.0}
        for name, value in pl_module.state_dict().items():
            match = re.fullmatch(r"backbone2?\.model\.(.+)", name)
            if match and match.group(1) in self.loaded and value.is_floating_point():
                kind = "bn_stats" if name.endswith(("running_mean", "running_var")) else "weights"
                moved[kind] = max(moved[kind], (value.detach().cpu() - self.loaded[match.group(1)]).abs().max().item())
        optimizer = trainer.optimizers[0]
        self.epochs.append(
            dict(
                epoch=trainer.current_epoch,
                frozen=pl_module.backbone_frozen,
                optimizer=type(optimizer).__name__,
                ema_decay=next((cb.decay for cb in trainer.callbacks if type(cb).__name__ == "EMAWeights"), None),
                **moved,
            )
        )


def tiny_fit_args(entry: str, root: Path, weights: Path, out: Path, epochs: int) -> list[str]:
    """The entry with the photos, weights and logs moved, fewer epochs, a one-epoch head-first phase and small
    images (64 px input, two-stage crops of 64 px from a 128 px source); every other recipe value as written."""
    own = own_keys(entry)
    args = [
        "--config", str(LITE0 / entry),
        "--data.init_args.root", str(root),
        "--model.init_args.pretrained", str(weights),
        "--trainer.max_epochs", str(epochs),
        "--model.init_args.freeze_backbone_epochs", "1",
        "--model.init_args.img_size", "64",
        "--data.init_args.resize_size", "72",
        "--data.init_args.crop_size", "64",
        "--data.init_args.batch_size", "16",
        "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]
    if own["model"]["class_path"] == TWO_STAGE:
        args += ["--model.init_args.crop_size", "64"]
    if "localize_size" in own["model"].get("init_args", {}):
        args += ["--model.init_args.localize_size", "64"]
    if "source_size" in own["data"].get("init_args", {}):
        args += ["--data.init_args.source_size", "128"]
    return args


@pytest.mark.parametrize("entry", ENTRIES)
def test_each_entry_fits_generated_photos_with_its_recipe_and_learns(entry, easy_root, lite0_weights, tmp_path, monkeypatch):
    """The real entry and recipe (Lite0 from a safetensors file, AdamW, head-first epoch, bn_mode eval, EMA over
    one epoch) on an easy generated 4-class task, 5 epochs of a few steps: test accuracy well above chance 0.25.
    The weights are random (no download here), so the task is a coloured disc, not the default scenes' wing mark."""
    probe = RecipeProbe(lite0_weights)
    instantiate = FitCLI.instantiate_classes

    def with_probe(cli):
        instantiate(cli)
        cli.trainer.callbacks.append(probe)

    monkeypatch.setattr(FitCLI, "instantiate_classes", with_probe)
    epochs = 5
    metrics = fit_run(tiny_fit_args(entry, easy_root, lite0_weights, tmp_path, epochs))

    saved = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert saved["test/acc"] == pytest.approx(metrics["test/acc"]) and saved["num_classes"] == NUM_CLASSES
    assert saved["test/acc"] > 0.5, saved
    if own_keys(entry)["model"]["class_path"] == TWO_STAGE:
        assert {"test/stage1_acc", "test/stage2_acc"} <= saved.keys(), sorted(saved)
        assert saved["test/stage1_acc"] > 0.5 and saved["test/stage2_acc"] > 0.5, saved
    # the recipe's test_checkpoints: test/* for the first, test_<name>/* beside it for the others
    reported = read_yaml(RECIPE).get("test_checkpoints") or ["best"]
    assert list(saved.get("tested_checkpoints", {"best": None})) == reported
    assert all(f"test_{name}/acc" in saved for name in reported[1:]), sorted(saved)

    # the recipe ran as written: AdamW; epoch 0 the head alone (backbone as loaded, its lr 0), then fine-tuning;
    # BatchNorm statistics never move (bn_mode eval); the EMA's decay set from its one-epoch horizon
    assert [e["epoch"] for e in probe.epochs] == list(range(epochs))
    first, last = probe.epochs[0], probe.epochs[-1]
    assert {e["optimizer"] for e in probe.epochs} == {"AdamW"}
    assert first["frozen"] and first["weights"] == 0.0, first
    assert {lr for epoch, lr in probe.backbone_lrs if epoch == 0} == {0.0}
    assert max(lr for epoch, lr in probe.backbone_lrs if epoch > 0) > 0.0
    assert not last["frozen"] and last["weights"] > 0.0, last
    assert all(e["bn_stats"] == 0.0 for e in probe.epochs), probe.epochs
    assert all(0.0 < e["ema_decay"] < 1.0 for e in probe.epochs), probe.epochs

    # the checkpoints hold the averaged weights, with the raw ones beside them (mgff.callbacks.EMAWeights)
    best = torch.load(saved["best_checkpoint"], map_location="cpu", weights_only=False)
    assert {"current_model_state", "averaging_state"} <= best.keys()
    assert best["hyper_parameters"]["bn_mode"] == "eval" and best["hyper_parameters"]["optimizer"] == "adamw"


# ----- 4. bad input names the path ------------------------------------------------------------------------------

def test_a_missing_weights_file_is_named(easy_root, tmp_path):
    missing = tmp_path / "nowhere" / "efficientnet_lite0_imagenet.safetensors"
    args = ["--config", str(LITE0 / "single.yaml"), "--data.init_args.root", str(easy_root), "--model.init_args.pretrained", str(missing),
            "--data.init_args.num_workers", "0", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(missing))) as err:
        fit_run(args)
    assert "not found" in str(err.value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_missing_photo_folder_is_named(lite0_weights, tmp_path):
    from data_modules.errors import DatasetNotFoundError

    missing = tmp_path / "nowhere" / "CUB_200_2011_first25"
    args = ["--config", str(LITE0 / "single.yaml"), "--data.init_args.root", str(missing), "--model.init_args.pretrained", str(lite0_weights),
            "--data.init_args.num_workers", "0", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(missing))) as err:
        fit_run(args)
    assert "does not exist" in str(err.value) and "images.txt" in str(err.value)


# ----- 5. the recipe's defaults: the shared photos and weights, relative to the repository root ------------------

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"../shared absent ({SHARED}): the recipe's default photos and weights live there")


@needs_shared
def test_the_recipes_default_photos_and_weights_exist_from_the_repository_root():
    data, model = read_yaml(RECIPE)["data"]["init_args"], read_yaml(RECIPE)["model"]["init_args"]
    root, weights = REPO / data["root"], REPO / model["pretrained"]
    assert (root / "images.txt").is_file() and (root / "images").is_dir(), f"recipe data.root {data['root']} -> {root}"
    assert weights.is_file(), f"recipe model.pretrained {model['pretrained']} -> {weights}"


@needs_shared
def test_the_shared_weights_are_an_efficientnet_lite0():
    from safetensors import safe_open

    weights = REPO / read_yaml(RECIPE)["model"]["init_args"]["pretrained"]
    with safe_open(str(weights), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {k: tuple(v.shape) for k, v in timm.create_model("efficientnet_lite0", num_classes=0).state_dict().items()}
    assert {k: shapes.get(k) for k in expected} == expected


# ----- the recipe's variants (experiments/lite0/variants/) stack on every entry and change only their own keys -----
VARIANTS = sorted(p.name for p in (LITE0 / "variants").glob("*.yaml"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("entry", ["single.yaml", "full.yaml"])
def test_a_variant_stacks_on_an_entry_and_changes_only_its_own_keys(capsys, entry, variant):
    base = print_config(capsys, LITE0 / entry)
    stacked = print_config(capsys, LITE0 / entry, LITE0 / "variants" / variant)
    own = read_yaml(LITE0 / "variants" / variant)
    assert_contains(own, stacked, f"{entry} + variants/{variant}")  # the variant's values are in force
    assert_contains(base, stacked, f"{entry} + variants/{variant}", besides=own)  # and the rest is the entry's
    assert any(not same_value(v, base_value) for path, v in leaf_paths(own).items()
               if (base_value := _lookup(base, path)) is not _MISSING), f"variants/{variant} changes nothing in {entry}"


_MISSING = object()


def _lookup(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree
