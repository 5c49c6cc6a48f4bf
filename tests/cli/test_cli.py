"""The ``flexlora`` CLI: every shipped config parses, GLUE configs match the paper's parameter counts, and
an end-to-end ``flexlora fit`` on a tiny backbone fires events and leaves rank scalars, the heat-map image
and the rank pattern behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_glue_run
from lightning.pytorch.callbacks import ProgressBar
from shapes import DEBERTA_V3_BASE
from tiny_run import DROP, tiny_run_config

from flexlora_pl.cli import build_cli, main
from flexlora_pl.core.inject import match_target

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
GLUE_CONFIGS = [c for c in CONFIGS if c.name.startswith("glue_")]


def test_all_eight_glue_tasks_and_the_demo_ship_a_config():
    assert {c.stem for c in GLUE_CONFIGS} == {f"glue_{t}" for t in
                                              ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")}
    assert any(c.name == "demo.yaml" for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_with_the_real_cli(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "seed_everything" in printed and printed["seed_everything"] is not None
    callbacks = [cb["class_path"] for cb in printed["trainer"]["callbacks"]]
    assert "flexlora_pl.RankReallocation" not in callbacks  # it has its own group, so it never runs twice
    assert printed["reallocation"]["b0"] == 4 and printed["reallocation"]["t_warmup"] >= 1
    assert "flexlora_pl.RankHeatmap" in callbacks
    assert "flexlora_pl.InterruptCheckpoint" in callbacks
    assert "lightning.pytorch.callbacks.OnExceptionCheckpoint" not in callbacks  # it makes every fit resume
    for callback in printed["trainer"]["callbacks"]:  # checkpoints go into the run folder, never a shared one
        assert (callback.get("init_args") or {}).get("dirpath") is None, callback




@pytest.mark.parametrize("config", GLUE_CONFIGS, ids=[c.name for c in GLUE_CONFIGS])
def test_glue_config_adapter_counts_match_the_paper(config):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    model_args = yaml.safe_load(config.read_text())["model"]["init_args"]["method"]["init_args"]
    assert yaml.safe_load(config.read_text())["model"]["init_args"]["model_name_or_path"] == "microsoft/deberta-v3-base"
    with torch.device("meta"):  # the real architecture, no weights, no download
        model = DebertaV2ForSequenceClassification(DebertaV2Config(**DEBERTA_V3_BASE))
    matched = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and match_target(n, model_args["target_modules"])]
    per_rank = sum(m.in_features + m.out_features for m in matched)
    assert len(matched) == 72
    assert model_args["init_rank"] * per_rank == pytest.approx(1.33e6, rel=0.01)  # paper: LoRA r=8, 1.3M
    assert 1.9e6 <= model_args["max_rank"] * per_rank <= 2.0e6  # paper: FlexLoRA / AdaLoRA 1.9M
    assert model_args["alpha"] == 16


# What this file's runs change in the tiny run (tests/helpers/tiny_run.yaml): three epochs, events every 3 steps
# at budget 2, one more target module, a learning-rate schedule and its monitor.
TINY_CHANGES = {
    "trainer": {"max_epochs": 3, "enable_model_summary": DROP,
                "callbacks": [{"class_path": "flexlora_pl.RankHeatmap"},
                              {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                               "init_args": {"logging_interval": "step"}}]},
    "reallocation": {"b0": 2, "t_warmup": 3, "t_final": 3, "delta_t": 3},
    "model": {"init_args": {"method": {"init_args": {"target_modules": ["query", "value", "attention.output.dense"]}},
                            "lr_scheduler": {"class_path": "flexlora_pl.LinearWarmupDecay"}}},
}


@pytest.fixture
def tiny_run_dir(tmp_path, tiny_tokenizer_dir):
    make_tiny_glue_run(tmp_path, tiny_tokenizer_dir)
    (tmp_path / "tiny.yaml").write_text(tiny_run_config(tmp_path, tmp_path, TINY_CHANGES))
    return tmp_path


def test_fit_end_to_end_fires_events_and_writes_tensorboard(tiny_run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = build_cli(["fit", "--config", str(tiny_run_dir / "tiny.yaml")])
    assert cli.model.num_labels == 2 and cli.model.task == "mrpc"  # linked from the data module
    assert cli.model.modules_to_save == ["classifier"]  # the head trains even though the checkpoint had one
    log_dir = Path(cli.trainer.log_dir)
    pattern = json.loads((log_dir / "rank_pattern.json").read_text())
    steps = [event["step"] for event in pattern["events"]]
    assert steps == [6, 9, 12]  # 3 epochs × 6 steps: t_warmup 3 < t < 18 − 3, every 3
    assert sum(pattern["rank_pattern"].values()) == 2 * 6  # 6 layers at r=2, total conserved
    assert pattern["rank_pattern"] != {k: 2 for k in pattern["rank_pattern"]}, "ranks never moved"
    assert (log_dir / "config.yaml").exists()

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    rank_tags = [t for t in scalars if t.startswith("flexlora_rank/")]
    assert len(rank_tags) == 6 and any(t.startswith("flexlora_importance/") for t in scalars)
    assert [e.step for e in events.Scalars("flexlora/budget")] == steps
    assert [e.value for e in events.Scalars("flexlora/total_rank")] == [12.0] * 3
    assert "train/orth_reg" in scalars and "val/f1" in scalars and "val/score" in scalars
    assert any(t.startswith("lr-") for t in scalars)
    images = events.Images("flexlora/rank_heatmap")
    assert images and images[-1].width > 300 and images[-1].height > 300  # a labelled figure, not 3×6 raw cells


def test_bad_config_values_name_the_key(tiny_run_dir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tiny_run_dir / "tiny.yaml"),
              "--model.init_args.method.init_args.init_rank", "two"])
    assert "init_rank" in capsys.readouterr().err


def test_console_script_exits_zero_on_success(tiny_run_dir):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flexlora_pl.cli", "fit", "--config", str(tiny_run_dir / "tiny.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FlexLoRACLI object" not in done.stdout


def test_validate_and_predict_run_from_a_fit_checkpoint(tiny_run_dir):
    fit = build_cli(["fit", "--config", str(tiny_run_dir / "tiny.yaml"), "--trainer.max_epochs", "3"])
    ckpt = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    assert ckpt and Path(ckpt).exists()
    validate = build_cli(["validate", "--config", str(tiny_run_dir / "tiny.yaml"), "--ckpt_path", ckpt])
    assert {"val/accuracy", "val/f1", "val/score"} <= set(validate.trainer.callback_metrics)
    # the fit checkpoint's ranks were restored, not the initial ones
    restored = [layer.rank for _, layer in validate.model.flexlora_layers()]
    assert restored == [layer.rank for _, layer in fit.model.flexlora_layers()]
    assert restored != [2] * len(restored)

    files = f"{{train: {tiny_run_dir}/train.csv, validation: {tiny_run_dir}/dev.csv, test: {tiny_run_dir}/dev.csv}}"
    predict = build_cli(["predict", "--config", str(tiny_run_dir / "tiny.yaml"), "--ckpt_path", ckpt,
                         "--data.init_args.data_files", files, "--return_predictions", "true"])
    predictions = torch.cat(predict.trainer.predict_loop.predictions)
    assert predictions.shape == (16,) and set(predictions.tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("task", "header", "label", "files", "expected"),
    [
        ("mnli", "premise,hypothesis,label", lambda i: i % 3,
         "{{train: {root}/t.csv, validation_matched: {root}/d.csv, validation_mismatched: {root}/d.csv}}",
         {"val_matched/accuracy", "val_mismatched/accuracy", "val/score"}),
        ("stsb", "sentence1,sentence2,label", lambda i: (i % 11) / 2,
         "{{train: {root}/t.csv, validation: {root}/d.csv}}", {"val/pearson", "val/spearman", "val/score"}),
    ],
    ids=["mnli-two-dev-sets", "stsb-regression"],
)
def test_fit_links_the_task_layout_into_the_model(tiny_run_dir, task, header, label, files, expected):
    words = ["the movie is good", "a bad film", "i love this story", "they hate the plot", "we see a city"]
    for name, n in (("t.csv", 48), ("d.csv", 12)):
        rows = [header] + [f"{words[i % 5]},{words[(i * 2) % 5]},{label(i)}" for i in range(n)]
        (tiny_run_dir / name).write_text("\n".join(rows) + "\n")
    cli = build_cli(["fit", "--config", str(tiny_run_dir / "tiny.yaml"), "--data.init_args.task_name", task,
                     "--data.init_args.data_files", files.format(root=tiny_run_dir)])
    assert cli.model.num_labels == (1 if task == "stsb" else 3)
    assert cli.model.modules_to_save == ["classifier"]  # the saved 2-label head was re-initialised, and trains
    assert expected <= set(cli.trainer.callback_metrics)


def test_disabling_the_progress_bar_drops_the_one_a_config_adds(tiny_run_dir):
    # the shipped configs add RichProgressBar; Lightning alone refuses it beside enable_progress_bar=False
    args = ["--config", str(tiny_run_dir / "tiny.yaml"),
            "--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar"]
    with_bar = build_cli([*args, "--trainer.enable_progress_bar", "true"], run=False)
    assert type(with_bar.trainer.progress_bar_callback).__name__ == "RichProgressBar"
    without = build_cli([*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert without.trainer.progress_bar_callback is None
    assert not any(isinstance(cb, ProgressBar) for cb in without.trainer.callbacks)
