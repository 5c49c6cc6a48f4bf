"""Your own images in torchvision's ``ImageFolder`` layout: one sub-folder per class, the class names its names.

Two layouts are read (``root`` is ``data.init_args.root``)::

    root/train/<class>/<image>     root/<class>/<image>
    root/val/<class>/<image>       (one folder: carve val_size and test_size out of it)
    root/test/<class>/<image>

A root that holds a ``train`` folder is the split layout: ``train`` trains; ``val`` (or ``validation``, not
both) validates, else a ``val_size`` carve of ``train`` does, else there is no validation loop; ``test`` serves
``flexlora test`` and ``flexlora predict``. Any other root is one folder of classes: ``val_size`` and ``test_size``
carve the validation and test images out of it (the test carve first), the rest trains. A ``val`` or ``test``
folder without ``train`` is refused, so no class of a one-folder layout may carry one of those names.

The classes are the sorted names of the training folder's class folders (or ``label_names``, which fixes their
order), and class ``i`` is the ``i``-th of them; a validation or test folder may lack some of them but holds no
other. Inside a class folder images are found at any depth, in sorted path order; files and folders whose name
starts with a dot are skipped, and any other file that is not an image (:data:`IMAGE_EXTENSIONS`) is refused, as is
an image lying loose beside the class folders, so that nothing is silently left out.

Every carve is stratified by class and seeded by ``seed`` (:func:`~flexlora_pl.data.holdout.stratified_draw`): the
same folder and seed always carve the same images, and every class keeps an image on both sides.

Preprocessing follows the backbone's timm data config (``model_name``, linked from the model by the ``flexlora``
command: its pretrained config's mean, std, interpolation and crop), at ``image_size`` when given; evaluation and,
by default, training use timm's evaluation transform (resize, centre crop, normalise). ``augment: true`` trains on
timm's standard training transform instead (random resized crop, flip, colour jitter), its random draws seeded by
the seed, the epoch and the image, so a resumed run draws the same. Images are decoded in the DataLoader workers.

Everything is checked when the module is built, before a run folder exists: the folders, the class folders, every
file's extension, every image's header and the carves.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import Dataset
from typing_extensions import override

from flexlora_pl.core.checks import require_int
from flexlora_pl.data.holdout import stratified_draw
from flexlora_pl.data.resumable import ResumableDataLoader, ResumableSampler
from flexlora_pl.data.vtab_files import ImageSplitData, VTABExample, VTABSplit
from flexlora_pl.runs.seeding import resolve_seed

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FOLDER_SPLITS", "ImageFolderDataModule", "ImageFolderError", "ImageSplit",
           "carve", "scan_class_folders"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
"""File name endings read as images (any case), torchvision's ``ImageFolder`` list and GIF."""

IMAGE_FOLDER_SPLITS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
"""role -> the folder names under ``root`` that serve it in the split layout."""

_FLAG = "data.init_args"
_LISTED = 5  # offending files named in a message (then the count)


class ImageFolderError(ValueError):
    """An image folder is missing, empty or malformed (the message names the folder or file and the fix)."""


