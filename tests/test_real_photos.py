"""benchmarks/real_photos.py: the paired bootstrap, and that every named run builds and runs a forward."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_photos  # noqa: E402


def test_paired_bootstrap_interval_of_the_difference():
    rng = np.random.default_rng(0)
    a = (rng.random(600) < 0.6).astype(int)
    b = a.copy()
    flip = rng.choice(600, 60, replace=False)
    b[flip] = 1  # b is right wherever a is, and on some more images
    diff, low, high = real_photos.paired_bootstrap(a, b, samples=2000)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert 0 < low <= diff <= high
    # identical runs: the interval collapses to zero (pairs are kept together)
    assert real_photos.paired_bootstrap(a, a, samples=500) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="different images"):
        real_photos.paired_bootstrap(a, b[:-1])


def test_unknown_run_names_are_refused():
    with pytest.raises(SystemExit, match="unknown run"):
        real_photos.parse_names("linear,not_a_run", ())


@pytest.mark.skipif(not real_photos.WEIGHTS.is_file(), reason=f"shared weights not found at {real_photos.WEIGHTS} (../shared absent)")
@pytest.mark.parametrize("name", ["linear", "mgff"])
def test_runs_load_the_shared_weights_and_run_a_forward(name):
    class Data:  # the class facts the runner takes from the DataModule
        num_classes, mean, std = 25, real_photos.WEIGHTS_MEAN, real_photos.WEIGHTS_STD

    run = real_photos.RUNS[name]
    model = real_photos.import_class(run.model_class)(**real_photos.model_kwargs(run, Data())).eval()
    assert model.backbone.feature_channels[-1] == 1280  # the pretrained conv_head/bn2 map is kept
    with torch.no_grad():
        logits, _, _ = model.forward_outputs(torch.zeros(2, 3, 64, 64))
    assert logits["main"].shape == (2, 25)


@pytest.mark.skipif(not real_photos.WEIGHTS.is_file(), reason=f"shared weights not found at {real_photos.WEIGHTS} (../shared absent)")
@pytest.mark.parametrize("name, localization, response", [
    ("ts_features_source", "features", "refined"), ("ts_energy_source", "features", "energy"), ("ts_oracle_source", "ground_truth", None),
])
def test_two_stage_runs_build_the_localiser_they_name(name, localization, response):
    class Data:
        num_classes, mean, std = 25, real_photos.WEIGHTS_MEAN, real_photos.WEIGHTS_STD

    run = real_photos.RUNS[name]
    model = real_photos.import_class(run.model_class)(**real_photos.model_kwargs(run, Data()))
    assert model.hparams.localization == localization and model.hparams.crop_from == "source"
    assert (model.feature_localizer.response if response else model.feature_localizer) == response
