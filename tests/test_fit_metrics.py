"""What ``mgff.fit`` records in ``metrics.json`` besides accuracies: the fit's CPU time (loader workers included),
the torch thread count and, for the two-stage model, each stage's test accuracy; and ``mgff.report``'s CPU time
column, also on runs recorded before these keys existed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fit_helpers import tiny_demo_args
from mgff.fit import cpu_seconds_so_far, run as fit_run
from mgff.report import Run, group_runs, markdown_table, write_csv

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def test_cpu_time_counts_running_and_ended_children():
    """A persistent loader worker is alive when the fit ends, an ended one was waited for: both count."""
    start = cpu_seconds_so_far()
    alive = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=0.6) + "print('done', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline().strip() == "done"
        assert cpu_seconds_so_far() - start >= 0.55  # still running
    finally:
        alive.kill()
        alive.wait()
    subprocess.run([sys.executable, "-c", BURN.format(seconds=0.4)], check=True)
    assert cpu_seconds_so_far() - start >= 0.95  # both ended and waited for: RUSAGE_CHILDREN


def test_metrics_json_has_cpu_time_threads_and_each_stages_accuracy(cub_root, tmp_path):
    metrics = fit_run(tiny_demo_args(cub_root, tmp_path))
    run_dir = next(tmp_path.rglob("metrics.json")).parent
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))  # what fit returns is what it wrote
    assert saved["torch_threads"] == torch.get_num_threads()  # the count in force (an earlier test may have changed it)
    assert 0 < saved["cpu_seconds"] <= saved["fit_seconds"] * (torch.get_num_threads() + 2) + 1
    # TwoStageClassifier's test gives stage 1, stage 2 and the merged prediction's accuracies: all land in metrics.json
    assert {"test/acc", "test/stage1_acc", "test/stage2_acc", "test/acc5", "test/stage1_acc5", "test/stage2_acc5"} <= saved.keys()
    assert all(0.0 <= saved[k] <= 1.0 for k in ("test/acc", "test/stage1_acc", "test/stage2_acc"))
    rows = list(csv.DictReader(open(run_dir / "test_predictions.csv")))
    assert sum(r["correct"] == "1" for r in rows) / len(rows) == pytest.approx(saved["test/acc"], abs=1e-6)  # test/acc is the merged one


def _run(name: str, seed: int, **metrics) -> Run:
    lr = {"a": "0.002", "b": "0.001", "c": "0.003"}[name[0]]  # one group per letter
    return Run(Path(name), {"model.init_args.lr": lr}, {"test/acc": 0.5, "epochs": 1, "fit_seconds": 60.0, **metrics}, seed)


def test_report_shows_cpu_time_and_reads_runs_without_it(tmp_path):
    groups = group_runs([
        _run("a0", 0, cpu_seconds=100.0), _run("a1", 1, cpu_seconds=140.0),  # both recorded it
        _run("b0", 0, cpu_seconds=90.0), _run("b1", 1),  # one run made before mgff recorded it
        _run("c0", 0),  # a group of old runs only
    ])
    table = markdown_table(groups)
    header, _, *rows = table.splitlines()
    assert header.endswith("| fit time | CPU time |")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0][-2:] == ["60 s", "2.0 min"]  # mean of 100 and 140 s
    assert cells[1][-1] == "90 s (1 of 2 runs)"
    assert cells[-1][-1] == "-"
    write_csv(groups[:2], tmp_path / "table.csv")
    written = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert [float(r["cpu_seconds_mean"]) for r in written] == [120.0, 90.0] and [r["cpu_seconds_runs"] for r in written] == ["2", "1"]
