"""``python -m mgff.sweep --configs A.yaml B.yaml --seeds 0 1 2 --out runs/sweep [-- overrides]``: many runs, one command.

Every (config, seed) is an ordinary ``python -m mgff.fit --config <config> --seed_everything <seed>`` run in a
subprocess, in a folder fixed by the config and the seed: ``<out>/<config stem>/seed<k>/``, an ordinary run
folder (``config.yaml``, ``metrics.json``, ``test_predictions.csv``, ``metrics.csv``, ``checkpoints/``) that
``python -m mgff.report <out>`` groups and compares. Arguments after ``--`` go to every run.

- **Folders.** The logger's ``save_dir``/``name``/``version`` (CSV and TensorBoard loggers; another logger's
  ``save_dir``; nothing without a logger), ``trainer.default_root_dir`` and the ``dirpath`` of ``checkpoint``
  and ``last_checkpoint`` are set on the command line, after the overrides, so that the run folder is exactly
  that one. Two configs with the same stem are named by their paths instead (``experiments/lite0/single.yaml``
  -> ``lite0_single``). ``A.yaml+B.yaml`` stacks configs (``--config A.yaml --config B.yaml``: a dataset
  config, then an ablation); the folder takes the last one's stem.
- **Finished runs are skipped**: a folder with ``metrics.json``. A folder without it (a run killed, preempted,
  crashed) is resumed from its newest checkpoint (``checkpoints/last.ckpt``, or a preemption's
  ``hpc_ckpt_N.ckpt``) with ``--ckpt_path``, its earlier ``metrics.csv`` rows kept (Lightning's CSV logger
  would delete them); without a checkpoint (or with ``--no-resume``) the folder is moved aside to
  ``<folder>.failed-<time>`` and the run starts again. The overrides of a run are recorded in
  ``<folder>/sweep.json``; a folder left by a run with other overrides is not skipped nor resumed but reported
  as failed, so a changed sweep never reuses results silently (use another ``--out``).
- **Failures do not stop the sweep.** A run that exits non-zero (a diverged run: ``mgff.fit`` exits 1 and says
  why on a line starting ``mgff:``) is reported with its reason: that line, or else the log's last error line.
- Each run's stdout and stderr go to ``<folder>/sweep.log`` (appended, one header per attempt). At the end a
  table (config, seed, status, ``test/acc``, reason); the exit status is 1 if a run failed.
- ``--jobs N`` runs N at once, each with ``--threads T`` threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
  ``OPENBLAS_NUM_THREADS``; torch follows ``OMP_NUM_THREADS``); by default one at a time with the inherited
  environment, or with N > 1 the usable CPUs divided by N. ``--workers W`` sets ``data.init_args.num_workers``.
- **Signals.** The runs have their own process group, and SIGINT, SIGTERM and SIGUSR1 sent to the sweep are
  passed on to them exactly once: ``mgff.fit``'s preemption handling checkpoints and stops them (SIGUSR1 also
  requeues a SLURM job; it takes a *second* SIGUSR1 or SIGTERM as "terminate now"). Then no new run starts and
  the sweep exits with ``128 + signal``; rerunning it resumes them. So signal the sweep alone: under SLURM run it
  as the batch shell (``exec``, ``#SBATCH --signal=B:SIGUSR1@90``), not in an ``srun`` step, whose signals
  may reach every process of the step and so reach a run twice.
- ``--dry-run`` prints what would be done and the commands, and changes nothing.

For a SLURM job array, ``experiments/slurm/sweep_array.sh`` runs one (config, seed) per array task through
this command, into the same folders (``--among`` names them as the whole sweep would).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["Run", "plan_runs", "folder_names", "fit_command", "location_args", "resume_checkpoint", "failure_reason", "main"]

STACK = "+"
LOG = "sweep.log"
CSV_LOG = "metrics.csv"
RECORD = "sweep.json"
#: options the sweep sets itself, after the user's overrides (so that the folder is fixed)
OWNED_OPTIONS = (
    "--seed_everything",
    "--trainer.default_root_dir",
    "--trainer.logger.init_args.save_dir",
    "--trainer.logger.init_args.name",
    "--trainer.logger.init_args.version",
    "--checkpoint.dirpath",
    "--last_checkpoint.dirpath",
    "--ckpt_path",
)
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
UNSET = object()


@dataclass
class Run:
    """One (config, seed) of the sweep: the stacked config files, the seed, the folder's name and the folder."""

    configs: tuple[Path, ...]
    seed: int
    name: str
    folder: Path
    status: str = "pending"
    note: str = ""
    test_acc: float | None = None
    command: list[str] = field(default_factory=list)
    csv_before: Path | None = None  # a resumed run's earlier CSV log, merged back when it ends

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"


