"""``holdout_size``: a validation split carved out of the training rows, for a search that never sees a reported split.

The carve is stratified, seeded and disjoint from the rows that still train; a GLUE module under a holdout never
opens its validation and test files; with a fixed ``draw_seed`` no tweet trial, at any seed, touches the reported
validation draw; the option works through ``flexlora fit``; every bad value is refused with the fix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_run_folder
from torch import nn

from flexlora_pl.cli import build_cli
from flexlora_pl.data import GLUEDataModule, TweetSentimentDataModule
from flexlora_pl.data import glue as glue_module
from flexlora_pl.data.holdout import carve_holdout, check_holdout_size, holdout_count, stratified_draw

# Ten words of the tiny test vocabulary: row i of a file is written with the digits of i, so no two rows share text
# and a row is known again by its token ids after tokenisation.
WORDS = ["the", "a", "this", "that", "it", "movie", "film", "plot", "car", "road"]


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the Arrow files `datasets` writes out of the user's cache, and never try the network.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def text_of(row: int) -> str:
    return " ".join(WORDS[int(digit)] for digit in f"{row:03d}")


def write_mrpc(path: Path, labels: list[int]) -> str:
    lines = ["sentence1,sentence2,label", *(f"{text_of(i)},{WORDS[i % 10]},{y}" for i, y in enumerate(labels))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_tweets(path: Path, rows: int) -> str:
    sentiments = ["negative", "neutral", "positive"]
    lines = ["sentiment,text", *(f"{sentiments[i % 3 if i % 5 else 2]},{text_of(i)}" for i in range(rows))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def row_keys(data: datasets.Dataset) -> set[tuple[int, ...]]:
    """The rows of a tokenised split, each known by its token ids (every row of the test files differs)."""
    return {tuple(ids) for ids in data["input_ids"]}


def label_counts(data: datasets.Dataset, classes: int) -> list[int]:
    return np.bincount(np.asarray(data["labels"]), minlength=classes).tolist()


# 40 training rows: 30 of class 0 and 10 of class 1, interleaved.
MRPC_LABELS = [int(i % 4 == 0) for i in range(40)]


@pytest.fixture
def mrpc_files(tmp_path: Path) -> dict[str, str]:
    return {"train": write_mrpc(tmp_path / "train.csv", MRPC_LABELS),
            "validation": write_mrpc(tmp_path / "dev.csv", [0, 1] * 6),
            "test": write_mrpc(tmp_path / "test.csv", [-1] * 8)}


def glue(tokenizer: str, files: dict[str, str], **kwargs) -> GLUEDataModule:
    kwargs = {"task_name": "mrpc", "max_seq_length": 16, "batch_size": 8, "seed": 3, **kwargs}
    return GLUEDataModule(tokenizer_name_or_path=tokenizer, data_files=files, **kwargs)


class BagOfWords(L.LightningModule):
    """Just enough model for a Trainer to fit and validate on token batches."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(64, 2, padding_idx=0)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(self.bag(batch["input_ids"]), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=batch["labels"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


# --------------------------------------------------------------------------- the carve
def test_carve_is_stratified_seeded_disjoint_and_covers_the_training_rows():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    np.random.default_rng(1).shuffle(labels)
    train, carved = carve_holdout(labels, 0.2, seed=4)
    assert len(carved) == 20 and len(train) == 80
    assert set(train).isdisjoint(carved) and sorted([*train, *carved]) == list(range(100))
    assert list(train) == sorted(train) and list(carved) == sorted(carved)
    assert np.bincount(labels[carved]).tolist() == [12, 6, 2]  # the class mix of the training rows, 60/30/10
    again_train, again = carve_holdout(labels, 0.2, seed=4)
    assert np.array_equal(again, carved) and np.array_equal(again_train, train)
    assert not np.array_equal(carve_holdout(labels, 0.2, seed=5)[1], carved)

    targets = np.linspace(0.0, 5.0, 50)  # regression: a plain seeded random draw of the asked size
    train, carved = carve_holdout(targets, 7, seed=4, stratify=False)
    assert len(carved) == 7 and set(train).isdisjoint(carved) and len(train) == 43
    assert np.array_equal(carve_holdout(targets, 7, seed=4, stratify=False)[1], carved)
    assert not np.array_equal(carve_holdout(targets, 7, seed=6, stratify=False)[1], carved)


def test_counts_and_fractions():
    assert holdout_count(12, 48) == 12
    assert holdout_count(0.2, 48) == 10  # 9.6 rounds to the nearest row
    assert holdout_count(0.25, 10) == 3  # halves round up
    assert holdout_count(0.001, 48) == 1  # never an empty holdout
    assert check_holdout_size(None) is None and check_holdout_size(3) == 3 and check_holdout_size(0.5) == 0.5


