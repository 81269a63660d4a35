"""benchmarks/config_flops.py: FLOPs of a config's whole evaluation forward, built through the CLI, and the
single-stage side that matches a two-stage config (what experiments/lite0/single_equal_flops.yaml is written with)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.config_flops import main

LITE0 = Path(__file__).resolve().parents[1] / "experiments" / "lite0"


@pytest.fixture
def on_generated_photos(cub_root):
    return ["--", "--data.init_args.root", str(cub_root), "--model.init_args.pretrained", "false"]


def test_two_stage_costs_two_stages_and_the_head_adds_to_it(on_generated_photos, capsys):
    configs = [str(LITE0 / name) for name in ("single.yaml", "two_stage.yaml", "full.yaml")]
    flops = main(configs + on_generated_photos)
    single, two_stage, full = (flops[c] for c in configs)
    # stage 1 + stage 2 on a crop of the same side (the features box is read from stage 1's maps: no network)
    assert two_stage == pytest.approx(2 * single, rel=0.01)
    assert full > two_stage  # the MGFF head on both stages
    assert "GFLOPs per image" in capsys.readouterr().out


def test_the_matched_side_is_the_one_closest_to_the_target(on_generated_photos):
    full, single = str(LITE0 / "full.yaml"), str(LITE0 / "single.yaml")
    result = main([full, "--match", single, "--sides", "224,320,352,384"] + on_generated_photos)
    match = result["match"]
    assert match["side"] == min(match["sides"], key=lambda s: abs(match["sides"][s] - match["target"]))
    assert match["sides"][224] < match["sides"][320] < match["sides"][352] < match["sides"][384]  # grows with the side
    assert match["side"] == 352  # what single_equal_flops.yaml says


def test_a_stacked_ablation_is_measured_as_the_sweep_stacks_it(on_generated_photos):
    full = str(LITE0 / "full.yaml")
    ablation = LITE0.parent / "ablation"
    no_gcn, single_stage = (f"{full}+{ablation / name}" for name in ("no_gcn.yaml", "single_stage.yaml"))
    flops = main([full, no_gcn, single_stage] + on_generated_photos)
    assert flops[no_gcn] < flops[full]  # the GCN's FLOPs are gone, the rest stays
    assert flops[single_stage] == pytest.approx(flops[full] / 2, rel=0.05)  # one of the two stages