# ----- naming --------------------------------------------------------------------------------------
def parse_config_spec(spec: str) -> tuple[Path, ...]:
    """``"a.yaml+b.yaml"`` -> ``(Path("a.yaml"), Path("b.yaml"))``: configs stacked in that order."""
    return tuple(Path(os.path.normpath(part)) for part in spec.split(STACK) if part)


def _path_parts(spec: tuple[Path, ...]) -> list[str]:
    """The spec's files as path parts without suffix, relative to the working directory when inside it."""
    cwd = Path.cwd().resolve()
    parts: list[str] = []
    for path in spec:
        resolved = path.resolve()
        try:
            relative = resolved.relative_to(cwd)
        except ValueError:
            relative = resolved.relative_to(resolved.anchor)
        parts += list(relative.with_suffix("").parts)
    return parts


def folder_names(specs: Sequence[tuple[Path, ...]]) -> dict[tuple[Path, ...], str]:
    """A folder name for each config spec: the last file's stem; specs sharing a stem are named by their path
    parts after the leading folders they all share, joined by ``_`` (``lite0_single``, ``b0_single``); a name
    still taken gets a short hash of the paths. Depends on the whole list: pass the same list for every part
    of a sweep (``--among``)."""
    specs = list(dict.fromkeys(specs))
    stems = {spec: spec[-1].stem for spec in specs}
    names: dict[tuple[Path, ...], str] = {}
    for spec in specs:
        same = [other for other in specs if stems[other] == stems[spec]]
        if len(same) == 1:
            names[spec] = stems[spec]
            continue
        parts = {other: _path_parts(other) for other in same}
        common = len(os.path.commonprefix(list(parts.values())))
        names[spec] = "_".join(parts[spec][min(common, len(parts[spec]) - 1) :])
    taken: dict[str, int] = {}
    for name in names.values():
        taken[name] = taken.get(name, 0) + 1
    for spec, name in names.items():
        if taken[name] > 1:
            names[spec] = f"{name}-{hashlib.sha1(STACK.join(map(str, spec)).encode()).hexdigest()[:6]}"
    return names


def plan_runs(configs: Sequence[str], seeds: Sequence[int], out: str | Path, among: Sequence[str] = ()) -> list[Run]:
    """The runs, config-major (config 0 seed 0, config 0 seed 1, ...), each with its folder."""
    specs = list(dict.fromkeys(map(parse_config_spec, configs)))
    names = folder_names(list(dict.fromkeys([*map(parse_config_spec, among), *specs])))
    return [Run(spec, seed, names[spec], Path(out) / names[spec] / f"seed{seed}") for spec in specs for seed in dict.fromkeys(seeds)]


