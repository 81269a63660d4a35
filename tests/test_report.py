"""``python -m mgff.report``: three tiny fits (two seeds of one config, one other config) grouped into a table,
compared by the pooled paired bootstrap, plotted; run folders without or with a broken metrics.json skipped."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fit_helpers import tiny_demo_args
from mgff.fit import run as fit_run
from mgff.report import Run, group_runs, main as report_main, read_run, read_test_predictions
from mgff.stats import paired_bootstrap



def tiny_fit(out: Path, cub_root: Path, *extra: str) -> Path:
    """The demo config, two training steps, on the session's generated data; returns the run folder."""
    fit_run(tiny_demo_args(cub_root, out, *extra))
    return next(out.rglob("metrics.json")).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cub_root) -> Path:
    """runs/a: seed 0, runs/b: seed 1 (another logger name and version), runs/c: seed 0 with lr 0.001."""
    root = tmp_path_factory.mktemp("runs")
    tiny_fit(root / "a", cub_root, "--seed_everything", "0")
    tiny_fit(root / "b", cub_root, "--seed_everything", "1", "--trainer.logger.init_args.name", "seed1", "--trainer.logger.init_args.version", "x")
    tiny_fit(root / "c", cub_root, "--seed_everything", "0", "--model.init_args.lr", "0.001")
    return root


def table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells for line in text.splitlines() if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])[0] != "group"}


def test_two_seeds_of_one_config_form_one_group(runs, tmp_path):
    text = report_main([str(runs), "--csv", str(tmp_path / "table.csv")])
    rows = table_rows(text)
    assert set(rows) == {"lr=0.002", "lr=0.001"}  # the only key that differs once seeds and locations are ignored
    group, count, seeds, test_acc, val_acc, epochs, fit_time, cpu_time = rows["lr=0.002"]
    assert (count, seeds, epochs) == ("2", "0 1", "1")
    accs = [json.loads((p.parent / "metrics.json").read_text())["test/acc"] for p in sorted((runs / "a").rglob("metrics.json")) + sorted((runs / "b").rglob("metrics.json"))]
    assert test_acc == f"{np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f}"
    assert rows["lr=0.001"][1:3] == ["1", "0"] and "±" not in rows["lr=0.001"][3]  # one run: no sd
    table = {row["group"]: row for row in csv.DictReader(open(tmp_path / "table.csv"))}
    assert table["lr=0.002"]["runs"] == "2" and float(table["lr=0.002"]["test_acc_mean"]) == pytest.approx(np.mean(accs))
    assert table["lr=0.001"]["model.init_args.lr"] == "0.001"
    assert "Skipped" not in text


def test_compare_pairs_runs_by_seed(runs):
    text = report_main([str(runs), "--compare", "lr=0.002", "lr=0.001", "--samples", "2000"])
    by_group = {g.label: g for g in group_runs([r for r in map(_run, sorted(runs.rglob("metrics.json")))])}
    a = next(r for r in by_group["lr=0.002"].runs if r.seed == 0)
    (_, correct_a), (_, correct_b) = read_test_predictions(a), read_test_predictions(by_group["lr=0.001"].runs[0])
    diff, low, high = paired_bootstrap(correct_a, correct_b, samples=2000)  # one seed in common: the plain paired bootstrap
    assert f"**lr=0.001 - lr=0.002**: test/acc {diff:+.4f}, pooled paired bootstrap 95 % interval [{low:+.4f}, {high:+.4f}] (1 seed pair: 0; 24 test images" in text
    assert "seed 1 of lr=0.002 has no run in the other group" in text
    with pytest.raises(SystemExit):
        report_main([str(runs), "--compare", "lr=0.002", "lr=0.5"])  # no such group: argparse's error, exit 2


def _run(metrics_json: Path) -> Run:
    run = read_run(metrics_json.parent)
    assert isinstance(run, Run), run
    return run