def test_the_tweet_draw_is_the_shared_stratified_draw():
    from flexlora_pl.data import tweets

    assert tweets.stratified_draw is stratified_draw  # one draw serves the tweet task and the holdout


# --------------------------------------------------------------------------- GLUE: no peeking
def test_glue_holdout_never_opens_the_validation_or_test_files(mrpc_files, tiny_tokenizer_dir, monkeypatch):
    opened: list[str] = []
    real_load = glue_module.load_data_files

    def recording_load(paths, **kwargs):
        opened.extend([paths] if isinstance(paths, str) else paths)
        return real_load(paths, **kwargs)

    monkeypatch.setattr(glue_module, "load_data_files", recording_load)
    dm = glue(tiny_tokenizer_dir, mrpc_files, holdout_size=0.25)
    Path(mrpc_files["validation"]).unlink()  # the reported splits are gone: any read of them fails
    Path(mrpc_files["test"]).unlink()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    model = BagOfWords()
    trainer.fit(model, datamodule=dm)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)

    assert set(opened) == {mrpc_files["train"]}
    assert "val/loss" in metrics[0]
    assert dm.val_split_names == ["holdout"] and set(dm.datasets) == {"train", "holdout"}
    assert dm.holdout == {"holdout_size": 0.25, "rows": 10, "train_rows": 30, "seed": 3, "stratified": True}
    assert row_keys(dm.datasets["train"]).isdisjoint(row_keys(dm.datasets["holdout"]))
    carved = label_counts(dm.datasets["holdout"], 2)
    assert carved in ([8, 2], [7, 3])  # 10 rows in the 30/10 class mix of the training rows, ±1 row
    assert label_counts(dm.datasets["train"], 2) == [30 - carved[0], 10 - carved[1]]


def test_same_seed_same_carve_and_another_seed_another(mrpc_files, tiny_tokenizer_dir):
    carves = {}
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        dm = glue(tiny_tokenizer_dir, mrpc_files, holdout_size=10, seed=seed)
        dm.setup("fit")
        carves[name] = row_keys(dm.datasets["holdout"])
        assert len(carves[name]) == 10 and len(dm.datasets["train"]) == 30
    assert carves["first"] == carves["again"]
    assert carves["first"] != carves["other"]