# ----- the command ---------------------------------------------------------------------------------
def _option_values(extra: Sequence[str], option: str) -> list[str]:
    """Values of ``option`` in ``extra``, as ``--option value`` or ``--option=value``, in order."""
    values = []
    for i, arg in enumerate(extra):
        if arg == option and i + 1 < len(extra):
            values.append(extra[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg[len(option) + 1 :])
    return values


def configured_logger(configs: Sequence[Path], extra: Sequence[str]) -> Any:
    """``trainer.logger`` as the run will see it: the configs' YAML in order, then the overrides' ``--config``
    files and ``--trainer.logger`` values (in that order, an approximation of the CLI's); :data:`UNSET` when
    nothing sets it (the CLI's default CSV logger)."""
    logger: Any = UNSET
    sources: list[tuple[str, str]] = [("file", str(path)) for path in configs]
    for i, arg in enumerate(extra):
        for option, kind in (("--config", "file"), ("--trainer.logger", "value"), ("--trainer.logger.class_path", "class")):
            if arg == option and i + 1 < len(extra):
                sources.append((kind, extra[i + 1]))
            elif arg.startswith(option + "="):
                sources.append((kind, arg[len(option) + 1 :]))
    for kind, text in sources:
        if kind == "file":
            try:
                loaded = yaml.safe_load(Path(text).read_text())
            except (OSError, yaml.YAMLError):
                continue  # mgff.fit will say what is wrong with it
            trainer = loaded.get("trainer") if isinstance(loaded, dict) else None
            if isinstance(trainer, dict) and "logger" in trainer:
                logger = trainer["logger"]
        elif kind == "value":
            try:
                logger = yaml.safe_load(text)
            except yaml.YAMLError:
                logger = text
        else:
            logger = {"class_path": text}
    return logger


def _is_dir_logger(logger: Any) -> bool:
    """CSV and TensorBoard loggers: their folder is ``save_dir/name/version``."""
    class_path = str(logger.get("class_path", "")) if isinstance(logger, dict) else ""
    return class_path.rsplit(".", 1)[-1] in ("CSVLogger", "TensorBoardLogger")


def location_args(logger: Any, run: Run) -> list[str]:
    """The options that put every output of ``run`` into ``run.folder``, for the configured ``logger``."""
    folder = str(run.folder)
    args = [
        "--trainer.default_root_dir", folder,
        "--checkpoint.dirpath", str(run.folder / "checkpoints"),
        "--last_checkpoint.dirpath", str(run.folder / "checkpoints"),
    ]
    out, name, version = str(run.folder.parent.parent), run.folder.parent.name, run.folder.name
    if logger is UNSET or _is_dir_logger(logger):  # unset: the CLI's default CSVLogger
        args += ["--trainer.logger.init_args.save_dir", out, "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", version]
    elif logger is None or logger is False or logger == []:
        pass  # no logger: the run folder is trainer.default_root_dir
    elif isinstance(logger, dict):  # W&B, MLflow...: Lightning's log_dir is the logger's save_dir
        args += ["--trainer.logger.init_args.save_dir", folder]
    elif logger is True or isinstance(logger, list):
        # True: Lightning's default logger (TensorBoard); a list: the first logger's folder is the run's
        items = [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}] if logger is True else logger
        fixed = []
        for i, item in enumerate(items):
            item = dict(item) if isinstance(item, dict) else {"class_path": str(item)}
            init_args = dict(item.get("init_args") or {})
            if i == 0 and _is_dir_logger(item):
                init_args.update(save_dir=out, name=name, version=version)
            else:
                init_args["save_dir"] = folder
            fixed.append({**item, "init_args": init_args})
        args += ["--trainer.logger", json.dumps(fixed if isinstance(logger, list) else fixed[0])]
    return args


