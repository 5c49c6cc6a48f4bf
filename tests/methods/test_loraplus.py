"""LoRA+: the B factors of every LoRA-family method learn at ``loraplus_ratio`` times the rate of the rest.

The optimizer gets an ``adapter`` group (A, and λ for the SVD forms) and an ``adapter_B`` group (B, or P), whose
learning rate is exactly the ratio times the other's at every step of a scheduled run through the real ``flexlora``
command; the ratio is recorded in ``config.yaml`` and ``metrics.json``; a ratio that is not a number above 0 is
refused before a run folder exists.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_bert, tiny_run_folder
from lightning.pytorch import Callback

from flexlora_pl import FlexLoRAModule
from flexlora_pl.cli import build_cli
from flexlora_pl.methods import AdaLoRA, FlexLoRA, LoRA
from flexlora_pl.methods.loraplus import LORAPLUS_OPTION, check_loraplus_ratio

ROOT = Path(__file__).resolve().parents[2]
LORA_CONFIG, LORAPLUS_CONFIG = ROOT / "configs/methods/lora.yaml", ROOT / "configs/methods/loraplus.yaml"
TARGETS = ["query", "value"]


def _groups(method) -> dict[str, dict]:
    module = FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], init_seed=0, method=method,
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    optimizer = module.configure_optimizers()
    names = {id(p): n for n, p in module.named_parameters()}
    return {g["name"]: {"lr": g["lr"], "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups}


@pytest.mark.parametrize("method, b_key", [
    (LoRA(TARGETS, r=2, loraplus_ratio=16), ".lora_B."),
    (AdaLoRA(TARGETS, init_rank=3, target_rank=2, loraplus_ratio=16), ".lora_B."),
    (FlexLoRA(TARGETS, init_rank=2, max_rank=3, loraplus_ratio=16), ".lora_P"),
], ids=["lora", "adalora", "flexlora"])
def test_the_b_factors_get_their_own_group_at_ratio_times_the_rate(method, b_key):
    groups = _groups(method)
    assert list(groups) == ["adapter", "adapter_B", "modules_to_save"]
    assert groups["adapter_B"]["params"] and all(b_key in n for n in groups["adapter_B"]["params"])
    assert not any(b_key in n for n in groups["adapter"]["params"])
    assert len(groups["adapter_B"]["params"]) == 4  # one B per adapted matrix: 2 layers × query, value
    assert groups["adapter_B"]["lr"] == 16 * groups["adapter"]["lr"] == 16 * groups["modules_to_save"]["lr"]
    every = groups["adapter"]["params"] + groups["adapter_B"]["params"]
    assert sorted(every) == sorted(n for n in _groups(type(method)(**{**method.as_config()["init_args"],
                                                                     "loraplus_ratio": None}))["adapter"]["params"])


def test_without_a_ratio_there_is_one_adapter_group():
    assert list(_groups(LoRA(TARGETS, r=2))) == ["adapter", "modules_to_save"]


@pytest.mark.parametrize("ratio", [0, -1.0, math.nan, math.inf, True, "16"])
def test_a_ratio_that_is_not_a_number_above_zero_is_refused(ratio):
    with pytest.raises(ValueError, match="loraplus_ratio must be a number above 0") as refused:
        LoRA(TARGETS, loraplus_ratio=ratio)
    assert LORAPLUS_OPTION in str(refused.value)
    assert check_loraplus_ratio(None, "LoRA") is None and check_loraplus_ratio(4, "LoRA") == 4.0


class _RecordRates(Callback):
    def __init__(self) -> None:
        self.rates: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        groups = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
        self.rates.append((groups["adapter"], groups["adapter_B"]))


def test_a_scheduled_fit_through_the_cli_keeps_the_ratio_at_every_step_and_records_it(tmp_path, tiny_glue_root):
    root = tiny_run_folder(tmp_path, tiny_glue_root, {"trainer": {"callbacks": [
        {"class_path": "flexlora_pl.RankHeatmap"}, {"class_path": "flexlora_pl.FinalMetricsReport"}]}})
    cli = build_cli(["--config", str(root / "run.yaml"), "--config", str(LORA_CONFIG),
                     "--config", str(LORAPLUS_CONFIG), "--model.init_args.method.init_args.r", "2",
                     "--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.LinearLR",
                     "--model.init_args.lr_scheduler.init_args.start_factor", "0.3"], run=False)
    recorder = _RecordRates()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert type(cli.model.method) is LoRA and cli.model.method.loraplus_ratio == 16.0
    assert len(recorder.rates) == cli.trainer.global_step > 1
    assert len({a for a, _ in recorder.rates}) > 1  # the schedule moved the rate
    assert all(b == 16 * a for a, b in recorder.rates)  # 16 is a power of two: exactly, at every step
    folder = Path(cli.trainer.log_dir)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["init_args"]["method"]["init_args"]["loraplus_ratio"] == 16.0
    assert json.loads((folder / "metrics.json").read_text())["run"]["method_facts"]["loraplus_ratio"] == 16.0
    assert cli.model.method.facts() == {"loraplus_ratio": 16.0}


def test_a_bad_ratio_through_the_cli_stops_before_a_run_folder_exists(tmp_path, tiny_glue_root):
    root = tiny_run_folder(tmp_path, tiny_glue_root, {})
    with pytest.raises(ValueError, match="loraplus_ratio"):
        build_cli(["fit", "--config", str(root / "run.yaml"), "--config", str(LORA_CONFIG),
                   "--model.init_args.method.init_args.loraplus_ratio", "-2"])
    assert not (root / "runs").exists()