def scan_class_folders(folder: Path, role: str, check_images: bool = True) -> dict[str, list[str]]:
    """The images of each class folder of ``folder``, checked.

    Args:
        folder: a folder of class folders (``root/train``, or ``root`` itself in the one-folder layout).
        role: what the folder serves (``train``, ``val``, ``test``), for the messages.
        check_images: read every image's header (and, for PNG, check its chunks), so a damaged file is named now.

    Returns:
        ``{class name: sorted image paths}``, classes in sorted order.

    Raises:
        ImageFolderError: the folder does not exist or holds no class folder, an image lies beside the class
            folders, a class folder holds no image, some files are not images, or an image cannot be read.
    """
    if not folder.is_dir():
        raise ImageFolderError(f"{role} folder {str(folder)!r} does not exist (relative paths are resolved from "
                               f"{os.getcwd()!r}); set {_FLAG}.root to the folder that holds the class folders")
    entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    loose = [entry for entry in entries if entry.is_file() and _is_image(entry)]
    if loose:
        raise ImageFolderError(f"{role} folder {str(folder)!r}: {len(loose)} image(s) lie beside the class folders "
                               f"and belong to no class ({_names(loose, folder)}); move each into the folder of "
                               "its class (<folder>/<class>/<image>)")
    classes: dict[str, list[str]] = {}
    strays: list[Path] = []
    for class_dir in (entry for entry in entries if entry.is_dir()):
        images = []
        for path in _files_under(class_dir):
            (images if _is_image(path) else strays).append(path)
        if not images and not strays:
            raise ImageFolderError(f"class folder {str(class_dir)!r} holds no image; put the images of class "
                                   f"{class_dir.name!r} in it, or remove the folder")
        classes[class_dir.name] = [str(path) for path in images]
    if strays:
        raise ImageFolderError(
            f"{role} folder {str(folder)!r}: {len(strays)} file(s) in the class folders are not images "
            f"({_names(strays, folder)}); an image's name ends in one of {', '.join(IMAGE_EXTENSIONS)}. Move the "
            "other files out of the class folders (names starting with '.' are skipped), or rename an image "
            "whose ending is wrong")
    if not classes:
        raise ImageFolderError(f"{role} folder {str(folder)!r} holds no class folder; lay the images out as "
                               f"{folder!s}/<class>/<image>, one folder per class")
    if check_images:
        _check_images(folder, role, [path for images in classes.values() for path in images])
    return classes


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder`` at any depth, in sorted path order, skipping names that start with a dot."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found.extend(Path(current) / name for name in files if not name.startswith("."))
    return sorted(found)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _names(paths: Sequence[Path], folder: Path) -> str:
    named = ", ".join(repr(os.path.relpath(path, folder)) for path in paths[:_LISTED])
    return named + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def _check_images(folder: Path, role: str, paths: Sequence[str]) -> None:
    broken: list[tuple[Path, str]] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()  # header (and PNG chunk checksums); pixels are not decoded
        except Exception as err:  # PIL raises OSError, SyntaxError, struct.error ... for damaged files
            broken.append((Path(path), f"{type(err).__name__}: {err}"))
    if broken:
        path, why = broken[0]
        named = _names([p for p, _ in broken], folder)
        raise ImageFolderError(
            f"{role} folder {str(folder)!r}: {len(broken)} image(s) cannot be read ({named}); the first, "
            f"{str(path)!r}: {why}. Replace or remove the damaged files, or set "
            f"{_FLAG}.check_images=false to meet them only when they are decoded")


def _checked_size(name: str, size: Any) -> int | float | None:
    """``size`` if it is ``None``, a count (an integer >= 1) or a fraction in (0, 1); else an ``ImageFolderError``."""
    if size is None:
        return None
    flag = f"{_FLAG}.{name}"
    if isinstance(size, bool) or not isinstance(size, Real):
        raise ImageFolderError(f"{name} must be a count of training images (an integer >= 1) or a fraction of them "
                               f"in (0, 1), got {size!r}; set {flag} to e.g. 0.1, or leave it unset")
    if isinstance(size, Integral):
        if size < 1:
            raise ImageFolderError(f"{name}={size} carves no image: give a count of training images (an integer "
                                   f">= 1) or a fraction in (0, 1), e.g. {flag}=0.1, or leave it unset")
        return int(size)
    if not 0 < size < 1:  # NaN fails this too
        raise ImageFolderError(f"{name}={size!r} is a fraction of the training images and must lie in (0, 1), e.g. "
                               f"{flag}=0.1; for a number of images write an integer (e.g. {flag}=20)")
    return float(size)