def test_runs_without_or_with_broken_metrics_are_skipped_with_the_reason(runs, tmp_path):
    run_dir = next((runs / "c").rglob("metrics.json")).parent
    shutil.copytree(run_dir, tmp_path / "unfinished")
    (tmp_path / "unfinished" / "metrics.json").unlink()
    shutil.copytree(run_dir, tmp_path / "partial")
    (tmp_path / "partial" / "metrics.json").write_text('{"test/acc": 0.5, "epo')
    shutil.copytree(run_dir, tmp_path / "no_csv_log")
    (tmp_path / "no_csv_log" / "metrics.csv").unlink()
    text = report_main([str(tmp_path), "--plot", str(tmp_path / "curves.png")])
    assert f"- {tmp_path / 'unfinished'}: no metrics.json: the run did not finish" in text
    assert f"- {tmp_path / 'partial'}: metrics.json is not valid JSON" in text
    assert table_rows(text)["all"][1] == "1"  # the one complete run
    assert f"- {tmp_path / 'no_csv_log'}: no val/acc in a CSV log (metrics.csv), left out of the plot" in text
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_draws_mean_and_range_over_seeds(runs, tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, low, high, **kw: drawn.setdefault(kw["color"], (list(low), list(high))))
    report_main([str(runs), "--plot", str(tmp_path / "curves.png")])
    curves = [_val_acc(p.parent) for p in sorted((runs / "a").rglob("metrics.csv")) + sorted((runs / "b").rglob("metrics.csv"))]
    assert drawn["C0"] == ([min(curves)], [max(curves)])  # group lr=0.002: one epoch, band from min to max over its 2 seeds
    assert (tmp_path / "curves.png").is_file()


def _val_acc(run_dir: Path) -> float:
    return [float(r["val/acc"]) for r in csv.DictReader(open(run_dir / "metrics.csv")) if r["val/acc"]][-1]


def test_grouping_ignores_seed_locations_versions_and_counts():
    def run(name: str, **changes: str) -> Run:
        config = {
            "seed_everything": "0", "trainer.default_root_dir": '"runs/x"', "trainer.devices": "1", "trainer.num_nodes": "1",
            "trainer.logger.init_args.version": "null", "trainer.logger.init_args.save_dir": '"runs"', "ckpt_path": "null",
            "data.init_args.num_workers": "2", "checkpoint.dirpath": "null", "model.init_args.lr": "0.002",
            "model.init_args.head": '"mgff"', "data.init_args.lr": "1",
        }
        return Run(Path(name), {**config, **changes}, {"test/acc": 0.5, "epochs": 1, "fit_seconds": 1.0}, None)

    same = run("a"), run("b", **{"seed_everything": "1", "trainer.default_root_dir": '"/scratch/y"', "trainer.devices": "4", "trainer.num_nodes": "2",
                                "trainer.logger.init_args.version": '"slurm-7"', "trainer.logger.init_args.save_dir": '"/s"', "ckpt_path": '"last"',
                                "data.init_args.num_workers": "8", "checkpoint.dirpath": '"/c"'})
    assert [g.label for g in group_runs(same)] == ["all"]
    groups = group_runs([*same, run("c", **{"model.init_args.lr": "0.01", "model.init_args.head": '"linear"'}), run("d", **{"data.init_args.lr": "2"})])
    assert [(g.label, len(g.runs)) for g in groups] == [  # keys in sorted order, each as short as still unique
        ("data.lr=1,head=mgff,model.lr=0.002", 2), ("data.lr=1,head=linear,model.lr=0.01", 1), ("data.lr=2,head=mgff,model.lr=0.002", 1),
    ]


