"""Figures of a run, drawn apart from the callbacks that log them (a registry: ``FIGURES``, ``register_figure``),
and of a tuned comparison's search (:mod:`~flexlora_pl.figures.sensitivity`)."""

from flexlora_pl.figures.rank_heatmap import heatmap_figure, rank_heatmap, render_heatmap, shorten_module_names
from flexlora_pl.figures.registry import FIGURES, register_figure
from flexlora_pl.figures.sensitivity import read_selections, sensitivity_figure, write_sensitivity

__all__ = ["FIGURES", "heatmap_figure", "rank_heatmap", "read_selections", "register_figure", "render_heatmap",
           "sensitivity_figure", "shorten_module_names", "write_sensitivity"]
