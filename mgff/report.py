"""``python -m mgff.report RUN_DIR...``: many ``mgff.fit`` runs, one table; seeds pooled per configuration.

Every folder under the given paths that holds a ``config.yaml`` or a ``metrics.json`` (what ``mgff.fit``
writes into its run directory) is a run. A run without ``metrics.json`` (stopped, diverged, still running,
or another subcommand's folder), without ``config.yaml``, or with a file that cannot be read is listed as
skipped, with the reason.

**Grouping.** Runs whose resolved ``config.yaml`` are equal except for the keys in :data:`IGNORED_KEYS`
form one group: the seed (``seed_everything``), where outputs and logs go (``trainer.default_root_dir``,
everything under ``trainer.logger``: its class, ``save_dir``, ``name``, ``version``...; the ``dirpath`` of
``checkpoint``, ``last_checkpoint`` and ``preemption``; ``prediction_writer.output_dir``), ``ckpt_path``,
and the worker and device counts (``data.init_args.num_workers``, ``trainer.devices``,
``trainer.num_nodes``).

**Labels.** A lone group is ``all``. Two or more are named in one of two ways:

- **By name**, when every run has a name, the runs of a group share theirs, and there are at least two
  different names. A run's name is its configs' stems joined by ``+`` when its folder holds the ``sweep.json``
  of ``mgff.sweep`` (``single``, ``two_stage``, ``full+no_gcn`` for ``--configs full.yaml+no_gcn.yaml``), else
  the name of the folder above a run folder called ``seed<k>`` (``<out>/<name>/seed<k>/``, the layout of
  ``mgff.sweep`` and ``benchmarks/head_probe.py``), else none. Groups that share a name (the same configs
  run with other overrides, or two ``single.yaml`` of other folders) are told apart after a ``:`` by the
  settings that separate them among themselves: ``single:max_epochs=5``.
- **By settings** otherwise: the config keys and values that differ between groups, each key shortened to
  the last part(s) that tell it apart, ``init_args`` left out (``lr=0.001,head=linear``). Where the groups
  differ in a class (``model.class_path``: ``FineGrainedClassifier`` and ``TwoStageClassifier``), the class
  is shown as ``model=TwoStageClassifier`` and the ``init_args`` of that class that another group lacks are
  left out (they follow from the class).

A group labelled by name also answers ``--compare`` to its settings label (``freeze_backbone_epochs=0`` for
``single+no_head_first`` beside ``single``), unless another group has that label. Labels never repeat (a
``#<n>`` is appended to a label already taken, e.g. values that only differ in what the label shows of
them) and depend only on the runs' configs and folders, in path order.

**Other runners' folders.** A run folder whose ``config.yaml`` has a top-level key of :data:`RUNNER_KEYS`
(``probe``: ``benchmarks/head_probe.py``, a head trained on a frozen backbone's cached maps) is a run of that
runner: grouped the same way, but labelled by settings among that runner's groups alone, with as few of their
differing keys as tell them apart (in key order, each key that separates groups the keys before it left
together), after the runner's name: ``probe`` (one group), ``probe:head=linear``. The ``mgff.fit`` groups
keep the labels they have without such folders (a lone one is ``fit`` instead of ``all``), so a probe and
fine-tunes of the same photos are compared with ``--compare probe:head=linear <fit group>``.

**Table.** Markdown, one row per group: runs, seeds, mean ± sd over runs (sample sd, n-1) of ``test/acc``
and of the best ``val/acc`` (``metrics.json``), epochs, fit time and CPU time (means over runs; the CPU time of
the fit, user + system, loader workers included, from ``cpu_seconds``, which runs made before mgff recorded it
lack: ``-``, or the mean over the runs that have it, with their count). ``--csv FILE`` writes the same numbers,
and each group's differing settings, one column per key.

**``--compare A B``** (group labels; repeatable): the difference ``test/acc(B) - test/acc(A)`` with the pooled
paired bootstrap 95 % interval (:func:`mgff.stats.pooled_paired_bootstrap`): the runs of A and B are paired
by seed, each pair's per-image results come from ``test_predictions.csv`` (written by the run's own test),
paired by the test dataset's ``index``, and every run must cover the same test images: the same indices and,
where both files have a ``path`` column, the same image path at each index.

**Other tested checkpoints.** A run that tested more than one checkpoint (``mgff.fit``'s ``test_checkpoints``, e.g.
``[last, best, last_raw]``) has ``test_<name>/acc`` in ``metrics.json`` and ``test_predictions_<name>.csv``: the
table is followed by each group's mean ± sd of those, and ``--compare A@last_raw A`` compares two of them
(``GROUP@NAME`` reads ``test_predictions_<NAME>.csv``; the same run on both sides is a within-run comparison:
here the EMA of the weights against the same run's raw weights).

**``--plot FILE``**: each group's ``val/acc`` per epoch from the runs' CSV logs (``metrics.csv``): the mean
over its runs and the range (min to max). A run without a CSV log is left out of the plot, with a note.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from mgff.stats import pooled_paired_bootstrap

__all__ = ["IGNORED_KEYS", "RUNNER_KEYS", "Group", "Run", "find_runs", "group_runs", "group_index", "markdown_table", "compare", "plot_val_curves", "main"]

#: config keys (dotted, ``fnmatch`` patterns; list items as ``key[i]``) that do not separate groups
IGNORED_KEYS: tuple[str, ...] = (
    "seed_everything",
    "trainer.default_root_dir",
    "trainer.logger",
    "trainer.logger.*",
    "trainer.logger[[]*",
    "checkpoint.dirpath",
    "last_checkpoint.dirpath",
    "preemption.dirpath",
    "prediction_writer.output_dir",
    "ckpt_path",
    "data.init_args.num_workers",
    "trainer.devices",
    "trainer.num_nodes",
)

#: top-level config keys that mark a run folder of another runner than ``mgff.fit`` (see the module's doc)
RUNNER_KEYS: tuple[str, ...] = ("probe",)

TEST_PREDICTIONS = "test_predictions.csv"
CSV_LOG = "metrics.csv"
#: what ``mgff.sweep`` records in each run folder: ``{"configs": [...], "seed": k, "extra": [...]}``
SWEEP_RECORD = "sweep.json"


@dataclass
class Run:
    """One finished ``mgff.fit`` run: its folder, flattened config (key -> JSON text), ``metrics.json``, seed and
    name (:func:`run_name`: its sweep's config stems, or its folder's; ``None`` without one)."""

    path: Path
    config: dict[str, str]
    metrics: dict[str, Any]
    seed: int | None
    name: str | None = None


@dataclass
class Group:
    """Runs with the same config but for :data:`IGNORED_KEYS`; ``settings`` are the keys that differ between
    groups (full dotted key -> value as text); ``label`` names the group (see the module's doc), ``aliases`` are
    other names ``--compare`` takes for it (a named group's settings label)."""

    label: str
    runs: list[Run]
    settings: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)


# ----- finding and reading runs ---------------------------------------------------------------------
def find_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The runs under ``paths`` (a run folder itself or any folder above runs) and the skipped folders with
    their reasons, both in path order."""
    folders: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder of runs")
        folders |= {p.parent.resolve() for name in ("config.yaml", "metrics.json") for p in path.rglob(name)}
    runs, skipped = [], []
    for folder in sorted(folders):
        run_or_reason = read_run(folder)
        if isinstance(run_or_reason, Run):
            runs.append(run_or_reason)
        else:
            skipped.append((folder, run_or_reason))
    return runs, skipped


def read_run(folder: Path) -> Run | str:
    """The run in ``folder``, or why it cannot be used."""
    if not (folder / "metrics.json").is_file():
        return "no metrics.json: the run did not finish (stopped, diverged, still running) or is not an mgff.fit run"
    if not (folder / "config.yaml").is_file():
        return "no config.yaml: its configuration is unknown, so it cannot be grouped"
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"metrics.json is not valid JSON (a partial write?): {err}"
    missing = [key for key in ("test/acc", "epochs", "fit_seconds") if not isinstance(metrics, dict) or key not in metrics]
    if missing:
        return f"metrics.json lacks {', '.join(missing)}"
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except yaml.YAMLError as err:
        return f"config.yaml cannot be read as YAML: {err}"
    if not isinstance(config, dict):
        return "config.yaml is not a mapping of config keys"
    seed = config.get("seed_everything")
    return Run(folder, flatten(config), metrics, seed if isinstance(seed, int) and not isinstance(seed, bool) else None, run_name(folder))


def run_name(folder: Path) -> str | None:
    """The name a run folder gives its run: the stems of the configs in its ``sweep.json`` (``mgff.sweep``) joined
    by ``+`` (``full+no_gcn``); else, for a folder ``seed<k>``, the name of the folder above it; else ``None``."""
    try:
        configs = json.loads((folder / SWEEP_RECORD).read_text()).get("configs")
    except (OSError, ValueError, AttributeError):
        configs = None
    if isinstance(configs, list) and configs and all(isinstance(c, str) and c for c in configs):
        return "+".join(Path(c).stem for c in configs)
    if re.fullmatch(r"seed\d+", folder.name) and folder.parent.name:
        return folder.parent.name
    return None


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """``{"trainer": {"max_epochs": 10}, "x": [1, 2]}`` -> ``{"trainer.max_epochs": "10", "x": "[1, 2]"}``; lists
    of mappings (callbacks, loggers) by index: ``trainer.callbacks[0].class_path``."""
    if isinstance(config, dict):
        out: dict[str, str] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: "{}"}
    if isinstance(config, list) and any(isinstance(item, dict) for item in config):
        out = {}
        for i, item in enumerate(config):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: json.dumps(config, sort_keys=True)}


def ignored(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in IGNORED_KEYS)


# ----- grouping ------------------------------------------------------------------------------------
def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups of ``runs`` (see the module's doc), in the order of their first run, labelled by name or by what
    differs (another runner's groups among their own, see :data:`RUNNER_KEYS`)."""
    by_config: dict[tuple, list[Run]] = {}
    for run in runs:
        by_config.setdefault(tuple(sorted((k, v) for k, v in run.config.items() if not ignored(k))), []).append(run)
    members = list(by_config.values())
    configs = [dict(key) for key in by_config]
    kinds = [runner_of(config) for config in configs]
    labels: list[str] = [""] * len(configs)
    aliases: list[list[str]] = [[] for _ in configs]
    settings: list[dict[str, str]] = [{} for _ in configs]
    for kind in dict.fromkeys(kinds):
        family = [i for i, k in enumerate(kinds) if k == kind]
        family_settings, family_labels = settings_labels([configs[i] for i in family], fewest=bool(kind))
        names = [group_name(members[i]) for i in family]
        by_name = not kind and None not in names and len(set(names)) > 1
        for j, i in enumerate(family):
            settings[i] = family_settings[j]
            if kind:
                labels[i] = f"{kind}:{family_labels[j]}" if family_labels[j] else kind
            elif by_name:
                same = [jj for jj, name in enumerate(names) if name == names[j]]
                if len(same) == 1:
                    labels[i] = names[j]
                else:  # told apart among the groups of that name by the fewest settings that do
                    labels[i] = f"{names[j]}:{settings_labels([configs[family[jj]] for jj in same], fewest=True)[1][same.index(j)]}"
                aliases[i] = [family_labels[j]]
            else:
                labels[i] = family_labels[j] or ("fit" if len(set(kinds)) > 1 else "all")
    groups: list[Group] = []
    for label, alias, setting, group_members in zip(labels, aliases, settings, members):
        base, n = label, len(groups) + 1
        while any(g.label == label for g in groups):  # values that only differ in what the label shows of them
            label, n = f"{base}#{n}", n + 1
        groups.append(Group(label, group_members, setting, alias))
    taken = {g.label for g in groups}
    for g in groups:  # an alias that is another group's label or alias is dropped
        g.aliases = [a for a in g.aliases if a not in taken and sum(a in other.aliases for other in groups) == 1]
    return groups


def group_index(groups: Sequence[Group]) -> dict[str, Group]:
    """Each group by its label and by its aliases (what ``--compare`` looks names up in)."""
    index = {g.label: g for g in groups}
    for g in groups:
        index.update({a: g for a in g.aliases if a not in index})
    return index


def group_name(runs: Sequence[Run]) -> str | None:
    """The name the runs of a group share (:func:`run_name`), ``None`` when one has none or they differ."""
    names = {r.name for r in runs}
    return names.pop() if len(names) == 1 else None


def settings_labels(configs: Sequence[dict[str, str]], fewest: bool = False) -> tuple[list[dict[str, str]], list[str]]:
    """For each config, the settings that differ between ``configs`` (dotted key -> value, ``"unset"`` where it
    lacks the key) and their label ``key=value,...``; ``fewest``: only the keys that tell the configs apart
    (:func:`telling_keys`). Where a class differs (``model.class_path``), its ``init_args`` that some config lacks
    are left out when they follow from the class (one value in all configs of each class), and the others are
    left out of the labels of the configs that lack them (no ``key=unset``)."""
    all_keys = sorted({k for c in configs for k in c})
    differing = [k for k in all_keys if len({c.get(k) for c in configs}) > 1]
    classes = [k[: -len("class_path")] for k in differing if k.endswith(".class_path")]
    scoped = {k: f"{p}class_path" for k in differing for p in classes if k.startswith(f"{p}init_args.") and any(k not in c for c in configs)}
    differing = [k for k in differing if k not in scoped or len({(c.get(scoped[k]), c.get(k)) for c in configs}) > len({c.get(scoped[k]) for c in configs})]
    if fewest:
        differing = telling_keys(configs, differing)
    short = short_names(differing)
    settings = [{k: c.get(k, "unset") for k in differing} for c in configs]
    labels = [",".join(f"{short[k]}={_display(k, v)}" for k, v in setting.items() if not (k in scoped and k not in c))
              for setting, c in zip(settings, configs)]
    return settings, labels


def runner_of(config: dict[str, str]) -> str:
    """The key of :data:`RUNNER_KEYS` that a flattened config has at its top level, ``""`` for an ``mgff.fit`` run."""
    return next((kind for kind in RUNNER_KEYS if any(k == kind or k.startswith((f"{kind}.", f"{kind}[")) for k in config)), "")


def telling_keys(configs: Sequence[dict[str, str]], keys: Sequence[str]) -> list[str]:
    """Of ``keys`` (in their order), each one that separates configs the keys before it left together: as few as
    tell ``configs`` apart when ``keys`` do."""
    chosen: list[str] = []
    for key in keys:
        if len({tuple(c.get(k) for k in [*chosen, key]) for c in configs}) > len({tuple(c.get(k) for k in chosen) for c in configs}):
            chosen.append(key)
    return chosen


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key shortened to its last part(s), ``init_args`` dropped, as many as keep the names apart; a
    ``class_path`` is named by what it is the class of (``model.class_path`` -> ``model``)."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] for k in keys}
    parts = {k: p[:-1] if len(p) > 1 and p[-1] == "class_path" else p for k, p in parts.items()}
    short = {}
    for key in keys:
        for n in range(1, len(parts[key]) + 1):
            name = ".".join(parts[key][-n:])
            if sum(".".join(other[-n:]) == name for other in parts.values()) == 1:
                break
        short[key] = name
    return short


def _display(key: str, value: str) -> str:
    if value == "unset":
        return value
    loaded = json.loads(value)
    if isinstance(loaded, str):
        return loaded.rsplit(".", 1)[-1] if key.endswith("class_path") else loaded
    return value.replace(" ", "")


# ----- table ---------------------------------------------------------------------------------------
def metric_mean_sd(runs: Sequence[Run], key: str) -> tuple[float, float, int]:
    """``(mean, sd, count)`` of ``metrics.json[key]`` over the runs that have it: sample sd (n-1; NaN for one run),
    NaN mean for none."""
    values = np.array([float(r.metrics[key]) for r in runs if r.metrics.get(key) is not None])
    if not len(values):
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values)


