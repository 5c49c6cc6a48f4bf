"""flexlora_pl: FlexLoRA (entropy-guided flexible low-rank adaptation, ICLR 2026) for PyTorch Lightning."""

from flexlora_pl.callbacks.final_report import FinalMetricsReport
from flexlora_pl.callbacks.generation_writer import GenerationWriter
from flexlora_pl.callbacks.interrupt_checkpoint import InterruptCheckpoint
from flexlora_pl.callbacks.prediction_writer import PredictionWriter
from flexlora_pl.callbacks.rank_heatmap import RankHeatmap, render_heatmap
from flexlora_pl.callbacks.rank_reallocation import RankReallocation
from flexlora_pl.callbacks.run_record import RunRecord
from flexlora_pl.core.allocation import AllocationDecision, decide_allocation, expand_direction, prune_direction
from flexlora_pl.core.importance import IMPORTANCE_METRICS, SensitivityTracker, importance_scores, spectral_entropy
from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.orthogonality import orthogonality_penalty
from flexlora_pl.core.schedule import budget_at, event_steps, is_event_step
from flexlora_pl.module import FlexLoRAModule
from flexlora_pl.runs.cosine_schedule import WarmupCosine
from flexlora_pl.runs.lr_scheduler import LinearWarmupDecay
from flexlora_pl.tasks.causal_lm import FlexLoRACausalLM
from flexlora_pl.tasks.image_classification import ImageClassifier
from flexlora_pl.tasks.sequence_classification import FlexLoRASequenceClassifier

__version__ = "0.1.0"

__all__ = [
    "IMPORTANCE_METRICS",
    "AllocationDecision",
    "FinalMetricsReport",
    "FlexLoRACausalLM",
    "FlexLoRALinear",
    "FlexLoRAModule",
    "FlexLoRASequenceClassifier",
    "GenerationWriter",
    "ImageClassifier",
    "InterruptCheckpoint",
    "LinearWarmupDecay",
    "PredictionWriter",
    "RankHeatmap",
    "RankReallocation",
    "RunRecord",
    "SensitivityTracker",
    "WarmupCosine",
    "budget_at",
    "decide_allocation",
    "event_steps",
    "expand_direction",
    "flexlora_layers",
    "importance_scores",
    "inject_flexlora",
    "is_event_step",
    "orthogonality_penalty",
    "prune_direction",
    "render_heatmap",
    "spectral_entropy",
]
