"""The rank heat-map: a modules × events image of every adapted matrix's active rank (the paper's Figure 2).

Writing r_m(t_e) for the active rank of adapted module m after the allocation event at optimizer step t_e, the
figure shows the matrix R[m, e] = r_m(t_e):

- rows: the adapted modules in model (depth) order, labelled with their names less the prefix they all
  share (``backbone.bert.encoder.layer.0.attention.self.query`` → ``0.attention.self.query``); with more
  rows than fit legibly, every k-th row is labelled;
- columns: the allocation events, labelled with their optimizer step t_e;
- colour: R[m, e] on the perceptually uniform ``viridis`` map (dark purple: rank 0, yellow: r_max), with
  a colour bar "active rank" running over 0..r_max.

In the default ``prune_and_expand`` mode every column sums to the same total rank, so the figure shows where
rank moved, not how much there is. It is drawn with matplotlib's Agg canvas (no ``pyplot``, no display, no
global state). The :class:`~flexlora_pl.RankHeatmap` callback logs it; ``docs/figures/draw.py`` and the
notebooks draw it from a run folder's ``rank_pattern.json``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from flexlora_pl.figures.registry import register_figure

__all__ = ["heatmap_figure", "rank_heatmap", "render_heatmap", "shorten_module_names"]

# Layout, in inches. A label of f points needs about 1.45·f/72 in of height to leave a gap to the next.
_FONT_PT = 8
_MIN_ROW_FONT_PT = 6  # smaller row labels are unreadable: below this, label every k-th row instead
_LINE_SPACING = 1.45
_LABEL_PITCH_IN = _LINE_SPACING * _FONT_PT / 72  # room one row (or one rotated column) label needs
_CHAR_W_IN = 0.065  # average width of an 8 pt DejaVu Sans character
_CELL_W_IN = 0.32  # preferred width of one event column
_AXES_H_IN = (2.0, 10.0)  # beyond 10 in the image no longer fits a screen: label every k-th row instead
_AXES_W_IN = (3.0, 11.0)
_CMAP = "viridis"


def shorten_module_names(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix every name shares, keeping at least the last component of each.

    Stripping the same leading components from every name keeps distinct names distinct, so the labels
    stay unique: ``backbone.bert.encoder.layer.0.attention.self.query`` and
    ``backbone.bert.encoder.layer.1.output.dense`` become ``0.attention.self.query`` and
    ``1.output.dense``.

    Args:
        names: dotted module names, e.g. from ``pl_module.flexlora_layers()``.

    Returns:
        The shortened names, in the same order.
    """
    parts = [name.split(".") for name in names]
    if not parts:
        return []
    shared = 0
    for components in zip(*parts, strict=False):  # stops at the shortest name
        if any(c != components[0] for c in components):
            break
        shared += 1
    # never strip a whole name: a module whose name is the others' prefix keeps its last component
    shared = min(shared, min(len(p) for p in parts) - 1)
    return [".".join(p[shared:]) for p in parts]


