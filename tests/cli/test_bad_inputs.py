"""The bad-input catalogue: every entry drives the real ``flexlora`` entry point with one mistake in the config,
the command line, the data files or the checkpoint, and checks three things:

1. the error type (``SystemExit`` from the argument parser, whose message goes to stderr, or an exception);
2. the message names the problem (the key, file or value) and says how to fix it;
3. nothing half-written is left behind: the run's output root (logger ``save_dir`` and ``default_root_dir``)
   holds no file and no ``version_*`` run folder, and the checkpoint handed to ``--ckpt_path`` is unchanged.

``docs/reliability.md`` keeps the same catalogue as a table; a test below keeps the two in step.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_run import DROP, tiny_run_config

from flexlora_pl.cli import main

DOCS = Path(__file__).parents[2] / "docs" / "reliability.md"


def _changes(out: Path, model: Path) -> dict:
    """What these runs change in the tiny run (tests/helpers/tiny_run.yaml): the shipped configs' callbacks (a
    failed start must not make any of them write), the library's default optimizer and logging cadence, a model
    folder of its own and outputs straight under ``out``."""
    return {
        "trainer": {"log_every_n_steps": DROP, "default_root_dir": str(out),
                    "logger": {"init_args": {"save_dir": str(out)}},
                    "callbacks": [
                        {"class_path": "flexlora_pl.RankHeatmap"},
                        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"monitor": "val/score", "mode": "max", "filename": "best-{epoch}-{step}",
                                       "save_last": True}},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"every_n_train_steps": 2, "filename": "periodic-{step}"}},
                        {"class_path": "flexlora_pl.InterruptCheckpoint"},
                        {"class_path": "flexlora_pl.FinalMetricsReport"}]},
        "model": {"init_args": {"model_name_or_path": str(model), "optimizer": DROP}},
        "data": {"init_args": {"max_seq_length": 32}},
    }


# 48 training rows in batches of 8: one epoch is 6 optimizer steps.

WORDS = ["the movie is good", "a bad film", "i love this story", "they hate the plot", "we see a city"]
HEADER = "sentence1,sentence2,label"

# name -> content of the data files in the shared folder (good ones first)
DATA_FILES = {
    "train.csv": "\n".join([HEADER] + [f"{WORDS[i % 5]},{WORDS[i * 3 % 5]},{int(i % 5 == i * 3 % 5)}"
                                       for i in range(48)]) + "\n",
    "dev.csv": "\n".join([HEADER] + [f"{WORDS[i % 5]},{WORDS[i * 3 % 5]},{int(i % 5 == i * 3 % 5)}"
                                     for i in range(16)]) + "\n",
    "no_sentence2.csv": "sentence1,label\nthe movie is good,1\na bad film,0\n",
    "label_2.csv": f"{HEADER}\nthe movie,a film,1\na bad film,the plot,2\n",
    "label_words.csv": f"{HEADER}\nthe movie,a film,yes\na bad film,the plot,no\n",
    "zero_bytes.csv": "",
    "header_only.csv": f"{HEADER}\n",
    "empty_cell.csv": f"{HEADER}\nthe movie,a film,1\na bad film,,0\n",
    "train.txt": f"{HEADER}\nthe movie,a film,1\n",
    "broken.yaml": "model:\n  init_args: {init_rank: 2\n",  # the flow mapping is never closed
    "hidden.csv": "\n".join([HEADER] + [f"{WORDS[i % 5]},{WORDS[i * 3 % 5]},-1" for i in range(8)]) + "\n",
}
# name -> bytes: files in another encoding than UTF-8
BINARY_FILES = {"latin1.csv": f"{HEADER}\nthe café,a film,1\na bad film,the plot,0\n".encode("latin-1")}


@dataclass(frozen=True)
class Shared:
    """Read-only inputs shared by every case: backbones, data files and one real checkpoint."""

    root: Path  # holds bert32/ and bert48/ (backbones, hidden size 32 and 48), the data files and checkpoints
    ckpt: Path  # a real checkpoint: one epoch of the base config on bert32
    ckpt_sha: str


def _save_backbone(folder: Path, hidden: int, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


def _write_config(path: Path, out: Path, model: Path, data: Path) -> Path:
    path.write_text(tiny_run_config(data, out, _changes(out, model)))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_tokenizer_dir) -> Shared:
    root = tmp_path_factory.mktemp("bad_inputs")
    _save_backbone(root / "bert32", 32, tiny_tokenizer_dir)
    _save_backbone(root / "bert48", 48, tiny_tokenizer_dir)
    for name, text in DATA_FILES.items():
        (root / name).write_text(text)
    for name, blob in BINARY_FILES.items():
        (root / name).write_bytes(blob)
    (root / "no_config_json").mkdir()

    # One real training run (6 optimizer steps) gives the checkpoint that the checkpoint cases start from.
    first = root / "first_run"
    main(["fit", "--config", str(_write_config(root / "first.yaml", first, root / "bert32", root))])
    shutil.copy(next(first.rglob("last.ckpt")), root / "good.ckpt")
    blob = (root / "good.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(blob[:100])
    (root / "random_bytes.ckpt").write_bytes(random.Random(0).randbytes(4096))
    (root / "zero_bytes.ckpt").write_bytes(b"")

    # The backbone folder a checkpoint was trained from, later overwritten by another model: the checkpoint
    # still names the folder, the folder now holds hidden size 48.
    shutil.copytree(root / "bert48", root / "swapped_backbone")
    state = torch.load(root / "good.ckpt", map_location="cpu", weights_only=False)
    state["hyper_parameters"]["model_name_or_path"] = str(root / "swapped_backbone")
    torch.save(state, root / "swapped_backbone.ckpt")
    return Shared(root, root / "good.ckpt", _sha256(root / "good.ckpt"))


@dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        argv: the command line; ``{config}`` is the base config, ``{data}`` the shared folder (data files,
            backbones and checkpoints), ``{tmp}`` this case's own folder.
        error: the exception type(s) expected.
        expect: regular expressions that must all occur in the message (the exception's text, or stderr
            for ``SystemExit``): what the problem is, and how to fix it.
        edit: ``(old, new)``: a text edit of the base config, for mistakes in the YAML itself.
        model: the backbone folder named in the base config (a name inside the shared folder).
    """

    argv: tuple[str, ...]
    error: type[BaseException] | tuple[type[BaseException], ...]
    expect: tuple[str, ...]
    edit: tuple[str, str] | None = None
    model: str = "bert32"


