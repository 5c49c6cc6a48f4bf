"""Commonsense reasoning in the LLM-Adapters layout: ``commonsense_170k.json`` and 8 test sets.

The layout of the LLM-Adapters repository (and of DoRA's ``commonsense_reasoning`` folder)::

    ft-training_set/commonsense_170k.json      training records (170,420)
    dataset/<set>/test.json                    one file per test set, for the 8 sets of COMMONSENSE_SETS

Every record is ``{"instruction", "input" (""), "output": "the correct answer is <ans>", "answer": "<ans>"}``.
Training rows are the full prompt followed by the output and EOS, truncated to ``cutoff_len`` tokens; the
loss covers prompt and response (``train_on_inputs=True``, LLM-Adapters' default) or the response only.
Test rows are the evaluation prompt alone, scored by generation (:mod:`flexlora_pl.tasks.causal_lm`).
A slice of ``val_size`` training records (120 in DoRA's runs) is held out for the validation loss.

Prompts (:mod:`flexlora_pl.data.commonsense_prompts`): ``llm_adapters`` reproduces the two templates of
LLM-Adapters' code byte for byte, the ones the published numbers come from; ``alpaca`` is the clean Alpaca
template.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from typing_extensions import override

from flexlora_pl.data.commonsense_prompts import PROMPT_TEMPLATES, PromptTemplate
from flexlora_pl.data.files import DataFileNotFoundError, load_data_files
from flexlora_pl.data.resumable import ResumableTrainingData
from flexlora_pl.runs.seeding import resolve_seed
from flexlora_pl.sources import require_folder

__all__ = ["COMMONSENSE_SETS", "PROMPT_TEMPLATES", "CommonsenseDataModule", "PromptTemplate"]

COMMONSENSE_SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                    "openbookqa")
"""The 8 test sets (``dataset/<set>/test.json``), in the column order of the paper's Table 2."""

IGNORE_INDEX = -100
"""Label of the tokens the loss skips (padding, and the prompt when ``train_on_inputs=False``)."""

_TRAIN_FIELDS = ("instruction", "output")
_TEST_FIELDS = ("instruction", "answer")


