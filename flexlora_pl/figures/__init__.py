"""Figures of a run, drawn apart from the callbacks that log them (a registry: ``FIGURES``, ``register_figure``)."""

from flexlora_pl.figures.rank_heatmap import heatmap_figure, rank_heatmap, render_heatmap, shorten_module_names
from flexlora_pl.figures.registry import FIGURES, register_figure

__all__ = ["FIGURES", "heatmap_figure", "rank_heatmap", "register_figure", "render_heatmap", "shorten_module_names"]
