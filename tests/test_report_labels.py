"""``mgff.report``'s group labels on generated run folders (no fit): runs of ``mgff.sweep`` named by their configs'
stems (two model classes, ablations stacked on ``full.yaml``), ``--compare`` by those names and by the settings
labels, the settings labels without the ``key=unset`` of another class's ``init_args``, names shared by two groups
told apart by a setting, and the labels that stay as they were (runs without a name, a lone group)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mgff.report import group_runs, main as report_main, read_run, settings_labels

DATA = {"class_path": "data_modules.CUB200DataModule", "init_args": {"crop_size": 224, "source_size": None, "num_workers": 2}}
SINGLE = {"class_path": "mgff.lit.FineGrainedClassifier", "init_args": {"head": "linear", "use_gcn": True, "lr": 0.002}}
TWO_STAGE = {"class_path": "mgff.lit.TwoStageClassifier",
             "init_args": {**SINGLE["init_args"], "cropper": "vit_base_patch16_384", "crop_from": "source", "merge": "mean_prob"}}


def config(model_: dict, **changes: dict) -> dict:
    """A resolved config: ``DATA`` and ``model_`` with ``changes`` (``data=``/``model=``: init_args) applied."""
    out = {"model": copy.deepcopy(model_), "data": copy.deepcopy(DATA), "trainer": {"max_epochs": 12}}
    for part, init_args in changes.items():
        out[part]["init_args"].update(init_args)
    return out


#: experiments/lite0 and experiments/ablation as mgff.sweep stacks them: (configs, resolved config)
SPECS = {
    "single": (["experiments/lite0/single.yaml"], config(SINGLE)),
    "single_equal_flops": (["experiments/lite0/single_equal_flops.yaml"], config(SINGLE, data={"crop_size": 352})),
    "two_stage": (["experiments/lite0/two_stage.yaml"], config(TWO_STAGE, data={"source_size": 448})),
    "full": (["experiments/lite0/full.yaml"], config(TWO_STAGE, data={"source_size": 448}, model={"head": "mgff"})),
    "no_gcn": (["experiments/lite0/full.yaml", "experiments/ablation/no_gcn.yaml"],
               config(TWO_STAGE, data={"source_size": 448}, model={"head": "mgff", "use_gcn": False})),
    # single_stage.yaml sets the class and drops the source view: the stage classifier of full.yaml
    "single_stage": (["experiments/lite0/full.yaml", "experiments/ablation/single_stage.yaml"],
                     config(SINGLE, model={"head": "mgff"})),
}

#: per folder and seed, which of the 4 test images the run got right
CORRECT = {
    "single": ([1, 0, 1, 0], [1, 0, 0, 1]),
    "single_equal_flops": ([1, 1, 1, 0], [1, 0, 0, 1]),
    "two_stage": ([1, 1, 1, 0], [1, 1, 0, 1]),
    "full": ([1, 1, 1, 1], [1, 1, 1, 1]),
    "no_gcn": ([1, 0, 1, 1], [1, 1, 0, 1]),
    "single_stage": ([1, 0, 1, 1], [1, 0, 1, 1]),
}


def write_run(folder: Path, seed: int, resolved: dict, correct: list[int], configs: list[str] | None = None, extra: tuple[str, ...] = ()) -> Path:
    """A finished run folder: ``config.yaml``, ``metrics.json``, ``test_predictions.csv``, and with ``configs`` the
    ``sweep.json`` that ``mgff.sweep`` writes."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed, **resolved, "trainer": {**resolved["trainer"], "default_root_dir": str(folder)}}))
    (folder / "metrics.json").write_text(json.dumps({"test/acc": float(np.mean(correct)), "best_val/acc": 0.5, "epochs": 12, "fit_seconds": 60.0}))
    with open(folder / "test_predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "correct"])
        writer.writerows([i, f"img{i}.jpg", c] for i, c in enumerate(correct))
    if configs is not None:
        (folder / "sweep.json").write_text(json.dumps({"configs": configs, "seed": seed, "extra": list(extra)}))
    return folder


def sweep(out: Path, names: tuple[str, ...] = tuple(SPECS)) -> Path:
    """``python -m mgff.sweep --configs ... --seeds 0 1 --out out``'s folders: ``out/<last config stem>/seed<k>/``."""
    for name in names:
        configs, resolved = SPECS[name]
        for seed in (0, 1):
            write_run(out / name / f"seed{seed}", seed, resolved, CORRECT[name][seed], configs)
    return out


def table_labels(text: str) -> list[str]:
    table = text.split("\n\n")[0]
    return [line.split("|")[1].strip() for line in table.splitlines()[2:]]


#: the settings label of each config among all of SPECS: the class instead of the other class's init_args
SETTINGS = {
    "full": "crop_size=224,source_size=448,model=TwoStageClassifier,head=mgff,use_gcn=true",
    "no_gcn": "crop_size=224,source_size=448,model=TwoStageClassifier,head=mgff,use_gcn=false",
    "single": "crop_size=224,source_size=null,model=FineGrainedClassifier,head=linear,use_gcn=true",
    "single_equal_flops": "crop_size=352,source_size=null,model=FineGrainedClassifier,head=linear,use_gcn=true",
    "single_stage": "crop_size=224,source_size=null,model=FineGrainedClassifier,head=mgff,use_gcn=true",
    "two_stage": "crop_size=224,source_size=448,model=TwoStageClassifier,head=linear,use_gcn=true",
}


def test_sweep_runs_of_two_model_classes_and_stacked_ablations_are_named_by_their_configs(tmp_path):
    out = sweep(tmp_path / "lite0")
    text = report_main([str(out), "--compare", "full", "full+no_gcn", "--compare", "single", "two_stage", "--samples", "500"])
    # path order of the folders: full, no_gcn, single, single_equal_flops, single_stage, two_stage
    assert table_labels(text) == ["full", "full+no_gcn", "single", "single_equal_flops", "full+single_stage", "two_stage"]
    assert "unset" not in text
    # no_gcn misses one of full's 4 images on each seed (index 1, then 2): -1/4
    assert "**full+no_gcn - full**: test/acc -0.2500, pooled paired bootstrap 95 % interval [" in text
    assert "(2 seed pairs: 0, 1; 4 test images; 500 resamples)" in text
    assert "**two_stage - single**: test/acc +0.2500" in text  # one image more on each seed

    # each group also answers to its settings label, as the same group
    groups = group_runs([read_run(p) for p in sorted({q.parent for q in out.rglob("metrics.json")})])
    assert {g.label: g.aliases for g in groups} == {
        ("full+" if name in ("no_gcn", "single_stage") else "") + name: [SETTINGS[name]] for name in SPECS
    }
    by_settings = report_main([str(out), "--compare", SETTINGS["full"], SETTINGS["no_gcn"], "--samples", "500"])
    assert "**full+no_gcn - full**: test/acc -0.2500" in by_settings
    with pytest.raises(SystemExit):
        report_main([str(out), "--compare", "full", "no_gcn"])  # the folder's name is not the group's


def test_a_settings_label_of_a_two_group_sweep_keeps_working_in_compare(tmp_path):
    """A sweep of a config and its ablation (here full.yaml and its no_gcn ablation; the README's demo.yaml and
    demo.yaml+no_se.yaml): the groups are labelled ``full`` and ``full+no_gcn``, and also answer to their settings,
    as ``--compare use_se=true use_se=false`` did before sweep groups had names."""
    out = sweep(tmp_path / "sweep", ("full", "no_gcn"))
    text = report_main([str(out), "--compare", "use_gcn=true", "use_gcn=false", "--samples", "500"])
    assert table_labels(text) == ["full", "full+no_gcn"]
    assert "**full+no_gcn - full**: test/acc -0.2500" in text
    with pytest.raises(SystemExit, match="test_predictions_last.csv is missing"):  # GROUP@NAME takes a settings label too
        report_main([str(out), "--compare", "use_gcn=true@last", "full"])


def test_runs_without_a_name_are_labelled_by_settings_without_another_class_init_args(tmp_path):
    """mgff.fit's own folders (``<save_dir>/<name>/version_<k>``, no sweep.json): labelled by what differs, the model
    class shown instead of the init_args one class has and the other lacks."""
    for i, name in enumerate(SPECS):
        write_run(tmp_path / "runs" / f"version_{i}", 0, SPECS[name][1], CORRECT[name][0])
    text = report_main([str(tmp_path / "runs"), "--compare", SETTINGS["single"], SETTINGS["two_stage"], "--samples", "500"])
    assert table_labels(text) == [SETTINGS[name] for name in SPECS]
    assert f"**{SETTINGS['two_stage']} - {SETTINGS['single']}**: test/acc +0.2500" in text


def test_the_init_args_of_one_class_that_vary_within_it_are_shown_only_where_set():
    fine = {"model.class_path": '"a.Fine"', "model.init_args.lr": "0.1"}
    two = {**fine, "model.class_path": '"a.Two"', "model.init_args.merge": '"mean"', "model.init_args.cropper": '"vit"'}
    settings, labels = settings_labels([fine, two, {**two, "model.init_args.merge": '"max"'}])
    assert labels == ["model=Fine", "model=Two,merge=mean", "model=Two,merge=max"]  # cropper follows from the class
    assert settings[0] == {"model.class_path": '"a.Fine"', "model.init_args.merge": "unset"}  # the CSV's columns keep it


def test_a_name_shared_by_two_groups_is_told_apart_by_a_setting_and_seed_folders_are_named_by_their_parent(tmp_path):
    """The same config stems in two sweeps with other overrides (``-- --trainer.max_epochs 5``): ``single:max_epochs=5``;
    folders ``<name>/seed<k>`` without sweep.json (benchmarks/head_probe.py's layout) are named ``<name>``."""
    configs, resolved = SPECS["single"]
    write_run(tmp_path / "a" / "single" / "seed0", 0, resolved, [1, 0, 1, 0], configs)
    write_run(tmp_path / "b" / "single" / "seed0", 0, {**resolved, "trainer": {"max_epochs": 5}}, [1, 0, 0, 0], configs, ("--trainer.max_epochs", "5"))
    write_run(tmp_path / "c" / "curve_20" / "seed0", 0, {**resolved, "trainer": {"max_epochs": 20}}, [1, 1, 1, 0])
    text = report_main([str(tmp_path), "--compare", "single:max_epochs=12", "curve_20", "--samples", "500"])
    assert table_labels(text) == ["single:max_epochs=12", "single:max_epochs=5", "curve_20"]
    assert "**curve_20 - single:max_epochs=12**: test/acc +0.2500" in text


def test_labels_stay_as_they_were_for_a_lone_group_and_for_groups_whose_runs_disagree_on_the_name(tmp_path):
    configs, resolved = SPECS["single"]
    write_run(tmp_path / "one" / "single" / "seed0", 0, resolved, [1, 0, 1, 0], configs)
    write_run(tmp_path / "one" / "single" / "seed1", 1, resolved, [1, 0, 0, 0], configs)
    assert table_labels(report_main([str(tmp_path / "one")])) == ["all"]
    # seed 2 of single.yaml run by hand into another folder: the group has no one name, so none is named
    write_run(tmp_path / "one" / "by_hand" / "version_0", 2, resolved, [1, 1, 0, 0])
    write_run(tmp_path / "one" / "single_equal_flops" / "seed0", 0, SPECS["single_equal_flops"][1], [1, 1, 1, 0], SPECS["single_equal_flops"][0])
    assert table_labels(report_main([str(tmp_path / "one")])) == ["crop_size=224", "crop_size=352"]