class CommonsenseDataModule(ResumableTrainingData):
    """Commonsense170K for training and the 8 commonsense test sets, in the LLM-Adapters layout.

    Training batches hold ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where the loss skips),
    padded on the right. Test and predict serve one dataloader per set (in :attr:`test_set_names` order)
    of evaluation prompts padded on the **left**, so that generation continues every row right after its
    prompt; their batches also carry ``index`` (the record's position in ``test.json``), ``answer`` and
    ``prompt``. Each set is sorted by prompt length (longest first) so batches carry little padding.
    Under DDP each process takes every ``world_size``-th record of a set and nothing is repeated: every
    test record is scored exactly once.

    Args:
        tokenizer_name_or_path: tokenizer folder or hub name; the ``flexlora`` command links it to the model's
            ``model_name_or_path``. A path that reads as local (absolute, starting with ``.`` or ``~``, or with
            more than one ``/``) must be an existing folder. A tokenizer without a pad token pads with EOS
            (padding is masked out).
        train_file: the training records (``commonsense_170k.json``); JSON or JSON Lines.
        test_dir: the folder holding ``<set>/test.json`` for every set of ``test_sets``.
        test_sets: the sets that ``test`` and ``predict`` evaluate (any of the 8, in any order).
        prompt_template: ``llm_adapters`` (the verbatim LLM-Adapters prompts, default) or ``alpaca``.
        cutoff_len: longest training sequence in tokens (prompt, answer and EOS); longer ones are cut.
            EOS is appended only when the text is shorter. Evaluation prompts are never cut.
        train_on_inputs: loss over prompt and response (LLM-Adapters' default); ``False``: response only.
        val_size: training records held out for the validation loss (0: no validation).
        batch_size: training micro-batch size per process (× accumulation × processes = the batch).
        eval_batch_size: batch size of validation, test and predict (prompts generated together).
        num_workers: ``DataLoader`` worker processes.
        seed: seeds the held-out split and the training order; ``None`` follows ``seed_everything``.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str | None = None,
        train_file: str = "LLM-Adapters/ft-training_set/commonsense_170k.json",
        test_dir: str = "LLM-Adapters/dataset",
        test_sets: Sequence[str] = COMMONSENSE_SETS,
        prompt_template: str = "llm_adapters",
        cutoff_len: int = 256,
        train_on_inputs: bool = True,
        val_size: int = 120,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if tokenizer_name_or_path is None:
            raise ValueError("tokenizer_name_or_path is required: set model.init_args.model_name_or_path (the "
                             "`flexlora` command links it) or data.init_args.tokenizer_name_or_path")
        require_folder(tokenizer_name_or_path, "tokenizer_name_or_path",
                       "the tokenizer files, usually the base model's folder, which the `flexlora` command takes "
                       "from model.init_args.model_name_or_path", "meta-llama/Meta-Llama-3-8B")
        if isinstance(test_sets, str):
            test_sets = [test_sets]
        if not test_sets:
            raise ValueError(f"test_sets is empty; name at least one of the {len(COMMONSENSE_SETS)} sets: "
                             f"{list(COMMONSENSE_SETS)}")
        unknown = [name for name in test_sets if name not in COMMONSENSE_SETS]
        if unknown:
            raise ValueError(f"test_sets={list(test_sets)}: {unknown} is not a commonsense set; "
                             f"choose from {list(COMMONSENSE_SETS)} (names are case-sensitive)")
        if len(set(test_sets)) != len(test_sets):
            raise ValueError(f"test_sets={list(test_sets)} names a set twice")
        if prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_template={prompt_template!r} is not one of {sorted(PROMPT_TEMPLATES)}")
        for name, value, least in (("cutoff_len", cutoff_len, 2), ("val_size", val_size, 0),
                                   ("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                   ("num_workers", num_workers, 0)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.train_file, self.test_dir = train_file, test_dir
        self.test_set_names = list(test_sets)
        self.prompt_template = prompt_template
        self.template = PROMPT_TEMPLATES[prompt_template]
        self.cutoff_len, self.train_on_inputs, self.val_size = cutoff_len, train_on_inputs, val_size
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed = resolve_seed(seed)
        self.datasets: dict[str, Dataset] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use; it pads with EOS when it has no pad token."""
        if self._tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
            if tokenizer.eos_token_id is None:
                raise ValueError(f"the tokenizer {self.tokenizer_name_or_path!r} has no EOS token; training appends "
                                 "EOS to every answer so that generation learns to stop. Use the base model's own "
                                 "tokenizer (it defines one)")
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token  # padding is masked out (attention mask, labels -100)
            self._tokenizer = tokenizer
        return self._tokenizer

    # ----------------------------------------------------------------- loading
    def test_file(self, set_name: str) -> str:
        """Path of a set's ``test.json``."""
        return os.path.join(self.test_dir, set_name, "test.json")

    def _splits(self, stage: str | None) -> list[str]:
        if stage == "fit":
            return ["train", *(["validation"] if self.val_size else [])]
        if stage == "validate":
            if not self.val_size:
                raise ValueError("validate needs a held-out slice: set data.init_args.val_size > 0")
            return ["validation"]
        if stage in ("test", "predict"):
            return [f"test:{name}" for name in self.test_set_names]
        return [*self._splits("fit"), *self._splits("test")]

    @override
    def prepare_data(self) -> None:
        """Check that every file the coming stage needs exists and holds the expected fields, before any run
        folder is written (the Trainer calls this before its loggers create one)."""
        _ = self.tokenizer
        fn = self.trainer.state.fn.value if self.trainer is not None and self.trainer.state.fn else None
        for split in self._splits(fn):
            self._load(split)

    def _load(self, split: str) -> Dataset:
        """Raw records of ``train``/``validation`` (one file, split by ``val_size``) or ``test:<set>``."""
        if split.startswith("test:"):
            name = split.removeprefix("test:")
            path = self.test_file(name)
            if not os.path.isfile(path):
                raise DataFileNotFoundError(
                    f"test set {name!r}: {path!r} not found; test_dir must hold <set>/test.json for every set of "
                    f"test_sets (the LLM-Adapters repository's dataset/ folder), or drop {name!r} from "
                    f"data.init_args.test_sets (relative paths are resolved from {os.getcwd()!r})")
            return _checked(load_data_files(path, split=split), _TEST_FIELDS, path)
        if not os.path.isfile(self.train_file):
            raise DataFileNotFoundError(
                f"training file {self.train_file!r} not found; set data.init_args.train_file to commonsense_170k.json "
                f"(ft-training_set/ of the LLM-Adapters repository; relative paths are resolved from {os.getcwd()!r})")
        data = _checked(load_data_files(self.train_file, split="train"), _TRAIN_FIELDS, self.train_file)
        if not self.val_size:
            return data
        if len(data) <= self.val_size:
            raise ValueError(f"{self.train_file!r} has {len(data)} records, not more than val_size={self.val_size}; "
                             "lower data.init_args.val_size (0: no validation)")
        parts = data.train_test_split(test_size=self.val_size, shuffle=True, seed=self.seed)
        return parts["train"] if split == "train" else parts["test"]

    @override
    def setup(self, stage: str | None = None) -> None:
        for split in self._splits(stage):
            if split in self.datasets:
                continue
            raw = self._load(split)
            self.datasets[split] = self._tokenize_eval(raw, split) if split.startswith("test:") else \
                self._tokenize_train(raw, split)
            rank_zero_info(f"{type(self).__name__}: {split} has {len(raw)} records "
                           f"(prompt template {self.prompt_template!r})")

    def _tokenize_train(self, raw: Dataset, split: str) -> Dataset:
        return raw.map(
            _tokenize_training, batched=True, remove_columns=raw.column_names, desc=f"Tokenising {split}",
            fn_kwargs={"tokenizer": self.tokenizer, "template": self.template, "cutoff_len": self.cutoff_len,
                       "train_on_inputs": self.train_on_inputs},
        )

    def _tokenize_eval(self, raw: Dataset, split: str) -> Dataset:
        raw = raw.add_column("index", list(range(len(raw))))
        tokenised = raw.map(
            _tokenize_prompts, batched=True, desc=f"Tokenising {split}",
            remove_columns=[c for c in raw.column_names if c not in ("index", "answer")],
            fn_kwargs={"tokenizer": self.tokenizer, "template": self.template},
        )
        # longest prompts first: batches of similar length (little padding), and memory trouble shows at once
        lengths = tokenised["length"]
        return tokenised.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))  # stable

    # -------------------------------------------------------------- dataloaders
    def _dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            raise RuntimeError(f"split {split!r} is not ready: call setup() first (the Trainer does this)")
        return self.datasets[split]

    def _generator(self) -> torch.Generator:
        # worker seeds come from a private generator, never the global RNG (which drives dropout alone)
        return torch.Generator().manual_seed(self.seed)

    @override
    def train_dataloader(self) -> DataLoader:
        return self.resumable_train_loader(
            self._dataset("train"), self.seed, batch_size=self.batch_size,
            collate_fn=CausalLMCollator(self.tokenizer.pad_token_id), num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, generator=self._generator())

    @override
    def val_dataloader(self) -> DataLoader | list:
        if not self.val_size:
            return []
        return DataLoader(self._dataset("validation"), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=CausalLMCollator(self.tokenizer.pad_token_id), num_workers=self.num_workers,
                          generator=self._generator())

    def _prompt_loaders(self) -> list[DataLoader]:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loaders = []
        for name in self.test_set_names:
            data = self._dataset(f"test:{name}")
            # every world-th record, without the padding DistributedSampler adds: each record is scored once
            sampler = UnrepeatedDistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) \
                if world > 1 else None
            loaders.append(DataLoader(data, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False,
                                      collate_fn=PromptCollator(self.tokenizer.pad_token_id),
                                      num_workers=self.num_workers, generator=self._generator()))
        return loaders

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One loader per set of :attr:`test_set_names`, in that order."""
        return self._prompt_loaders()

    @override
    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per set of :attr:`test_set_names`, in that order."""
        return self._prompt_loaders()

    @property
    def predict_split_names(self) -> list[str]:
        """The set of each predict dataloader, in order."""
        return list(self.test_set_names)

    # ------------------------------------------------------------ resumption