def _validated(
    ranks: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    r_max: int,
    module_names: Sequence[str] | None,
    event_steps: Sequence[int] | None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Check the inputs; return the rank matrix as floats, the row labels and the column labels."""
    matrix = torch.as_tensor(ranks).detach().cpu().double().numpy()
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"ranks must be a non-empty (modules, events) matrix, got shape {tuple(matrix.shape)}")
    if not np.isfinite(matrix).all():
        raise ValueError("ranks must be finite, got NaN or infinite entries")
    if isinstance(r_max, bool) or not isinstance(r_max, numbers.Integral) or r_max < 1:
        raise ValueError(f"r_max must be an integer >= 1, got {r_max!r}")
    modules, events = matrix.shape
    if module_names is None:
        rows = [f"module {i}" for i in range(modules)]
    elif len(module_names) != modules:
        raise ValueError(f"module_names has {len(module_names)} entries but ranks has {modules} rows (modules)")
    else:
        rows = shorten_module_names([str(n) for n in module_names])
    if event_steps is None:
        columns = [str(e) for e in range(1, events + 1)]  # event number when the steps are unknown
    elif len(event_steps) != events:
        raise ValueError(f"event_steps has {len(event_steps)} entries but ranks has {events} columns (events)")
    else:
        columns = [str(int(s)) for s in event_steps]
    return matrix, rows, columns


def _label_stride(count: int, room_in: float, pitch_in: float) -> int:
    """Label every k-th of ``count`` items spread over ``room_in`` inches, so labels are ``pitch_in`` apart."""
    return max(1, math.ceil(count * pitch_in / room_in))


def _set_ticks(axis: Any, labels: list[str], stride: int) -> None:
    """Label every ``stride``-th item; an unlabelled minor tick still marks every item."""
    positions = range(len(labels))
    axis.set_ticks(list(positions[::stride]), labels[::stride])
    if stride > 1:
        axis.set_ticks(list(positions), minor=True)


def heatmap_figure(
    ranks: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    r_max: int,
    *,
    module_names: Sequence[str] | None = None,
    event_steps: Sequence[int] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Draw the modules × events rank heat-map (the paper's Figure 2) as a matplotlib ``Figure``.

    The figure is not registered with ``pyplot``: show it in a notebook by leaving it as a cell's value,
    save it with ``fig.savefig(...)``, and let it be garbage-collected.

    Args:
        ranks: (modules, events) active rank of each module (rows, depth order) after each event (columns).
        r_max: top of the colour scale (the largest rank a module may reach); ranks above it saturate.
        module_names: one name per row; the prefix they all share is dropped. Default ``module 0``, ….
        event_steps: optimizer step of each event (column). Default: the event numbers 1, 2, ….
        title: figure title. Default "FlexLoRA rank allocation — step N", N the last event's step.
        dpi: pixels per inch of the rendered image.

    Returns:
        The figure, with the heat-map axes first and the colour bar axes second in ``fig.axes``.

    Raises:
        ValueError: if ``ranks`` is not a non-empty finite 2-D matrix, ``r_max < 1``, or ``module_names``
            / ``event_steps`` do not have one entry per row / column.
    """
    matrix, rows, columns = _validated(ranks, r_max, module_names, event_steps)
    if dpi < 1:
        raise ValueError(f"dpi must be >= 1, got {dpi}")
    modules, events = matrix.shape
    if title is None:
        title = "FlexLoRA rank allocation" + (f" — step {columns[-1]}" if event_steps is not None else "")

    axes_h = min(max(modules * _LABEL_PITCH_IN, _AXES_H_IN[0]), _AXES_H_IN[1])
    axes_w = min(max(events * _CELL_W_IN, _AXES_W_IN[0]), _AXES_W_IN[1])
    column_chars = max(len(c) for c in columns)
    # Step labels read horizontally while they fit under their column; otherwise rotate and thin them.
    horizontal = axes_w / events >= column_chars * _CHAR_W_IN + 0.08
    column_stride = 1 if horizontal else _label_stride(events, axes_w, _LABEL_PITCH_IN)
    # Shrink the row labels (down to 6 pt) before thinning them: 72 rows (DeBERTa-v3 on GLUE) all fit.
    row_font = min(max(axes_h / modules * 72 / _LINE_SPACING, _MIN_ROW_FONT_PT), _FONT_PT)
    row_stride = _label_stride(modules, axes_h, _LINE_SPACING * row_font / 72)
    row_label_w = max(len(r) for r in rows) * _CHAR_W_IN * row_font / _FONT_PT
    column_label_h = _LABEL_PITCH_IN if horizontal else column_chars * _CHAR_W_IN
    fig_w = axes_w + row_label_w + 0.5 + 1.3  # + y-axis title, + colour bar and its labels
    fig_h = axes_h + column_label_h + 1.2  # + x-axis title and figure title

    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: an off-screen canvas, no GUI backend involved
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap=_CMAP, vmin=0, vmax=r_max, aspect="auto", interpolation="nearest")
    _set_ticks(ax.yaxis, rows, row_stride)
    _set_ticks(ax.xaxis, columns, column_stride)
    ax.tick_params(axis="x", which="major", labelsize=_FONT_PT)
    ax.tick_params(axis="y", which="major", labelsize=row_font)
    if not horizontal:
        ax.tick_params(axis="x", which="major", labelrotation=90)
    ax.set_xlabel("allocation event (optimizer step)")
    ax.set_ylabel("adapted module (depth order)")
    ax.set_title(title)

    colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("active rank")
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(r_max, 12)))
    colorbar.ax.tick_params(labelsize=_FONT_PT)
    return fig


def render_heatmap(
    ranks: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    r_max: int,
    cell: int | None = None,
    *,
    module_names: Sequence[str] | None = None,
    event_steps: Sequence[int] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> torch.Tensor:
    """Render the rank heat-map of :func:`heatmap_figure` as a (3, H, W) float image in [0, 1].

    This is the layout ``SummaryWriter.add_image`` takes (``dataformats="CHW"``).

    Args:
        ranks: (modules, events) active rank of each module (rows, depth order) after each event (columns).
        r_max: top of the colour scale (the largest rank a module may reach).
        cell: deprecated and ignored (it was the pixel size of one cell of the old raw image); the figure
            is now sized from the number of modules and events. Use ``dpi`` to scale it.
        module_names: one name per row; the prefix they all share is dropped.
        event_steps: optimizer step of each event (column).
        title: figure title; default "FlexLoRA rank allocation — step N".
        dpi: pixels per inch.

    Returns:
        A float32 tensor of shape (3, H, W) with values in [0, 1].

    Raises:
        ValueError: on malformed inputs, as :func:`heatmap_figure`.
    """
    if cell is not None:
        warnings.warn("render_heatmap: `cell` is deprecated and ignored; use `dpi` to scale the image",
                      DeprecationWarning, stacklevel=2)
    fig = heatmap_figure(ranks, r_max, module_names=module_names, event_steps=event_steps, title=title, dpi=dpi)
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())  # (H, W, 4) uint8, a view of the canvas memory
        rgb = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)
    finally:
        fig.clear()  # drop the artists now instead of waiting for the cycle collector
    return rgb.permute(2, 0, 1).contiguous()


@register_figure("rank_heatmap")
def rank_heatmap(record: dict[str, Any], dpi: int = 100) -> Figure:
    """The heat-map of a run's rank record (``rank_pattern.json``: ``rank_pattern``, ``max_rank``, ``events``).

    Args:
        record: the run's rank record; its events' ``ranks`` are in ``rank_pattern``'s module order.
        dpi: pixels per inch.

    Raises:
        ValueError: the record holds no event.
    """
    events = record.get("events") or []
    if not events:
        raise ValueError("the run's rank record holds no allocation event: there is no trajectory to draw")
    names = list(record["rank_pattern"])
    ranks = np.array([event["ranks"] for event in events]).T  # (modules, events)
    return heatmap_figure(ranks, max(record["max_rank"].values()), module_names=names,
                          event_steps=[event["step"] for event in events], dpi=dpi)
