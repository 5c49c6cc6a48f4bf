"""A tiny VTAB-1k task folder for tests: a few dozen small PNGs whose class is visible in the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# split file -> number of images; train800val200 is train800 followed by val200, as in the real folders
TINY_SPLITS = {"train800": 24, "val200": 8, "test": 16}


def write_tiny_vtab(root: Path, task: str = "kitti", num_classes: int = 4, size: int = 20, seed: int = 0) -> Path:
    """Write ``<root>/<task>/`` in the VTAB-1k layout: images of different sizes and modes (RGB, grey), one
    bright quadrant per class, and the four split files. Returns the task folder."""
    rng = np.random.default_rng(seed)
    folder = root / task
    lines: dict[str, list[str]] = {}
    for split, count in TINY_SPLITS.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for i in range(count):
            label = i % num_classes
            side = size + (i % 3) * 4  # sizes differ: the data module resizes every image
            pixels = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
            half = side // 2
            row, col = divmod(label % 4, 2)
            pixels[row * half:(row + 1) * half, col * half:(col + 1) * half] += 150
            image = Image.fromarray(pixels)
            if i % 5 == 0:
                image = image.convert("L")
            relative = f"images/{split}/{i:06d}.{'png' if i % 2 else 'jpg'}"
            image.save(folder / relative)
            lines[split].append(f"{relative} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def write_vtab_1k_sized(root: Path, task: str = "kitti", num_classes: int = 4, test: int = 12) -> Path:
    """Write ``<root>/<task>/`` with VTAB-1k's split sizes: 800 + 200 training images (``train800val200`` lists
    both) and ``test`` test images, each a 4×4 PNG, every image under its own split's folder. Returns the folder."""
    folder = root / task
    lines: dict[str, list[str]] = {}
    for split, count in {"train800": 800, "val200": 200, "test": test}.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for i in range(count):
            label = i % num_classes
            relative = f"images/{split}/{i:06d}.png"
            Image.fromarray(np.full((4, 4), 40 * label + i % 7, dtype=np.uint8)).save(folder / relative)
            lines[split].append(f"{relative} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder
