"""Shared fixtures: tiny backbones built from configs (no downloads) and an offline environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HELPERS = Path(__file__).parent / "helpers"  # the tests' shared helpers and the tiny-run config
sys.path.insert(0, str(HELPERS))


def tiny_bert(num_labels: int = 2) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_deberta(num_labels: int = 2) -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, relative_attention=True, position_buckets=8,
        pos_att_type=["p2c", "c2p"], num_labels=num_labels,
    )
    return DebertaV2ForSequenceClassification(config).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_vit(num_classes: int = 5) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=32).eval()


# name -> (factory, target_modules, modules_to_save, example-input builder)
BACKBONES = {
    "bert": (tiny_bert, ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                         "output.dense"], ["classifier"], lambda: {"input_ids": torch.randint(0, 64, (2, 7))}),
    "deberta": (tiny_deberta, ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                               "intermediate.dense", "output.dense"], ["classifier"],
                lambda: {"input_ids": torch.randint(0, 64, (2, 7))}),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], [],
              lambda: {"input_ids": torch.randint(0, 64, (2, 7))}),
    "vit": (tiny_vit, ["qkv", "mlp.fc1", "mlp.fc2"], ["head"], lambda: torch.randn(2, 3, 32, 32)),
}


def run_backbone(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if torch.is_tensor(out) else out.logits


@pytest.fixture(params=sorted(BACKBONES))
def backbone_case(request):
    return request.param, *BACKBONES[request.param]


# Fewer than 64 entries, so ids also fit the tiny backbones above (vocab_size=64).
TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "a", "an", "this", "that", "it", "i", "you", "we", "they",
    "is", "was", "are", "be", "not", "no", "very", "so", "too", "and", "or", "but",
    "movie", "film", "plot", "actor", "story", "car", "road", "day", "city", "man", "woman",
    "good", "bad", "great", "awful", "fun", "dull", "happy", "sad", "new", "old",
    "like", "love", "hate", "see", "drive", "go", ".", ",", "?", "!",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A saved word-level BERT tokenizer folder (no download): pass it as ``tokenizer_name_or_path``."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_tokenizer")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    # Positional: the keyword is `vocab_file` in transformers 4 and `vocab` in 5.
    BertTokenizerFast(str(vocab)).save_pretrained(root / "tok")
    return str(root / "tok")


def make_tiny_glue_run(root, tokenizer_dir: str) -> None:
    """Write what a tiny ``flexlora fit`` needs into ``root``: a tiny BERT with the tiny tokenizer in
    ``root/model``, and MRPC-layout ``train.csv`` (48 rows) and ``dev.csv`` (16 rows)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # 512 positions, like real encoders: the GLUE tasks' default max_seq_length (256) fits
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=512)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "model")
    words = ["the movie is good", "a bad film", "i love this story", "they hate the plot", "we see a city"]
    for name, n in (("train.csv", 48), ("dev.csv", 16)):
        rows = ["sentence1,sentence2,label"]
        rows += [f"{words[i % 5]},{words[(i * 3) % 5]},{int(i % 5 == (i * 3) % 5)}" for i in range(n)]
        (root / name).write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="session")
def tiny_glue_root(tmp_path_factory, tiny_tokenizer_dir):
    """One tiny model and MRPC-layout data (see :func:`make_tiny_glue_run`), shared by the CLI run tests."""
    root = tmp_path_factory.mktemp("tiny_glue")
    make_tiny_glue_run(root, tiny_tokenizer_dir)
    return root


def tiny_run_folder(folder, tiny_glue_root, changes: dict):
    """Link the shared tiny model and data into ``folder`` and write ``run.yaml``: the tiny run
    (``tests/helpers/tiny_run.yaml``) with ``changes``, reading from and writing to ``folder``."""
    from tiny_run import tiny_run_config

    for name in ("model", "train.csv", "dev.csv"):
        (folder / name).symlink_to(tiny_glue_root / name)
    (folder / "run.yaml").write_text(tiny_run_config(folder, folder, changes))
    return folder

