"""The sbatch scripts: valid bash, the #SBATCH requests that preemption and requeue need, and an srun
line whose devices/num_nodes follow the request. Each script is run with a stand-in ``srun`` that
records its arguments, under the environment SLURM would set for that request; the recorded
``mgff.fit`` command line must then parse in the real CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mgff.fit import run as fit_run

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "experiments" / "slurm").glob("*.sbatch"))
JOB_ID = "4242"


def sbatch_options(script: Path) -> dict[str, str]:
    """``#SBATCH --key=value`` lines as ``{key: value}`` (``""`` for flags such as ``--requeue``)."""
    options = {}
    for line in script.read_text().splitlines():
        if match := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            options[match.group(1)] = match.group(2) or ""
    return options


def gpus_per_node(options: dict[str, str]) -> int:
    if "gpus-per-node" in options:
        return int(options["gpus-per-node"].split(":")[-1])
    match = re.fullmatch(r"gpu(?::[\w-]+)?:(\d+)", options["gres"])
    assert match, f"--gres={options['gres']} does not request GPUs"
    return int(match.group(1))


def test_there_are_single_and_multi_node_scripts():
    nodes = sorted(int(sbatch_options(s)["nodes"]) for s in SCRIPTS)
    assert nodes[0] == 1 and nodes[-1] >= 2, [s.name for s in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_requests_one_task_per_gpu_and_preemption_signal(script):
    options = sbatch_options(script)
    assert int(options["ntasks-per-node"]) == gpus_per_node(options)
    assert options["signal"] == "SIGUSR1@90"  # to the tasks (no B:), where Lightning/mgff handle it
    assert "requeue" in options
    assert options.get("open-mode") == "append"  # a requeued job appends to its log


def run_with_recording_srun(script: Path, tmp_path: Path) -> list[str]:
    """Run ``script`` as SLURM would for its #SBATCH request, with ``srun`` replaced by a recorder;
    returns the arguments given to ``python -m mgff.fit``."""
    options = sbatch_options(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun_args"
    fake_srun = bin_dir / "srun"
    fake_srun.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    fake_srun.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": options["job-name"],
        "SLURM_NNODES": options["nodes"],
        "SLURM_NTASKS_PER_NODE": options["ntasks-per-node"],
        "SLURM_CPUS_PER_TASK": options["cpus-per-task"],
    }
    work = tmp_path / "repo"
    work.mkdir()
    result = subprocess.run(["bash", str(script), "--trainer.max_epochs", "3"], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    args = record.read_text().splitlines()
    start = args.index("python")
    assert args[start : start + 3] == ["python", "-m", "mgff.fit"], args
    return args[start + 3 :]


def value_of(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_srun_line_follows_the_request(script, tmp_path):
    options = sbatch_options(script)
    args = run_with_recording_srun(script, tmp_path)
    assert int(value_of(args, "--trainer.devices")) == int(options["ntasks-per-node"]) == gpus_per_node(options)
    assert int(value_of(args, "--trainer.num_nodes")) == int(options["nodes"])
    assert value_of(args, "--trainer.strategy") == "ddp"
    run_dir = value_of(args, "--trainer.default_root_dir")
    assert JOB_ID in run_dir and (tmp_path / "repo" / run_dir).is_dir()  # stable across requeues
    assert value_of(args, "--trainer.logger.init_args.save_dir") == run_dir
    assert JOB_ID in value_of(args, "--trainer.logger.init_args.version")
    assert args[-2:] == ["--trainer.max_epochs", "3"]  # the script's own arguments reach mgff.fit


def test_srun_line_parses_in_the_cli(tmp_path, capsys):
    script = next(s for s in SCRIPTS if int(sbatch_options(s)["nodes"]) >= 2)
    args = run_with_recording_srun(script, tmp_path)
    args[args.index("--config") + 1] = str(REPO / value_of(args, "--config"))
    with pytest.raises(SystemExit) as done:
        fit_run([*args, "--print_config"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"version: slurm-{JOB_ID}" in out
    # devices parses as the string '4', which Lightning reads as a count ("4," would be GPU index 4)
    assert re.search(r"^  devices: '?4'?$", out, re.M) and re.search(r"^  num_nodes: 2$", out, re.M)
    assert "signals:" in out and "SIGUSR1" in out  # the preemption callback is configured


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM on this machine")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_sbatch_accepts_the_script(script):
    result = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
