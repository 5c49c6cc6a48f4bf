"""LightningModules per task family, each a ``FlexLoRAModule`` that owns its backbone, head and metrics."""

from flexlora_pl.tasks.causal_lm import LLAMA_TARGETS, FlexLoRACausalLM
from flexlora_pl.tasks.image_classification import VIT_MLP_TARGETS, ImageClassifier
from flexlora_pl.tasks.sequence_classification import FlexLoRASequenceClassifier

__all__ = ["LLAMA_TARGETS", "VIT_MLP_TARGETS", "FlexLoRACausalLM", "FlexLoRASequenceClassifier", "ImageClassifier"]
