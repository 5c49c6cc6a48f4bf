"""VTAB-1k task folders on disk: split files (``relative/path.jpg <int label>`` per line), images, preprocessing.

Every line of a split file is parsed and checked before training (a line without a label, a label out of
range, a missing or unreadable image), with errors that name ``<file>:<line>`` and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from typing_extensions import override

from flexlora_pl.data.resumable import ResumableTrainingData

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VTAB_PROTOCOLS",
    "VTAB_SPLIT_FILES",
    "ImageSplitData",
    "VTABDataError",
    "VTABExample",
    "VTABSplit",
    "read_split_file",
    "split_lines",
    "vtab_data_config",
    "vtab_transform",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet channel means: the normalisation of the PEFT-for-ViT literature on VTAB-1k (not timm's 0.5)."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations (see :data:`IMAGENET_MEAN`)."""

VTAB_SPLIT_FILES = ("train800", "val200", "train800val200", "test")
"""The four split files of every task folder (``<name>.txt``)."""

# protocol -> split file of each role ("val": None means no validation loop)
VTAB_PROTOCOLS: dict[str, dict[str, str | None]] = {
    "final": {"train": "train800val200", "val": None, "test": "test"},
    "tune": {"train": "train800", "val": "val200", "test": "test"},
}


class VTABDataError(ValueError):
    """A VTAB-1k folder, split file or image is missing or malformed (the message names it and the fix)."""


def vtab_data_config(image_size: int) -> dict[str, Any]:
    """The preprocessing of the VTAB-1k protocol as a timm data config.

    ``crop_pct`` 1.0 with ``crop_mode`` ``squash`` is timm's way of saying "resize to exactly
    ``image_size`` × ``image_size``, no crop", so ``timm.data.create_transform(**config)`` rebuilds the
    same evaluation transform as :func:`vtab_transform`.

    Args:
        image_size: side of the square input in pixels.
    """
    return {"input_size": (3, image_size, image_size), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "crop_pct": 1.0, "crop_mode": "squash"}


def vtab_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Bicubic resize to ``image_size`` × ``image_size`` (aspect ratio not kept), no crop, no augmentation,
    ImageNet mean/std: the preprocessing of NOAH, FacT, GLoRA and SPT, for training and evaluation alike.

    Args:
        image_size: side of the square input in pixels.
    """
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@dataclass(frozen=True)
class VTABExample:
    """One line of a split file: the image, its label, and where the line is (for error messages)."""

    path: str
    label: int
    source: str  # "<split file>:<line number>"


class VTABSplit(Dataset):
    """The images of one split file; decoding happens in ``__getitem__`` (in the DataLoader workers).

    Args:
        examples: the parsed lines of the split file.
        transform: turns a PIL image into the model's input tensor.
    """

    def __init__(self, examples: Sequence[VTABExample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.examples = list(examples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        example = self.examples[index]
        try:
            with Image.open(example.path) as image:
                pixels = image.convert("RGB")
        except (OSError, ValueError) as err:  # PIL raises OSError subclasses for damaged files
            raise self.read_error(example, err) from err
        return self.transform(pixels), example.label

    def read_error(self, example: VTABExample, err: Exception) -> Exception:
        """The error of an image that cannot be decoded: names its file and the fix."""
        return VTABDataError(f"{example.source}: cannot read image {example.path!r} ({err}); replace the file or "
                             "remove the line")


class ImageSplitData(ResumableTrainingData):
    """The loaders of an image data module whose splits sit in ``self.datasets`` by role (``train``, ``val``,
    ``test``; prediction reads ``test``), with ``batch_size``, ``eval_batch_size`` and ``has_validation``
    (``False``: no validation loop). Shared by :class:`VTABDataModule` and the image-folder module."""

    datasets: dict[str, Dataset]
    batch_size: int
    eval_batch_size: int
    has_validation: bool

    def _loader(self, role: str, batch_size: int) -> DataLoader:
        if role not in self.datasets:
            raise RuntimeError(f"the {role} split is not ready: call setup() first (the Trainer does this)")
        return self.split_loader(self.datasets[role], batch_size, train=role == "train")

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loader; without a validation split none (an empty list: no validation loop)."""
        return self._loader("val", self.eval_batch_size) if self.has_validation else []

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)


def split_lines(path: Path, num_classes: int) -> list[tuple[int, str, int]]:
    """The lines of a split file as ``(line number, relative image path, label)``; format and labels checked."""
    if not path.is_file():
        raise VTABDataError(f"split file {str(path)!r} does not exist; a VTAB-1k task folder holds "
                            f"{', '.join(f'{s}.txt' for s in VTAB_SPLIT_FILES)} (build it with NOAH's VTAB-1k "
                            "generator, see docs/vtab.md)")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            where = f"{path}:{number}"
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise VTABDataError(f"{where}: cannot parse {text!r}; each line must be '<relative/image/path> "
                                    "<integer label>'")
            label = int(parts[1])
            if not 0 <= label < num_classes:
                raise VTABDataError(f"{where}: label {label} is out of range for this task's {num_classes} classes "
                                    f"(0..{num_classes - 1}); check that the folder belongs to this task")
            rows.append((number, parts[0], label))
    if not rows:
        raise VTABDataError(f"split file {str(path)!r} lists no images; regenerate the task folder")
    return rows


def read_split_file(path: str | os.PathLike, num_classes: int, *, check_images: bool = True) -> list[VTABExample]:
    """Parse one VTAB-1k split file and check every line before any training.

    Each line is ``relative/path.jpg <int label>`` (path relative to the task folder; blank lines are
    skipped). Every image must exist; with ``check_images`` its header is read too, so a damaged or
    non-image file is found now rather than in the middle of an epoch.

    Args:
        path: the split file (``<root>/<task>/<split>.txt``).
        num_classes: labels must lie in ``0 .. num_classes - 1``.
        check_images: open every image's header (cheap: pixels are not decoded).

    Raises:
        VTABDataError: the file is missing or empty, a line does not parse, a label is out of range, or an
            image is missing or unreadable; the message names the file and line and says what to fix.
    """
    path = Path(path)
    folder = path.parent
    examples = []
    for number, relative, label in split_lines(path, num_classes):
        where = f"{path}:{number}"
        image = folder / relative
        if not image.is_file():
            raise VTABDataError(f"{where}: image {str(image)!r} does not exist; paths are relative to the task "
                                f"folder {str(folder)!r}")
        if check_images:
            try:
                with Image.open(image) as opened:
                    opened.size  # noqa: B018 - reads the header only
            except (OSError, ValueError) as err:
                raise VTABDataError(f"{where}: image {str(image)!r} cannot be read as an image ({err}); "
                                    "replace the file or remove the line") from err
        examples.append(VTABExample(str(image), label, where))
    return examples