def carve(labels: np.ndarray, size: int | float, seed: int, *, option: str, source: str,
          label_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, carved)`` row indices: a seeded carve of ``size`` images, stratified by class, each sorted.

    Args:
        labels: the class id of every image.
        size: a checked count or fraction (:func:`_checked_size`).
        seed: the carve depends on this, the labels and the size alone.
        option: the option that asked for it (``val_size``, ``test_size``), for the messages.
        source: the folder carved, for the messages.
        label_names: the class names in id order, for the messages.

    Raises:
        ImageFolderError: the carve would leave no image to train on, or some class has too few images to keep one
            on both sides; the message names the class, its count and the fix.
    """
    rows = len(labels)
    flag = f"{_FLAG}.{option}"
    count = size if isinstance(size, int) else max(1, int(size * rows + 0.5))
    if count >= rows:
        raise ImageFolderError(f"{source}: {option}={size!r} carves {count} of its {rows} images, which leaves no "
                               f"image to train on; set {flag} to fewer than {rows} images or to a fraction such as "
                               "0.1")
    rest, carved = stratified_draw(labels, rows - count, count, seed)
    taken = np.bincount(labels[carved], minlength=len(label_names))
    for label, total in enumerate(np.bincount(labels, minlength=len(label_names))):
        if total == 0 or 0 < taken[label] < total:
            continue
        if total < 2:
            fix = "give the class at least 2 images (one for each part)"
        elif taken[label] == 0:
            fix = f"raise {flag} to at least {-(-rows // int(total))} images so that the carve takes one"
        else:
            fix = f"lower {flag} so that some of them stay in training"
        raise ImageFolderError(
            f"{source}: class {label_names[label]!r} has {total} of the {rows} images, too few to stratify a "
            f"{option} carve of {count} images: it would take {taken[label]} of them and leave {total - taken[label]} "
            f"to train on, and every class needs an image on both sides. {fix[0].upper()}{fix[1:]}, or give the "
            "split its own folder (root/train, root/val, root/test)")
    return np.sort(rest), np.sort(carved)


class ImageSplit(VTABSplit):
    """The images of one split; decoding happens in ``__getitem__`` (in the DataLoader workers).

    Args:
        examples: the split's images and class ids.
        transform: turns a PIL image into the model's input tensor.
    """

    def read_error(self, example: VTABExample, err: Exception) -> Exception:
        return ImageFolderError(f"cannot read image {example.path!r} ({err}); replace or remove the file")


class _EpochSampler(ResumableSampler):
    """A :class:`ResumableSampler` that yields ``(epoch, index)``, so an augmented split seeds each draw by both."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class _AugmentedSplit(ImageSplit):
    """Training images under a random transform whose draws are seeded by ``(seed, epoch, index)``.

    The global RNG states (Python's and torch's) are put back after each image, so augmentation in the main
    process (``num_workers: 0``) leaves dropout's draws as they would be without it.
    """

    def __init__(self, examples: Sequence[VTABExample], transform: Callable[[Image.Image], torch.Tensor],
                 seed: int) -> None:
        super().__init__(examples, transform)
        self.seed = seed

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        epoch, index = key if isinstance(key, tuple) else (0, key)
        draw = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(draw)
                torch.manual_seed(draw)
                return super().__getitem__(index)
        finally:
            random.setstate(state)