def test_mnli_holdout_is_one_validation_loader(tmp_path, tiny_tokenizer_dir):
    rows = ["premise,hypothesis,label", *(f"{text_of(i)},{WORDS[i % 10]},{i % 3}" for i in range(30))]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    files = {"train": str(tmp_path / "train.csv"), "validation_matched": str(tmp_path / "missing_matched.csv"),
             "validation_mismatched": str(tmp_path / "missing_mismatched.csv")}
    dm = GLUEDataModule("mnli", tokenizer_name_or_path=tiny_tokenizer_dir, data_files=files, max_seq_length=16,
                        holdout_size=6, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_split_names == ["holdout"]
    assert isinstance(dm.val_dataloader(), torch.utils.data.DataLoader)  # one loader, not the two dev sets
    assert label_counts(dm.datasets["holdout"], 3) == [2, 2, 2]


def test_test_and_predict_are_refused_under_a_holdout(mrpc_files, tiny_tokenizer_dir):
    dm = glue(tiny_tokenizer_dir, mrpc_files, holdout_size=0.25)
    for stage in ("test", "predict"):
        with pytest.raises(ValueError, match=rf"holdout_size=0\.25 is set.*no reported split: stage '{stage}' is "
                                             rf"refused.*Run without data\.init_args\.holdout_size to {stage}"):
            dm.setup(stage)
    assert dm.datasets == {}


# --------------------------------------------------------------------------- tweets: the draw seed
def tweets(csv: str, tokenizer: str, **kwargs) -> TweetSentimentDataModule:
    kwargs = {"train_size": 120, "val_size": 60, "max_seq_length": 16, **kwargs}
    return TweetSentimentDataModule(tokenizer_name_or_path=tokenizer, csv_path=csv, **kwargs)


def test_a_fixed_draw_seed_keeps_every_trial_off_the_reported_validation_draw(tmp_path, tiny_tokenizer_dir):
    csv = write_tweets(tmp_path / "tweets.csv", 400)
    reported = tweets(csv, tiny_tokenizer_dir, draw_seed=11, seed=0)
    reported.setup("fit")
    validation = row_keys(reported.datasets["validation"])
    assert len(validation) == 60

    for seed in range(4):
        trial = tweets(csv, tiny_tokenizer_dir, draw_seed=11, seed=seed, holdout_size=0.25)
        trial.setup("fit")
        train, carved = row_keys(trial.datasets["train"]), row_keys(trial.datasets["holdout"])
        assert len(train) == 90 and len(carved) == 30 and train.isdisjoint(carved)
        assert (train | carved).isdisjoint(validation), f"seed {seed} touches the reported validation draw"

    # Without a fixed draw seed the draw moves with the seed: a trial at seed 1 uses reported rows of seed 0.
    reported_at_0 = tweets(csv, tiny_tokenizer_dir, seed=0)
    reported_at_0.setup("fit")
    moving = tweets(csv, tiny_tokenizer_dir, seed=1, holdout_size=0.25)
    moving.setup("fit")
    trial_rows = row_keys(moving.datasets["train"]) | row_keys(moving.datasets["holdout"])
    assert trial_rows & row_keys(reported_at_0.datasets["validation"])


def test_draw_seed_none_is_the_old_draw_and_the_shuffle_follows_seed(tmp_path, tiny_tokenizer_dir):
    csv = write_tweets(tmp_path / "tweets.csv", 400)
    old = tweets(csv, tiny_tokenizer_dir, seed=5).load_raw_splits(["train", "validation"])
    same = tweets(csv, tiny_tokenizer_dir, seed=5, draw_seed=5).load_raw_splits(["train", "validation"])
    for split in ("train", "validation"):
        assert old[split].data["text"] == same[split].data["text"]

    first = tweets(csv, tiny_tokenizer_dir, seed=0, draw_seed=2, batch_size=120)
    second = tweets(csv, tiny_tokenizer_dir, seed=1, draw_seed=2, batch_size=120)
    orders = []
    for dm in (first, second):
        dm.setup("fit")
        orders.append([tuple(row) for row in next(iter(dm.train_dataloader()))["input_ids"].tolist()])
    assert set(orders[0]) == set(orders[1]) and orders[0] != orders[1]  # same rows, each seed its own order


# --------------------------------------------------------------------------- through the command
def test_holdout_size_works_through_flexlora_fit(tmp_path, tiny_glue_root):
    # The reported files do not exist: the run can only succeed if it never reads them.
    missing = {"data": {"init_args": {"data_files": {"train": "{root}/train.csv", "validation": "{root}/gone.csv",
                                                     "test": "{root}/gone_too.csv"}}}}
    folder = tiny_run_folder(tmp_path, tiny_glue_root, missing)
    cli = build_cli(["fit", "--config", str(folder / "run.yaml"), "--data.init_args.holdout_size", "0.25"])
    assert cli.datamodule.holdout == {"holdout_size": 0.25, "rows": 12, "train_rows": 36, "seed": 7,
                                      "stratified": True}
    assert cli.model.val_split_names == ["holdout"]
    assert {"val/score", "val/accuracy", "val/f1"} <= set(cli.trainer.callback_metrics)
    record = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert record["fit"]["holdout"] == cli.datamodule.holdout and record["fit"]["status"] == "finished"

    counted = build_cli(["--config", str(folder / "run.yaml"), "--data.init_args.holdout_size", "12"], run=False)
    assert counted.datamodule.holdout_size == 12 and isinstance(counted.datamodule.holdout_size, int)


def test_a_trial_of_the_shipped_tuned_sweep_trains_and_validates_on_the_tweets_holdout(tmp_path, tiny_glue_root):
    # The command the shipped sweep gives its first tweets trial, on the tiny model and fewer tweets and steps.
    from flexlora_pl.experiments.sweep_file import load_sweep
    from flexlora_pl.experiments.tuned import trial_run

    sweep = load_sweep(str(Path(__file__).parents[2] / "configs" / "sweeps" / "offline_tuned.yaml"))
    lr = sweep.search.params["lora"][0]
    run = trial_run(sweep, "tweets", "lora", 0, {lr.name: 1e-2}, save_dir=str(tmp_path / "runs"))
    cli = build_cli(run.command("fit", ["--model.init_args.model_name_or_path", str(tiny_glue_root / "model"),
                                        "--data.init_args.train_size", "60", "--data.init_args.val_size", "30",
                                        "--data.init_args.batch_size", "8", "--trainer.max_steps", "4",
                                        "--trainer.val_check_interval", "2"]))
    assert "validation" not in cli.datamodule.datasets  # the reported draw is never loaded
    assert Path(cli.trainer.log_dir) == run.folder
    record = json.loads((run.folder / "metrics.json").read_text())
    assert record["fit"]["status"] == "finished"
    assert record["fit"]["holdout"] == {"holdout_size": 0.2, "rows": 12, "train_rows": 48, "seed": 0,
                                        "stratified": True}
    assert {entry["step"] for entry in record["fit"]["history"]} == {2, 4}


def test_a_holdout_that_leaves_no_training_row_stops_before_the_run_folder(tmp_path, tiny_glue_root):
    folder = tiny_run_folder(tmp_path, tiny_glue_root, {})
    with pytest.raises(ValueError, match=r"train\.csv \(split 'train'\): holdout_size=48 carves 48 of its 48 "
                                         r"training rows, which leaves no row to train on; set "
                                         r"data\.init_args\.holdout_size to fewer than 48 rows"):
        build_cli(["fit", "--config", str(folder / "run.yaml"), "--data.init_args.holdout_size", "48"])
    assert not (folder / "runs").exists() or not any((folder / "runs").rglob("*"))


# --------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("size", "message"),
    [
        (0, r"holdout_size=0 carves no row: give a count of training rows \(an integer >= 1\) or a fraction in "
            r"\(0, 1\), e\.g\. data\.init_args\.holdout_size=0\.2"),
        (-3, r"holdout_size=-3 carves no row"),
        (0.0, r"holdout_size=0\.0 is a fraction of the training rows and must lie in \(0, 1\)"),
        (-0.1, r"holdout_size=-0\.1 is a fraction of the training rows and must lie in \(0, 1\)"),
        (1.0, r"holdout_size=1\.0 is a fraction .* must lie in \(0, 1\).*for a number of rows write an integer"),
        (2.5, r"holdout_size=2\.5 is a fraction .* must lie in \(0, 1\)"),
        (math.nan, r"holdout_size=nan is a fraction .* must lie in \(0, 1\)"),
        (True, r"holdout_size must be a count of training rows .* or a fraction of them in \(0, 1\), got True"),
        ("0.2", r"holdout_size must be a count of training rows .* got '0\.2'"),
    ],
    ids=["zero", "negative", "zero-fraction", "negative-fraction", "fraction-one", "fraction-above-one", "nan",
         "bool", "text"],
)
def test_bad_holdout_size_is_refused_at_construction(size, message, mrpc_files, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        glue(tiny_tokenizer_dir, mrpc_files, holdout_size=size)
    with pytest.raises(ValueError, match=message):
        tweets(write_tweets(tmp_path / "tweets.csv", 10), tiny_tokenizer_dir, holdout_size=size)


def test_bad_draw_seed_is_refused(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ValueError, match=r"draw_seed must be an integer >= 0 \(or None: the module's seed\), got -1"):
        tweets(write_tweets(tmp_path / "tweets.csv", 10), tiny_tokenizer_dir, draw_seed=-1)


@pytest.mark.parametrize("size", [40, 0.99])
def test_a_holdout_of_every_training_row_is_refused(size, mrpc_files, tiny_tokenizer_dir):
    dm = glue(tiny_tokenizer_dir, mrpc_files, holdout_size=size)
    with pytest.raises(ValueError, match=rf"train\.csv \(split 'train'\): holdout_size={size} carves 40 of its 40 "
                                         r"training rows, which leaves no row to train on"):
        dm.prepare_data()


def test_tweet_holdout_counts_against_the_train_draw(tmp_path, tiny_tokenizer_dir):
    dm = tweets(write_tweets(tmp_path / "tweets.csv", 400), tiny_tokenizer_dir, holdout_size=120)
    with pytest.raises(ValueError, match=r"holdout_size=120 carves 120 of its 120 training rows"):
        dm.setup("fit")


def test_a_class_of_one_row_cannot_be_stratified(tmp_path, tiny_tokenizer_dir):
    files = {"train": write_mrpc(tmp_path / "train.csv", [0] * 39 + [1])}
    dm = glue(tiny_tokenizer_dir, files, holdout_size=0.25)
    with pytest.raises(ValueError, match=r"class 'equivalent' \(label 1\) has 1 of the 40 training rows, too few to "
                                         r"stratify a holdout of 10 rows .*give the class at least 2 training rows"):
        dm.prepare_data()


def test_a_class_too_small_for_the_carve_names_the_count_it_needs(tmp_path, tiny_tokenizer_dir):
    files = {"train": write_mrpc(tmp_path / "train.csv", [0] * 37 + [1] * 3)}
    dm = glue(tiny_tokenizer_dir, files, holdout_size=4)
    with pytest.raises(ValueError, match=r"class 'equivalent' \(label 1\) has 3 of the 40 training rows, too few to "
                                         r"stratify a holdout of 4 rows \(holdout_size=4\): the carve would take 0 of "
                                         r"them and leave 3 to train on.*raise data\.init_args\.holdout_size to at "
                                         r"least 14 rows"):
        dm.prepare_data()
    dm = glue(tiny_tokenizer_dir, files, holdout_size=14)
    dm.prepare_data()  # the count the message names is enough
    assert dm.holdout["rows"] == 14


def test_a_class_the_carve_would_take_whole_says_to_lower_it():
    with pytest.raises(ValueError, match=r"class label 0 has 3 of the 5 training rows.*the carve would take 3 of them "
                                         r"and leave 0 to train on.*lower data\.init_args\.holdout_size"):
        carve_holdout(np.array([0, 0, 0, 1, 1]), 4, seed=0)
