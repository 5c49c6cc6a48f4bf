"""An offline stand-in for a VTAB-1k task: scikit-learn's handwritten digits in the VTAB-1k folder layout.

No pretrained ViT weights and no VTAB-1k images are reachable offline, so the vision demo
(``configs/vtab/demo_digits.yaml``) trains on the 1,797 8×8 grey-scale digits that ship inside
scikit-learn (UCI optical recognition of handwritten digits, 10 classes). :func:`build_digits_vtab` writes
them as ``<root>/digits/`` with ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``
(800 / 200 / 1,000 / 797 images, a fixed shuffle), exactly the layout of a real task folder, so the demo
runs the same data module, checks and preprocessing as the 19 tasks. The splits pass both checks of the
data module: VTAB-1k's sizes (the test split's 797 declared by :data:`DIGITS_TASK`) and no image shared
between what trains and what is tested or validated (each image is written once, under its split's folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from typing_extensions import override

from flexlora_pl.data.vtab import VTAB_1K_SIZES, VTAB_SPLIT_FILES, VTABDataModule, VTABTask

__all__ = ["DIGITS_TASK", "DigitsVTABDataModule", "build_digits_vtab"]

# the split sizes of VTAB-1k (800 + 200 for training), the rest of the 1,797 digits for testing
_TRAIN, _VAL = VTAB_1K_SIZES["train800"], VTAB_1K_SIZES["val200"]
_DIGITS = 1797

DIGITS_TASK = VTABTask("digits", 10, "demo", test_size=_DIGITS - _TRAIN - _VAL)
"""The demo task: 10 classes, in no VTAB group, 797 test images."""


def build_digits_vtab(root: str | os.PathLike, seed: int = 0) -> Path:
    """Write scikit-learn's digits as a VTAB-1k task folder ``<root>/digits`` unless it is complete already.

    The folder is written under a temporary name and renamed into place, so an interrupted build leaves
    no half-written task folder, and two processes building at once both end up with a complete one.

    Args:
        root: the data root (the parent of the task folder).
        seed: seed of the shuffle that assigns images to splits.

    Returns:
        The task folder.
    """
    root = Path(root)
    task_dir = root / DIGITS_TASK.name
    if all((task_dir / f"{split}.txt").is_file() for split in VTAB_SPLIT_FILES):
        return task_dir
    if task_dir.exists():
        raise ValueError(f"{str(task_dir)!r} exists but lacks some of the split files "
                         f"{[f'{s}.txt' for s in VTAB_SPLIT_FILES]}; delete it and it is rebuilt on the next run")
    from sklearn.datasets import load_digits

    digits = load_digits()
    if len(digits.images) != _DIGITS:
        raise ValueError(f"scikit-learn's digits hold {len(digits.images)} images, not the {_DIGITS} the demo's "
                         "split sizes assume; use a scikit-learn release that ships the UCI digits unchanged")
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 grey levels
    order = np.random.default_rng(seed).permutation(len(pixels))
    splits = {"train800": order[:_TRAIN], "val200": order[_TRAIN:_TRAIN + _VAL], "test": order[_TRAIN + _VAL:]}
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    try:
        lines: dict[str, list[str]] = {}
        for split, indices in splits.items():
            (tmp / "images" / split).mkdir(parents=True)
            lines[split] = []
            for index in indices:
                relative = f"images/{split}/{index:04d}.png"
                Image.fromarray(pixels[index]).save(tmp / relative)
                lines[split].append(f"{relative} {int(digits.target[index])}")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, rows in lines.items():
            (tmp / f"{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, task_dir)
        except OSError:  # another process finished first: keep its folder
            if not (task_dir / "test.txt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return task_dir


class DigitsVTABDataModule(VTABDataModule):
    """scikit-learn's digits as a VTAB-1k task (see :func:`build_digits_vtab`), built on first use.

    Everything else is :class:`~flexlora_pl.data.vtab.VTABDataModule`: protocols, preprocessing (bicubic
    resize of the 8×8 digits to ``image_size``, ImageNet mean/std), checks (sizes and overlap included) and
    exact resume.

    Args:
        root: where the ``digits`` task folder is (or will be built).
        protocol: ``final`` (train800val200 → test) or ``tune`` (train800 → val200).
        image_size: side of the square input in pixels.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: ``DataLoader`` worker processes.
        seed: seeds the training shuffle; ``None`` follows ``seed_everything``.
    """

    def __init__(
        self,
        root: str = "data/vtab_digits",
        protocol: str = "final",
        image_size: int = 32,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__(root, DIGITS_TASK.name, protocol=protocol, image_size=image_size, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)

    @override
    def resolve_task(self, task: str) -> VTABTask:
        return DIGITS_TASK

    @override
    def check_task_dir(self) -> None:
        build_digits_vtab(self.root)
        super().check_task_dir()
