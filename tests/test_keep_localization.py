"""keep_localization_weight: the energy-correlation term against a frozen copy of the initial backbone (known answers
against a loop, zero at initialisation, gradients into the backbone only, never saved, off by default), in the
single-stage, two-stage and two-view models."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mgff.lit import FineGrainedClassifier, TwoStageClassifier, TwoViewClassifier
from mgff.lit.keep_localization import FrozenReference, energy_correlation_loss

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], head="linear")


def naive_loss(student, reference):
    """1 - Pearson r of the channel sums, image by image, then the mean."""
    values = []
    for s, r in zip(student, reference):
        pair = torch.stack([s.double().sum(0).flatten(), r.double().sum(0).flatten()])
        values.append(1 - torch.corrcoef(pair)[0, 1])
    return torch.stack(values).mean()


def test_energy_correlation_loss_known_answers_and_a_loop():
    torch.manual_seed(0)
    a = torch.rand(3, 5, 4, 6)
    assert energy_correlation_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert energy_correlation_loss(3 * a + 2, a).item() == pytest.approx(0.0, abs=1e-6)  # scale and offset do not count
    assert energy_correlation_loss(-a, a).item() == pytest.approx(2.0, abs=1e-6)  # the opposite pattern
    b = torch.randn(3, 7, 4, 6)  # other channels, same grid
    torch.testing.assert_close(energy_correlation_loss(a, b).double(), naive_loss(a, b), atol=1e-5, rtol=1e-5)
    flat = torch.ones(3, 5, 4, 6)
    assert energy_correlation_loss(flat, a).item() == pytest.approx(1.0, abs=1e-6)  # no pattern: uncorrelated


def test_energy_correlation_loss_refuses_maps_of_other_grids():
    with pytest.raises(ValueError, match="same images and grid"):
        energy_correlation_loss(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 5, 4))


def test_frozen_reference_is_a_copy_that_does_not_follow_training():
    model = FineGrainedClassifier(num_classes=3, **TINY)
    reference = FrozenReference(model.backbone)
    images = torch.randn(2, 3, 64, 64)
    before = reference.last_map(images).clone()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    torch.testing.assert_close(reference.last_map(images), before)
    assert not any(p.requires_grad for p in reference.backbone.parameters())


def test_off_by_default_and_refuses_a_negative_weight():
    model = FineGrainedClassifier(num_classes=3, **TINY)
    assert not model.keeps_localization and model._localization_reference is None
    with pytest.raises(ValueError, match="keep_localization_weight must be >= 0"):
        FineGrainedClassifier(num_classes=3, keep_localization_weight=-1.0, **TINY)


def batch_of(n=4, size=64, classes=3):
    torch.manual_seed(1)
    return {"image": torch.randn(n, 3, size, size), "label": torch.arange(n) % classes,
            "source": torch.randint(0, 256, (n, 3, 2 * size, 2 * size), dtype=torch.uint8)}


@pytest.mark.parametrize("cls, extra", [(FineGrainedClassifier, {}), (TwoStageClassifier, dict(localization="features")),
                                        (TwoStageClassifier, dict(localization="ground_truth")),
                                        (TwoViewClassifier, dict(crop_from="view"))])
def test_the_term_is_in_training_only_zero_at_initialisation_and_moves_with_the_backbone(cls, extra):
    torch.manual_seed(0)
    model = cls(num_classes=3, keep_localization_weight=2.0, **TINY, **extra)
    model.train()
    batch = batch_of()
    if extra.get("localization") == "ground_truth":
        batch["box"] = torch.tensor([[8.0, 8.0, 56.0, 56.0]]).repeat(4, 1)
    # BatchNorm in train mode normalises with the batch's statistics and the reference with its running ones:
    # put the student in the reference's state for the known answer
    model.backbone.eval()
    logits, aux, extras = model.forward_outputs(batch["image"], batch)
    assert extras["last_map"].requires_grad
    term = model.keep_localization_term(batch["image"], extras["last_map"])
    assert term.item() == pytest.approx(0.0, abs=1e-5)
    # the term reaches the backbone (not the head) once the student's maps differ from the reference's
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, _, extras = model.forward_outputs(batch["image"], batch)
    term = model.keep_localization_term(batch["image"], extras["last_map"])
    assert term.item() > 1e-4
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.head.parameters())
    model.eval()
    assert "last_map" not in model.forward_outputs(batch["image"], batch)[2]


def test_the_step_logs_the_term_and_the_checkpoint_holds_no_reference(tmp_path):
    from data_modules import SyntheticCUBDataModule

    torch.manual_seed(0)
    model = FineGrainedClassifier(num_classes=4, keep_localization_weight=1.0, lr=0.01, head_lr_scale=10.0, **TINY)
    data = SyntheticCUBDataModule(root=tmp_path / "CUB_200_2011", num_classes=4, images_per_class=8, min_side=72, max_side=96,
                                  resize_size=72, crop_size=64, batch_size=8, num_workers=0, val_fraction=0.25)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1)
    trainer.fit(model, data)
    assert "train/loss_keep_loc" in trainer.callback_metrics and "val/loss_keep_loc" not in trainer.callback_metrics
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("reference" in key for key in state)
    assert set(state) == set(model.state_dict())
    loaded = FineGrainedClassifier.load_from_checkpoint(path)
    assert loaded._localization_reference is None  # built to load weights: no initial backbone to compare with
    with pytest.raises(RuntimeError, match="built to load a checkpoint"):
        loaded.keep_localization_term(torch.randn(1, 3, 64, 64), torch.randn(1, 512, 2, 2))
