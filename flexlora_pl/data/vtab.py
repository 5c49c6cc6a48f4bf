"""VTAB-1k: the 19 tasks in the folder layout of the PEFT-for-ViT literature (NOAH's generator).

Each task folder ``<root>/<task>/`` holds ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and
``test.txt``; every line is ``relative/path.jpg <int label>``, the path relative to the task folder.
A registry gives each task's class count and group (``vtab_tasks.py``); the split files and images are read by
``vtab_files.py``; :class:`VTABDataModule` serves one task under the
``final`` (train800val200 → test) or ``tune`` (train800 → val200) protocol, after checking that the split
files have VTAB-1k's sizes and that nothing it trains on is in a split it reports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from flexlora_pl.core.checks import require_int
from flexlora_pl.data.vtab_files import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VTAB_PROTOCOLS,
    VTAB_SPLIT_FILES,
    ImageSplitData,
    VTABDataError,
    VTABExample,
    VTABSplit,
    read_split_file,
    split_lines,
    vtab_data_config,
    vtab_transform,
)
from flexlora_pl.data.vtab_tasks import VTAB_1K_SIZES, VTAB_ALIASES, VTAB_GROUPS, VTAB_TASKS, VTABTask, vtab_task
from flexlora_pl.runs.seeding import resolve_seed

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VTAB_1K_SIZES",
    "VTAB_ALIASES",
    "VTAB_GROUPS",
    "VTAB_PROTOCOLS",
    "VTAB_SPLIT_FILES",
    "VTAB_TASKS",
    "VTABDataError",
    "VTABDataModule",
    "VTABExample",
    "VTABSplit",
    "VTABTask",
    "read_split_file",
    "vtab_data_config",
    "vtab_task",
    "vtab_transform",
]


class VTABDataModule(ImageSplitData):
    """One VTAB-1k task in the folder layout of the PEFT-for-ViT literature, under either protocol.

    ``protocol="final"`` (the default) trains on ``train800val200`` and tests on ``test``, with no
    validation loop: the last epoch's checkpoint is the one tested, and nothing is ever selected on the
    test set. ``protocol="tune"`` trains on ``train800`` and validates on ``val200`` (``val/accuracy``,
    ``val/score``), for choosing hyper-parameters. Images are resized bicubically to ``image_size`` ×
    ``image_size``, with no crop and no augmentation, and normalised with ImageNet mean/std
    (:func:`vtab_transform`); they are decoded in the DataLoader workers. Before the run folder is created,
    :meth:`prepare_data` checks the split files against each other (:meth:`check_splits`: VTAB-1k's sizes,
    and no image that trains in a split that is reported), then parses every split file the coming stage
    needs and checks every image it names. The training order depends only on the seed and the epoch, and
    a run resumed from a mid-epoch checkpoint continues on exactly the next batch.

    Batches are ``(images, labels)``: a float tensor ``(B, 3, image_size, image_size)`` and class ids.

    Args:
        root: the folder that holds one sub-folder per task (``<root>/<task>/train800.txt`` ...).
        task: a task folder name (one of the 19 of :data:`VTAB_TASKS`) or an alias (``cifar100``, ``oxford_pet``).
        protocol: ``final`` (train800val200 → test) or ``tune`` (train800 → val200).
        image_size: side of the square input in pixels (224 for ViT-B/16).
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: ``DataLoader`` worker processes (they decode the images).
        seed: seeds the training shuffle; ``None`` follows ``seed_everything``.
        check_images: open every image's header before training (finds damaged files early).
        check_split_sizes: require VTAB-1k's split sizes (:attr:`VTABTask.split_sizes`); ``false`` for a task
            folder of other sizes (a small custom or test folder). The overlap check runs either way.
    """

    def __init__(
        self,
        root: str,
        task: str,
        protocol: str = "final",
        image_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        seed: int | None = None,
        check_images: bool = True,
        check_split_sizes: bool = True,
    ) -> None:
        super().__init__()
        if protocol not in VTAB_PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} is not one of {list(VTAB_PROTOCOLS)}: 'final' trains on "
                             "train800val200 and tests on test; 'tune' trains on train800 and validates on val200")
        for name, value, least in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                   ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):
            require_int(name, value, least)
        for name, value in (("check_images", check_images), ("check_split_sizes", check_split_sizes)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.task = self.resolve_task(task)
        self.root = str(root)
        self.protocol = protocol
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = resolve_seed(seed)
        self.check_images = check_images
        self.check_split_sizes = check_split_sizes
        # role ("train", "val", "test") -> dataset; filled by setup()
        self.datasets: dict[str, VTABSplit] = {}
        self._checked: dict[str, list[VTABExample]] = {}

    def resolve_task(self, task: str) -> VTABTask:
        """The task's registry entry; subclasses with a task outside the 19 override this.

        Args:
            task: the name given to the constructor.
        """
        return vtab_task(task)

    # ------------------------------------------------------------------ what the model links
    @property
    def num_classes(self) -> int:
        """Number of classes of the task (linked into the model)."""
        return self.task.num_classes

    @property
    def data_config(self) -> dict[str, Any]:
        """The preprocessing as a timm data config (linked into the model, so its exports carry it)."""
        return vtab_data_config(self.image_size)

    @property
    def task_dir(self) -> Path:
        """The task's folder, ``<root>/<task>``."""
        return Path(self.root) / self.task.name

    @property
    def has_validation(self) -> bool:
        """Whether the protocol has a validation loop (``tune``) or not (``final``)."""
        return VTAB_PROTOCOLS[self.protocol]["val"] is not None

    def split_file(self, role: str) -> Path:
        """The split file that serves ``role`` (``train``, ``val`` or ``test``) under this protocol.

        Args:
            role: ``train``, ``val`` or ``test``.
        """
        name = VTAB_PROTOCOLS[self.protocol][role]
        if name is None:
            raise ValueError(f"protocol={self.protocol!r} has no {role} split")
        return self.task_dir / f"{name}.txt"

    def roles_for_stage(self, stage: str | None) -> list[str]:
        """The roles a Trainer stage needs (``None``: all of this protocol's).

        Args:
            stage: ``fit``, ``validate``, ``test``, ``predict`` or ``None``.
        """
        val = ["val"] if self.has_validation else []
        if stage == "fit":
            return ["train", *val]
        if stage == "validate":
            if not val:
                raise ValueError("protocol 'final' has no validation split (nothing may be selected on test); use "
                                 "data.init_args.protocol=tune to validate on val200, or `flexlora test`")
            return val
        if stage in ("test", "predict"):
            return ["test"]
        if stage is None:
            return ["train", *val, "test"]
        raise ValueError(f"unknown stage {stage!r}; expected fit, validate, test, predict or None")

    # ------------------------------------------------------------------ loading and checks
    def check_task_dir(self) -> None:
        """Raise :class:`VTABDataError` when the root or the task folder is missing, naming what is there."""
        root = Path(self.root)
        if not root.is_dir():
            raise VTABDataError(f"data root {self.root!r} does not exist (relative paths are resolved from "
                                f"{os.getcwd()!r}); set data.init_args.root to the folder that holds the VTAB-1k "
                                "task folders (see docs/vtab.md)")
        if not self.task_dir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise VTABDataError(f"task folder {str(self.task_dir)!r} does not exist; folders under {self.root!r}: "
                                f"{present or 'none'}. Task folders carry NOAH's names ({', '.join(VTAB_TASKS)})")

    def check_splits(self) -> None:
        """Check the protocol's split files against each other, before anything is trained or scored.

        The files the protocol reads are parsed (``final``: train800val200 and test; ``tune``: train800,
        val200 and test). With ``check_split_sizes`` each must list the number of images of
        :attr:`VTABTask.split_sizes` (800, 200, 1,000, and the task's test count where it is known). Always, no
        image of the training file may be listed by a file that is reported (``final``: test; ``tune``: val200
        and test), compared by their paths relative to the task folder.

        Raises:
            VTABDataError: a file is missing or malformed, has the wrong number of images, or shares images
                with the training file; the message names the file, its first offending line, how many
                and the fix.
        """
        roles = VTAB_PROTOCOLS[self.protocol]
        train = roles["train"]
        reported = [name for role, name in roles.items() if role != "train" and name is not None]
        rows = {name: split_lines(self.task_dir / f"{name}.txt", self.num_classes) for name in (train, *reported)}
        if self.check_split_sizes:
            sizes = self.task.split_sizes
            for name, lines in rows.items():
                if name in sizes and len(lines) != sizes[name]:
                    raise VTABDataError(self._size_message(name, lines, sizes[name]))
        trained: dict[str, int] = {}
        for number, relative, _ in rows[train]:
            trained.setdefault(os.path.normpath(relative), number)
        for name in reported:
            shared = [(number, relative) for number, relative, _ in rows[name]
                      if os.path.normpath(relative) in trained]
            if shared:
                number, relative = shared[0]
                raise VTABDataError(
                    f"{self.task_dir / f'{name}.txt'}:{number}: image {relative!r} is also in the training split "
                    f"({self.task_dir / f'{train}.txt'}:{trained[os.path.normpath(relative)]}); "
                    f"{len(shared):,} of the {len(rows[name]):,} images of {name}.txt are in {train}.txt, and "
                    f"nothing trained on may be {'validated' if name == roles['val'] else 'tested'} on. Remove "
                    f"those lines from {name}.txt, or regenerate the task folder with NOAH's VTAB-1k generator, "
                    "whose splits are disjoint (see docs/vtab.md)")

    def _size_message(self, name: str, lines: list[tuple[int, str, int]], expected: int) -> str:
        """The size check's message: the file, the line where it goes wrong, the counts and the fix."""
        count = len(lines)
        if count > expected:
            where, what = lines[expected][0], f"the first image past the {expected:,} is on this line"
        else:
            where, what = lines[-1][0], f"the file ends on this line, {expected - count:,} short"
        source = "every VTAB-1k task" if name in VTAB_1K_SIZES else f"task {self.task.name}"
        return (f"{self.task_dir / f'{name}.txt'}:{where}: {name}.txt lists {count:,} images where {source} has "
                f"{expected:,}; {what}. Regenerate the task folder with NOAH's VTAB-1k generator (see docs/vtab.md), "
                "or, for a task folder of other sizes, set data.init_args.check_split_sizes=false")

    def _load(self, roles: Sequence[str]) -> dict[str, list[VTABExample]]:
        if not roles:
            return {}
        self.check_task_dir()
        self.check_splits()
        return {role: read_split_file(self.split_file(role), self.num_classes, check_images=self.check_images)
                for role in roles}

    @override
    def prepare_data(self) -> None:
        """Check the split files, before the run folder is created.

        :meth:`check_splits` checks the protocol's files against each other (sizes, overlap); then the split
        files the coming stage needs are parsed and every image they name is checked. The checked lines are
        kept for :meth:`setup` in this process; other processes (DDP) check their own.
        """
        fn = self.trainer.state.fn if self.trainer is not None else None
        wanted = [role for role in self.roles_for_stage(None if fn is None else fn.value)
                  if role not in self.datasets and role not in self._checked]
        if wanted:
            self._checked.update(self._load(wanted))

    @override
    def setup(self, stage: str | None = None) -> None:
        wanted = [role for role in self.roles_for_stage(stage) if role not in self.datasets]
        checked = {role: self._checked.pop(role) for role in wanted if role in self._checked}
        checked.update(self._load([role for role in wanted if role not in checked]))
        transform = vtab_transform(self.image_size)
        for role in wanted:
            self.datasets[role] = VTABSplit(checked[role], transform)
            rank_zero_info(f"{type(self).__name__}: {self.task.name} {role} has {len(checked[role])} images from "
                           f"{self.split_file(role)}")