def _checked(data: Dataset, fields: Sequence[str], path: str) -> Dataset:
    """Refuse a file without records or whose records lack a field; fill a missing ``input`` with ``""``."""
    if len(data) == 0:
        raise ValueError(f"{path!r} holds no records; point it at the LLM-Adapters file")
    missing = [name for name in fields if name not in data.column_names]
    if missing:
        raise ValueError(f"{path!r}: the records have no {missing} field(s) (fields found: {data.column_names}); "
                         f"LLM-Adapters records hold {list(fields)} (plus 'input', often empty)")
    for name in fields:
        values = data[name]
        bad = next((i for i, value in enumerate(values) if not isinstance(value, str) or not value.strip()), None)
        if bad is not None:
            raise ValueError(f"{path!r}: record {bad} (0-based) has no text in field {name!r} "
                             f"(found {values[bad]!r}); fix or drop that record")
    if "input" not in data.column_names:
        data = data.add_column("input", [""] * len(data))
    return data


def _tokenize_training(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, template: PromptTemplate,
                       cutoff_len: int, train_on_inputs: bool) -> dict[str, list[list[int]]]:
    inputs = [value or "" for value in batch["input"]]
    texts = [template.training_prompt(i, x, o) for i, x, o in zip(batch["instruction"], inputs, batch["output"],
                                                                    strict=True)]
    ids = tokenizer(texts, truncation=True, max_length=cutoff_len)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = [[*row, eos] if row[-1] != eos and len(row) < cutoff_len else row for row in ids]
    labels = [list(row) for row in ids]
    if not train_on_inputs:  # as LLM-Adapters: the prompt is the training text with an empty output
        prompts = [template.training_prompt(i, x, "") for i, x in zip(batch["instruction"], inputs, strict=True)]
        lengths = [len(row) for row in tokenizer(prompts, truncation=True, max_length=cutoff_len)["input_ids"]]
        labels = [[IGNORE_INDEX] * n + row[n:] for n, row in zip(lengths, labels, strict=True)]
    return {"input_ids": ids, "labels": labels}


def _tokenize_prompts(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase,
                      template: PromptTemplate) -> dict[str, list[Any]]:
    inputs = [value or "" for value in batch["input"]]
    prompts = [template.eval_prompt(i, x) for i, x in zip(batch["instruction"], inputs, strict=True)]
    ids = tokenizer(prompts)["input_ids"]
    return {"input_ids": ids, "length": [len(row) for row in ids], "prompt": prompts}


class CausalLMCollator:
    """Pads training rows on the right: ``input_ids`` with the pad id, ``attention_mask`` 0, ``labels`` -100.

    Args:
        pad_token_id: the tokenizer's pad id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PromptCollator:
    """Pads evaluation prompts on the **left**, so that every row's generation starts at the same column.

    Args:
        pad_token_id: the tokenizer's pad id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, width - n:] = torch.as_tensor(row["input_ids"])
            mask[i, width - n:] = 1
        return {"input_ids": ids, "attention_mask": mask, "index": [int(row["index"]) for row in rows],
                "answer": [row["answer"] for row in rows], "prompt": [row["prompt"] for row in rows]}