def fit_command(run: Run, extra: Sequence[str], workers: int | None = None, ckpt_path: Path | None = None) -> list[str]:
    """``python -m mgff.fit`` for ``run``: its configs, the worker count, the overrides, then what the sweep
    fixes (seed, folders, and the checkpoint to resume from) so that the overrides cannot move the folder."""
    command = [sys.executable, "-m", "mgff.fit"]
    for path in run.configs:
        command += ["--config", str(path)]
    if workers is not None:
        command += ["--data.init_args.num_workers", str(workers)]
    command += [*extra, "--seed_everything", str(run.seed), *location_args(configured_logger(run.configs, extra), run)]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    return command


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of a run: unbuffered output (the log keeps stdout and stderr in order) and the thread count."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
    return env


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----- state of a run folder -----------------------------------------------------------------------
def resume_checkpoint(folder: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and the preemption checkpoints ``hpc_ckpt_N.ckpt`` in ``folder``."""
    candidates = [folder / "checkpoints" / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def recorded_extra(folder: Path) -> list[str] | None:
    """The overrides recorded by the sweep that last ran in ``folder`` (``None``: none recorded)."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    extra = record.get("extra") if isinstance(record, dict) else None
    return [str(arg) for arg in extra] if isinstance(extra, list) else None


def read_test_acc(folder: Path) -> tuple[float | None, str]:
    """``test/acc`` of a finished run, and a note when its ``metrics.json`` cannot be read."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        return float(metrics["test/acc"]), ""
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"metrics.json unreadable: {err}"


def _options(args: Sequence[str]) -> list[str]:
    """``["--a", "1", "--b=2", "x"]`` -> ``["--a 1", "--b=2 x"]``: each option with its values."""
    items: list[str] = []
    for arg in args:
        if arg.startswith("--") or not items:
            items.append(shlex.quote(arg))
        else:
            items[-1] += " " + shlex.quote(arg)
    return items


def overrides_diff(before: Sequence[str], now: Sequence[str]) -> str:
    """What changed between two override lists, option by option: ``was '--trainer.max_epochs 1', now '--trainer.max_epochs 2'``."""
    old, new = _options(before), _options(now)
    was, is_now = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag != "equal":
            was += old[i1:i2]
            is_now += new[j1:j2]
    return f"was {' '.join(was) or 'nothing'!r}, now {' '.join(is_now) or 'nothing'!r}"


def set_csv_log_aside(folder: Path) -> Path | None:
    """Before a resume: move ``metrics.csv`` to ``metrics.before-resume-<time>.csv`` (Lightning's CSVLogger deletes it
    when the run starts), to be merged back by :func:`merge_csv_logs`; first merge back what an earlier sweep, killed
    meanwhile, left set aside."""
    current = folder / CSV_LOG
    for earlier in sorted(folder.glob("metrics.before-resume-*.csv")):
        merge_csv_logs(earlier, current)
    if not current.is_file():
        return None
    aside = folder / f"metrics.before-resume-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    current.rename(aside)
    return aside


def merge_csv_logs(before: Path, after: Path) -> None:
    """Put a resumed run's earlier CSV log rows back in front of its new ones (Lightning's CSVLogger deletes
    ``metrics.csv`` when a run starts in a folder that has one): the earlier rows of the epochs before the
    first epoch the resumed run logged, then the resumed run's rows; the columns of both. ``before`` is removed."""
    def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
        if not path.is_file():
            return [], []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def epoch(row: dict[str, str]) -> float:
        try:
            return float(row.get("epoch") or "nan")
        except ValueError:
            return math.nan

    old_fields, old_rows = read(before)
    new_fields, new_rows = read(after)
    new_epochs = [e for e in map(epoch, new_rows) if not math.isnan(e)]
    cutoff = min(new_epochs, default=math.inf)
    rows = [row for row in old_rows if not epoch(row) >= cutoff] + new_rows
    fields = list(dict.fromkeys([*old_fields, *new_fields]))
    partial = after.with_name(after.name + ".partial")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, after)
    before.unlink()


ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b|\berror:|^Traceback", re.IGNORECASE)


