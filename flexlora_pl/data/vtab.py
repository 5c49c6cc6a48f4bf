"""VTAB-1k: the 19 tasks in the folder layout of the PEFT-for-ViT literature (NOAH's generator).

Each task folder ``<root>/<task>/`` holds ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and
``test.txt``; every line is ``relative/path.jpg <int label>``, the path relative to the task folder.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VTAB_ALIASES", "VTAB_GROUPS", "VTAB_TASKS", "VTABTask", "vtab_task"]


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task: its folder name (NOAH's), number of classes and group."""

    name: str
    num_classes: int
    group: str  # "natural", "specialized" or "structured"


VTAB_GROUPS = ("natural", "specialized", "structured")
"""The three task groups, in the order the paper's tables print them."""

_TASKS = [
    ("cifar", 100, "natural"), ("caltech101", 102, "natural"), ("dtd", 47, "natural"),
    ("oxford_flowers102", 102, "natural"), ("oxford_iiit_pet", 37, "natural"), ("svhn", 10, "natural"),
    ("sun397", 397, "natural"),
    ("patch_camelyon", 2, "specialized"), ("eurosat", 10, "specialized"), ("resisc45", 45, "specialized"),
    ("diabetic_retinopathy", 5, "specialized"),
    ("clevr_count", 8, "structured"), ("clevr_dist", 6, "structured"), ("dmlab", 6, "structured"),
    ("kitti", 4, "structured"), ("dsprites_loc", 16, "structured"), ("dsprites_ori", 16, "structured"),
    ("smallnorb_azi", 18, "structured"), ("smallnorb_ele", 9, "structured"),
]

VTAB_TASKS: dict[str, VTABTask] = {name: VTABTask(name, n, group) for name, n, group in _TASKS}
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
