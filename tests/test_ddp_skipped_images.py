"""``on_bad_image: skip`` under DDP (2 CPU processes, gloo): one rank's batch is all skipped images.

Training: 3 good + 1 bad image, batch size 1: on the bad image's step one rank has an empty batch while
the other has a real one. Validation: 1 good + 1 bad image: one rank's whole validation epoch is
empty, and the values logged with ``sync_dist`` (and the accuracy metrics) are reduced over both.
Before the fix Lightning refused the ``None`` step under DDP; with only that fixed, the validation
reduction hung. The run must finish on both ranks with the same weights, and ``val/loss`` must be
the loss of the one good validation image.

``strategy: ddp`` relaunches ``sys.argv``, so the run is a script in a subprocess (with a timeout: a
hang fails instead of blocking the suite).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = '''
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_modules import ImageFolderDataModule
from mgff.lit import FineGrainedClassifier

if __name__ == "__main__":
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    (root / "train" / "a" / "0.png").write_bytes(b"not a png")
    (root / "val" / "b" / "0.png").write_bytes(b"not a png")
    data = dict(batch_size=1, num_workers=0, resize_size=72, crop_size=64, on_bad_image="skip", check_images=False, val_fraction=0.0)
    model = FineGrainedClassifier(num_classes=2, backbone="resnet10t", img_size=64, stages=[4], head="linear", lr=0.01)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=ImageFolderDataModule(root, **data))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).double().sum().item()
    print(f"RANK {trainer.global_rank} STEPS {trainer.global_step} WEIGHTS {weights:.8f}", flush=True)
    if trainer.global_rank == 0:
        single = ImageFolderDataModule(root, **data)
        single.setup("fit")
        item = next(item for item in single.datasets["val"] if item is not None)
        model.eval()
        with torch.no_grad():
            expected = F.cross_entropy(model(item["image"][None]).logits, item["label"][None]).item()
        print(f"VAL_LOSS {trainer.callback_metrics['val/loss'].item():.6f} EXPECTED {expected:.6f}", flush=True)
'''


def test_a_rank_with_only_skipped_images_neither_hangs_nor_desyncs(tmp_path):
    script = tmp_path / "ddp_skip.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # two ranks share the pipe: a line may be cut by the other rank's, so match the numbers' exact format
    ranks = dict((int(rank), (int(steps), float(w))) for rank, steps, w in re.findall(r"RANK (\d) STEPS (\d+) WEIGHTS (-?\d+\.\d{8})", output))
    assert sorted(ranks) == [0, 1] and ranks[0] == ranks[1], output[-3000:]  # same steps, same weights
    assert ranks[0][0] == 2  # 2 steps per rank: the empty step was taken, not skipped
    val_loss, expected = map(float, re.search(r"VAL_LOSS (-?\d+\.\d{6}) EXPECTED (-?\d+\.\d{6})", output).groups())
    assert abs(val_loss - expected) < 1e-4, output[-3000:]