class ImageFolderDataModule(ImageSplitData):
    """Image classification on your own folders: ``root/<split>/<class>/<image>`` or ``root/<class>/<image>``.

    See the module docstring for the layouts, the checks and the preprocessing. Batches are ``(images, labels)``: a
    float tensor ``(B, 3, H, W)`` and class ids. The module's ``num_classes``, ``label_names`` and ``data_config``
    are linked into the model (:class:`~flexlora_pl.tasks.image_classification.ImageClassifier`) by the ``flexlora``
    command; :attr:`carved_validation` (what the carves took) goes into ``metrics.json``. The training order depends
    only on the seed and the epoch, and a run resumed from a mid-epoch checkpoint continues on exactly the next batch.

    Args:
        root: the data folder (see the layouts above).
        val_size: validate on images carved out of the training images (what a ``test_size`` carve leaves): a count,
            or a fraction in (0, 1) (rounded to the nearest image), stratified by class and seeded by ``seed``.
            Refused when a ``val`` folder is there. ``None`` (and no ``val`` folder): no validation loop.
        test_size: the one-folder layout only: test on a carve of this many images (count or fraction), taken before
            the validation carve. ``None`` (and no ``test`` folder): ``test`` and ``predict`` are refused.
        label_names: the class names in id order; they must be exactly the training folder's class folders. ``None``:
            the sorted folder names. The ``flexlora`` command writes the resolved names into the run's
            ``config.yaml``.
        model_name: the timm model whose pretrained data config (mean, std, interpolation, crop) preprocesses the
            images; the ``flexlora`` command links ``model.init_args.model_name``. ``None``: timm's ImageNet defaults.
        image_size: side of the square input in pixels; ``None``: the model's (224 for ViT-B/16).
        augment: train on timm's standard training transform (random resized crop, horizontal flip, colour jitter)
            instead of the evaluation transform.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: ``DataLoader`` worker processes (they decode the images).
        seed: seeds the carves, the training shuffle and the augmentation; ``None`` follows ``seed_everything``.
        check_images: read every image's header when the module is built (finds damaged files before training).
    """

    def __init__(
        self,
        root: str,
        val_size: int | float | None = None,
        test_size: int | float | None = None,
        label_names: list[str] | None = None,
        model_name: str | None = None,
        image_size: int | None = None,
        augment: bool = False,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        seed: int | None = None,
        check_images: bool = True,
    ) -> None:
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                   ("num_workers", num_workers, 0)):
            require_int(name, value, least)
        if image_size is not None:
            require_int("image_size", image_size, 1)
        for name, value in (("augment", augment), ("check_images", check_images)):
            if not isinstance(value, bool):
                raise ImageFolderError(f"{name} must be true or false, got {value!r}")
        self.root = str(root)
        self.val_size = _checked_size("val_size", val_size)
        self.test_size = _checked_size("test_size", test_size)
        self.model_name = model_name
        self.image_size = image_size
        self.augment = augment
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = resolve_seed(seed)
        self.check_images = check_images
        self._data_config = self._resolve_data_config()
        #: role ("train", "val", "test") -> its images, checked; the datasets are built from them by setup()
        self.examples: dict[str, list[VTABExample]] = {}
        #: the folder (or carve) that serves each role, for messages and the log
        self.sources: dict[str, str] = {}
        #: the carves: ``val_size`` as given, ``rows`` carved, ``train_rows`` left, the ``seed``, ``stratified``, and
        #: ``test_size`` / ``test_rows`` with a test carve; ``None`` when nothing is carved
        self.carved_validation: dict[str, Any] | None = None
        self.label_names: list[str] = []
        self._read(label_names)
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ what the model links
    @property
    def num_classes(self) -> int:
        """Number of classes: the training folder's class folders (linked into the model)."""
        return len(self.label_names)

    @property
    def data_config(self) -> dict[str, Any]:
        """The preprocessing as a timm data config (linked into the model, so its exports carry it)."""
        return dict(self._data_config)

    @property
    def has_validation(self) -> bool:
        """Whether there is a validation split (a ``val`` folder or a ``val_size`` carve)."""
        return "val" in self.examples

    @property
    def has_test_split(self) -> bool:
        """Whether there is a test split (a ``test`` folder or a ``test_size`` carve)."""
        return "test" in self.examples

    def resolved_init_args(self) -> dict[str, Any]:
        """The settings taken from the data, as ``init_args`` (the ``flexlora`` command writes them into the run's
        ``config.yaml``): the class names in id order."""
        return {"label_names": list(self.label_names)}

    # ------------------------------------------------------------------ reading and checks
    def _resolve_data_config(self) -> dict[str, Any]:
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        pretrained = None
        if self.model_name is not None:
            found = get_pretrained_cfg(self.model_name)
            if found is None:
                raise ImageFolderError(f"model_name={self.model_name!r} has no timm pretrained config to take the "
                                       "preprocessing from; give a timm model name (timm.list_models() lists them), "
                                       "or leave it unset for timm's ImageNet defaults")
            pretrained = found.to_dict()
        size = self.image_size or (None if pretrained else 224)  # timm's default input size without a model
        args = {} if size is None else {"input_size": (3, size, size)}
        config = resolve_data_config(args=args, pretrained_cfg=pretrained or {}, use_test_size=False, verbose=False)
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        return {key: tuple(config[key]) if isinstance(config[key], (list, tuple)) else config[key]
                for key in keys if key in config}

    def _read(self, label_names: list[str] | None) -> None:
        root = Path(self.root)
        if not root.is_dir():
            raise ImageFolderError(f"data root {self.root!r} does not exist (relative paths are resolved from "
                                   f"{os.getcwd()!r}); set {_FLAG}.root to your image folder, laid out as "
                                   "root/<class>/<image> or root/train/<class>/<image>")
        split_layout = (root / "train").is_dir()
        others = [name for role in ("val", "test") for name in IMAGE_FOLDER_SPLITS[role] if (root / name).is_dir()]
        if not split_layout and others:
            raise ImageFolderError(f"{self.root!r} holds {others[0]}/ but no train/ folder: the split layout is "
                                   f"root/train/<class>/<image> beside root/{others[0]}/<class>/<image>. Add "
                                   f"{str(root / 'train')!r} with the training images (a class may not be named "
                                   f"{', '.join(n for names in IMAGE_FOLDER_SPLITS.values() for n in names)})")
        folders: dict[str, Path] = {"train": root / "train" if split_layout else root}
        if split_layout:
            for role in ("val", "test"):
                present = [root / name for name in IMAGE_FOLDER_SPLITS[role] if (root / name).is_dir()]
                if len(present) > 1:
                    raise ImageFolderError(f"{self.root!r} holds both {present[0].name}/ and {present[1].name}/; "
                                           "keep one validation folder")
                if present:
                    folders[role] = present[0]
            if "val" in folders and self.val_size is not None:
                raise ImageFolderError(f"{str(folders['val'])!r} is a validation folder and val_size="
                                       f"{self.val_size!r} is set: validate on the folder or on a carve of training, "
                                       f"not both. Remove {_FLAG}.val_size to use the folder, or the folder to carve")
            if self.test_size is not None:
                raise ImageFolderError(f"test_size={self.test_size!r} carves a test split out of a one-folder layout, "
                                       f"but {self.root!r} holds a train/ folder (the split layout); put the test "
                                       f"images in {str(root / 'test')!r} and remove {_FLAG}.test_size")
        train = scan_class_folders(folders["train"], "training", self.check_images)
        if len(train) < 2:
            raise ImageFolderError(f"training folder {str(folders['train'])!r} holds one class folder "
                                   f"({next(iter(train))!r}); classification needs two or more, one folder per "
                                   f"class ({folders['train']!s}/<class>/<image>)")
        self.label_names = self._class_order(train, label_names, folders["train"])
        ids = {name: i for i, name in enumerate(self.label_names)}
        train_examples = [VTABExample(path, ids[name], path) for name in self.label_names for path in train[name]]
        self.examples["train"], self.sources["train"] = train_examples, str(folders["train"])
        for role in ("val", "test"):
            if role in folders:
                self.examples[role] = self._other_split(folders[role], role, ids)
                self.sources[role] = str(folders[role])
        self._carve_splits()

    def _class_order(self, train: dict[str, list[str]], given: list[str] | None, folder: Path) -> list[str]:
        found = sorted(train)
        if given is None:
            return found
        if isinstance(given, str) or sorted(map(str, given)) != found:
            raise ImageFolderError(f"label_names={given!r} must list exactly the class folders of {str(folder)!r}, "
                                   f"{found}, in the id order wanted; fix the list, or leave {_FLAG}.label_names "
                                   "unset to take the sorted folder names")
        return [str(name) for name in given]

    def _other_split(self, folder: Path, role: str, ids: dict[str, int]) -> list[VTABExample]:
        what = "validation" if role == "val" else "test"
        classes = scan_class_folders(folder, what, self.check_images)
        unknown = [name for name in classes if name not in ids]
        if unknown:
            raise ImageFolderError(f"{what} folder {str(folder)!r} has class folder(s) {unknown} that the training "
                                   f"folder lacks (its classes: {self.label_names}); the model cannot predict a class "
                                   "it never trained on. Add training images of that class to "
                                   f"{self.sources['train']}/<class>/, or remove the folder")
        return [VTABExample(path, ids[name], path) for name in sorted(classes, key=ids.get) for path in classes[name]]

    def _carve_splits(self) -> None:
        """The ``test_size`` carve of the one folder, then the ``val_size`` carve of what trains."""
        if self.test_size is None and self.val_size is None:
            return
        record: dict[str, Any] = {"val_size": self.val_size, "seed": self.seed, "stratified": True}
        if self.test_size is not None:
            source = f"image folder {self.sources['train']!r}"
            rest, carved = self._carve_role("test", self.test_size, source)
            self.sources["test"] = f"{source} (test: {len(carved)} images carved by test_size={self.test_size!r}, " \
                                   f"seed {self.seed})"
            record.update(test_size=self.test_size, test_rows=len(carved))
            self.examples["train"], self.examples["test"] = rest, carved
        if self.val_size is not None:
            source = f"training folder {self.sources['train']!r}"
            rest, carved = self._carve_role("val", self.val_size, source)
            self.sources["val"] = f"{source} (validation: {len(carved)} images carved by val_size={self.val_size!r}, " \
                                  f"seed {self.seed})"
            record["rows"] = len(carved)
            self.examples["train"], self.examples["val"] = rest, carved
        record["train_rows"] = len(self.examples["train"])
        self.carved_validation = record

    def _carve_role(self, role: str, size: int | float, source: str) -> tuple[list[VTABExample], list[VTABExample]]:
        examples = self.examples["train"]
        labels = np.asarray([example.label for example in examples], dtype=np.int64)
        rest, carved = carve(labels, size, self.seed, option=f"{role}_size", source=source,
                             label_names=self.label_names)
        return [examples[i] for i in rest], [examples[i] for i in carved]

    # ------------------------------------------------------------------ stages
    def roles_for_stage(self, stage: str | None) -> list[str]:
        """The roles a Trainer stage needs (``None``: every role there is).

        Args:
            stage: ``fit``, ``validate``, ``test``, ``predict`` or ``None``.

        Raises:
            ImageFolderError: ``validate`` without a validation split, ``test`` or ``predict`` without a test split.
        """
        val = ["val"] if self.has_validation else []
        if stage == "fit":
            return ["train", *val]
        if stage == "validate":
            if not val:
                raise ImageFolderError(f"{self.root!r} has no validation split: add {self.root}/val/<class>/<image> "
                                       f"(split layout), or set {_FLAG}.val_size (e.g. 0.1) to carve one")
            return val
        if stage in ("test", "predict"):
            if not self.has_test_split:
                raise ImageFolderError(f"{self.root!r} has no test split, which `{stage}` needs: add "
                                       f"{self.root}/test/<class>/<image> (with {self.root}/train/...), or, for a "
                                       f"one-folder layout, set {_FLAG}.test_size (e.g. 0.2) to carve one")
            return ["test"]
        if stage is None:
            return ["train", *val, *(["test"] if self.has_test_split else [])]
        raise ValueError(f"unknown stage {stage!r}; expected fit, validate, test, predict or None")

    @override
    def setup(self, stage: str | None = None) -> None:
        from timm.data import create_transform

        evaluation = create_transform(**self._data_config, is_training=False)
        for role in self.roles_for_stage(stage):
            if role in self.datasets:
                continue
            examples = self.examples[role]
            if role == "train" and self.augment:
                self.datasets[role] = _AugmentedSplit(examples, create_transform(**self._data_config,
                                                                                 is_training=True), self.seed)
            else:
                self.datasets[role] = ImageSplit(examples, evaluation)
            rank_zero_info(f"{type(self).__name__}: {role} has {len(examples)} images of {self.num_classes} classes "
                           f"from {self.sources[role]}")

    # ------------------------------------------------------------------ loaders
    @override
    def resumable_train_loader(self, dataset: Dataset, seed: int, **kwargs: Any) -> ResumableDataLoader:
        if not self.augment:
            return super().resumable_train_loader(dataset, seed, **kwargs)
        # the same loader, its sampler saying the epoch with each index so that augmentation is seeded by both
        self._train_loader = ResumableDataLoader(dataset, _EpochSampler(dataset, seed=seed, shuffle=True),
                                                 progress=self._training_progress, **kwargs)
        if self._resume_position is not None:
            self._train_loader.resume_at(self._resume_position)
            self._resume_position = None
        return self._train_loader

