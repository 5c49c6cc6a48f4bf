"""Tiny commonsense fixtures: LLM-Adapters-format files for the 8 sets, a word-level tokenizer built from their
words, and a tiny LLaMA saved with it (no download). Used by ``test_commonsense.py`` and the DDP script."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexlora_pl.data.commonsense import COMMONSENSE_SETS, PROMPT_TEMPLATES

# set -> (instruction pattern over a question number, answer choices), in LLM-Adapters' wording
_SETS = {
    "boolq": ("Please answer the following question with true or false, question: is item {n} {pad}red?\n\n"
              "Answer format: true/false", ["true", "false"]),
    "piqa": ("Please choose the correct solution to the question: how to open {pad}box {n}\n\nSolution1: cut it\n\n"
             "Solution2: eat it\n\nAnswer format: solution1/solution2", ["solution1", "solution2"]),
    "social_i_qa": ("Please choose the correct answer to the question: why did Alex {pad}help {n}\n\nAnswer1: kind "
                    "Answer2: bored Answer3: tired\n\nAnswer format: answer1/answer2/answer3",
                    ["answer1", "answer2", "answer3"]),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: a {pad}man walks {n}\n\nEnding1: "
                  "home Ending2: up Ending3: away Ending4: in\n\nAnswer format: ending1/ending2/ending3/ending4",
                  ["ending1", "ending2", "ending3", "ending4"]),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: _ won "
                   "{pad}{n}\n\nOption1: Sam Option2: Kim Answer format: option1/option2", ["option1", "option2"]),
    "ARC-Easy": ("Please choose the correct answer to the question: which is {pad}warm {n}\n\nAnswer1: sun "
                 "Answer2: ice Answer3: snow Answer4: rain\n\nAnswer format: answer1/answer2/answer3/answer4",
                 ["answer1", "answer2", "answer3", "answer4"]),
    "ARC-Challenge": ("Please choose the correct answer to the question: which is {pad}hard {n}\n\nAnswer1: rock "
                      "Answer2: air Answer3: water Answer4: foam\n\nAnswer format: answer1/answer2/answer3/answer4",
                      ["answer1", "answer2", "answer3", "answer4"]),
    "openbookqa": ("Please choose the correct answer to the question: what {pad}grows {n}\n\nAnswer1: plant Answer2: "
                   "stone Answer3: glass Answer4: metal\n\nAnswer format: answer1/answer2/answer3/answer4",
                   ["answer1", "answer2", "answer3", "answer4"]),
}
TEST_SIZES = {name: 5 + i % 3 for i, name in enumerate(COMMONSENSE_SETS)}  # 5, 6 or 7 records: odd sizes for DDP


def record(set_name: str, n: int) -> dict[str, str]:
    """One LLM-Adapters record of a set (question number ``n``)."""
    pattern, choices = _SETS[set_name]
    answer = choices[n % len(choices)]
    instruction = pattern.format(n=n, pad="very " * (n % 4))  # prompts of 4 lengths
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def write_commonsense_data(root: Path, train_size: int = 72) -> dict[str, Path]:
    """``root/commonsense_170k.json`` (``train_size`` records over the 8 sets) and ``root/dataset/<set>/test.json``."""
    train = [record(COMMONSENSE_SETS[i % 8], i) for i in range(train_size)]
    (root / "commonsense_170k.json").write_text(json.dumps(train, indent=1))
    for name in COMMONSENSE_SETS:
        folder = root / "dataset" / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = [record(name, 100 + n) for n in range(TEST_SIZES[name])]
        (folder / "test.json").write_text(json.dumps(rows, indent=1))
    return {"train_file": root / "commonsense_170k.json", "test_dir": root / "dataset"}


def _corpus() -> list[str]:
    texts = []
    for name in COMMONSENSE_SETS:
        for n in [*range(80), *range(100, 110)]:
            row = record(name, n)
            for template in PROMPT_TEMPLATES.values():
                texts.append(template.training_prompt(row["instruction"], "", row["output"]))
    return texts


def build_tokenizer(folder: Path):
    """A word-level tokenizer over the fixtures' words (split on whitespace, so ``### Response:`` survives
    decoding), with ``<s>`` prepended, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(_corpus(), trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def write_tiny_llama(folder: Path, hidden: int = 32, intermediate: int = 48) -> Path:
    """A tiny LLaMA (2 layers, hidden 32) with the fixture tokenizer, saved to ``folder``. A 4-bit base needs every
    linear layer's in_features to be a multiple of 64 (bitsandbytes' block size on CPU): hidden 64, intermediate
    128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