def test_another_runners_groups_are_labelled_among_themselves_by_the_keys_that_tell_them_apart():
    """``probe:`` configs (benchmarks/head_probe.py) beside mgff.fit runs: the fit groups keep the labels they have alone;
    the probe groups are named after the runner, by as few of their differing keys as tell them apart."""
    def fit(name: str, lr: str) -> Run:
        return Run(Path(name), {"seed_everything": "0", "model.init_args.lr": lr, "model.init_args.head": '"linear"'}, {}, 0)

    def probe(name: str, head: str, lr: str = "0.001", **overrides: str) -> Run:
        config = {"seed_everything": "0", "probe.head": json.dumps(head), "probe.head_overrides.head": json.dumps(head.split("_")[0]),
                  "probe.recipe.lr": lr, **{f"probe.head_overrides.{k}": v for k, v in overrides.items()}}
        return Run(Path(name), config, {}, 0)

    fits = [fit("a", "0.002"), fit("b", "0.001")]
    assert [g.label for g in group_runs(fits)] == ["lr=0.002", "lr=0.001"]
    probes = [probe("p", "linear"), probe("q", "mgff_no_se", use_se="false"), probe("r", "linear", "0.003"), probe("s", "linear")]
    groups = group_runs([*fits, *probes])
    # head alone tells linear from mgff_no_se apart, the lr the two linear recipes; the overrides follow from the head
    assert [(g.label, [r.path.name for r in g.runs]) for g in groups] == [
        ("lr=0.002", ["a"]), ("lr=0.001", ["b"]), ("probe:head=linear,lr=0.001", ["p", "s"]), ("probe:head=mgff_no_se,lr=0.001", ["q"]),
        ("probe:head=linear,lr=0.003", ["r"]),
    ]
    assert groups[2].settings == {"probe.head": '"linear"', "probe.recipe.lr": "0.001"}
    # one group of each: the runner's name, and fit (not "all", which would name the probe's runs too)
    assert [g.label for g in group_runs([fits[0], probes[0]])] == ["fit", "probe"]
    assert [g.label for g in group_runs([probes[0], probes[3]])] == ["probe"]


def test_compare_refuses_runs_with_other_images_at_the_same_index(runs, tmp_path):
    """Pairs are made by the test dataset's index; runs of other photos or another split with as many test images have
    other paths there, and are refused instead of paired."""
    moved = tmp_path / "other_photos"
    shutil.copytree(next((runs / "c").rglob("metrics.json")).parent, moved)
    rows = list(csv.DictReader(open(moved / "test_predictions.csv", newline="")))
    rows[3]["path"], rows[5]["path"] = rows[5]["path"], rows[3]["path"]
    with open(moved / "test_predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match=r"other_photos/test_predictions.csv has other images than .* at the same index \(index 3: "):
        report_main([str(runs / "a"), str(moved), "--compare", "lr=0.002", "lr=0.001"])


def write_run(folder: Path, seed: int, tests: dict[str, list[int]]) -> None:
    """A run folder as mgff.fit writes it with ``test_checkpoints``: one predictions file per tested checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed_everything: {seed}\nmodel:\n  init_args:\n    lr: 0.1\n")
    metrics = {"epochs": 1, "fit_seconds": 1.0, "best_val/acc": 0.5}
    for i, (name, correct) in enumerate(tests.items()):
        key = "test" if i == 0 else f"test_{name}"
        metrics[f"{key}/acc"] = float(np.mean(correct))
        file = "test_predictions.csv" if i == 0 else f"test_predictions_{name}.csv"
        with open(folder / file, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "path", "correct"])
            writer.writerows([i, f"img{i}.jpg", c] for i, c in enumerate(correct))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_other_tested_checkpoints_are_listed_and_compared_within_runs(tmp_path):
    write_run(tmp_path / "s0", 0, {"last": [1, 1, 1, 0], "best": [1, 0, 1, 0], "last_raw": [1, 0, 0, 0]})
    write_run(tmp_path / "s1", 1, {"last": [1, 1, 0, 1], "best": [1, 1, 0, 1], "last_raw": [0, 1, 0, 1]})
    text = report_main([str(tmp_path), "--compare", "all@last_raw", "all", "--compare", "all@best", "all"])
    rows = table_rows(text.split("Other tested checkpoints")[1])
    assert rows["all"][1:] == ["0.7500 ± 0.0000", "0.6250 ± 0.1768", "0.3750 ± 0.1768"]  # test/acc, @best, @last_raw
    # the average over both seeds of (last - last_raw) on the same images: (2/4 + 1/4) / 2
    assert "**all - all@last_raw**: test/acc +0.3750" in text
    assert "**all - all@best**: test/acc +0.1250" in text
    with pytest.raises(SystemExit, match="test_predictions_nothing.csv is missing"):
        report_main([str(tmp_path), "--compare", "all@nothing", "all"])