def failure_reason(log: str) -> str:
    """Why a run failed, from its log: the last line ``mgff.fit`` wrote about it (``mgff: ...``, not the summary
    of a finished run), else the last error line (an exception, a CLI ``error:``), else the last line."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", log) if line.strip()]
    own = [line for line in lines if line.startswith("mgff:") and not line.startswith("mgff: test/acc=")]
    if own:
        return own[-1]
    errors = [i for i, line in enumerate(lines) if ERROR_LINE.search(line) and not line.startswith("Traceback")]
    if errors:  # with the lines that continue it (a YAML error's position, a multi-line message)
        reason = " ".join(lines[errors[-1] : errors[-1] + 4])
        return reason if len(reason) <= 300 else reason[:297] + "..."
    return lines[-1] if lines else "no output"


# ----- running -------------------------------------------------------------------------------------
class Sweep:
    """Start the runs (at most ``jobs`` at once), pass signals on, collect the outcomes."""

    def __init__(self, runs: list[Run], extra: list[str], jobs: int, threads: int | None, workers: int | None, resume: bool, dry_run: bool) -> None:
        self.runs, self.extra, self.jobs, self.threads, self.workers = runs, extra, jobs, threads, workers
        self.resume, self.dry_run = resume, dry_run
        self.received: int | None = None
        self.signals: list[int] = []  # every signal received, in order
        self.running: dict[int, tuple[Run, subprocess.Popen, float, int]] = {}
        self.forwarded: dict[int, int] = {}  # pid -> how many of self.signals it was sent

    def say(self, text: str) -> None:
        print(f"mgff.sweep: {text}", flush=True)

    # what to do with one run
    def prepare(self, index: int, run: Run) -> tuple[str, Path | None] | None:
        """Decide: ``None`` (skipped, or refused with a reason), or ``(what, checkpoint to resume from)``."""
        tag = f"[{index + 1}/{len(self.runs)}] {run.label}"
        folder = run.folder
        recorded = recorded_extra(folder) if folder.is_dir() else None
        if recorded is not None and recorded != list(self.extra):
            run.status = "failed"
            run.note = f"{folder} holds a run with other overrides ({overrides_diff(recorded, self.extra)}): use another --out, or move the folder away"
            self.say(f"{tag}: {run.note}")
            return None
        if (folder / "metrics.json").is_file():
            run.status = "skipped"
            run.test_acc, run.note = read_test_acc(folder)
            run.note = run.note or "finished earlier"
            self.say(f"{tag}: skipped, finished: {folder / 'metrics.json'} exists")
            return None
        checkpoint = resume_checkpoint(folder) if folder.is_dir() and self.resume else None
        if checkpoint is not None:
            return f"resume from {checkpoint}", checkpoint
        if folder.exists():
            aside = folder.with_name(f"{folder.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while aside.exists():
                n += 1
                aside = aside.with_name(f"{folder.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            if not self.dry_run:
                folder.rename(aside)
            why = "--no-resume" if not self.resume else "no checkpoint to resume from"
            return f"restart from scratch ({why}; the unfinished folder moved to {aside})", None
        return "start", None

    def start(self, index: int, run: Run, what: str, checkpoint: Path | None) -> None:
        run.command = fit_command(run, self.extra, self.workers, checkpoint)
        run.note = "" if what == "start" else what
        tag = f"[{index + 1}/{len(self.runs)}] {run.label}"
        if self.dry_run:
            run.status = "dry run"
            self.say(f"{tag}: would {what} in {run.folder}")
            print(f"  {self.env_prefix()}{shlex.join(run.command)}", flush=True)
            return
        run.folder.mkdir(parents=True, exist_ok=True)
        (run.folder / RECORD).write_text(json.dumps({"configs": [str(p) for p in run.configs], "seed": run.seed, "extra": list(self.extra)}, indent=2) + "\n")
        log_path = run.folder / LOG
        with open(log_path, "a") as log:
            log.write(f"=== mgff.sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}\n$ {self.env_prefix()}{shlex.join(run.command)}\n")
            offset = log.tell()
        if self.signals:  # came while preparing
            run.status, run.note = "not run", f"the sweep was stopped by {signal.Signals(self.signals[-1]).name}"
            return
        if checkpoint is not None:
            run.csv_before = set_csv_log_aside(run.folder)
        log = open(log_path, "a")
        try:
            # its own process group: a Ctrl-C reaches it once, through the sweep (mgff.fit's preemption handling
            # takes a second identical signal as "terminate now")
            process = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(self.threads), start_new_session=True)
        except OSError as err:
            if run.csv_before is not None:
                merge_csv_logs(run.csv_before, run.folder / CSV_LOG)
            run.status, run.note = "failed", f"could not start {run.command[0]}: {err}"
            self.say(f"{tag}: {run.note}")
            return
        finally:
            log.close()
        run.status = "running"
        self.running[process.pid] = (run, process, time.monotonic(), offset)
        self.forwarded[process.pid] = 0  # no run starts once a signal came: every signal came while it ran
        self.say(f"{tag}: {what} in {run.folder} (log: {log_path})")

    def env_prefix(self) -> str:
        return f"OMP_NUM_THREADS={self.threads} MKL_NUM_THREADS={self.threads} OPENBLAS_NUM_THREADS={self.threads} " if self.threads is not None else ""

    def collect(self) -> None:
        """Record the runs that ended."""
        for pid, (run, process, started, offset) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            del self.running[pid]
            seconds = time.monotonic() - started
            if run.csv_before is not None:
                merge_csv_logs(run.csv_before, run.folder / CSV_LOG)
                run.csv_before = None
            tag = f"[{self.runs.index(run) + 1}/{len(self.runs)}] {run.label}"
            if code == 0 and (run.folder / "metrics.json").is_file():
                run.status = "finished"
                run.test_acc, note = read_test_acc(run.folder)
                run.note = "; ".join(filter(None, [run.note, note]))
                acc = "?" if run.test_acc is None else f"{run.test_acc:.4f}"
                self.say(f"{tag}: finished in {seconds:.0f} s, test/acc {acc}")
                continue
            with open(run.folder / LOG, errors="replace") as log:
                log.seek(offset)
                reason = failure_reason(log.read())
            if code == 0:
                reason = f"exit 0 but no metrics.json in {run.folder} (did the run write elsewhere?)"
            elif code < 0:
                reason = f"killed by {signal.Signals(-code).name}; {reason}"
            else:
                reason = f"exit {code}: {reason}"
            run.status = "stopped" if self.received is not None else "failed"
            run.note = reason
            self.say(f"{tag}: {run.status} after {seconds:.0f} s: {reason} (log: {run.folder / LOG})")

    def on_signal(self, signum: int, frame: Any) -> None:
        """Note the signal; :meth:`forward` passes it on from the main loop (here a run being started may not be
        registered yet). A third one kills the runs and ends the sweep."""
        self.received = signum
        self.signals.append(signum)
        if len(self.signals) >= 3:
            for _, process, _, _ in self.running.values():
                process.kill()
            self.say(f"{signal.Signals(signum).name}, a third signal: running runs killed")
            raise SystemExit(128 + signum)

    def forward(self) -> None:
        """Send each running run the signals received since it started that it was not sent yet, once each."""
        for pid, (run, process, _, _) in self.running.items():
            for signum in self.signals[self.forwarded[pid] :]:
                if process.poll() is None:
                    process.send_signal(signum)
                    self.say(f"{signal.Signals(signum).name} passed on to {run.label}")
            self.forwarded[pid] = len(self.signals)

    def execute(self) -> None:
        pending = list(enumerate(self.runs))
        previous = {}
        if not self.dry_run:
            for name in FORWARDED_SIGNALS:
                if hasattr(signal, name):
                    previous[name] = signal.signal(getattr(signal, name), self.on_signal)
        try:
            while pending or self.running:
                while pending and len(self.running) < self.jobs and self.received is None:
                    index, run = pending.pop(0)
                    decision = self.prepare(index, run)
                    if decision is not None:
                        self.start(index, run, *decision)
                self.forward()
                if self.received is not None:
                    for _, run in pending:
                        run.status, run.note = "not run", f"the sweep was stopped by {signal.Signals(self.received).name}"
                    pending = []
                if self.running:
                    time.sleep(0.2)
                    self.forward()
                    self.collect()
        finally:
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)


def summary_table(runs: Sequence[Run]) -> str:
    lines = ["| config | seed | status | test/acc | reason |", "|---|---|---|---|---|"]
    for run in runs:
        acc = "-" if run.test_acc is None or math.isnan(run.test_acc) else f"{run.test_acc:.4f}"
        note = run.note.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {run.name} | {run.seed} | {run.status} | {acc} | {note} |")
    return "\n".join(lines)


# ----- command line --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mgff.sweep``; returns the exit status (0; 1 if a run failed; 128 + signal if stopped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m mgff.sweep",
        usage="python -m mgff.sweep --configs CONFIG [CONFIG ...] --seeds SEED [SEED ...] --out DIR [options] [-- mgff.fit overrides]",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every mgff.fit run (e.g. -- --trainer.max_epochs 2).",
    )
    parser.add_argument("--configs", nargs="+", required=True, metavar="CONFIG", help=f"config files; 'a.yaml{STACK}b.yaml' stacks configs (--config a.yaml --config b.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, required=True, metavar="SEED", help="seed_everything values")
    parser.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder: runs go to DIR/<config stem>/seed<k>/")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at once (default 1)")
    parser.add_argument("--threads", type=int, default=None, metavar="T", help="threads per run (OMP/MKL/OpenBLAS); default inherited, or usable CPUs / N with --jobs N > 1")
    parser.add_argument("--workers", type=int, default=None, metavar="W", help="data.init_args.num_workers of every run (default: the config's)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="restart unfinished runs from scratch instead of resuming from their checkpoint")
    parser.add_argument("--among", nargs="+", default=[], metavar="CONFIG", help="name the folders as a sweep over these configs would (one part of a larger sweep, e.g. a SLURM array task)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done and the commands; change nothing")
    args = parser.parse_args(own)

    if args.jobs < 1 or (args.threads is not None and args.threads < 1) or (args.workers is not None and args.workers < 0):
        parser.error("--jobs and --threads must be at least 1, --workers at least 0")
    missing = [str(path) for spec in [*args.configs, *args.among] for path in parse_config_spec(spec) if not path.is_file()]
    if missing:
        parser.error(f"no such config file: {', '.join(missing)}")
    owned = [arg for arg in extra for option in OWNED_OPTIONS if arg == option or arg.startswith(option + "=")]
    if owned:
        parser.error(f"{', '.join(owned)}: set by the sweep for each run (seed and folders), not as an override")
    threads = args.threads
    if threads is None and args.jobs > 1:
        threads = max(1, usable_cpus() // args.jobs)

    runs = plan_runs(args.configs, args.seeds, args.out, args.among)
    where = f"{args.jobs} at a time" if args.jobs > 1 else "one at a time"
    print(
        f"mgff.sweep: {len(runs)} run(s) ({len(runs) // len(set(args.seeds))} config(s) x {len(set(args.seeds))} seed(s)) in {args.out}, {where}"
        + (f", {threads} thread(s) each" if threads is not None else ""),
        flush=True,
    )
    sweep = Sweep(runs, extra, args.jobs, threads, args.workers, args.resume, args.dry_run)
    sweep.execute()
    print("\n" + summary_table(runs), flush=True)
    if args.dry_run:
        return 0
    failed = [run for run in runs if run.status == "failed"]
    if failed:
        print(f"\n{len(failed)} run(s) failed; their logs: " + ", ".join(str(run.folder / LOG) for run in failed), flush=True)
    if sweep.received is not None:
        return 128 + sweep.received
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