def fit(*extra: str) -> tuple[str, ...]:
    return ("fit", "--config", "{config}", *extra)


def files(train: str, validation: str = "dev.csv") -> tuple[str, str]:
    """``--data.init_args.data_files {train: {data}/<train>, validation: {data}/<validation>}`` (braces doubled
    here, as the case's arguments go through ``str.format``)."""
    return "--data.init_args.data_files", f"{{{{train: {{data}}/{train}, validation: {{data}}/{validation}}}}}"


CB = "--reallocation."
MODEL = "--model.init_args."
METHOD = "--model.init_args.method.init_args."

CASES = {
    # ------------------------------------------------------------------ command line and config file
    "cli-unknown-subcommand": Case(("fitt", "--config", "{config}"), SystemExit,
                                   (r"invalid choice: 'fitt'", r"choose from 'fit'")),
    "cli-config-file-missing": Case(("fit", "--config", "{tmp}/no_such.yaml"), SystemExit,
                                    (r"File does not exist", r"no_such\.yaml")),
    "cli-config-malformed-yaml": Case(fit("--config", "{data}/broken.yaml"), SystemExit,
                                      (r"Problems parsing config", r"line \d+")),
    "config-unknown-key": Case(fit(), SystemExit, (r"init_rnk", r"not accepted", r"--help"),
                               edit=("    init_rank: 2", "    init_rnk: 2")),
    "config-unknown-trainer-key": Case(fit(), SystemExit, (r"does not accept option 'trainer\.max_epoch'",),
                                       edit=("  max_epochs: 1", "  max_epoch: 1")),
    "config-wrong-type": Case(fit(), SystemExit, (r'key "init_rank"', r"Expected a <class 'int'>", r"two"),
                              edit=("    init_rank: 2", "    init_rank: two")),
    "config-lightning-on-exception-checkpoint": Case(
        fit(), ValueError,
        (r"OnExceptionCheckpoint makes every `fit` silently resume", r"flexlora_pl\.InterruptCheckpoint"),
        edit=("    - class_path: flexlora_pl.InterruptCheckpoint",
              "    - class_path: lightning.pytorch.callbacks.OnExceptionCheckpoint\n      init_args: {dirpath: ckpt}")),
    "config-reallocation-in-trainer-callbacks": Case(
        fit(), ValueError, (r"RankReallocation is configured in trainer\.callbacks", r"under `reallocation:`"),
        edit=("    - class_path: flexlora_pl.RankHeatmap",
              "    - class_path: flexlora_pl.RankReallocation\n    - class_path: flexlora_pl.RankHeatmap")),
    "config-unknown-class-path": Case(fit(), SystemExit, (r"flexlora_pl\.FlexLoRASequenceClassifer",
                                                          r"has no attribute 'FlexLoRASequenceClassifer'"),
                                      edit=("FlexLoRASequenceClassifier", "FlexLoRASequenceClassifer")),
    # ------------------------------------------------------------------ RankReallocation settings
    "config-unknown-importance": Case(fit(CB + "importance", "entropyy"), ValueError,
                                      (r"importance='entropyy' is not one of", r"'entropy'")),
    "config-unknown-mode": Case(fit(CB + "mode", "grow"), ValueError,
                                (r"mode='grow' is not one of", r"'prune_and_expand'")),
    "config-unknown-init": Case(fit(CB + "init", "gaussian"), ValueError,
                                (r"init='gaussian' is not one of", r"'zero_impact'")),
    "config-b0-negative": Case(fit(CB + "b0", "-1"), ValueError, (r"b0 must be an integer >= 0, got -1",)),
    "config-delta-t-zero": Case(fit(CB + "delta_t", "0"), ValueError, (r"delta_t must be an integer >= 1, got 0",)),
    "schedule-never-fires": Case(fit(CB + "t_warmup", "4", CB + "t_final", "2"), ValueError,
                                 (r"t_warmup\W+4", r"t_final\W+2", r"\b6\b[^.]*steps|total_steps\W+6",
                                  r"[Ll]ower t_warmup|train longer")),
    "config-r-min-freezes-every-rank": Case(fit(CB + "r_min", "2"), ValueError,
                                            (r"r_min=2 is not below the rank of any FlexLoRA layer",
                                             r"plain LoRA", r"Lower r_min to 1 or less")),
    # ------------------------------------------------------------------ model settings
    "config-max-rank-below-init-rank": Case(fit(METHOD + "max_rank", "1"), ValueError,
                                            (r"max_rank \(1\) must be >= init_rank \(2\)",)),
    "config-max-rank-above-layer-width": Case(fit(METHOD + "max_rank", "40"), ValueError,
                                              (r"max_rank=40 is more than layer '.*query' can use",
                                               r"Set max_rank <= 32")),
    "config-alpha-not-positive": Case(fit(METHOD + "alpha", "0"), ValueError, (r"alpha must be positive, got 0",)),
    "config-dropout-out-of-range": Case(fit(METHOD + "dropout", "1.0"), ValueError,
                                        (r"dropout must be in \[0, 1\), got 1\.0",)),
    "config-target-matches-nothing": Case(fit(METHOD + "target_modules", "[qkv]"), ValueError,
                                          (r"target_modules \['qkv'\] match no nn\.Linear",
                                           r"Linear layers look like: .*attention\.self\.query")),
    "config-target-is-a-container": Case(fit(METHOD + "target_modules", "[attention]"), ValueError,
                                         (r"a BertAttention, not an nn\.Linear", r"name its linear sub-layers")),
    "config-target-bad-regex": Case(fit(METHOD + "target_modules", "[re:(]"), ValueError,
                                    (r"target 're:\(' is not a valid regular expression",)),
    "config-modules-to-save-matches-nothing": Case(fit(MODEL + "modules_to_save", "[head]"), ValueError,
                                                   (r"modules_to_save entry 'head' matches no module",
                                                    r"top-level modules are: .*'classifier'")),
    "config-model-folder-missing": Case(fit(MODEL + "model_name_or_path", "{tmp}/no_such_model"), ValueError,
                                        (r"no_such_model' is not an existing folder", r"config\.json")),
    "config-model-folder-without-config": Case(fit(MODEL + "model_name_or_path", "{data}/no_config_json"),
                                               ValueError, (r"no_config_json' is a folder without config\.json",
                                                            r"save_pretrained")),
    # ------------------------------------------------------------------ data settings
    "config-unknown-glue-task": Case(fit("--data.init_args.task_name", "mrcp"), ValueError,
                                     (r"unknown GLUE task 'mrcp'", r"valid task names: .*mrpc")),
    "config-data-files-unknown-key": Case(fit("--data.init_args.data_files",
                                              "{{train: {data}/train.csv, dev: {data}/dev.csv}}"), ValueError,
                                          (r"data_files has unknown key\(s\) \['dev'\]",
                                           r"valid keys: \['train', 'validation', 'test'\]")),
    "config-data-files-missing-split": Case(fit("--data.init_args.data_files", "{{train: {data}/train.csv}}"),
                                            ValueError, (r"data_files has no 'validation' entry",
                                                         r"pass e\.g\. data_files=")),
    "config-max-seq-length-above-positions": Case(fit("--data.init_args.max_seq_length", "100"), ValueError,
                                                  (r"max_seq_length=100 exceeds the backbone's "
                                                   r"max_position_embeddings=64", r"max_seq_length <= 64")),
    "config-unknown-encoding": Case(fit("--data.init_args.encoding", "utf-9"), ValueError,
                                    (r"encoding='utf-9' is not a known text encoding",)),
    "config-batch-size-zero": Case(fit("--data.init_args.batch_size", "0"), ValueError,
                                   (r"batch_size must be >= 1, got 0",)),
    # ------------------------------------------------------------------ data files
    "data-file-missing": Case(fit(*files("no_such.csv")), FileNotFoundError,
                              (r"data file for split 'train' not found: '.*no_such\.csv'", r"check the path")),
    "data-file-wrong-extension": Case(fit(*files("train.txt")), ValueError,
                                      (r"train\.txt'\]: unsupported file extension\(s\) \['\.txt'\]",
                                       r"use one of \['\.csv'")),
    "data-column-missing": Case(fit(*files("no_sentence2.csv")), ValueError,
                                (r"no_sentence2\.csv \(split 'train'\): missing column\(s\) \['sentence2'\]",
                                 r"Rename the columns")),
    "data-label-out-of-range": Case(fit(*files("train.csv", "label_2.csv")), ValueError,
                                    (r"label_2\.csv \(split 'validation'\): label 2 at row 1",
                                     r"valid labels are the integers 0\.\.1")),
    "data-label-not-numeric": Case(fit(*files("label_words.csv")), ValueError,
                                   (r"label_words\.csv \(split 'train'\): column 'label' must hold numbers",
                                    r"'yes'", r"write the labels as integer ids")),
    "data-file-zero-bytes": Case(fit(*files("zero_bytes.csv")), ValueError,
                                 (r"zero_bytes\.csv \(split 'train'\): the split is empty",
                                  r"point it at a file with data")),
    "data-file-header-only": Case(fit(*files("header_only.csv")), ValueError,
                                  (r"header_only\.csv \(split 'train'\): the split is empty",)),
    "data-text-cell-empty": Case(fit(*files("empty_cell.csv")), ValueError,
                                 (r"empty_cell\.csv \(split 'train'\): column 'sentence2' is empty at row 1",
                                  r"fill in or drop")),
    "data-file-wrong-encoding": Case(fit(*files("latin1.csv")), ValueError,
                                     (r"latin1\.csv' for split 'train' is not valid utf-8 text", r"byte\(s\) e9",
                                      r"line 2", r"encoding")),
    "test-labels-withheld": Case(("test", "--config", "{config}", "--ckpt_path", "{data}/good.ckpt",
                                  "--data.init_args.data_files",
                                  "{{train: {data}/train.csv, validation: {data}/dev.csv, test: {data}/hidden.csv}}"),
                                 ValueError, (r"test split has no labels", r"flexlora predict")),
    # ------------------------------------------------------------------ checkpoints (--ckpt_path)
    "ckpt-last-without-a-run": Case(fit("--ckpt_path", "last"), ValueError,
                                    (r"no run of 'tiny' under .* holds a checkpoint", r"without --ckpt_path")),
    "ckpt-missing": Case(fit("--ckpt_path", "{tmp}/no_such.ckpt"), FileNotFoundError,
                         (r"no_such\.ckpt", r"not found|does not exist")),
    "ckpt-is-a-directory": Case(fit("--ckpt_path", "{data}"), (IsADirectoryError, ValueError),
                                (r"[Ii]s a directory",)),
    "ckpt-zero-bytes": Case(fit("--ckpt_path", "{data}/zero_bytes.ckpt"), ValueError,
                            (r"zero_bytes\.ckpt", r"empty|truncated|corrupt")),
    "ckpt-truncated": Case(fit("--ckpt_path", "{data}/truncated.ckpt"), ValueError,
                           (r"truncated\.ckpt", r"truncated|corrupt")),
    "ckpt-random-bytes": Case(fit("--ckpt_path", "{data}/random_bytes.ckpt"), ValueError,
                              (r"random_bytes\.ckpt", r"corrupt|not a (PyTorch|Lightning) checkpoint")),
    "ckpt-other-backbone": Case(fit("--ckpt_path", "{data}/good.ckpt"), ValueError,
                                (r"model_name_or_path", r"bert32", r"bert48"), model="bert48"),
    "ckpt-backbone-folder-changed": Case(fit("--ckpt_path", "{data}/swapped_backbone.ckpt"), ValueError,
                                         (r"trained on another base model", r"swapped_backbone",
                                          r"--base-model"), model="swapped_backbone"),
    "ckpt-other-max-rank": Case(fit("--ckpt_path", "{data}/good.ckpt", METHOD + "max_rank", "6"), ValueError,
                                (r"max_rank", r"\b4\b", r"\b6\b")),
    "ckpt-other-target-modules": Case(fit("--ckpt_path", "{data}/good.ckpt", METHOD + "target_modules",
                                          "[query,key,value]"), ValueError, (r"target_modules", r"\bkey\b")),
}


