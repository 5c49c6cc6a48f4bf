"""Lightning callbacks: when ranks move (``RankReallocation``), what a run leaves behind (heat-map, rank
pattern, ``metrics.json``, predictions, the final printout) and the checkpoint written on interruption."""

from flexlora_pl.callbacks.final_checkpoint import FinalCheckpoint
from flexlora_pl.callbacks.final_report import FinalMetricsReport
from flexlora_pl.callbacks.generation_writer import GenerationWriter
from flexlora_pl.callbacks.interrupt_checkpoint import InterruptCheckpoint
from flexlora_pl.callbacks.prediction_writer import PredictionWriter
from flexlora_pl.callbacks.rank_heatmap import RankHeatmap, heatmap_figure, render_heatmap
from flexlora_pl.callbacks.rank_reallocation import RankReallocation
from flexlora_pl.callbacks.run_record import RunRecord

__all__ = [
    "FinalCheckpoint",
    "FinalMetricsReport",
    "GenerationWriter",
    "InterruptCheckpoint",
    "PredictionWriter",
    "RankHeatmap",
    "RankReallocation",
    "RunRecord",
    "heatmap_figure",
    "render_heatmap",
]
