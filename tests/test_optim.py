"""The learning-rate schedule: the paper's per-epoch cosine and the per-step option."""

import math

import pytest
import torch

from mgff.lit.optim import cosine_schedule


def test_epoch_interval_sets_one_lr_per_epoch_along_the_cosine():
    # the paper: "使用函数cos(x)调整每轮的学习率" (the lr of each epoch is set by cos(x))
    factor, interval = cosine_schedule("epoch", total_steps=500, max_epochs=50, warmup_epochs=0)
    assert interval == "epoch"
    assert factor(0) == 1.0
    assert factor(25) == pytest.approx(0.5)
    assert factor(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 50)))


def test_step_interval_advances_every_step():
    factor, interval = cosine_schedule("step", total_steps=100, max_epochs=10, warmup_epochs=1)
    assert interval == "step"
    assert factor(0) < factor(9) < factor(10) == pytest.approx(1.0)  # a warmup of 10 steps
    assert factor(10) > factor(11) > factor(99)


def test_lightning_steps_the_epoch_schedule_once_per_epoch(tmp_path):
    import lightning as L

    from mgff.lit.classifier import FineGrainedClassifier

    class Tiny(FineGrainedClassifier):
        def training_step(self, batch, batch_idx):
            return self.head.classifier.weight.sum() * 0 + self(batch).logits.square().mean()

    model = Tiny(num_classes=2, backbone="test_resnet", stages=[-1], head="linear", lr=0.1, scheduler_interval="epoch")
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    data = torch.utils.data.DataLoader(torch.randn(8, 3, 32, 32), batch_size=2)
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record()], default_root_dir=tmp_path).fit(model, data)
    per_epoch = [lrs[i:i + 4] for i in range(0, 12, 4)]
    assert all(len(set(e)) == 1 for e in per_epoch)  # constant within an epoch
    assert per_epoch[0][0] == pytest.approx(0.1) and per_epoch[1][0] == pytest.approx(0.1 * 0.75)


def test_unknown_interval_is_an_error():
    with pytest.raises(ValueError, match="scheduler_interval"):
        cosine_schedule("batch", 10, 1, 0)


# ----- parameter roles: backbone, fusion, classifier ---------------------------------------------

ROLE_MODEL = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], fusion_dim=32, num_heads=2, num_super_nodes=3)


def role_of(model, name: str) -> str:
    """The role a parameter's name says it belongs to (what the docstrings of mgff.lit.optim promise)."""
    if name.startswith(("backbone.", "backbone2.")):
        return "backbone"
    head_part = name.split(".", 2)[1]
    return "classifier" if head_part in ("norm", "classifier") or name.startswith("cropper.") else "fusion"


@pytest.mark.parametrize(
    "kwargs",
    [dict(head="mgff"), dict(head="mgff", fusion_residual=False), dict(head="linear"), dict(head="mgff", use_gcn=False, use_se=False)],
    ids=["residual", "plain", "linear", "residual_without_gcn_se"],
)
def test_every_trainable_parameter_is_in_exactly_one_group_of_its_role(kwargs):
    from mgff.lit.classifier import FineGrainedClassifier

    model = FineGrainedClassifier(
        num_classes=5, lr=0.01, head_lr_scale=10.0, fusion_lr_scale=2.0, weight_decay=1e-4, fusion_weight_decay=0.05,
        classifier_weight_decay=0.0, warmup_epochs=0, fusion_warmup_epochs=1.0, **ROLE_MODEL, **kwargs,
    )
    groups = model.optimizer_param_groups()
    where = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in where, "a parameter is in two groups"
            where[id(p)] = g
    expected = {"backbone": (0.01, 1e-4, 0), "fusion": (0.02, 0.05, 1.0), "classifier": (0.1, 0.0, 0)}
    for name, p in model.named_parameters():
        assert id(p) in where, f"{name} is in no group"
        group, role = where[id(p)], role_of(model, name)
        lr, decay, warmup = expected[role]
        assert group["role"] == role, name
        assert group["lr"] == pytest.approx(lr) and group["warmup_epochs"] == warmup, name
        assert group["weight_decay"] == (decay if p.ndim >= 2 else 0.0), name  # biases, norms, layer scales: none
    if kwargs["head"] == "linear":
        assert not [g for g in groups if g["role"] == "fusion"]


def test_unset_role_arguments_follow_lr_head_lr_scale_and_weight_decay():
    from mgff.lit.classifier import FineGrainedClassifier

    model = FineGrainedClassifier(num_classes=5, lr=0.01, head_lr_scale=10.0, weight_decay=1e-3, warmup_epochs=2, **ROLE_MODEL)
    recipes = model.group_recipes()
    assert (recipes["backbone"].lr, recipes["fusion"].lr, recipes["classifier"].lr) == pytest.approx((0.01, 0.1, 0.1))
    assert {r.weight_decay for r in recipes.values()} == {1e-3} and {r.warmup_epochs for r in recipes.values()} == {2}


def test_a_parameter_in_two_roles_or_a_role_without_recipe_is_refused():
    from mgff.lit.optim import GroupRecipe, param_groups

    layer = torch.nn.Linear(2, 2)
    recipes = {"backbone": GroupRecipe(0.1, 0.0), "classifier": GroupRecipe(1.0, 0.0)}
    with pytest.raises(ValueError, match="in role 'backbone' and again in 'classifier'"):
        param_groups([("backbone", layer.parameters()), ("classifier", layer.parameters())], recipes)
    with pytest.raises(ValueError, match="no recipe for parameter role 'fusion'"):
        param_groups([("fusion", layer.parameters())], recipes)


def test_each_role_warms_up_on_its_own_factor(tmp_path):
    # the fresh fusion layers warm up over the first epoch while the backbone and classifier start at full lr
    import lightning as L

    from mgff.lit.classifier import FineGrainedClassifier

    class Tiny(FineGrainedClassifier):
        def training_step(self, batch, batch_idx):
            out = self(batch)
            return out.logits.square().mean() + out.aux_loss

    model = Tiny(num_classes=2, lr=0.1, head_lr_scale=10.0, scheduler_interval="step", fusion_warmup_epochs=1.0, **ROLE_MODEL)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append({g["role"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    data = torch.utils.data.DataLoader(torch.randn(8, 3, 64, 64), batch_size=2)
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record()], default_root_dir=tmp_path).fit(model, data)
    assert lrs[0]["backbone"] == pytest.approx(0.1) and lrs[0]["classifier"] == pytest.approx(1.0)
    assert lrs[0]["fusion"] == pytest.approx(1.0 / 5)  # step 1 of a 4-step warmup: (0 + 1) / (4 + 1)
    assert [round(r["fusion"], 6) for r in lrs[:5]] == sorted(round(r["fusion"], 6) for r in lrs[:5])  # rising
    assert lrs[4]["fusion"] == pytest.approx(1.0)  # the warmup is over: the cosine's start
