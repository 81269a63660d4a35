"""Fine-tune the shared ImageNet EfficientNet-Lite0 on real CUB photos, one named run per head.

The one runner for every real-photo comparison of the project. Every run uses the same seed, data
split, epochs, optimiser and input normalisation (the heads table also the same lr; ``linear_head10x`` is the
linear head at the held-back 10x head lr); a run is a model class plus overrides of
:data:`COMMON`, one entry of :data:`RUNS` (adding a run is adding an entry). For each run it

- fine-tunes at 224 px (resize 256 -> random crop 224, flip; centre crop at evaluation) on the
  750 training photos of ``../shared/realdata/CUB_200_2011_first25`` minus a stratified 20 %
  validation split, keeping the checkpoint of the best validation top-1 (``val/acc``),
- tests that checkpoint once on the 652 official test photos (one predict pass),
- writes ``<out>/<run>/best.ckpt``, ``<out>/<run>/test_predictions.csv`` (one row per test image:
  ``index,path,label,pred,correct``) and the Lightning CSV logs,

and finally writes ``<out>/results.md`` and ``<out>/results.csv`` (run, test top-1, best val top-1,
epoch of the best, minutes) and prints the table. ``--compare a,b`` adds the paired bootstrap
interval of ``acc(b) - acc(a)`` on the same test images (:func:`paired_bootstrap`).

Inputs are normalised with mean = std = 0.5, what these TF-Lite-converted weights expect (see
``../shared/weights/README.md``): set on the DataModule (``data.mean``/``data.std``) and, where the
model knows its backbone's normalisation (``backbone_mean``/``backbone_std``), there too, so the
model's conversion is the identity.

    nice -n 5 python benchmarks/real_photos.py                        # every run of RUNS
    nice -n 5 python benchmarks/real_photos.py --runs linear,mgff     # some of them
    python benchmarks/real_photos.py --compare linear,mgff --report-only   # table + CI from saved runs

Full-resolution JPEGs are decoded once into a resized cache (``<out>/cache``, shorter side 256).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
DATA_ROOT = SHARED / "realdata" / "CUB_200_2011_first25"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0_imagenet.safetensors"
DEFAULT_OUT = REPO_ROOT / "runs" / "real_photos"
WEIGHTS_MEAN = WEIGHTS_STD = (0.5, 0.5, 0.5)

# the settings every run shares: the held-back measurement (SGD lr 0.01, momentum 0.9, head at
# 10x, 6 epochs, batch 32, seed 0, EfficientNet-Lite0 stages 2-4 at 224 px)
SEED = 0
EPOCHS = 6
DATA = dict(batch_size=32, resize_size=256, crop_size=224, val_fraction=0.2, split_seed=0, cache_size=256)
COMMON: dict[str, Any] = dict(
    backbone="efficientnet_lite0",
    img_size=224,
    stages=[2, 3, 4],
    optimizer="sgd",
    lr=0.01,
    head_lr_scale=10.0,
    momentum=0.9,
    weight_decay=5e-4,
    warmup_epochs=0.0,
    scheduler_interval="step",
    dropout=0.1,
    label_smoothing=0.0,
)


@dataclass(frozen=True)
class Run:
    """One named run: the LightningModule class (import path) and its overrides of :data:`COMMON`."""

    model_class: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # overrides of DATA (e.g. source_size, no cache)


CLASSIFIER = "mgff.lit.FineGrainedClassifier"
# The heads table (issue 12 §4) uses one lr for every parameter, as the paper does ("初始学习率为2e−4",
# one initial lr): with the head at 10x the MGFF head diverged (with its LayerNorm readout: train loss
# 4.8 -> 23 within the first epoch) or stayed near chance (without it; BENCHMARKS.md). ``linear_head10x``
# is the linear head at the held-back setting, for reference.
ONE_LR = dict(head_lr_scale=1.0)
RUNS: dict[str, Run] = {
    "linear": Run(CLASSIFIER, dict(ONE_LR, head="linear"), "norm + pool + linear on the last map (conv_head/bn2, 1280 ch)"),
    "linear_head10x": Run(CLASSIFIER, dict(head="linear"), "linear, head at 10x lr (the held-back setting)"),
    "mgff": Run(CLASSIFIER, dict(ONE_LR, head="mgff"), "full MGFF head: align + MHSA + SE + GCN + super-node pooling"),
    "mgff_no_attention": Run(CLASSIFIER, dict(ONE_LR, head="mgff", use_attention=False), "MGFF without spatial attention"),
    "mgff_no_se": Run(CLASSIFIER, dict(ONE_LR, head="mgff", use_se=False), "MGFF without SE"),
    "mgff_no_gcn": Run(CLASSIFIER, dict(ONE_LR, head="mgff", use_gcn=False), "MGFF without GCN/pooling (mean over nodes)"),
    # diagnosis: can the MGFF head take the 10x head lr with a warmup?
    "mgff_head10x": Run(CLASSIFIER, dict(head="mgff"), "MGFF, head at 10x lr, no warmup"),
    "mgff_head10x_warmup": Run(CLASSIFIER, dict(head="mgff", warmup_epochs=1.0), "MGFF, head at 10x lr, 1 warmup epoch"),
}
# issue 13 §4: single-stage vs two-stage (the `features` localiser) vs two-stage with the ground-truth box
# (oracle), stage 2 cut from stage 1's 224 px view or from the same view at 448 px (§3); all on the same
# data: the originals (no resized cache) with the 448 px source view in every batch.
TWO_STAGE = "mgff.lit.TwoStageClassifier"
SOURCE_DATA = dict(cache_dir=None, source_size=448)
STAGE2 = dict(head="linear", crop_size=224)
RUNS.update({
    "ts_single": Run(CLASSIFIER, dict(head="linear"), "single-stage linear, data as the two-stage runs", SOURCE_DATA),
    "ts_features_view": Run(TWO_STAGE, dict(STAGE2, localization="features", crop_from="view"), "two-stage, features box, crop from the 224 view", SOURCE_DATA),
    "ts_features_source": Run(TWO_STAGE, dict(STAGE2, localization="features", crop_from="source"), "two-stage, features box, crop from the 448 source", SOURCE_DATA),
    "ts_energy_source": Run(TWO_STAGE, dict(STAGE2, localization="features", feature_response="energy", crop_from="source"),
                            "two-stage, features box (energy response, the default before 'refined'), crop from the 448 source", SOURCE_DATA),
    "ts_oracle_view": Run(TWO_STAGE, dict(STAGE2, localization="ground_truth", crop_from="view"), "two-stage, ground-truth box, crop from the 224 view", SOURCE_DATA),
    "ts_oracle_source": Run(TWO_STAGE, dict(STAGE2, localization="ground_truth", crop_from="source"), "two-stage, ground-truth box, crop from the 448 source", SOURCE_DATA),
})
# issue 21 §1: single-stage at equal compute. The two-stage forward (stage 1 at 224 + stage 2 on a 224 crop, the
# features box read from stage 1's maps) costs 2.0x one 224 px stage; EfficientNet's FLOPs grow with the side squared,
# so 320 px (2.04x) matches it; the resize keeps the 256/224 ratio of the 224 runs.
RUNS.update({
    "ts_single_equal_flops": Run(CLASSIFIER, dict(head="linear", img_size=320), "single-stage linear at 320 px (2.04x the FLOPs of 224)",
                                 dict(SOURCE_DATA, resize_size=366, crop_size=320)),
    "ts_single_448": Run(CLASSIFIER, dict(head="linear", img_size=448), "single-stage linear at 448 px (4x the FLOPs of 224)",
                         dict(SOURCE_DATA, resize_size=512, crop_size=448)),
})
# issue 20 §3: the linear head's recipe search (3 epochs, seed 0, chosen on val); linear_head10x is the fourth setting
RUNS.update({
    "linear_lr02": Run(CLASSIFIER, dict(head="linear", lr=0.02), "linear, lr 0.02, head at 10x"),
    "linear_head30x": Run(CLASSIFIER, dict(head="linear", head_lr_scale=30.0), "linear, lr 0.01, head at 30x"),
    "linear_ls01": Run(CLASSIFIER, dict(head="linear", label_smoothing=0.1), "linear, head at 10x, label smoothing 0.1"),
})
DEFAULT_RUNS = ("linear", "mgff", "mgff_no_attention", "mgff_no_se", "mgff_no_gcn")


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def model_kwargs(run: Run, data) -> dict[str, Any]:
    """The model's init arguments: :data:`COMMON`, the run's overrides, the data's class facts, the weights."""
    cls = import_class(run.model_class)
    kwargs = {**COMMON, **run.overrides, "num_classes": data.num_classes, "pretrained": str(WEIGHTS)}
    accepted = inspect.signature(cls).parameters
    has_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key, value in (("data_mean", data.mean), ("data_std", data.std), ("backbone_mean", WEIGHTS_MEAN), ("backbone_std", WEIGHTS_STD)):
        if key in accepted or has_var_kwargs:
            kwargs.setdefault(key, list(value))
    return kwargs