def group_summary(group: Group) -> dict[str, Any]:
    """The table's numbers of one group: runs, seeds, mean and sd (n-1; NaN for one run) of test/acc and best
    val/acc, epochs (min, max), mean fit seconds, mean CPU seconds over the runs that recorded them (NaN when
    none did) and how many did; then the differing settings."""
    test_mean, test_sd, _ = metric_mean_sd(group.runs, "test/acc")
    val_mean, val_sd, _ = metric_mean_sd(group.runs, "best_val/acc")
    epochs = [int(r.metrics["epochs"]) for r in group.runs]
    cpu = [float(r.metrics["cpu_seconds"]) for r in group.runs if isinstance(r.metrics.get("cpu_seconds"), (int, float))]
    return {
        "group": group.label,
        "runs": len(group.runs),
        "seeds": " ".join(str(r.seed) if r.seed is not None else "?" for r in sorted(group.runs, key=_seed_order)),
        "test_acc_mean": test_mean,
        "test_acc_sd": test_sd,
        "best_val_acc_mean": val_mean,
        "best_val_acc_sd": val_sd,
        "epochs_min": min(epochs),
        "epochs_max": max(epochs),
        "fit_seconds_mean": float(np.mean([float(r.metrics["fit_seconds"]) for r in group.runs])),
        "cpu_seconds_mean": float(np.mean(cpu)) if cpu else math.nan,
        "cpu_seconds_runs": len(cpu),
        **group.settings,
        "run_dirs": " ".join(str(r.path) for r in group.runs),
    }


