"""``TextFilesDataModule``: your own text-classification files through the real ``flexlora`` command (fit, test,
predict, merged export), the shipped ``configs/own_text.yaml``, the seeded stratified validation carve, every file
format, exact mid-epoch resume and the bad inputs, each refused before a run folder exists."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
import yaml
from tiny_run import tiny_run_dict

from flexlora_pl.cli import build_cli
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.data import TextFilesDataModule

CONFIG = Path(__file__).parents[2] / "configs" / "own_text.yaml"

# Three classes with string labels, in words of the tiny tokenizer's vocabulary (tests/conftest.py).
WORDS = {"cinema": ["movie", "film", "plot", "actor", "story"], "traffic": ["car", "road", "drive", "city", "go"],
         "mood": ["happy", "sad", "fun", "dull", "love"]}
NAMES = sorted(WORDS)  # the class names in id order: cinema, mood, traffic


def example_rows(n: int = 60, offset: int = 0) -> list[dict]:
    """``n`` rows, the classes in turn, each with an ``id`` column (extra columns are allowed) for identity."""
    rows = []
    for i in range(offset, offset + n):
        label = ["cinema", "traffic", "mood"][i % 3]
        words = WORDS[label]
        rows.append({"id": i, "text": f"the {words[i % 5]} is {words[(i * 2 + 1) % 5]} {words[(i * 3) % 5]}",
                     "label": label})
    return rows


def write(path: Path, rows: list[dict]) -> str:
    """``rows`` in ``path``'s format (csv, tsv, json, jsonl, parquet; any other extension: tab-separated)."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t", quoting=csv.QUOTE_NONE)
    return str(path)


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """The example data set: 60 training rows and 15 test rows (csv)."""
    return {"train": write(tmp_path / "train.csv", example_rows()),
            "test": write(tmp_path / "test.csv", example_rows(15, offset=100))}


def module(data_files: dict, tokenizer: str, **kwargs) -> TextFilesDataModule:
    return TextFilesDataModule(data_files, tokenizer_name_or_path=tokenizer, batch_size=8, **kwargs)


