"""The life cycle of a run, through the real ``flexlora`` command (in-process): one folder per run, no silent
resume, ``--ckpt_path last`` picks the most trained state of the named run, ``metrics.json``, test scores and
predictions files, one seed, slim checkpoints, the reallocation config group.

The config below carries the callbacks the shipped configs carry (two ModelCheckpoints without ``dirpath``,
InterruptCheckpoint, the heat-map and the final report), so what is tested is what users run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_folder
from tiny_run import RUN_CHANGES

from flexlora_pl.cli import build_cli, main
from flexlora_pl.runs.run_folder import RunFolder, newest_trained_checkpoint

# 48 training rows in batches of 8: 6 optimizer steps per epoch, 12 in a run.


@pytest.fixture
def run_root(tmp_path, tiny_glue_root) -> Path:
    """A fresh folder with the tiny model and data (links) and ``run.yaml``; runs go to ``<it>/runs``."""
    return tiny_run_folder(tmp_path, tiny_glue_root, RUN_CHANGES)


def fit(root: Path, *extra: str):
    return build_cli(["fit", "--config", str(root / "run.yaml"), *extra])


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# --------------------------------------------------------------------------- run folders
def test_repeating_a_command_starts_a_new_run_from_scratch(run_root):
    first = fit(run_root)
    second = fit(run_root, "--model.init_args.method.init_args.alpha", "8")  # changed settings: the run uses them
    one, two = Path(first.trainer.log_dir), Path(second.trainer.log_dir)
    assert (one.name, two.name) == ("version_0", "version_1")
    assert second.trainer.global_step == 12  # trained from step 0, not resumed from the first run
    assert second.model.method.alpha == 8
    for folder in (one, two):  # everything a run writes is in its own folder
        names = {p.name for p in folder.iterdir()}
        assert {"config.yaml", "hparams.yaml", "rank_pattern.json", "metrics.json", "checkpoints"} <= names
        assert any(n.startswith("events.out.tfevents") for n in names)
        assert {"last.ckpt", "periodic-step=12.ckpt"} <= {p.name for p in (folder / "checkpoints").iterdir()}
    assert not (run_root / "runs" / "tiny" / "checkpoints").exists()


def test_name_and_version_choose_the_folder_and_an_existing_one_is_refused(run_root):
    cli = fit(run_root, "--name", "sweep_a", "--version", "seed3", "--trainer.max_epochs", "1")
    assert Path(cli.trainer.log_dir) == run_root / "runs" / "sweep_a" / "seed3"
    with pytest.raises(ValueError, match=r"already exists and holds files.*--ckpt_path last --version seed3"):
        fit(run_root, "--name", "sweep_a", "--version", "seed3")


def test_ckpt_path_last_resumes_the_most_trained_state_not_the_newest_file(run_root):
    fit(run_root, "--trainer.max_epochs", "1")  # version_0: 6 steps, periodic-step=4 and last (step 6)
    ckpts = run_root / "runs" / "tiny" / "version_0" / "checkpoints"
    # an interrupt checkpoint from an earlier, shorter attempt, written after last.ckpt
    shutil.copy(ckpts / "periodic-step=4.ckpt", ckpts / "on_exception.ckpt")
    os.utime(ckpts / "on_exception.ckpt", (time.time() + 60, time.time() + 60))
    path, step = newest_trained_checkpoint(RunFolder(str(run_root / "runs"), "tiny", "version_0"))
    assert (path.name, step) == ("last.ckpt", 6)

    resumed = fit(run_root, "--ckpt_path", "last")
    assert resumed.trainer.ckpt_path == str(ckpts / "last.ckpt")
    assert Path(resumed.trainer.log_dir).name == "version_0"  # continues in the run's own folder
    assert resumed.trainer.global_step == 12
    assert not (run_root / "runs" / "tiny" / "version_1").exists()
    assert (ckpts.parent / "config.fit-resume.yaml").exists() and (ckpts.parent / "config.yaml").exists()
    assert metrics(ckpts.parent)["fit"]["global_step"] == 12


def test_resume_is_refused_when_it_would_mix_configs_or_runs(run_root):
    first = fit(run_root, "--trainer.max_epochs", "1")
    with pytest.raises(ValueError, match=r"method\.init_args\.alpha=4\.0 in the checkpoint but "
                                         r"method\.init_args\.alpha=8\.0 in the config"):
        fit(run_root, "--ckpt_path", "last", "--model.init_args.method.init_args.alpha", "8")
    other = fit(run_root, "--name", "other", "--trainer.max_epochs", "1")
    with pytest.raises(ValueError, match=r"belongs to run .*other/version_0.*would mix two runs"):
        fit(run_root, "--ckpt_path", other.trainer.checkpoint_callback.last_model_path)
    with pytest.raises(ValueError, match=r"no run folder .*version_9; runs of 'tiny'.*\['version_0'\]"):
        fit(run_root, "--ckpt_path", "last", "--version", "9")
    with pytest.raises(ValueError, match="no run of 'nothing_here'.*holds a checkpoint"):
        fit(run_root, "--ckpt_path", "last", "--name", "nothing_here")
    assert Path(first.trainer.log_dir).name == "version_0"


def test_lightning_on_exception_checkpoint_and_a_second_reallocation_are_refused(run_root):
    config = (run_root / "run.yaml").read_text()
    (run_root / "a.yaml").write_text(config.replace(
        "    - class_path: flexlora_pl.InterruptCheckpoint\n",
        "    - class_path: lightning.pytorch.callbacks.OnExceptionCheckpoint\n      init_args: {dirpath: ckpt}\n"))
    with pytest.raises(ValueError, match="OnExceptionCheckpoint makes every `fit` silently resume"):
        build_cli(["fit", "--config", str(run_root / "a.yaml")])
    (run_root / "b.yaml").write_text(config.replace(
        "    - class_path: flexlora_pl.RankHeatmap\n",
        "    - class_path: flexlora_pl.RankReallocation\n    - class_path: flexlora_pl.RankHeatmap\n"))
    with pytest.raises(ValueError, match="Move its init_args under `reallocation:`"):
        build_cli(["fit", "--config", str(run_root / "b.yaml")])
    assert not (run_root / "runs").exists()


# --------------------------------------------------------------------------- failures keep what trained
def test_a_crash_after_training_began_keeps_the_logs_and_a_failed_start_leaves_nothing(run_root):
    config = (run_root / "run.yaml").read_text().replace(
        "    - class_path: flexlora_pl.FinalMetricsReport\n",
        "    - class_path: flexlora_pl.FinalMetricsReport\n    - class_path: run_helpers.CrashAt\n"
        "      init_args: {step: 5}\n")
    (run_root / "crash.yaml").write_text(config)
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        build_cli(["fit", "--config", str(run_root / "crash.yaml")])
    folder = run_root / "runs" / "tiny" / "version_0"
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "hparams.yaml", "metrics.json", "checkpoints"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert (folder / "checkpoints" / "on_exception.ckpt").exists()
    record = metrics(folder)["fit"]
    assert record["status"] == "failed" and record["global_step"] == 5 and "simulated crash" in record["error"]

    # a run that fails before its first step (here: a schedule that can never fire) writes nothing at all
    with pytest.raises(ValueError, match="will never fire"):
        fit(run_root, "--reallocation.t_warmup", "100")
    assert sorted(p.name for p in (run_root / "runs" / "tiny").iterdir()) == ["version_0"]


# --------------------------------------------------------------------------- test, validate, predict
def test_test_scores_the_fitted_run_and_predict_writes_a_glue_file(run_root, capsys):
    fitted = fit(run_root)
    folder = Path(fitted.trainer.log_dir)
    best = metrics(folder)["fit"]["best"]
    assert best["monitor"] == "val/score" and best["checkpoint"].startswith("checkpoints/best-")
    assert best["step"] in [entry["step"] for entry in metrics(folder)["fit"]["history"]]

    tested = build_cli(["test", "--config", str(run_root / "run.yaml"), "--ckpt_path", "best"])
    assert Path(tested.trainer.log_dir) == folder  # evaluations go into the run they evaluate
    section = metrics(folder)["test"]
    assert section["status"] == "finished" and section["ckpt_path"] == best["checkpoint"]
    assert {"test/accuracy", "test/f1", "test/loss", "test/score"} == set(section["metrics"])
    assert section["checkpoint_step"] == best["step"]
    assert "fit" in metrics(folder)  # the fit's section is kept
    assert (folder / "config.test.yaml").exists()

    build_cli(["validate", "--config", str(run_root / "run.yaml"), "--ckpt_path", "last"])
    assert {"val/accuracy", "val/f1", "val/score"} <= set(metrics(folder)["validate"]["metrics"])

    build_cli(["predict", "--config", str(run_root / "run.yaml"), "--ckpt_path", "last"])
    lines = (folder / "predictions" / "MRPC.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 17  # the 16 rows of the test file
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(16)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


def test_test_refuses_withheld_labels_and_points_to_predict(run_root):
    rows = (run_root / "dev.csv").read_text().splitlines()
    (run_root / "hidden.csv").write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + ",-1" for r in rows[1:]]) + "\n")
    files = f"{{train: {run_root}/train.csv, validation: {run_root}/dev.csv, test: {run_root}/hidden.csv}}"
    fitted = fit(run_root, "--trainer.max_epochs", "1")
    with pytest.raises(ValueError, match="test split has no labels.*flexlora predict"):
        build_cli(["test", "--config", str(run_root / "run.yaml"), "--ckpt_path", "last",
                   "--data.init_args.data_files", files])
    assert "test" not in metrics(Path(fitted.trainer.log_dir))


def test_evaluating_without_a_checkpoint_warns_loudly(run_root):
    with pytest.warns(UserWarning, match="without --ckpt_path evaluates the model as built from the config"):
        build_cli(["validate", "--config", str(run_root / "run.yaml")])


def test_mnli_predictions_use_label_names_and_jsonl_elsewhere(tmp_path):
    from flexlora_pl.callbacks.prediction_writer import PredictionWriter

    path = PredictionWriter._write_glue(tmp_path, "mnli", [0.0, 2.0, 1.0], ["entailment", "neutral", "contradiction"])
    assert path.name == "MNLI-m.tsv"
    assert path.read_text().splitlines() == ["index\tprediction", "0\tentailment", "1\tcontradiction", "2\tneutral"]
    path = PredictionWriter._write_glue(tmp_path, "stsb", [-0.2, 2.5, 7.0], None)
    assert path.read_text().splitlines()[1:] == ["0\t0.000", "1\t2.500", "2\t5.000"]
    path = PredictionWriter._write_jsonl(tmp_path / "p.jsonl", [1.0, 0.0], ["neg", "pos"])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"index": 0, "prediction": 1, "label": "pos"}, {"index": 1, "prediction": 0, "label": "neg"}]


# --------------------------------------------------------------------------- metrics.json
def test_metrics_json_records_scores_settings_and_costs(run_root):
    cli = fit(run_root)
    record = metrics(Path(cli.trainer.log_dir))
    run, params, fitted = record["run"], record["parameters"], record["fit"]
    assert run["seed"] == 7 and run["method"] == "flexlora" and run["version"] == 0 and run["name"] == "tiny"
    assert len(run["config_hash"]) == 16 and run["versions"]["torch"] == torch.__version__.split("+")[0]
    assert "git_commit" in run
    counts = cli.model.parameter_counts()
    assert params["active"] == counts["active"] and params["allocated"] == counts["allocated"]
    assert params["trainable"] == sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    assert fitted["status"] == "finished" and fitted["global_step"] == 12
    assert fitted["wall_time_s"] > 0 and fitted["peak_memory_mb"] > 0
    assert fitted["final"]["step"] == 12 and "val/score" in fitted["final"]
    assert fitted["final"]["val/score"] == pytest.approx(float(cli.trainer.callback_metrics["val/score"]))

    # the hash ignores the seed and follows settings that change the result
    same = fit(run_root, "--seed_everything", "8", "--trainer.max_epochs", "2")
    other = fit(run_root, "--model.init_args.optimizer.init_args.lr", "0.02")
    assert metrics(Path(same.trainer.log_dir))["run"]["config_hash"] == run["config_hash"]
    assert metrics(Path(other.trainer.log_dir))["run"]["config_hash"] != run["config_hash"]


# --------------------------------------------------------------------------- one seed
def test_seed_everything_alone_changes_data_order_adapter_init_and_event_draws(run_root):
    a = build_cli(["--config", str(run_root / "run.yaml"), "--seed_everything", "1"], run=False)
    b = build_cli(["--config", str(run_root / "run.yaml"), "--seed_everything", "2"], run=False)
    realloc = lambda cli: next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RankReallocation")  # noqa: E731
    assert (a.datamodule.seed, b.datamodule.seed) == (1, 2)
    assert (realloc(a).seed, realloc(b).seed) == (1, 2)
    p_a = next(layer for _, layer in a.model.flexlora_layers()).lora_P
    p_b = next(layer for _, layer in b.model.flexlora_layers()).lora_P
    assert not torch.equal(p_a, p_b)
    # the specific knobs stay overrides
    c = build_cli(["--config", str(run_root / "run.yaml"), "--seed_everything", "1",
                   "--data.init_args.seed", "5", "--reallocation.seed", "6"], run=False)
    assert (c.datamodule.seed, realloc(c).seed) == (5, 6)


# --------------------------------------------------------------------------- slim checkpoints
def test_checkpoints_hold_what_training_changes_and_refuse_another_base(run_root, tiny_tokenizer_dir):
    cli = fit(run_root, "--trainer.max_epochs", "1")
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    model = cli.model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(ckpt["state_dict"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= set(ckpt["state_dict"])
    assert any(n.endswith("rank_mask") for n in ckpt["state_dict"])
    assert ckpt["flexlora_base"]["frozen_tensors"] == len(frozen)
    assert ckpt["flexlora_base"]["source"] == str(run_root / "model")

    # the checkpoint restores the trained module exactly (frozen weights rebuilt from the base)
    validate = build_cli(["validate", "--config", str(run_root / "run.yaml"), "--ckpt_path", "last"])
    restored, trained = validate.model.state_dict(), model.state_dict()
    assert restored.keys() == trained.keys()
    for name, value in trained.items():
        if torch.is_tensor(value):
            assert torch.equal(restored[name], value), name

    # another base under the same path is refused by its fingerprint
    from transformers import BertConfig, BertForSequenceClassification

    other = run_root / "other_model"
    torch.manual_seed(123)
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=48, max_position_embeddings=512)).save_pretrained(other)
    (run_root / "model").unlink()
    (run_root / "model").symlink_to(other)
    with pytest.raises(ValueError, match="trained on another base model"):
        build_cli(["validate", "--config", str(run_root / "run.yaml"), "--ckpt_path", "last"])


# --------------------------------------------------------------------------- reallocation group
def test_every_reallocation_option_is_a_flag(run_root, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(run_root / "run.yaml"), "--help"])
    help_text = capsys.readouterr().out
    for option in ("b0", "t_warmup", "t_final", "delta_t", "importance", "mode", "init", "r_min", "b_schedule",
                   "seed", "allow_no_events"):
        assert f"--reallocation.{option}" in help_text, option
    cli = build_cli(["--config", str(run_root / "run.yaml"), "--reallocation.t_warmup", "3",
                     "--reallocation.importance", "nuclear"], run=False)
    realloc = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RankReallocation"]
    assert len(realloc) == 1 and (realloc[0].t_warmup, realloc[0].importance) == (3, "nuclear")


def test_max_seq_length_beyond_the_backbones_positions_is_refused(run_root):
    with pytest.raises(ValueError, match=r"max_seq_length=600 exceeds the backbone's max_position_embeddings=512"):
        fit(run_root, "--data.init_args.max_seq_length", "600")
    assert not (run_root / "runs").exists()
