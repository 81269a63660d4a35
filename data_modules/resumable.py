"""Loaders whose training batches a run stopped mid-epoch replays exactly, on one or many ranks.

Three things make the data of a resumed run equal to that of an uninterrupted one:

- **order**: the training permutation is a function of ``(seed, epoch)`` only
  (:class:`ResumableShuffleSampler`, the same order as Lightning's default ``DistributedSampler``);
- **position**: :class:`ResumableDataLoader` counts the batches it has handed to the training loop;
  that count goes into every checkpoint (``state_dict``/``load_state_dict``, called by Lightning's fit
  loop and by :class:`mgff.callbacks.resume_state.ResumeStateCheckpoint`, which also gives it back in
  the cases where Lightning does not) and the resumed loader skips those batches' indices without
  loading their images;
- **augmentation**: albumentations keeps its own random generators, which ``seed_everything`` does not
  touch (every fresh ``Compose`` draws OS entropy). :class:`ItemSeededDataset` seeds the training
  transform (:class:`SeededTransform`) per item from ``(seed, epoch, index)``, so an image's crop and
  flip do not depend on which worker loads it, nor on what was loaded before it.

Evaluation loaders on several ranks use Lightning's ``UnrepeatedDistributedSampler``: every image is
seen exactly once over all ranks (no padding duplicates), so accuracies reduced by torchmetrics equal
a single-process evaluation. Each rank must hold at least one batch (a validation set of at least
``world_size`` images).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Iterator

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data_modules.transforms import apply_transform

log = logging.getLogger("mgff")


def mixed_seed(*values: int) -> int:
    """A 64-bit seed well mixed from non-negative integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, dtype=np.uint64)[0])


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of item ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return mixed_seed(seed, epoch, index)


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, or ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class SeededTransform:
    """``fn(image (H, W, 3) uint8, box) -> (tensor, box)`` through an albumentations pipeline whose
    random draws can be fixed for the next item with :meth:`reseed`."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def reseed(self, seed: int) -> None:
        """Make the pipeline's next draws a function of ``seed`` alone."""
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray, box):
        return apply_transform(self.compose, image, box)


class ItemSeededDataset(Dataset):
    """A dataset whose items are asked for as ``(index, seed)``: the wrapped dataset's transform is
    reseeded with ``seed`` before ``dataset[index]`` is loaded. A plain ``index`` loads the item with
    the transform's current random state."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        transform = getattr(dataset, "transform", None)
        self._reseed = getattr(transform, "reseed", None)
        if self._reseed is None:
            log.warning("training transform %r cannot be seeded per item: a resumed run's augmentations will differ", transform)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            if self._reseed is not None:
                self._reseed(seed)
        else:
            index = key
        return self.dataset[index]


class ResumableShuffleSampler(DistributedSampler):
    """This rank's share of a shuffled epoch as ``(index, item seed)`` pairs, able to start mid-epoch.

    The order is torch's ``DistributedSampler`` order for ``(seed, epoch)`` (padded so that every rank
    gets as many items); the item seed is :func:`item_seed` of ``(seed, epoch, index)``. Setting
    :attr:`start` skips the first items of the next iteration (once). Being a ``DistributedSampler``,
    Lightning keeps it instead of injecting its own, and calls :meth:`set_epoch` every epoch.

    Args:
        dataset: the sized dataset to sample.
        num_replicas / rank: the process group's size and this rank (default: the initialised group,
            else a single process).
        seed: the permutation seed; default the run's seed (``PL_GLOBAL_SEED``, set by
            ``seed_everything``; 0 without one, as Lightning's own sampler). It must be the same on every rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None, seed: int | None = None) -> None:
        world, this_rank = distributed_world()
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=this_rank if rank is None else rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a skip belongs to the epoch it was restored for
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        seed, epoch = self.seed, self.epoch
        return ((index, item_seed(seed, epoch, index)) for index in indices[start:])


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` over a :class:`ResumableShuffleSampler` that resumes mid-epoch.

    :meth:`state_dict` records the sampler's seed and epoch and how many batches of that epoch the
    training loop has taken; after :meth:`load_state_dict` (before the epoch's first batch), the rest
    of that epoch is exactly the batches the stopped run had not trained on yet. Worker seeds come
    from ``(seed, epoch)`` through the loader's own generator, so iterating the loader never draws
    from the global torch generator (the model's dropout stream stays the same whether or not a run
    was resumed).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableShuffleSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableShuffleSampler, got {type(self.sampler).__name__}")
        self.batches_taken = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches already trained on), from a checkpoint

    def __iter__(self) -> Iterator[Any]:
        # a generator: the body runs at the first next(), after Lightning's set_epoch for this epoch
        sampler: ResumableShuffleSampler = self.sampler
        skip = 0
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            self._resume_at = None
            if epoch == sampler.epoch:
                skip = batches
        sampler.start = skip * self.batch_size
        self.batches_taken = skip
        self.generator.manual_seed(mixed_seed(sampler.seed, sampler.epoch))
        for batch in super().__iter__():
            self.batches_taken += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableShuffleSampler = self.sampler
        return {
            "seed": sampler.seed,
            "epoch": sampler.epoch,
            "batches_taken": self.batches_taken,
            "batch_size": self.batch_size,
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableShuffleSampler = self.sampler
        if state["batch_size"] != self.batch_size or state["num_replicas"] != sampler.num_replicas:
            log.warning(
                "resuming with batch_size %d on %d ranks from a run with batch_size %d on %d ranks: "
                "the rest of the interrupted epoch is not the data that run would have seen",
                self.batch_size, sampler.num_replicas, state["batch_size"], state["num_replicas"],
            )
        sampler.seed = state["seed"]
        sampler.set_epoch(state["epoch"])
        self._resume_at = (state["epoch"], state["batches_taken"])


def split_loader(dataset: Dataset, shuffle: bool, batch_size: int, **kwargs: Any) -> DataLoader:
    """The loader of one split.

    ``shuffle=True`` (training): a :class:`ResumableDataLoader` over this rank's share, per-item seeded
    augmentation, incomplete last batch dropped. ``shuffle=False`` (evaluation): a plain ``DataLoader``
    in dataset order, over this rank's unpadded share when a process group is initialised.
    ``kwargs`` are further ``DataLoader`` arguments (workers, collate_fn...).
    """
    world, rank = distributed_world()
    if shuffle:
        sampler = ResumableShuffleSampler(dataset, num_replicas=world, rank=rank)
        drop_last = len(sampler) > batch_size
        return ResumableDataLoader(ItemSeededDataset(dataset), batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
    sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, **kwargs)
