"""experiments/backbones/*.yaml: each builds through the CLI on the demo data and learns.

"Learns" here: the model fits one batch of 8 generated images (accuracy 1.0 after a few dozen
steps, from chance). The architectures are shrunk (fewer/narrower blocks, 64 px inputs) so this runs on a CPU; what
is tested is that each config wires its backbone into the head and the loss correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mgff.cli import MGFFCLI

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# architecture overrides that make each backbone tiny; the config's own choices (name, head, stages) stay
TINY = {
    "uniformer_mgff": {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 64], "head_dim": 16},
    "litv2_mgff": {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    "vit_linear": {"embed_dim": 48, "depth": 2, "num_heads": 2},
    "swin_linear": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 4},
}


# what is checked is the backbone wiring: the zoo configs (which keep the base config's two stages)
# are run on the single-stage classifier here, so the test does not pay for a cropper and a second pass
SINGLE_STAGE = ["--model.class_path", "mgff.lit.FineGrainedClassifier"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_backbone_config_fits_and_learns(name, cub_root, tmp_path):
    torch.manual_seed(0)
    cli = MGFFCLI(
        run=False,
        args=[
            "--config", str(EXPERIMENTS / "demo.yaml"),
            "--config", str(EXPERIMENTS / "backbones" / f"{name}.yaml"),
            "--model.init_args.backbone_kwargs", json.dumps(TINY[name]),
            *(SINGLE_STAGE if name.endswith("_mgff") else []),
            "--data.class_path", "data_modules.CUB200DataModule",
            "--data.init_args.root", str(cub_root),
            "--data.init_args.resize_size", "80",
            "--data.init_args.crop_size", "64",
            "--model.init_args.img_size", "64",
            "--data.init_args.batch_size", "8",
            "--data.init_args.num_workers", "0",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ],
    )
    model, data = cli.model, cli.datamodule
    assert model.hparams.backbone == {"uniformer_mgff": "uniformer_small", "litv2_mgff": "litv2_s", "vit_linear": "vit_base_patch16_384", "swin_linear": "swin_base_patch4_window12_384"}[name]
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    images, labels = batch["image"], batch["label"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    first = None
    for _ in range(30):
        logits, aux, _ = model.forward_outputs(images)
        loss = sum(model.loss_terms(logits, aux, labels).values())
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits, _, _ = model.forward_outputs(images)
    accuracy = (logits["main"].argmax(-1) == labels).float().mean().item()
    assert loss.item() < 0.5 * first, (first, loss.item())
    assert accuracy == 1.0, accuracy
    assert F.cross_entropy(logits["main"], labels).item() < 0.5
