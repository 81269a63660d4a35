"""``python -m mgff.sweep`` on the demo config shrunk to seconds (generated data under ``tmp_path``): runs land in
fixed folders that ``mgff.report`` groups, finished runs are skipped, a diverged run is reported with its reason
while the next one runs, an unfinished run resumes from its ``last.ckpt``, signals reach a run once, and the SLURM
array script maps every task id to one (config, seed) and to the sweep's own folder."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mgff import sweep as sweep_module
from mgff.report import main as report_main
from mgff.sweep import failure_reason, folder_names, main as sweep_main, merge_csv_logs, plan_runs

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
ARRAY_SCRIPT = REPO / "experiments" / "slurm" / "sweep_array.sh"
# the demo at 4 classes x 12 generated images, two training steps, one validation and one test batch
TINY = [
    "--data.init_args.num_classes", "4", "--data.init_args.images_per_class", "12",
    "--data.init_args.min_side", "64", "--data.init_args.max_side", "96", "--data.init_args.batch_size", "8",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


def sweep(*args: str) -> tuple[int, str]:
    """Run the sweep in-process (its runs are subprocesses); returns its exit status and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sweep_main(list(args))
    return code, out.getvalue()


def table(output: str) -> dict[tuple[str, str], list[str]]:
    """The summary table: ``(config, seed)`` -> ``[status, test/acc, reason]``."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "config":
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A diverging copy of the demo (lr 1e6) and the demo, seed 0; then the demo with seeds 0 and 1 (0 is done)."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = yaml.safe_load(open(DEMO))
    config["model"]["init_args"]["lr"] = 1.0e6
    diverge = tmp / "diverge.yaml"
    diverge.write_text(yaml.safe_dump(config))
    out = tmp / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MGFF_CACHE_DIR", str(tmp / "cache"))
        first = sweep("--configs", str(diverge), DEMO, "--seeds", "0", "--out", str(out), "--threads", "1", "--workers", "0", "--", *TINY)
        second = sweep("--configs", DEMO, "--seeds", "0", "1", "--out", str(out), "--threads", "1", "--workers", "0", "--", *TINY)
    return out, first, second


def test_a_diverged_run_is_reported_with_its_reason_and_the_next_run_goes_on(swept):
    out, (code, output), _ = swept
    assert code == 1
    rows = table(output)
    status, acc, reason = rows[("diverge", "0")]
    assert status == "failed" and acc == "-"
    assert reason.startswith("exit 1: mgff: non-finite") and "Not tested, no metrics.json written" in reason  # mgff.fit's own line
    assert not (out / "diverge" / "seed0" / "metrics.json").exists()
    assert "non-finite" in (out / "diverge" / "seed0" / "sweep.log").read_text()
    assert rows[("demo", "0")][0] == "finished" and (out / "demo" / "seed0" / "metrics.json").is_file()  # ran after the failure
    assert "1 run(s) failed" in output and str(out / "diverge" / "seed0" / "sweep.log") in output


def test_runs_land_in_fixed_folders_as_ordinary_run_folders(swept):
    out, _, (code, output) = swept
    assert code == 0
    rows = table(output)
    assert rows[("demo", "0")][0] == "skipped" and rows[("demo", "1")][0] == "finished"
    for seed in (0, 1):
        folder = out / "demo" / f"seed{seed}"
        assert {"config.yaml", "metrics.json", "metrics.csv", "test_predictions.csv", "sweep.log"} <= {p.name for p in folder.iterdir()}
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["torch_threads"] == 1  # --threads 1
        assert metrics["cpu_seconds"] > 0 and {"test/stage1_acc", "test/stage2_acc"} <= metrics.keys()
        assert f"{float(rows[('demo', str(seed))][1]):.4f}" == f"{metrics['test/acc']:.4f}"
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["seed_everything"] == seed and saved["data"]["init_args"]["num_workers"] == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("metrics.json")) == ["demo/seed0/metrics.json", "demo/seed1/metrics.json"]


def test_running_again_skips_finished_runs_without_training(swept):
    out, _, _ = swept
    logs = {p: (p.stat().st_mtime_ns, p.read_text()) for p in out.rglob("demo/*/sweep.log")}
    code, output = sweep("--configs", DEMO, "--seeds", "0", "1", "--out", str(out), "--threads", "1", "--workers", "0", "--", *TINY)
    assert code == 0
    assert [row[0] for row in table(output).values()] == ["skipped", "skipped"]
    assert output.count("skipped, finished") == 2 and "start in" not in output
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in logs} == logs  # nothing ran in those folders


def test_other_overrides_in_a_finished_folder_are_refused_not_reused(swept):
    out, _, _ = swept
    code, output = sweep("--configs", DEMO, "--seeds", "0", "--out", str(out), "--", *TINY[:-2], "--trainer.max_epochs", "3")
    assert code == 1
    status, _, reason = table(output)[("demo", "0")]
    assert status == "failed" and "other overrides" in reason and "now '--trainer.max_epochs 3'" in reason


def test_report_groups_the_seeds_of_the_sweep(swept):
    out, _, _ = swept
    text = report_main([str(out)])
    rows = [line for line in text.splitlines() if line.startswith("| all ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:3] == ["2", "0 1"]  # the two seeds of the demo, one row
    assert "CPU time" in text and cells[-1] != "-"
    assert f"{(out / 'diverge' / 'seed0').resolve()}: no metrics.json" in text  # the diverged run is listed as skipped


def test_an_unfinished_run_resumes_from_its_last_checkpoint(swept, tmp_path, monkeypatch):
    out, _, _ = swept
    monkeypatch.setenv("MGFF_CACHE_DIR", str(out.parent / "cache"))
    folder = tmp_path / "runs" / "demo" / "seed1"
    shutil.copytree(out / "demo" / "seed1", folder)
    (folder / "metrics.json").unlink()  # killed after its last epoch's checkpoint
    code, output = sweep("--configs", DEMO, "--seeds", "1", "--out", str(tmp_path / "runs"), "--threads", "1", "--workers", "0", "--", *TINY)
    assert code == 0, output
    status, _, note = table(output)[("demo", "1")]
    assert status == "finished" and note == f"resume from {folder / 'checkpoints' / 'last.ckpt'}"
    log = (folder / "sweep.log").read_text()
    assert "--ckpt_path" in log and "Restored all states from the checkpoint" in log
    assert json.loads((folder / "metrics.json").read_text())["epochs"] == 1
    # the CSV log's rows of epoch 0 (deleted by Lightning's CSVLogger on the new start) are back
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    assert any(r["epoch"] == "0" and r.get("val/acc") for r in rows) and any(r.get("test/acc") for r in rows)
    assert not list(folder.glob("metrics.before-resume-*"))


def test_dry_run_plans_restart_or_resume_and_changes_nothing(tmp_path):
    out = tmp_path / "runs"
    (out / "demo" / "seed0").mkdir(parents=True)
    (out / "demo" / "seed0" / "sweep.log").write_text("crashed before its first checkpoint\n")
    (out / "demo" / "seed1" / "checkpoints").mkdir(parents=True)
    (out / "demo" / "seed1" / "checkpoints" / "last.ckpt").write_bytes(b"")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, output = sweep("--configs", DEMO, "--seeds", "0", "1", "2", "--out", str(out), "--dry-run", "--threads", "2", "--", "--trainer.max_epochs", "2")
    assert code == 0
    assert re.search(r"seed 0: would restart from scratch \(no checkpoint to resume from; the unfinished folder moved to .*seed0\.failed-\d{8}-\d{6}\)", output)
    assert f"seed 1: would resume from {out / 'demo' / 'seed1' / 'checkpoints' / 'last.ckpt'}" in output
    assert "seed 2: would start" in output
    commands = [line.strip() for line in output.splitlines() if "-m mgff.fit" in line]
    assert len(commands) == 3 and all(c.startswith("OMP_NUM_THREADS=2 ") for c in commands)
    assert "--trainer.max_epochs 2 --seed_everything 1" in commands[1] and commands[1].endswith(f"--ckpt_path {out / 'demo' / 'seed1' / 'checkpoints' / 'last.ckpt'}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_options_the_sweep_sets_and_missing_configs_are_refused(tmp_path, capsys):
    for args in (["--", "--seed_everything", "3"], ["--", "--trainer.logger.init_args.save_dir=x"]):
        with pytest.raises(SystemExit):
            sweep_main(["--configs", DEMO, "--seeds", "0", "--out", str(tmp_path), *args])
        assert "set by the sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_main(["--configs", DEMO, str(tmp_path / "nope.yaml"), "--seeds", "0", "--out", str(tmp_path)])
    assert "no such config file" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("logger", ["unset", False, "list"])
def test_the_run_folder_is_fixed_whatever_the_logger(logger, tmp_path, capsys):
    """The command line of a config without a logger (the CLI's default CSV logger), with none, and with two:
    the resolved config puts the run folder (Lightning's log_dir) at <out>/<name>/seed<k>."""
    from mgff.fit import run as fit_run

    config = yaml.safe_load(open(DEMO))
    if logger == "unset":
        del config["trainer"]["logger"]
    elif logger == "list":
        config["trainer"]["logger"] = [config["trainer"]["logger"], {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}]
    else:
        config["trainer"]["logger"] = logger
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    run = plan_runs([str(path)], [4], tmp_path / "out")[0]
    command = sweep_module.fit_command(run, ["--trainer.max_epochs", "1"])
    assert command[1:3] == ["-m", "mgff.fit"]
    with pytest.raises(SystemExit):
        fit_run([*command[3:], "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    trainer = resolved["trainer"]
    assert trainer["default_root_dir"] == str(tmp_path / "out" / "cfg" / "seed4")
    assert resolved["checkpoint"]["dirpath"] == resolved["last_checkpoint"]["dirpath"] == str(tmp_path / "out" / "cfg" / "seed4" / "checkpoints")
    if logger is False:
        assert trainer["logger"] is False
    else:
        first = trainer["logger"][0] if logger == "list" else trainer["logger"]
        assert first["class_path"].endswith("CSVLogger")
        assert (first["init_args"]["save_dir"], first["init_args"]["name"], first["init_args"]["version"]) == (str(tmp_path / "out"), "cfg", "seed4")


def test_folder_names_are_stems_unless_two_configs_share_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("experiments/lite0/single.yaml", "experiments/b0/single.yaml", "experiments/demo.yaml", "experiments/ablation/no_se.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    runs = plan_runs(["experiments/lite0/single.yaml", "experiments/b0/single.yaml", "experiments/demo.yaml+experiments/ablation/no_se.yaml"], [0], "out")
    assert [r.folder.as_posix() for r in runs] == ["out/lite0_single/seed0", "out/b0_single/seed0", "out/no_se/seed0"]
    assert [str(p) for p in runs[2].configs] == ["experiments/demo.yaml", "experiments/ablation/no_se.yaml"]
    # one config of that sweep alone (a SLURM array task) gets the same folder with --among
    alone = plan_runs(["experiments/b0/single.yaml"], [0], "out", among=["experiments/lite0/single.yaml", "experiments/b0/single.yaml"])
    assert alone[0].folder.as_posix() == "out/b0_single/seed0"
    assert plan_runs(["experiments/b0/single.yaml"], [0], "out")[0].folder.as_posix() == "out/single/seed0"
    assert len(set(folder_names([(Path("a_b/c.yaml"),), (Path("a/b_c.yaml"),)]).values())) == 2  # a name clash after joining


def test_failure_reason_prefers_mgff_line_then_error_line():
    assert failure_reason("x\nmgff: non-finite loss; Not tested\nTraceback (most recent call last):\nValueError: y\n") == "mgff: non-finite loss; Not tested"
    assert failure_reason("mgff: test/acc=0.5 ...\nTraceback (most recent call last):\n  File x\nRuntimeError: boom\n") == "RuntimeError: boom"
    assert failure_reason("usage: fit.py\nerror: Problems parsing config: while parsing\n  in line 15\n") == "error: Problems parsing config: while parsing in line 15"
    assert failure_reason("") == "no output"


def test_merge_csv_logs_keeps_the_epochs_before_the_resume(tmp_path):
    before, after = tmp_path / "before.csv", tmp_path / "metrics.csv"
    before.write_text("epoch,step,val/acc,train/loss\n0,1,0.5,\n0,1,,2.0\n1,3,,1.5\n")  # epoch 1 cut short
    after.write_text("epoch,step,val/acc,test/acc\n1,3,0.6,\n2,4,,0.7\n")
    merge_csv_logs(before, after)
    rows = list(csv.DictReader(open(after)))
    assert [(r["epoch"], r["val/acc"], r["train/loss"], r["test/acc"]) for r in rows] == [("0", "0.5", "", ""), ("0", "", "2.0", ""), ("1", "0.6", "", ""), ("2", "", "", "0.7")]
    assert not before.exists()


def test_a_signal_reaches_each_running_run_once_and_stops_the_sweep(tmp_path, monkeypatch):
    """The runs have their own process group: a SIGUSR1 to the sweep is passed on once (a second one would end
    mgff.fit without a checkpoint), no further run starts, and the sweep exits with 128 + SIGUSR1."""
    child = (
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
        "print('ready', flush=True)\n"
        "end = time.time() + 30\n"
        "while not got and time.time() < end: time.sleep(0.05)\n"
        "time.sleep(0.5)  # a second signal would arrive meanwhile\n"
        "print('signals', len(got), flush=True)\n"
        "sys.exit(128 + signal.SIGUSR1 if got else 0)\n"
    )
    monkeypatch.setattr(sweep_module, "fit_command", lambda run, *a, **k: [sys.executable, "-c", child])
    out = tmp_path / "runs"

    def send_when_ready():
        log = out / "demo" / "seed0" / "sweep.log"
        for _ in range(600):
            if log.is_file() and "ready" in log.read_text().splitlines():  # the line, not the command in the header
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    handler_before = signal.getsignal(signal.SIGUSR1)
    sender = threading.Thread(target=send_when_ready)
    sender.start()
    code, output = sweep("--configs", DEMO, "--seeds", "0", "1", "--out", str(out))
    sender.join()
    assert code == 128 + signal.SIGUSR1
    assert "signals 1" in (out / "demo" / "seed0" / "sweep.log").read_text()
    rows = table(output)
    assert rows[("demo", "0")][0] == "stopped" and rows[("demo", "1")][0] == "not run"
    assert not (out / "demo" / "seed1").exists()
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the sweep's handler is gone


# ----- the SLURM job array ---------------------------------------------------------------------------
def array_task(task: int, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the array script for ``task`` with a stand-in ``python`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / f"args{task}"
    (bin_dir / "python").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "8"}
    result = subprocess.run(["bash", str(ARRAY_SCRIPT), "--trainer.max_epochs", "3"], cwd=REPO, env=env, capture_output=True, text=True)
    return result, record.read_text().splitlines() if record.is_file() else []


def test_array_script_is_valid_bash_and_asks_the_signal_for_the_sweep_alone():
    result = subprocess.run(["bash", "-n", str(ARRAY_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = ARRAY_SCRIPT.read_text()
    assert "#SBATCH --signal=B:SIGUSR1@90" in text and "#SBATCH --requeue" in text
    assert re.search(r"^exec python -m mgff\.sweep ", text, re.M) and "srun" not in text.split("set -euo pipefail")[1]


def test_array_ids_map_to_every_config_and_seed_once_in_the_sweeps_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the script's config paths are relative to the repository root
    first, last = map(int, re.search(r"#SBATCH --array=(\d+)-(\d+)", ARRAY_SCRIPT.read_text()).groups())
    seen, folders = [], []
    for task in range(first, last + 1):
        result, args = array_task(task, tmp_path)
        assert result.returncode == 0, result.stderr
        assert args[:2] == ["-m", "mgff.sweep"]
        configs, seeds = args[args.index("--configs") + 1], args[args.index("--seeds") + 1]
        among = args[args.index("--among") + 1 : args.index("--threads")]
        assert args[args.index("--threads") + 1] == "8" and args[-3:] == ["--", "--trainer.max_epochs", "3"]
        seen.append((configs, int(seeds)))
        folders.append(plan_runs([configs], [int(seeds)], "runs/sweep", among)[0].folder)
    all_configs = list(dict.fromkeys(c for c, _ in seen))
    all_seeds = list(dict.fromkeys(s for _, s in seen))
    assert sorted(seen) == sorted((c, s) for c in all_configs for s in all_seeds) and len(set(seen)) == len(seen)
    assert all(Path(part).is_file() for c in all_configs for part in c.split("+"))  # the script's configs exist
    whole = [r.folder for r in plan_runs(all_configs, all_seeds, "runs/sweep")]
    assert folders == whole  # task order = the sweep's own order, same folders
    result, args = array_task(last + 1, tmp_path)
    assert result.returncode == 2 and "out of range" in result.stderr and not args