def run_config(tmp_path: Path, model: Path, data_args: dict, **trainer) -> Path:
    """The tiny run (tests/helpers/tiny_run.yaml) on a TextFilesDataModule; runs write under ``tmp_path/runs``."""
    config = tiny_run_dict(model.parent, tmp_path, {"trainer": trainer} if trainer else None)
    config["model"]["init_args"]["model_name_or_path"] = str(model)
    config["model"]["init_args"]["method"]["init_args"]["dropout"] = 0.1  # the global RNG matters in a resume
    config["data"] = {"class_path": "flexlora_pl.data.TextFilesDataModule", "init_args": {"batch_size": 8,
                                                                                           **data_args}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def no_run_folder(tmp_path: Path) -> bool:
    runs = tmp_path / "runs"
    return not runs.exists() or not any(runs.rglob("version_*"))


# --------------------------------------------------------------------------- through the command
def test_string_labels_reach_config_metrics_predictions_and_the_merged_export(tmp_path, tiny_glue_root, files):
    config = run_config(tmp_path, tiny_glue_root / "model", {"data_files": files, "val_size": 0.2})
    fit = build_cli(["fit", "--config", str(config)])
    assert fit.model.num_labels == 3 and fit.model.label_names == NAMES  # linked from the data module
    run = Path(fit.trainer.log_dir)
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]
    assert saved["label_names"] == NAMES and saved["num_labels"] == 3  # the classes the data decided
    record = json.loads((run / "metrics.json").read_text())
    assert record["run"]["label_names"] == NAMES
    # 60 rows: 12 carved (4 per class), 48 train
    assert record["fit"]["carved_validation"] == {"val_size": 0.2, "rows": 12, "train_rows": 48, "seed": 7,
                                                  "stratified": True}
    assert record["fit"]["global_step"] == 6  # 48 rows in batches of 8

    build_cli(["test", "--config", str(config), "--ckpt_path", "last"])
    scored = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
    assert 0.0 <= scored["test/accuracy"] <= 1.0

    predict = build_cli(["predict", "--config", str(config), "--ckpt_path", "last"])
    lines = [json.loads(line) for line in (run / "predictions" / "predictions_test.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(15))
    assert all(line["label"] == NAMES[line["prediction"]] for line in lines)
    model = predict.model.eval()
    with torch.no_grad():  # the file holds what the model predicts for the test rows, in order
        expected = torch.cat([model.predictions(model.logits(b)) for b in predict.datamodule.predict_dataloader()])
    assert [line["prediction"] for line in lines] == expected.tolist()

    ckpt = Path(predict.trainer.ckpt_path)
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--format", "merged"]) == 0
    exported = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert exported["id2label"] == {str(i): name for i, name in enumerate(NAMES)}
    assert exported["label2id"] == {name: i for i, name in enumerate(NAMES)}


def test_the_shipped_config_runs_on_the_example_data(tmp_path, tiny_glue_root, files, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's run folder (runs/own_text) is relative
    cli = build_cli(["fit", "--config", str(CONFIG),
                     "--data.init_args.data_files.train", files["train"],
                     "--data.init_args.data_files.test", files["test"],
                     "--model.init_args.model_name_or_path", str(tiny_glue_root / "model"),
                     "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                     "--data.init_args.batch_size", "8",
                     "--reallocation.t_warmup", "1", "--reallocation.t_final", "1", "--reallocation.delta_t", "2"])
    run = tmp_path / "runs" / "own_text" / "version_0"
    assert (tmp_path / cli.trainer.log_dir).resolve() == run.resolve()
    record = json.loads((run / "metrics.json").read_text())
    assert record["fit"]["status"] == "finished" and record["fit"]["global_step"] == 7  # 54 rows, batches of 8
    assert record["fit"]["carved_validation"]["rows"] == 6 and record["run"]["label_names"] == NAMES
    assert record["fit"]["allocation"]["events"] == 2  # after steps 3 and 5 of 7: the schedule fired


def test_regression_on_float_labels(tmp_path, tiny_glue_root):
    rows = [{"text": row["text"], "label": (i % 7) / 2} for i, row in enumerate(example_rows())]
    config = run_config(tmp_path, tiny_glue_root / "model",
                        {"data_files": {"train": write(tmp_path / "train.jsonl", rows)}, "num_labels": 1,
                         "val_size": 10})
    cli = build_cli(["fit", "--config", str(config)])
    assert cli.model.num_labels == 1 and cli.model.task == "regression" and cli.model.label_names is None
    record = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert record["fit"]["carved_validation"]["stratified"] is False and "val/pearson" in record["fit"]["final"]
    assert sorted(set(cli.datamodule.datasets["train"]["labels"])) == [i / 2 for i in range(7)]  # floats, as given


def test_resume_mid_epoch_is_bitwise(tmp_path, tiny_glue_root, files):
    # 48 training rows in batches of 8: 6 steps an epoch, 12 in all; a checkpoint after step 3, mid-epoch
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 3, "filename": "periodic-{step}", "save_top_k": -1}}]
    config = run_config(tmp_path, tiny_glue_root / "model", {"data_files": files, "val_size": 12},
                        max_epochs=2, callbacks=callbacks)
    whole = build_cli(["fit", "--config", str(config), "--name", "whole"])
    assert whole.trainer.global_step == 12
    expected = {name: p.detach().clone() for name, p in whole.model.named_parameters() if p.requires_grad}
    mid = Path(whole.trainer.log_dir) / "checkpoints" / "periodic-step=3.ckpt"
    state = torch.load(mid, weights_only=True)
    assert state["global_step"] == 3 and state["TextFilesDataModule"]["train_position"] == {
        "epoch": 0, "batches_done": 3, "batch_size": 8, "num_replicas": 1}  # half-way through the first epoch
    resumed = build_cli(["fit", "--config", str(config), "--name", "whole", "--ckpt_path", str(mid)])
    assert resumed.trainer.global_step == 12
    got = {name: p for name, p in resumed.model.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert resumed.model.rank_pattern() == whole.model.rank_pattern()


# --------------------------------------------------------------------------- the carved validation split
def test_the_carve_is_stratified_disjoint_and_seeded(tmp_path, tiny_tokenizer_dir, monkeypatch):
    rows = example_rows(90) + [{"id": 1000 + i, "text": "the film is fun", "label": "cinema"} for i in range(30)]
    path = write(tmp_path / "train.csv", rows)  # 60 cinema, 30 traffic, 30 mood

    def carve(seed):
        dm = module({"train": path}, tiny_tokenizer_dir, val_size=0.25, seed=seed)
        raw = dm.load_raw_splits(["train", "validation"])
        return dm, raw["train"].data, raw["validation"].data

    dm, train, val = carve(3)
    assert len(val) == 30 and len(train) == 90
    assert set(train["id"]).isdisjoint(val["id"]) and set(train["id"]) | set(val["id"]) == {r["id"] for r in rows}
    counts = Counter(NAMES[label] for label in val["label"])
    assert counts == {"cinema": 15, "traffic": 8, "mood": 7} or counts == {"cinema": 15, "traffic": 7, "mood": 8}
    assert dm.carved_validation == {"val_size": 0.25, "rows": 30, "train_rows": 90, "seed": 3, "stratified": True}
    _, again_train, again = carve(3)
    assert again["id"] == val["id"] and again_train["id"] == train["id"]
    assert carve(4)[2]["id"] != val["id"]
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")  # seed None follows seed_everything
    assert carve(None)[2]["id"] == val["id"]


def test_a_holdout_is_carved_from_what_the_validation_carve_leaves(tmp_path, tiny_tokenizer_dir):
    path = write(tmp_path / "train.csv", example_rows(60))
    dm = module({"train": path}, tiny_tokenizer_dir, val_size=12, holdout_size=0.25, seed=1)
    dm.prepare_data()
    assert dm.val_split_names == ["holdout"]
    assert dm.holdout["rows"] == 12 and dm.holdout["train_rows"] == 36
    carved = dm.load_raw_splits(["validation"])["validation"].data["id"]
    held = dm._checked["holdout"].data["id"]
    assert set(held).isdisjoint(carved) and set(dm._checked["train"].data["id"]).isdisjoint(carved)
    with pytest.raises(ValueError, match="holdout_size"):
        dm.splits_for_stage("test")


# --------------------------------------------------------------------------- formats and columns
@pytest.mark.parametrize("name", ["train.csv", "train.tsv", "train.json", "train.jsonl", "train.parquet"])
def test_every_format_loads_the_same_rows(tmp_path, tiny_tokenizer_dir, name):
    rows = example_rows(30)
    dm = module({"train": write(tmp_path / name, rows), "validation": write(tmp_path / ("dev." + name[6:]), rows)},
                tiny_tokenizer_dir)
    raw = dm.load_raw_splits(["train", "validation"])
    assert dm.label_names == NAMES
    for split in ("train", "validation"):
        assert raw[split].data["text"] == [row["text"] for row in rows]
        assert raw[split].data["label"] == [NAMES.index(row["label"]) for row in rows]


def test_format_reads_files_whose_extension_says_nothing(tmp_path, tiny_tokenizer_dir):
    rows = example_rows(30)
    path = write(tmp_path / "train.txt", rows)  # tab-separated
    with pytest.raises(ValueError, match=r"extension does not say the format.*data.init_args.format"):
        module({"train": path}, tiny_tokenizer_dir)
    dm = module({"train": path}, tiny_tokenizer_dir, format="tsv", val_size=6)
    assert dm.load_raw_splits(["train"])["train"].data.column_names == ["id", "text", "label"]


def test_sentence_pairs_integer_labels_and_label_names(tmp_path, tiny_tokenizer_dir):
    rows = [{"first": row["text"], "second": "the day is new", "label": NAMES.index(row["label"])}
            for row in example_rows(30)]
    path = write(tmp_path / "pairs.csv", rows)
    named = module({"train": path, "validation": path}, tiny_tokenizer_dir, text_column="first",
                   text_pair_column="second", label_names=["a", "b", "c"])
    assert named.label_names == ["a", "b", "c"] and named.text_columns == ["first", "second"]
    named.prepare_data()
    named.setup("fit")
    batch = next(iter(named.val_dataloader()))
    assert (batch["token_type_ids"] == 1).any()  # the pair's second text is there
    assert batch["labels"][:3].tolist() == [row["label"] for row in rows[:3]]
    # whole numbers without label_names are named by their values
    plain = module({"train": path, "validation": path}, tiny_tokenizer_dir, text_column="first")
    assert plain.label_names == ["0", "1", "2"] and plain.resolved_init_args() == {"num_labels": 3}


def test_a_test_file_without_labels_is_predicted_only(tmp_path, tiny_tokenizer_dir, files):
    unlabeled = write(tmp_path / "unlabeled.csv", [{"text": row["text"], "label": None} for row in example_rows(9)])
    dm = module({"train": files["train"], "test": unlabeled}, tiny_tokenizer_dir, val_size=6)
    dm.prepare_data()
    assert dm.labels_withheld("test")


# --------------------------------------------------------------------------- bad input
def _bad_cases(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """name -> (data init_args, pattern the message must match)."""
    train = write(tmp_path / "train.csv", example_rows())
    rare = write(tmp_path / "rare.csv", [*example_rows(), {"id": 99, "text": "the day is old", "label": "weather"}])
    unseen = write(tmp_path / "unseen.csv", [*example_rows(6), {"id": 99, "text": "the day", "label": "weather"}])
    mixed = write(tmp_path / "mixed.csv", [{"text": r["text"], "label": i % 3 if i != 4 else "cinema"}
                                           for i, r in enumerate(example_rows())])
    mixed_json = write(tmp_path / "mixed.jsonl", [{"text": r["text"], "label": i % 3 if i != 4 else "cinema"}
                                                  for i, r in enumerate(example_rows())])
    floats = write(tmp_path / "floats.csv", [{"text": r["text"], "label": i / 4} for i, r in enumerate(example_rows())])
    (tmp_path / "empty.csv").write_text("text,label\n")
    empty = str(tmp_path / "empty.csv")
    return {
        "missing train file": ({"data_files": {"train": str(tmp_path / "nope.csv")}, "val_size": 0.1},
                               r"data file for split 'train' not found: '.*nope\.csv'.*data_files\.train"),
        "missing test file": ({"data_files": {"train": train, "test": str(tmp_path / "nope.csv")}, "val_size": 0.1},
                              r"split 'test' not found: '.*nope\.csv'"),
        "missing column": ({"data_files": {"train": train}, "text_column": "sentence", "val_size": 0.1},
                           r"train\.csv \(split 'train'\): no column 'sentence' \(text_column\); the columns are "
                           r"\['id', 'text', 'label'\]\. Set data\.init_args\.text_column"),
        "missing label column in validation": (
            {"data_files": {"train": train, "validation": write(tmp_path / "nolabel.csv", [{"text": "the day"}])}},
            r"nolabel\.csv \(split 'validation'\): no column 'label' \(label_column\); the columns are \['text'\]"),
        "empty train split": ({"data_files": {"train": empty}, "val_size": 0.1},
                              r"empty\.csv \(split 'train'\): the split is empty \(0 rows\)"),
        "empty validation split": ({"data_files": {"train": train, "validation": empty}},
                                   r"empty\.csv \(split 'validation'\): the split is empty"),
        "label unseen in validation": ({"data_files": {"train": train, "validation": unseen}},
                                       r"unseen\.csv \(split 'validation'\): label 'weather' at row 6 .* never "
                                       r"occurs in the training rows.*\['cinema', 'mood', 'traffic'\]"),
        "label unseen in test": ({"data_files": {"train": train, "test": unseen}, "val_size": 0.1},
                                 r"unseen\.csv \(split 'test'\): label 'weather' at row 6"),
        "mixed label types (csv)": ({"data_files": {"train": mixed}, "val_size": 0.1},
                                    r"mixed\.csv \(split 'train'\): column 'label' mixes label types: '0' at row 0 "
                                    r"is a number and 'cinema' at row 4 is a name.*label_names"),
        "mixed label types (jsonl)": ({"data_files": {"train": mixed_json}, "val_size": 0.1},
                                      r"mixed\.jsonl .*mixes label types: 0 at row 0 is a number and 'cinema' at "
                                      r"row 4 is a name"),
        "class too small to stratify": ({"data_files": {"train": rare}, "val_size": 0.1},
                                        r"rare\.csv: class 'weather' has 1 of the 61 training rows, too few to "
                                        r"stratify a validation split of 6 rows \(val_size=0\.1\).*at least 2"),
        "val_size leaves no training rows": ({"data_files": {"train": train}, "val_size": 60},
                                             r"val_size=60 carves 60 of the 60 training rows, which leaves no row "
                                             r"to train on; set data\.init_args\.val_size to fewer than 60"),
        "validation file and val_size": ({"data_files": {"train": train, "validation": train}, "val_size": 0.1},
                                         r"'validation' entry and val_size=0\.1 is set.*not both"),
        "no validation at all": ({"data_files": {"train": train}},
                                 r"no validation data.*data_files\.validation.*data\.init_args\.val_size"),
        "num_labels does not fit": ({"data_files": {"train": train}, "num_labels": 5, "val_size": 0.1},
                                    r"num_labels=5 does not fit the data: the training labels hold 3 classes "
                                    r"\['cinema', 'mood', 'traffic'\]\. Set data\.init_args\.num_labels to 3"),
        "label not in label_names": ({"data_files": {"train": train}, "label_names": ["cinema", "mood", "other"],
                                      "val_size": 0.1},
                                     r"label 'traffic' at row 1 .* is not one of label_names"),
        "float labels without regression": ({"data_files": {"train": floats}, "val_size": 0.1},
                                            r"label 0\.25 at row 1 .* is not a whole number.*num_labels to 1"),
        "regression on names": ({"data_files": {"train": train}, "num_labels": 1, "val_size": 0.1},
                                r"num_labels=1 means regression on numbers, but column 'label' holds text"),
    }


BAD = ["missing train file", "missing test file", "missing column", "missing label column in validation",
       "empty train split", "empty validation split",
       "label unseen in validation", "label unseen in test", "mixed label types (csv)", "mixed label types (jsonl)",
       "class too small to stratify", "val_size leaves no training rows", "validation file and val_size",
       "no validation at all", "num_labels does not fit", "label not in label_names",
       "float labels without regression", "regression on names"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_before_a_run_folder_exists(tmp_path, tiny_glue_root, case):
    cases = _bad_cases(tmp_path)
    assert sorted(cases) == sorted(BAD)
    data_args, pattern = cases[case]
    config = run_config(tmp_path, tiny_glue_root / "model", data_args)
    with pytest.raises(ValueError, match=pattern):
        build_cli(["fit", "--config", str(config)])
    assert no_run_folder(tmp_path)