def leftovers(out: Path) -> list[str]:
    """What a failed run left in its output root: any file, and any run folder (``version_*``).

    Empty plain folders (a logger's ``name`` folder, say) do not count: they hold nothing to mistake for a run.
    """
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.name.startswith("version_"))


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, shared, tmp_path, capsys):
    case = CASES[case_id]
    out = tmp_path / "runs"
    config = _write_config(tmp_path / "run.yaml", out, shared.root / case.model, shared.root)
    if case.edit is not None:
        old, new = case.edit
        assert old in config.read_text()
        config.write_text(config.read_text().replace(old, new, 1))
    argv = [arg.format(config=config, data=shared.root, tmp=tmp_path) for arg in case.argv]

    with pytest.raises(case.error) as info:
        main(argv)

    message = capsys.readouterr().err if info.type is SystemExit else str(info.value)
    # Paths carry digits and words of their own: match against the message with the two roots blanked out.
    message = message.replace(str(shared.root), "<data>").replace(str(tmp_path), "<tmp>")
    if info.type is SystemExit:
        assert info.value.code != 0
    missing = [pattern for pattern in case.expect if not re.search(pattern, message)]
    assert not missing, f"the message does not match {missing}:\n{message}"
    assert leftovers(out) == [], f"half-written output left behind by a failed run: {leftovers(out)}"
    assert _sha256(shared.ckpt) == shared.ckpt_sha, "the checkpoint given to --ckpt_path was modified"


def test_docs_table_lists_every_case():
    documented = set(re.findall(r"`test_bad_input\[([\w-]+)\]`", DOCS.read_text()))
    assert documented == set(CASES), (f"undocumented: {sorted(set(CASES) - documented)}; "
                                      f"no such case: {sorted(documented - set(CASES))}")