def markdown_table(groups: Sequence[Group]) -> str:
    """One row per group: runs, seeds, ``test/acc`` and best ``val/acc`` as mean ± sd, epochs, fit time, CPU time."""
    lines = ["| group | runs | seeds | test/acc | best val/acc | epochs | fit time | CPU time |", "|---|---|---|---|---|---|---|---|"]
    for s in map(group_summary, groups):
        epochs = str(s["epochs_min"]) if s["epochs_min"] == s["epochs_max"] else f"{s['epochs_min']}-{s['epochs_max']}"
        cpu = "-" if not s["cpu_seconds_runs"] else _duration(s["cpu_seconds_mean"])
        if 0 < s["cpu_seconds_runs"] < s["runs"]:  # older runs in the group did not record it
            cpu += f" ({s['cpu_seconds_runs']} of {s['runs']} runs)"
        lines.append(
            f"| {s['group']} | {s['runs']} | {s['seeds']} | {_mean_sd(s['test_acc_mean'], s['test_acc_sd'])} "
            f"| {_mean_sd(s['best_val_acc_mean'], s['best_val_acc_sd'])} | {epochs} | {_duration(s['fit_seconds_mean'])} | {cpu} |"
        )
    return "\n".join(lines)


def other_tests_table(groups: Sequence[Group]) -> str:
    """Each group's mean ± sd of the other tested checkpoints' ``test_<name>/acc`` (``mgff.fit``'s ``test_checkpoints``);
    ``""`` when no run tested more than one."""
    names = sorted({key[len("test_"):-len("/acc")] for g in groups for r in g.runs for key in r.metrics
                    if key.startswith("test_") and key.endswith("/acc")})
    if not names:
        return ""
    lines = ["| group | test/acc | " + " | ".join(f"test/acc @{n}" for n in names) + " |", "|---" * (len(names) + 2) + "|"]
    for g in groups:
        cells = [_mean_sd_cell(g.runs, key) for key in ["test/acc", *(f"test_{n}/acc" for n in names)]]
        lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
    return "Other tested checkpoints (`test_checkpoints`; `--compare GROUP@NAME ...` pairs them):\n\n" + "\n".join(lines)