def build_datamodule(out: Path, num_workers: int, **overrides: Any):
    from data_modules import CUB200DataModule

    return CUB200DataModule(
        root=str(DATA_ROOT), num_workers=num_workers, mean=WEIGHTS_MEAN, std=WEIGHTS_STD, **{**DATA, "cache_dir": str(out / "cache"), **overrides}
    )


def train_and_test(name: str, run: Run, out: Path, num_workers: int, epochs: int, seed: int = SEED, also_last: bool = False) -> dict[str, Any]:
    """Fine-tune one run, test its best-validation checkpoint, write its per-image predictions. ``seed`` seeds the
    training (initialisation of new layers, order, augmentation); the train/val split stays ``DATA["split_seed"]``.
    ``also_last`` also tests the last epoch's weights (``last_test_acc``: a diagnosis of the checkpoint choice, never
    the reported figure)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(seed, workers=True)
    data = build_datamodule(out, num_workers, **run.data)
    data.prepare_data()
    data.setup("fit")
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in [*run_dir.glob("best*.ckpt"), *run_dir.glob("last_epoch*.ckpt")]:
        old.unlink()
    model = import_class(run.model_class)(**model_kwargs(run, data))
    checkpoint = ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val/acc", mode="max", save_top_k=1)
    # Lightning's save_last writes last.ckpt only when a top-k checkpoint is saved in the same step, so the last
    # epoch's weights need a checkpoint of their own (no monitor: every epoch replaces it)
    final = ModelCheckpoint(dirpath=run_dir, filename="last_epoch", save_top_k=1) if also_last else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        precision="32-true",
        deterministic=False,
        callbacks=[checkpoint] + ([final] if final else []),
        logger=CSVLogger(save_dir=str(run_dir), name="logs"),
        enable_progress_bar=False,
        log_every_n_steps=5,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    best = checkpoint.best_model_path
    # read before predict(): restoring best.ckpt also restores the callbacks' states, and a best.ckpt written in
    # the first epoch holds the last-epoch callback's state from before it had saved anything (path '')
    last_path = final.best_model_path if final else None
    # one pass over the test images gives both the per-image rows and the top-1 (no separate trainer.test)
    rows = prediction_rows(trainer.predict(model, datamodule=data, ckpt_path=best))
    with open(run_dir / "test_predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if len(rows) != len(data.datasets["test"]):
        raise RuntimeError(f"{name}: {len(rows)} predictions for {len(data.datasets['test'])} test images")
    accuracy = float(np.mean([r["correct"] for r in rows]))
    ckpt_epoch = int(Path(best).exists() and __import__("torch").load(best, map_location="cpu", weights_only=False)["epoch"])
    result = dict(
        run=name,
        test_acc=round(accuracy, 4),
        best_val_acc=round(float(checkpoint.best_model_score), 4),
        best_epoch=ckpt_epoch + 1,
        epochs=epochs,
        seed=seed,
        minutes=round(minutes, 1),
        checkpoint=str(Path(best).relative_to(REPO_ROOT)) if Path(best).is_relative_to(REPO_ROOT) else best,
        note=run.note,
    )
    if also_last:
        last = prediction_rows(trainer.predict(model, datamodule=data, ckpt_path=last_path))
        result["last_test_acc"] = round(float(np.mean([r["correct"] for r in last])), 4)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def prediction_rows(predictions: list[dict]) -> list[dict[str, Any]]:
    """``trainer.predict`` batches -> one row per test image (index, path, label, pred, correct), by index."""
    rows = []
    for batch in predictions:
        for i in range(len(batch["label"])):
            label, pred = int(batch["label"][i]), int(batch["pred"][i])
            rows.append(dict(index=int(batch["index"][i]), path=str(batch["path"][i]), label=label, pred=pred, correct=int(label == pred)))
    return sorted(rows, key=lambda r: r["index"])


def load_correct(out: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(index, correct)`` of one finished run, ordered by image index."""
    with open(out / name / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["index"]) for r in rows]), np.array([int(r["correct"]) for r in rows])


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """``(acc_b - acc_a, low, high)``: the difference and its 95 % percentile interval, resampling the same
    test images for both runs (pairs kept together)."""
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"runs were tested on different images: {correct_a.shape} vs {correct_b.shape}")
    rng = np.random.default_rng(seed)
    diff = correct_b.astype(float) - correct_a.astype(float)
    picks = rng.integers(0, len(diff), size=(samples, len(diff)))
    boot = diff[picks].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def write_table(out: Path, results: list[dict], comparisons: list[tuple[str, str]], command: str) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}; "
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Command: `{command}`",
        "",
        "| run | test top-1 | best val top-1 | best epoch | minutes | what |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['run']} | {r['test_acc']:.3f} | {r['best_val_acc']:.3f} | {r['best_epoch']}/{r['epochs']} | {r['minutes']} | {r['note']}"
              + (f" (last epoch's weights: test {r['last_test_acc']:.3f})" if "last_test_acc" in r else "") + " |" for r in results]
    for a, b in comparisons:
        ia, ca = load_correct(out, a)
        ib, cb = load_correct(out, b)
        if not np.array_equal(ia, ib):
            raise ValueError(f"{a} and {b} were tested on different images")
        d, lo, hi = paired_bootstrap(ca, cb)
        lines.append(f"\n{b} - {a}: {d:+.3f} top-1, paired bootstrap 95 % interval [{lo:+.3f}, {hi:+.3f}] ({len(ca)} test images)")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in results for k in r)))  # runs may add keys
        writer.writeheader()
        writer.writerows(results)
    return text


