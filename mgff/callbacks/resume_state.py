"""What a checkpoint needs beyond Lightning's own for a run resumed mid-epoch to continue exactly.

Lightning restores weights, optimisers, schedulers and loop progress, but

- not the global random generators that dropout and drop-path draw from: without them a resumed
  run's dropout masks differ from the uninterrupted run's, and so do its weights;
- the training loader's position (its ``state_dict``) only when the loader is built after the
  checkpoint is loaded. A ``configure_optimizers`` that reads ``trainer.estimated_stepping_batches``
  (as mgff's does, for its per-step schedule) builds it earlier, and Lightning 2.6 then silently drops
  the saved position: the interrupted epoch restarts from its first batch.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


def collect_rng_states() -> dict[str, Any]:
    """This process's torch (CPU and every initialised CUDA device), numpy and Python generator states,
    as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the generators to states from :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeStateCheckpoint(Callback):
    """Save every rank's generator states and the training loader's position with each checkpoint;
    on resume, give the position back to the loader before its first batch and the generator states
    at the first training step.

    Restoring at the first ``on_train_batch_start`` rather than at load time matters: between loading
    and that step, a resumed run does things the uninterrupted run did not at that point (the sanity
    check's validation, creating loaders), and some of them draw from the global generators.

    Every rank gets back its own states when the world size is unchanged; otherwise every rank takes
    rank 0's. The states are gathered from all ranks while the checkpoint is written, which Lightning
    does on every rank (``Trainer.save_checkpoint`` must be called on all of them).
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._loader_state_to_restore: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() gets no trainer

    def state_dict(self) -> dict[str, Any]:
        rng = collect_rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rng)
            state: dict[str, Any] = {"rng_per_rank": gathered}
        else:
            state = {"rng_per_rank": [rng]}
        loader = self._train_loader()
        if loader is not None:
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng_per_rank")
        self._loader_state_to_restore = state_dict.get("train_loader")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the loader's iteration has not begun yet (it begins at the first batch, after set_epoch)
        loader = self._train_loader()
        if self._loader_state_to_restore is not None and loader is not None:
            loader.load_state_dict(self._loader_state_to_restore)
        self._loader_state_to_restore = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is None:
            return
        per_rank, self._rng_to_restore = self._rng_to_restore, None
        restore_rng_states(per_rank[trainer.global_rank] if len(per_rank) == trainer.world_size else per_rank[0])

    def _train_loader(self) -> Any:
        """The training loader when it can save and load its position (one loader, not a collection)."""
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        return loader if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)) else None