def _mean_sd_cell(runs: Sequence[Run], key: str) -> str:
    mean, sd, count = metric_mean_sd(runs, key)
    text = _mean_sd(mean, sd)
    return text if count in (0, len(runs)) else f"{text} ({count} of {len(runs)} runs)"


def split_variant(label: str, groups: dict[str, Group]) -> tuple[str, str | None]:
    """``"GROUP@NAME"`` -> ``("GROUP", "NAME")`` unless the whole text is a group's label."""
    if label in groups or "@" not in label:
        return label, None
    group, variant = label.rsplit("@", 1)
    return group, variant


def write_csv(groups: Sequence[Group], path: str | Path) -> None:
    rows = [group_summary(g) for g in groups]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _mean_sd(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _seed_order(run: Run) -> tuple[bool, int, str]:
    return (run.seed is None, run.seed or 0, str(run.path))


# ----- comparison ----------------------------------------------------------------------------------
def read_test_predictions(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """``(index (N,), correct (N,) bool)`` of a run's ``test_predictions.csv``, sorted by dataset index."""
    index, correct, _ = _read_test_rows(run)
    return index, correct


def _read_test_rows(run: Run, variant: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """:func:`read_test_predictions` and the image paths in the same order (``None`` without a ``path`` column);
    ``variant``: the file of another tested checkpoint, ``test_predictions_<variant>.csv``."""
    path = run.path / predictions_file(variant)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (the run predates mgff writing it, or its test did not finish)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"index", "correct"} <= rows[0].keys():
        raise ValueError(f"{path} has no rows with index and correct columns")
    index = np.array([int(r["index"]) for r in rows])
    correct = np.array([r["correct"] == "1" for r in rows])
    order = np.argsort(index, kind="stable")
    paths = [rows[i]["path"] for i in order] if "path" in rows[0] else None
    return index[order], correct[order], paths


def predictions_file(variant: str | None = None) -> str:
    """``test_predictions.csv``, or ``test_predictions_<variant>.csv`` of another tested checkpoint."""
    return TEST_PREDICTIONS if variant is None else f"test_predictions_{variant}.csv"


def compare(a: Group, b: Group, samples: int = 10000, seed: int = 0, variant_a: str | None = None, variant_b: str | None = None) -> str:
    """``test/acc(B) - test/acc(A)`` and its pooled paired bootstrap 95 % interval, runs paired by seed; one
    Markdown paragraph, with notes on runs left unpaired. ``variant_a``/``variant_b``: read another tested
    checkpoint's predictions (``test_predictions_<variant>.csv``) of that group."""
    notes: list[str] = []
    name_a = a.label + (f"@{variant_a}" if variant_a else "")
    name_b = b.label + (f"@{variant_b}" if variant_b else "")
    for group in (a, b):
        seeds = [r.seed for r in group.runs if r.seed is not None]
        if len(seeds) != len(set(seeds)):
            raise ValueError(f"group {group.label} has several runs of one seed ({sorted(seeds)}): pass one run per seed")
        notes += [f"{r.path}: no integer seed_everything, cannot be paired" for r in group.runs if r.seed is None]
    runs_a = {r.seed: r for r in a.runs if r.seed is not None}
    runs_b = {r.seed: r for r in b.runs if r.seed is not None}
    for name, own, other in ((a.label, runs_a, runs_b), (b.label, runs_b, runs_a)):
        notes += [f"seed {s} of {name} has no run in the other group" for s in sorted(set(own) - set(other))]
    pairs, seeds, images, reference, paths, path_reference = [], [], None, None, None, None
    for s in sorted(set(runs_a) & set(runs_b)):
        index_a, correct_a, paths_a = _read_test_rows(runs_a[s], variant_a)
        index_b, correct_b, paths_b = _read_test_rows(runs_b[s], variant_b)
        for index, names, run in ((index_a, paths_a, runs_a[s]), (index_b, paths_b, runs_b[s])):
            if images is None:
                images, reference = index, run.path / TEST_PREDICTIONS
            elif not np.array_equal(index, images):
                raise ValueError(f"{run.path / TEST_PREDICTIONS} covers other test images ({len(index)}) than {reference} ({len(images)})")
            if names is not None and paths is None:
                paths, path_reference = names, run.path / TEST_PREDICTIONS
            elif names is not None and names != paths:
                i = next(i for i, (x, y) in enumerate(zip(names, paths)) if x != y)
                raise ValueError(f"{run.path / TEST_PREDICTIONS} has other images than {path_reference} at the same index "
                                 f"(index {images[i]}: {names[i]!r}, there {paths[i]!r}): other photos or another split")
        pairs.append((correct_a, correct_b))
        seeds.append(s)
    if not pairs:
        raise ValueError(f"groups {a.label} and {b.label} have no seed in common: nothing to pair")
    diff, low, high = pooled_paired_bootstrap(pairs, samples=samples, seed=seed)
    text = (
        f"**{name_b} - {name_a}**: test/acc {diff:+.4f}, pooled paired bootstrap 95 % interval [{low:+.4f}, {high:+.4f}] "
        f"({len(pairs)} seed pair{'s' if len(pairs) > 1 else ''}: {', '.join(map(str, seeds))}; {len(images)} test images; {samples} resamples)"
    )
    return text + "".join(f"\n- {note}" for note in notes)


# ----- plot ----------------------------------------------------------------------------------------
def val_acc_by_epoch(run: Run) -> dict[int, float] | None:
    """``{epoch (0-based): val/acc}`` from the run's CSV log (the last value logged in an epoch), ``None``
    without a CSV log."""
    path = run.path / CSV_LOG
    if not path.is_file():
        return None
    curve = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/acc") not in (None, "") and row.get("epoch") not in (None, ""):
                curve[int(row["epoch"])] = float(row["val/acc"])
    return curve


def plot_val_curves(groups: Sequence[Group], path: str | Path) -> list[str]:
    """Draw each group's ``val/acc`` per epoch (mean over its runs, min-max band) into ``path``; return notes
    on the runs left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    notes = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, group in enumerate(groups):
        curves = []
        for run in group.runs:
            curve = val_acc_by_epoch(run)
            if not curve:
                notes.append(f"{run.path}: no val/acc in a CSV log ({CSV_LOG}), left out of the plot")
            else:
                curves.append(curve)
        if not curves:
            continue
        epochs = sorted({e for c in curves for e in c})
        values = [[c[e] for c in curves if e in c] for e in epochs]
        x = np.array(epochs) + 1
        color = f"C{i % 10}"
        ax.plot(x, [np.mean(v) for v in values], color=color, marker="o", ms=3, label=f"{group.label} ({len(curves)} run{'s' if len(curves) > 1 else ''})")
        low, high = [min(v) for v in values], [max(v) for v in values]
        ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
        if len(x) == 1:  # a band needs two epochs: the range as a bar
            ax.vlines(x, low, high, color=color, alpha=0.5)
    if ax.lines:
        ax.set_xlim(0.5, max(max(line.get_xdata()) for line in ax.lines) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("val/acc")
    ax.set_title("val/acc: mean over seeds, band from min to max")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return notes


# ----- command line --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> str:
    """``python -m mgff.report RUN_DIR... [--csv FILE] [--compare A B] [--plot FILE]``: print the report, return it."""
    parser = argparse.ArgumentParser(prog="python -m mgff.report", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run folders, or folders searched for runs")
    parser.add_argument("--csv", metavar="FILE", help="also write the table's numbers as CSV")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"), help="pooled paired bootstrap of B - A (group labels, or a named group's settings label); repeatable")
    parser.add_argument("--plot", metavar="FILE", help="val/acc per epoch of each group (mean and range over runs) as an image")
    parser.add_argument("--samples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    args = parser.parse_args(argv)

    try:
        runs, skipped = find_runs(args.paths)
    except FileNotFoundError as err:
        parser.error(str(err))
    groups = group_runs(runs)
    parts = [markdown_table(groups) if groups else "No finished runs found."]
    if skipped:
        parts.append("Skipped:\n" + "\n".join(f"- {folder}: {reason}" for folder, reason in skipped))
    others = other_tests_table(groups)
    if others:
        parts.append(others)
    by_label = group_index(groups)
    for label_a, label_b in args.compare:
        (label_a, variant_a), (label_b, variant_b) = (split_variant(label, by_label) for label in (label_a, label_b))
        unknown = [label for label in (label_a, label_b) if label not in by_label]
        if unknown:
            parser.error(f"--compare: no group {', '.join(map(repr, unknown))}; the groups are {', '.join(repr(g.label) for g in groups) or 'none'}")
        try:
            parts.append(compare(by_label[label_a], by_label[label_b], samples=args.samples, seed=args.seed, variant_a=variant_a, variant_b=variant_b))
        except (FileNotFoundError, ValueError) as err:
            print("\n\n".join(parts))
            sys.exit(f"mgff.report: --compare {label_a} {label_b}: {err}")
    if args.csv:
        write_csv(groups, args.csv)
        parts.append(f"Table written to {args.csv}")
    if args.plot:
        notes = plot_val_curves(groups, args.plot)
        parts.append(f"Plot written to {args.plot}" + "".join(f"\n- {note}" for note in notes))
    report = "\n\n".join(parts)
    print(report)
    return report


if __name__ == "__main__":
    main()
