"""The 19 VTAB-1k tasks: class counts, groups, split sizes, and the names the literature also uses for them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VTAB_1K_SIZES", "VTAB_ALIASES", "VTAB_GROUPS", "VTAB_TASKS", "VTABTask", "vtab_task"]


VTAB_1K_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
"""Images in the three training split files of every VTAB-1k task; the test split's count is each task's own."""


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task: its folder name (NOAH's), number of classes, group and test-set size.

    Attributes:
        name: the task folder's name.
        num_classes: labels lie in ``0 .. num_classes - 1``.
        group: ``natural``, ``specialized`` or ``structured`` (another word for a task outside the 19).
        test_size: images in ``test.txt``, or ``None`` where the test split's size is not checked.
    """

    name: str
    num_classes: int
    group: str  # "natural", "specialized" or "structured"
    test_size: int | None = None

    @property
    def split_sizes(self) -> dict[str, int]:
        """Images per split file (``train800`` ...) the size check expects: VTAB-1k's, plus the test count if known."""
        sizes = dict(VTAB_1K_SIZES)
        if self.test_size is not None:
            sizes["test"] = self.test_size
        return sizes


VTAB_GROUPS = ("natural", "specialized", "structured")
"""The three task groups, in the order the paper's tables print them."""

# name, classes, group, images in test.txt: the whole test split of Google's task_adaptation definitions, which
# NOAH's generator writes. KITTI's is left unchecked: its test split changed between versions of the dataset
# (634 or 711 images, depending on the release of the tensorflow_datasets KITTI a folder was built from).
_TASKS = [
    ("cifar", 100, "natural", 10_000), ("caltech101", 102, "natural", 6_084), ("dtd", 47, "natural", 1_880),
    ("oxford_flowers102", 102, "natural", 6_149), ("oxford_iiit_pet", 37, "natural", 3_669),
    ("svhn", 10, "natural", 26_032), ("sun397", 397, "natural", 21_750),
    ("patch_camelyon", 2, "specialized", 32_768), ("eurosat", 10, "specialized", 5_400),
    ("resisc45", 45, "specialized", 6_300), ("diabetic_retinopathy", 5, "specialized", 42_670),
    ("clevr_count", 8, "structured", 15_000), ("clevr_dist", 6, "structured", 15_000),
    ("dmlab", 6, "structured", 22_735), ("kitti", 4, "structured", None),
    ("dsprites_loc", 16, "structured", 73_728), ("dsprites_ori", 16, "structured", 73_728),
    ("smallnorb_azi", 18, "structured", 12_150), ("smallnorb_ele", 9, "structured", 12_150),
]

VTAB_TASKS: dict[str, VTABTask] = {name: VTABTask(name, n, group, test) for name, n, group, test in _TASKS}
"""The 19 tasks by folder name, in the paper's column order (Natural 7, Specialized 4, Structured 8)."""

VTAB_ALIASES = {"cifar100": "cifar", "oxford_pet": "oxford_iiit_pet"}
"""Other names in use for two of the folders."""


def vtab_task(name: str) -> VTABTask:
    """The task called ``name`` (a folder name or an alias); a clear error listing the 19 otherwise."""
    key = VTAB_ALIASES.get(name, name)
    if key not in VTAB_TASKS:
        raise ValueError(
            f"task={name!r} is not a VTAB-1k task; the 19 are: {', '.join(VTAB_TASKS)} "
            f"(aliases: {', '.join(f'{a} = {b}' for a, b in VTAB_ALIASES.items())})"
        )
    return VTAB_TASKS[key]


# ------------------------------------------------------------------------------------------------ data module
