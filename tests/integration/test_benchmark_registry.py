"""The benchmark's pieces, in process: studies come from the study registry, and every adapter method is built
through the project's method registry and driven by the real RankReallocation callback, as training drives it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # ``benchmarks`` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.harness import STUDIES, StudyResult, parse_args, quiet_libraries, register_study  # noqa: E402
from benchmarks.models import ModelSpec  # noqa: E402
from benchmarks.runners import METHOD_NAMES, build_runners, train_step  # noqa: E402
from benchmarks.step_time import main  # noqa: E402  # imports the studies that ship
from flexlora_pl import FlexLoRAModule  # noqa: E402
from flexlora_pl.methods import METHODS  # noqa: E402


class TinyNet(nn.Module):
    """Two adapted linears and a head, returning an object with ``.loss`` like the benchmark's models."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.out, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.cross_entropy(self.head(self.out(torch.relu(self.body(x)))), labels))


def tiny_spec() -> ModelSpec:
    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(4, 16, generator=gen), "labels": torch.randint(0, 3, (4,), generator=gen)}

    return ModelSpec(TinyNet, batch, ["body", "out"], ["head"], "tiny")


def test_the_studies_that_ship_are_registered_in_run_order():
    assert list(STUDIES)[:3] == ["step", "scaling", "compile"]
    assert parse_args(["--smoke"]).studies == list(STUDIES)
    assert parse_args(["--smoke", "--studies", "compile", "step"]).studies == ["step", "compile"]  # run order
    with pytest.raises(SystemExit):
        parse_args(["--studies", "no-such-study"])


def test_a_registered_study_is_run_and_written(tmp_path, capsys):
    calls = []

    @register_study("tiny-test-study", help="a study of the tests")
    def tiny(settings) -> StudyResult:
        calls.append(settings.smoke)
        return StudyResult({"tiny": [{"value": 1}]}, "| tiny | table |\n|---|---|")

    try:
        with pytest.raises(ValueError, match="taken"):
            register_study("tiny-test-study")(lambda settings: StudyResult({}))
        out = tmp_path / "run.json"
        result = main(["--smoke", "--studies", "tiny-test-study", "--json", str(out)])
    finally:
        STUDIES.pop("tiny-test-study", None)
    assert calls == [True]  # run once, and nothing else ran
    assert "| tiny | table |" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["tiny"] == result["tiny"] == [{"value": 1}]
    assert written["settings"]["studies"] == ["tiny-test-study"] and "results" not in written


def test_methods_come_from_the_registry_and_events_only_at_event_steps():
    settings = parse_args(["--smoke", "--delta-t", "3"])
    runners = {r.method: r for r in build_runners(tiny_spec(), METHOD_NAMES, settings)}
    assert list(runners) == list(METHOD_NAMES)
    full = runners["full"].model  # full fine-tuning is the registry's method too, through the same module
    assert isinstance(full, FlexLoRAModule) and type(full.method) is METHODS["full"]
    assert all(p.requires_grad for p in full.parameters())
    assert sum(p.numel() for g in runners["full"].optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in full.parameters())
    batch = tiny_spec().batch(torch.Generator().manual_seed(0))
    for name in ("lora", "adalora", "flexlora"):
        runner = runners[name]
        module = runner.model
        assert isinstance(module, FlexLoRAModule) and type(module.method) is METHODS[name]
        assert module.method.as_config() == METHODS[name](["body", "out"]).as_config()  # the registry's defaults
        assert {p.requires_grad for p in module.backbone.head.parameters()} == {True}
        groups = [g["name"] for g in runner.optimizer.param_groups]
        assert groups == ["adapter", "modules_to_save"]  # configure_optimizers' groups
        module.eval()  # no dropout: the step's loss is the objective, γ·R included
        torch.testing.assert_close(runner.loss(batch), runner.objective(batch))
        expected = module.compute_loss(batch) + module.method.orth_reg_weight * module.orthogonality_loss()
        torch.testing.assert_close(runner.objective(batch), expected)
        module.train()
        with quiet_libraries():  # training_step's self.log calls warn without a Trainer
            for _ in range(5):
                train_step(runner, batch, settings, "fp32")
        assert runner.step == 7  # 1 2 4 5 7: the event steps 3 and 6 are left to the event
        assert runner.callback.history == []
        assert (runner.event is None) == (name == "lora")
        if runner.event is not None:
            runner.event()
            assert runner.step == 9 and [e["step"] for e in runner.callback.history] == [9]
