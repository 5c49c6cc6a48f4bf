"""Training data order that survives a crash: exact mid-epoch resumption, single process or DDP.

The order of epoch ``e`` is a permutation seeded by ``seed + e`` (``torch.utils.data.DistributedSampler``
semantics), so it depends on nothing but the seed and the epoch. :class:`ResumableDataLoader` tells
Lightning where training stands when a checkpoint is written (epoch, and batches whose training step
ran), and on resume its sampler skips exactly those batches. Under DDP every rank takes its own shard
of the same permutation, so the union of one step's per-rank batches is the batch a single process
with the same global batch size would draw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

__all__ = ["ResumableDataLoader", "ResumableSampler", "ResumableTrainingData"]


class ResumableSampler(DistributedSampler):
    """A seeded, epoch-aware shuffling sampler that can start an epoch part-way through.

    Args:
        dataset: the dataset to index.
        seed: the permutation of epoch ``e`` is seeded by ``seed + e``.
        shuffle: shuffle (``False``: dataset order, sharded the same way).
        num_replicas: number of processes; default from ``torch.distributed`` (1 when not initialised).
        rank: this process's rank; default from ``torch.distributed`` (0 when not initialised).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0

    def skip_next_epoch_start(self, samples: int) -> None:
        """Skip the first ``samples`` indices of the next iteration only (resuming mid-epoch)."""
        if samples < 0:
            raise ValueError(f"cannot skip a negative number of samples ({samples})")
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())  # this rank's shard of the epoch's permutation
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that can report and restore its position.

    The data module saves :meth:`position` in every checkpoint (``LightningDataModule.state_dict``) and
    calls :meth:`resume_at` when the checkpoint is loaded. (Lightning's own protocol for stateful
    loaders is not used: the Trainer builds the training loader while counting the run's total steps,
    before the checkpoint is restored, and then never hands the saved state to it.) The position is
    read from the training loop (``progress``), not counted here, because Lightning pre-fetches a batch
    ahead of the one being trained on.

    Args:
        dataset: the training dataset.
        sampler: its :class:`ResumableSampler`.
        progress: returns ``(epoch, batches_done)``: the current epoch and how many of its batches
            have been trained on. Usually reads ``trainer.fit_loop``.
        **kwargs: passed to ``DataLoader`` (``batch_size``, ``collate_fn``, ``num_workers``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: ResumableSampler,
        progress: Callable[[], tuple[int, int]],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.progress = progress

    def position(self) -> dict[str, int]:
        """Where training stands in the data: epoch, batches trained on in it, and the batch layout."""
        epoch, done = self.progress()
        if done >= len(self):  # the epoch is over: resume at the start of the next one
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done, "batch_size": self.batch_size,
                "num_replicas": self.sampler.num_replicas}

    def resume_at(self, state: dict[str, int]) -> None:
        """Make the next iteration start where :meth:`position` said training stood."""
        for key in ("batch_size", "num_replicas"):
            current = self.batch_size if key == "batch_size" else self.sampler.num_replicas
            if state.get(key, current) != current:
                raise ValueError(
                    f"the checkpoint's training data was read with {key}={state[key]}, this run uses {current}: "
                    f"mid-epoch resumption would replay or skip rows. Resume with the same {key}."
                )
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip_next_epoch_start(state["batches_done"] * self.batch_size)


class ResumableTrainingData(LightningDataModule):
    """A ``LightningDataModule`` whose training loader resumes exactly where a checkpoint left it.

    Subclasses build their training loader with :meth:`resumable_train_loader`; the loader's position is
    saved in every checkpoint (:meth:`state_dict`) and restored on resume (:meth:`load_state_dict`), whether
    the Trainer built the loader before restoring (the usual case: it counts the run's steps first) or after.
    """

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: ResumableDataLoader | None = None
        self._resume_position: dict[str, int] | None = None

    def split_loader(self, dataset: Dataset, batch_size: int, train: bool, **kwargs: Any) -> DataLoader:
        """A loader of one split with the data module's ``num_workers`` and ``seed``: the training split's
        resumable (:meth:`resumable_train_loader`), the others in order.

        Every loader draws its worker seeds from a private generator, never from the global RNG: the global RNG
        then drives only dropout (and drop-path), and a resumed run replays it exactly.

        Args:
            dataset: the split.
            batch_size: rows per batch.
            train: whether this is the training split.
            **kwargs: more ``DataLoader`` arguments (``collate_fn``, ...).
        """
        workers = getattr(self, "num_workers", 0)
        kwargs = {"batch_size": batch_size, "num_workers": workers, "persistent_workers": workers > 0,
                  "generator": torch.Generator().manual_seed(self.seed), **kwargs}
        if not train:
            return DataLoader(dataset, shuffle=False, **kwargs)
        return self.resumable_train_loader(dataset, self.seed, **kwargs)

    def resumable_train_loader(self, dataset: Dataset, seed: int, **kwargs: Any) -> ResumableDataLoader:
        """The training loader: epoch ``e`` in the order seeded by ``seed + e``, starting where a restored
        checkpoint stopped.

        Args:
            dataset: the training dataset.
            seed: the shuffling seed.
            **kwargs: passed to ``DataLoader`` (``batch_size``, ``collate_fn``, ``num_workers``, ``generator``, ...).
        """
        sampler = ResumableSampler(dataset, seed=seed, shuffle=True)
        self._train_loader = ResumableDataLoader(dataset, sampler, progress=self._training_progress, **kwargs)
        if self._resume_position is not None:
            self._train_loader.resume_at(self._resume_position)
            self._resume_position = None
        return self._train_loader

    def _training_progress(self) -> tuple[int, int]:
        """``(epoch, batches trained on in it)``, read from the Trainer's fit loop."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    @override
    def state_dict(self) -> dict[str, Any]:
        """The training data position, saved by Lightning in every checkpoint."""
        return {} if self._train_loader is None else {"train_position": self._train_loader.position()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_position")
        if position is None:
            return
        if self._train_loader is not None:  # usually built already: the Trainer counts steps before restoring
            self._train_loader.resume_at(position)
        else:
            self._resume_position = position
