"""GLUEDataModule on small local files: batches for all 8 tasks, seeded order, and clear errors."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

from flexlora_pl.data import GLUE_TASKS, DataFileNotFoundError, GLUEDataModule, GlueTask

WORDS = ["the", "movie", "is", "good", "and", "the", "plot", "was", "very", "great", "but", "the", "actor", "is",
         "not", "fun"]
# One format per task, so every reader is exercised ("json" is a JSON array, "jsonl" one object a line).
FORMATS = {"cola": "csv", "sst2": "tsv", "mrpc": "json", "qqp": "parquet", "stsb": "csv", "mnli": "jsonl",
           "qnli": "tsv", "rte": "parquet"}
N_ROWS = 10


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the Arrow files `datasets` writes out of the user's cache, and never try the network.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def sentence(n_words: int) -> str:
    return " ".join(WORDS[k % len(WORDS)] for k in range(n_words))


def make_rows(task: GlueTask, labels: str = "real") -> list[dict]:
    """N_ROWS rows in the task's column layout; row i has 1 + 3i words per text column (all lengths differ).

    ``labels``: "real", "withheld" (all -1, as in GLUE test files) or "absent" (no label column).
    """
    rows = []
    for i in range(N_ROWS):
        row: dict = {column: sentence(1 + 3 * i) for column in task.text_columns}
        if labels == "real":
            row["label"] = round(i * 0.55 % 5, 2) if task.is_regression else i % task.num_labels
        elif labels == "withheld":
            row["label"] = -1
        rows.append(row)
    return rows


def write_table(path: Path, rows: list[dict]) -> str:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".json":
        frame.to_json(path, orient="records")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return str(path)


def glue_files(tmp_path: Path, task_name: str, *, test_labels: bool = True) -> dict[str, str]:
    """Train, validation split(s) and a test split whose labels are withheld (-1, or no label column)."""
    task, ext = GLUE_TASKS[task_name], FORMATS[task_name]
    files = {split: write_table(tmp_path / f"{task_name}_{split}.{ext}", make_rows(task))
             for split in ("train", *task.validation_splits)}
    hidden = make_rows(task, "withheld" if test_labels else "absent")
    files["test"] = write_table(tmp_path / f"{task_name}_test.{ext}", hidden)
    return files


def assert_padded_batch(batch: dict[str, torch.Tensor], max_seq_length: int) -> None:
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)
    # Dynamic padding: as wide as the longest row of this batch, never wider than max_seq_length.
    assert mask.shape[1] == int(lengths.max()) <= max_seq_length
    positions = torch.arange(mask.shape[1])
    assert torch.equal(mask, (positions < lengths[:, None]).long())  # right padding, no holes
    assert torch.all(batch["input_ids"][mask == 0] == 0)  # [PAD] has id 0
    assert batch["input_ids"].dtype == torch.long


def test_registry_lists_the_eight_tasks_with_paper_lengths():
    assert sorted(GLUE_TASKS) == sorted(["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"])
    lengths = {name: task.max_seq_length for name, task in GLUE_TASKS.items()}
    assert lengths == {"cola": 64, "sst2": 256, "mrpc": 256, "qqp": 320, "stsb": 256, "mnli": 256, "qnli": 256,
                       "rte": 512}
    for task in GLUE_TASKS.values():
        assert task.headline_metric in task.metrics
        assert len(task.label_names) == (0 if task.is_regression else task.num_labels)
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].metrics == ("pearson", "spearman")
    assert GLUE_TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")
    assert set(GLUE_TASKS["mrpc"].metrics) == {"accuracy", "f1"}
    assert GLUE_TASKS["cola"].headline_metric == "matthews"


@pytest.mark.parametrize("task_name", sorted(GLUE_TASKS))
def test_batches_for_every_task(task_name: str, tmp_path: Path, tiny_tokenizer_dir: str):
    task = GLUE_TASKS[task_name]
    dm = GLUEDataModule(task_name, tiny_tokenizer_dir, data_files=glue_files(tmp_path, task_name),
                        max_seq_length=24, batch_size=4, eval_batch_size=4)
    assert dm.num_labels == task.num_labels
    assert dm.is_regression == (task_name == "stsb")
    assert dm.val_split_names == list(task.validation_splits)
    dm.setup("fit")

    train = list(dm.train_dataloader())
    assert sum(len(batch["labels"]) for batch in train) == N_ROWS
    for batch in train:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["labels"].dtype == (torch.float32 if task_name == "stsb" else torch.long)
        assert_padded_batch(batch, 24)

    val = dm.val_dataloader()
    loaders = val if task_name == "mnli" else [val]
    assert len(loaders) == len(task.validation_splits)  # MNLI: matched and mismatched
    for loader in loaders:
        batches = list(loader)
        for batch in batches:
            assert_padded_batch(batch, 24)
        # Unshuffled rows grow longer: the first batch is narrower than the limit, the last is truncated to it.
        assert batches[0]["input_ids"].shape[1] < 24
        assert batches[-1]["input_ids"].shape[1] == 24

    dm.setup("test")
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        batch = next(iter(loader))
        assert torch.all(batch["labels"] == -1)  # GLUE test labels are withheld
        assert_padded_batch(batch, 24)


def test_test_split_without_label_column_and_with_real_labels(tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "rte", test_labels=False)
    dm = GLUEDataModule("rte", tiny_tokenizer_dir, data_files=files)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["labels"].dtype == torch.long and torch.all(batch["labels"] == -1)

    files["test"] = files["validation"]
    dm = GLUEDataModule("rte", tiny_tokenizer_dir, data_files=files)
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["labels"].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]


def test_training_order_depends_only_on_the_seed(tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "cola")

    def first_epoch(seed: int) -> list[int]:
        dm = GLUEDataModule("cola", tiny_tokenizer_dir, data_files=files, batch_size=3, seed=seed)
        dm.setup("fit")
        torch.manual_seed(seed + 1000)  # the global RNG must not matter
        # Every row has a different length, so the lengths identify the rows.
        return [int(n) for batch in dm.train_dataloader() for n in batch["attention_mask"].sum(dim=1)]

    assert first_epoch(7) == first_epoch(7)
    assert first_epoch(7) != first_epoch(8)
    assert sorted(first_epoch(7)) == [1 + 3 * i + 2 for i in range(N_ROWS)]


def test_sample_limits_and_default_max_length(tmp_path: Path, tiny_tokenizer_dir: str):
    dm = GLUEDataModule("mnli", tiny_tokenizer_dir, data_files=glue_files(tmp_path, "mnli"),
                        max_train_samples=3, max_eval_samples=2)
    assert dm.max_seq_length == 256
    dm.setup(None)
    assert {split: len(rows) for split, rows in dm.datasets.items()} == {
        "train": 3, "validation_matched": 2, "validation_mismatched": 2, "test": 2}


def test_unknown_task_lists_the_valid_names(tiny_tokenizer_dir: str):
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'") as info:
        GLUEDataModule("wnli", tiny_tokenizer_dir)
    for name in GLUE_TASKS:
        assert name in str(info.value)
    assert GLUEDataModule("SST-2", tiny_tokenizer_dir).task.name == "sst2"


def test_unknown_and_missing_data_files_keys(tmp_path: Path, tiny_tokenizer_dir: str):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['validation'\].*validation_matched"):
        GLUEDataModule("mnli", tiny_tokenizer_dir, data_files={"train": "a.csv", "validation": "b.csv"})
    files = glue_files(tmp_path, "sst2")
    del files["validation"]
    dm = GLUEDataModule("sst2", tiny_tokenizer_dir, data_files=files)
    with pytest.raises(ValueError, match="no 'validation' entry"):
        dm.setup("fit")
    dm.setup("test")  # a stage that does not need the missing split still works


def test_missing_column_names_the_column_the_file_and_what_was_found(tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "mrpc")
    rows = [{"sentence1": r["sentence1"], "text_b": r["sentence2"], "label": r["label"]}
            for r in make_rows(GLUE_TASKS["mrpc"])]
    files["train"] = write_table(tmp_path / "renamed.json", rows)
    dm = GLUEDataModule("mrpc", tiny_tokenizer_dir, data_files=files)
    with pytest.raises(ValueError, match="missing column") as info:
        dm.setup("fit")
    message = str(info.value)
    assert "sentence2" in message and files["train"] in message and "text_b" in message


def test_missing_file_names_the_path(tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "qnli")
    files["train"] = str(tmp_path / "nope" / "train.tsv")
    dm = GLUEDataModule("qnli", tiny_tokenizer_dir, data_files=files)
    with pytest.raises(DataFileNotFoundError) as info:
        dm.setup("fit")
    assert isinstance(info.value, ValueError) and files["train"] in str(info.value)


@pytest.mark.parametrize(
    ("task_name", "split", "bad_label", "expected"),
    [
        ("sst2", "validation", 2, r"label 2 at row 3 .*integers 0\.\.1"),
        ("sst2", "train", -1, r"label -1 at row 3 .*accepted only in the test split"),
        ("stsb", "train", 7.5, r"label 7\.5 at row 3 .*\[0\.0, 5\.0\]"),
        ("qqp", "train", 0.5, r"label 0\.5 at row 3 .*integers 0\.\.1 \(0=not_duplicate, 1=duplicate\)"),
    ],
)
def test_label_out_of_range_names_row_value_and_range(task_name: str, split: str, bad_label: float, expected: str,
                                                       tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, task_name)
    rows = make_rows(GLUE_TASKS[task_name])
    rows[3]["label"] = bad_label
    files[split] = write_table(tmp_path / f"bad.{FORMATS[task_name]}", rows)
    dm = GLUEDataModule(task_name, tiny_tokenizer_dir, data_files=files)
    with pytest.raises(ValueError, match=expected) as info:
        dm.setup("fit")
    assert files[split] in str(info.value)
    assert dm.datasets == {}  # every split is checked before any is tokenised


def test_text_labels_and_missing_values_are_reported(tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "mnli")
    rows = make_rows(GLUE_TASKS["mnli"])
    for row in rows:
        row["label"] = GLUE_TASKS["mnli"].label_names[row["label"]]
    files["train"] = write_table(tmp_path / "named.jsonl", rows)
    with pytest.raises(ValueError, match="integer ids: 0=entailment, 1=neutral, 2=contradiction"):
        GLUEDataModule("mnli", tiny_tokenizer_dir, data_files=files).setup("fit")

    files = glue_files(tmp_path, "cola")
    rows = make_rows(GLUE_TASKS["cola"])
    rows[4]["sentence"] = None
    files["train"] = write_table(tmp_path / "blank.csv", rows)
    with pytest.raises(ValueError, match="column 'sentence' is empty at row 4"):
        GLUEDataModule("cola", tiny_tokenizer_dir, data_files=files).setup("fit")

    rows = make_rows(GLUE_TASKS["cola"])
    rows[2]["label"] = None
    files["train"] = write_table(tmp_path / "unlabelled.csv", rows)
    with pytest.raises(ValueError, match="label missing at row 2"):
        GLUEDataModule("cola", tiny_tokenizer_dir, data_files=files).setup("fit")


def test_test_split_cannot_mix_withheld_and_real_labels(tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "sst2")
    rows = make_rows(GLUE_TASKS["sst2"])
    rows[5]["label"] = -1
    files["test"] = write_table(tmp_path / "mixed.tsv", rows)
    with pytest.raises(ValueError, match="fully labelled or fully withheld"):
        GLUEDataModule("sst2", tiny_tokenizer_dir, data_files=files).setup("test")


@pytest.mark.parametrize("content", ["sentence,label\n", ""], ids=["header-only", "zero-bytes"])
def test_empty_split(content: str, tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "cola")
    files["validation"] = str(tmp_path / "empty.csv")
    Path(files["validation"]).write_text(content)
    with pytest.raises(ValueError, match=r"split 'validation'\): the split is empty") as info:
        GLUEDataModule("cola", tiny_tokenizer_dir, data_files=files).setup("fit")
    assert files["validation"] in str(info.value)


def test_unreachable_hub_says_to_pass_data_files(tiny_tokenizer_dir: str):
    dm = GLUEDataModule("rte", tiny_tokenizer_dir)
    with pytest.raises(ConnectionError, match="unreachable.*Pass data_files="):
        dm.prepare_data()
    with pytest.raises(ConnectionError, match="Pass data_files="):
        dm.setup("fit")


def _train_lengths(dm: GLUEDataModule) -> list[int]:
    dm.setup("fit")
    # Every row has a different length, so the lengths identify the rows.
    return [int(n) for batch in dm.train_dataloader() for n in batch["attention_mask"].sum(dim=1)]


def test_seed_none_follows_seed_everything(tmp_path: Path, tiny_tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch):
    files = glue_files(tmp_path, "cola")

    def module(seed: int | None = None) -> GLUEDataModule:
        return GLUEDataModule("cola", tiny_tokenizer_dir, data_files=files, batch_size=3, seed=seed)

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything(7) leaves for the modules it precedes
    followed = module()
    assert followed.seed == 7
    assert _train_lengths(followed) == _train_lengths(module(seed=7))
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")
    assert module().seed == 8 and _train_lengths(module()) != _train_lengths(followed)
    explicit = module(seed=7)  # an explicit seed overrides the run's
    assert explicit.seed == 7 and _train_lengths(explicit) == _train_lengths(followed)

    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert module().seed == 0  # neither given: flexlora_pl.runs.seeding.DEFAULT_SEED

    import lightning

    monkeypatch.setenv("PL_SEED_WORKERS", "0")  # seed_everything writes both; monkeypatch restores them after
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    lightning.seed_everything(11)
    assert module().seed == 11
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 \(or None: follow seed_everything\)"):
        module(seed=-1)


def test_encoding_of_local_files(tmp_path: Path, tiny_tokenizer_dir: str):
    files = glue_files(tmp_path, "cola")
    rows = "sentence,label\n" + "".join(f"{sentence(1 + i)},{i % 2}\n" for i in range(5)) + "un café crème,1\n"
    files["train"] = str(tmp_path / "latin1.csv")
    Path(files["train"]).write_bytes(rows.encode("latin-1"))

    dm = GLUEDataModule("cola", tiny_tokenizer_dir, data_files=files)
    assert dm.encoding == "utf-8"
    with pytest.raises(ValueError, match=r"is not valid utf-8 text: byte\(s\) e9 .*\(line 7, near 'un caf\ufffd "
                                         r"cr\ufffdme,1'\).*Set data\.init_args\.encoding .*e\.g\. latin-1") as info:
        dm.prepare_data()
    assert files["train"] in str(info.value) and "split 'train'" in str(info.value)

    dm = GLUEDataModule("cola", tiny_tokenizer_dir, data_files=files, encoding="latin-1")
    raw = dm.load_raw_splits(["train"])["train"].data
    assert raw["sentence"][-1] == "un café crème"
    dm.setup("fit")  # the utf-8 validation file reads the same in latin-1 (ASCII only)
    assert len(dm.datasets["train"]) == 6


def test_label_names_are_public(tiny_tokenizer_dir: str):
    assert GLUEDataModule("mnli", tiny_tokenizer_dir).label_names == ["entailment", "neutral", "contradiction"]
    assert GLUEDataModule("qqp", tiny_tokenizer_dir).label_names == ["not_duplicate", "duplicate"]
    assert GLUEDataModule("stsb", tiny_tokenizer_dir).label_names is None  # regression


def test_tokenizer_none_is_the_packaged_minilm_offline(tmp_path: Path):
    from flexlora_pl.data import default_tokenizer_path

    # conftest sets HF_HUB_OFFLINE=1 before transformers is imported, so any hub lookup here would fail.
    dm = GLUEDataModule("rte", data_files=glue_files(tmp_path, "rte"), max_train_samples=4)
    assert dm.tokenizer_name_or_path == default_tokenizer_path()
    assert GLUEDataModule("rte", None).tokenizer_name_or_path == default_tokenizer_path()
    assert dm.max_seq_length == 512 == dm.tokenizer.model_max_length  # RTE's default length fits MiniLM
    assert dm.tokenizer.vocab_size == 30522  # the real pretrained uncased BERT vocabulary
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"][0, 0] == dm.tokenizer.cls_token_id