def parse_names(text: str | None, default: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(default)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {sorted(RUNS)}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", help=f"comma-separated names of RUNS (default: {','.join(DEFAULT_RUNS)})")
    parser.add_argument("--compare", action="append", default=[], help="a,b: paired bootstrap CI of acc(b) - acc(a); repeatable")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="runs/real_photos by default")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (0: decode the small cached JPEGs in the main process, saving a worker's memory)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (on shared cores two threads spin against each other)")
    parser.add_argument("--seed", type=int, default=SEED, help="training seed (the data split stays fixed); put other seeds in another --out")
    parser.add_argument("--also-last", action="store_true", help="also test the last epoch's weights (last_test_acc in result.json; a diagnosis)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--skip-done", action="store_true", help="reuse the result of runs that already have a result.json")
    args = parser.parse_args(argv)
    names = parse_names(args.runs, DEFAULT_RUNS)
    comparisons = [tuple(parse_names(c, ())) for c in args.compare]
    if any(len(c) != 2 for c in comparisons):
        raise SystemExit("--compare takes two run names: a,b")
    if not DATA_ROOT.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {DATA_ROOT} and {WEIGHTS} (the shared real data and weights)")
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        if args.report_only or (args.skip_done and (args.out / name / "result.json").is_file()):
            results.append(json.loads((args.out / name / "result.json").read_text()))
            continue
        result = train_and_test(name, RUNS[name], args.out, args.workers, args.epochs, args.seed, args.also_last)
        print(f"{name}: test top-1 {result['test_acc']:.4f} (best val {result['best_val_acc']:.4f}, {result['minutes']} min)", flush=True)
        results.append(result)
    command = "python benchmarks/real_photos.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_table(args.out, results, comparisons, command.strip()))


if __name__ == "__main__":
    main()
