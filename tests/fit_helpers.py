"""Helpers shared by the tests that run a tiny ``mgff.fit`` (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

DEMO = str(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml")


def tiny_demo_args(cub_root: Path, out: Path, *extra: str) -> list[str]:
    """``mgff.fit`` arguments: the demo config (two-stage), two training steps and one validation batch on the
    session's generated CUB-layout data, outputs under ``out``."""
    return [
        "--config", DEMO,
        "--data.class_path", "data_modules.CUB200DataModule",
        "--data.init_args.root", str(cub_root),
        "--data.init_args.resize_size", "80", "--data.init_args.crop_size", "64",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]
