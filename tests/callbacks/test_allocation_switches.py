"""The allocation switches behind the method-level questions: new directions' Adam moments (``zero`` or
``warm``), the flip-flop count and ``expand_cooldown``, the λ spectra written at each event, and the
allocation summary in ``metrics.json``; and the refusal of sharding strategies."""

from __future__ import annotations

import functools
import itertools
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tiny_mlp import mlp_loader, mlp_module, mlp_trainer

from flexlora_pl import RankReallocation, RunRecord, decide_allocation, expand_direction
from flexlora_pl.callbacks.rank_reallocation import SPECTRA_FILENAME
from flexlora_pl.core.allocation import warm_second_moments
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.module import refuse_sharded_strategy


def test_a_protected_module_does_not_prune_but_may_still_expand():
    scores, ranks = [0.1, 0.2, 0.9, 0.5], [3, 3, 3, 3]
    assert decide_allocation(scores, ranks, 1, 6, budget=1).prune == (0,)
    shielded = decide_allocation(scores, ranks, 1, 6, budget=1, protected=[0])
    assert shielded.prune == (1,) and shielded.expand == (2,)
    assert decide_allocation(scores, ranks, 1, 6, budget=1, protected=[2]).expand == (2,)


def test_warm_second_moments_start_at_the_mean_of_the_active_entries():
    torch.manual_seed(0)
    layer = FlexLoRALinear(torch.nn.Linear(8, 6), init_rank=2, max_rank=4, alpha=2.0)
    optimizer = torch.optim.AdamW([layer.lora_P, layer.lora_lambda, layer.lora_Q], lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(3, 8)).pow(2).sum().backward()
        optimizer.step()
    slot = expand_direction(layer, [optimizer])
    v = optimizer.state[layer.lora_lambda]["exp_avg_sq"]
    assert v[slot] == 0  # zero: what docs/method.md resets
    assert warm_second_moments(layer, slot, [optimizer]) == 3
    assert torch.isclose(v[slot], v[:2].mean())
    vp = optimizer.state[layer.lora_P]["exp_avg_sq"]
    assert torch.allclose(vp[:, slot], vp[:, :2].mean().expand(6))
    assert optimizer.state[layer.lora_lambda]["exp_avg"][slot] == 0  # the first moment stays zero


def _fit_with(tmp_path, logger=False, callbacks=(), module=None, **realloc_kwargs):
    L.seed_everything(0)
    settings = {"b0": 1, "t_warmup": 4, "t_final": 4, "delta_t": 4, "b_schedule": "constant", **realloc_kwargs}
    realloc = RankReallocation(**settings)
    module = module or mlp_module()
    trainer = mlp_trainer(tmp_path, [realloc, *callbacks], max_epochs=5, logger=logger)
    trainer.fit(module, mlp_loader())
    return realloc, module


def test_first_updates_of_new_directions_are_measured_and_warm_moments_shrink_them(tmp_path):
    means = {}
    for moments in ("zero", "warm"):
        realloc, _ = _fit_with(tmp_path / moments, new_direction_moments=moments)
        ratios = [event["new_direction_update_ratio"] for event in realloc.history if event["expanded"]]
        assert len(ratios) == len(realloc.history) and all(r > 0 for r in ratios)
        means[moments] = sum(ratios) / len(ratios)
    # Zeroed moments: the new entry's first Adam step is larger than its module's settled entries' (≈ 3.2× once
    # the tensor's step count is large; less in this 40-step run, where bias correction still boosts every
    # entry). Second moments seeded with the active entries' mean make it smaller than theirs instead.
    assert means["zero"] > 1.0
    assert means["warm"] < means["zero"] / 2


class _Alternating:
    """Scores that make module 0 the most important at even events and the least important at odd ones."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __call__(self, metric):
        scores = torch.tensor([0.5, 0.6, 0.7])
        scores[0] = 1.0 if self.calls % 2 == 0 else 0.0
        self.calls += 1
        return scores


def _flip_flop_module():
    # lr 0: every λ keeps its value, so a direction added with λ = 0 has the smallest |λ| of its module
    module = mlp_module(optimizer=functools.partial(torch.optim.SGD, lr=0.0), lr_scheduler=None)
    with torch.no_grad():
        for _, layer in module.flexlora_layers():
            layer.lora_lambda.fill_(1.0)
    module.importance_scores = _Alternating(module)
    return module


@pytest.mark.parametrize("cooldown", [0, 1])
def test_flip_flops_are_counted_and_a_cooldown_prevents_them(tmp_path, cooldown):
    # a one-event window: what the cool-down prevents (delayed loops: test_a_loop_that_the_cooldown_only_delays...)
    realloc, _ = _fit_with(tmp_path, module=_flip_flop_module(), expand_cooldown=cooldown, flip_flop_window=1)
    assert len(realloc.history) >= 4
    if cooldown == 0:  # module 0 gains a zero direction, then loses exactly that one at the next event
        for previous, event in zip(realloc.history[0::2], realloc.history[1::2], strict=False):
            assert event["pruned"] == ["backbone.0"] and event["pruned_slots"] == previous["expanded_slots"]
            assert event["flip_flops"] == 1
        assert realloc.flip_flop_count == sum(event["flip_flops"] for event in realloc.history) >= 3
    else:
        assert realloc.flip_flop_count == 0  # no module prunes at the event right after it grew
        for previous, event in zip(realloc.history, realloc.history[1:], strict=False):
            assert not set(previous["expanded"]) & set(event["pruned"])


class _EveryThird:
    """Module 0 is the most important at every third event (0, 3, 6, ...) and the least important otherwise."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __call__(self, metric):
        scores = torch.tensor([0.5, 0.6, 0.7])
        scores[0] = 1.0 if self.calls % 3 == 0 else 0.0
        self.calls += 1
        return scores


@pytest.mark.parametrize(("window", "counted"), [(None, True), (1, False), (2, True)])
def test_a_loop_that_the_cooldown_only_delays_is_still_counted(tmp_path, window, counted):
    # expand_cooldown 1: module 0 gains a zero direction at event e, is shielded at e + 1, and loses exactly that
    # direction at e + 2 (rank 3 → 4 → 4 → 3). The default window (cool-down + 1 = 2 events) counts it; a window of
    # one event, the old counter, reports 0 while the loop goes on.
    module = _flip_flop_module()
    module.importance_scores = _EveryThird(module)
    realloc, _ = _fit_with(tmp_path, module=module, expand_cooldown=1, flip_flop_window=window)
    assert realloc.flip_flop_window == (window or 2)
    history = realloc.history
    # the loops in this run: a direction of module 0 added at event i, shielded at i + 1, pruned at i + 2
    loops = [i for i in range(len(history) - 2)
             if "backbone.0" in history[i]["expanded"] and "backbone.0" not in history[i + 1]["pruned"]
             and ("backbone.0", history[i]["expanded_slots"][history[i]["expanded"].index("backbone.0")])
             in set(zip(history[i + 2]["pruned"], history[i + 2]["pruned_slots"], strict=True))]
    assert loops, "the scores were built to make module 0 loop; no loop happened"
    assert not any(set(a["expanded"]) & set(b["pruned"]) for a, b in itertools.pairwise(history))
    assert realloc.flip_flop_count == (len(loops) if counted else 0)


def test_flip_flop_window_is_checked():
    with pytest.raises(ValueError, match="flip_flop_window must be an integer >= 1, got 0"):
        RankReallocation(flip_flop_window=0)


class _LowestFirst:
    """Module 0 always scores 0: it is pruned at every event until it reaches r_min = 1."""

    def __init__(self, module):
        self.module = module

    def __call__(self, metric):
        return torch.tensor([0.0, 0.6, 0.7])


def test_a_module_pruned_to_rank_one_and_never_expanded_is_a_dead_end(tmp_path):
    module = mlp_module()
    module.importance_scores = _LowestFirst(module)
    realloc, module = _fit_with(tmp_path, module=module, callbacks=[RunRecord()],
                                logger=TensorBoardLogger(tmp_path, name="run", version=0))
    assert dict(module.flexlora_layers())["backbone.0"].rank == 1
    assert realloc.dead_ends == ["backbone.0"]
    summary = json.loads((tmp_path / "run" / "version_0" / "metrics.json").read_text())["fit"]["allocation"]
    assert summary["dead_ends"] == 1 and summary["dead_end_modules"] == ["backbone.0"]
    # a later expansion revives it: it is no longer counted
    realloc.history.append({"step": 99, "ranks": [2, 3, 3], "pruned": [], "expanded": ["backbone.0"],
                            "pruned_slots": [], "expanded_slots": [1]})
    assert realloc.dead_ends == []


def test_spectra_and_the_allocation_summary_are_written_into_the_run_folder(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    realloc, module = _fit_with(tmp_path, logger=logger, callbacks=[RunRecord()])
    folder = tmp_path / "run" / "version_0"
    spectra = json.loads((folder / SPECTRA_FILENAME).read_text())["events"]
    assert [e["step"] for e in spectra] == [e["step"] for e in realloc.history]
    # each module's spectrum has as many entries as its rank when it was scored (before the event moved it)
    first = spectra[0]["spectra"]
    assert sorted(first) == sorted(realloc.layer_names)
    assert all(len(values) == 3 for values in first.values())
    summary = json.loads((folder / "metrics.json").read_text())["fit"]["allocation"]
    assert summary["events"] == len(realloc.history)
    assert summary["flip_flops"] == realloc.flip_flop_count
    assert summary["flip_flop_window"] == 1 and summary["dead_ends"] == len(realloc.dead_ends)
    assert summary["final_total_rank"] == sum(layer.rank for _, layer in module.flexlora_layers())
    assert summary["new_direction_update_ratio"] > 0


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharding_strategies_are_refused_with_what_to_use(name):
    trainer = type("Trainer", (), {"strategy": type(name, (), {})()})()
    with pytest.raises(ValueError, match="Use trainer.strategy: ddp"):
        refuse_sharded_strategy(trainer)
    refuse_sharded_strategy(type("Trainer", (), {"strategy": type("DDPStrategy", (), {})()})())


@pytest.mark.parametrize("bad", [{"new_direction_moments": "hot"}, {"expand_cooldown": -1}])
def test_switch_values_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RankReallocation(**bad)


def test_a_run_whose_layers_all_start_at_max_rank_is_refused_before_training(tmp_path):
    module = mlp_module(init_rank=3, max_rank=3)
    trainer = mlp_trainer(tmp_path, [RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2)], max_epochs=1)
    with pytest.raises(ValueError, match=r"every FlexLoRA layer starts at its max_rank \(3\).*Raise max_rank"):
        trainer.fit(module, mlp_loader())
    assert trainer.global_step == 0
    # prune_only needs no room to grow
    trainer = mlp_trainer(tmp_path, [RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, mode="prune_only")],
                       max_epochs=1)
    trainer.fit(mlp_module(init_rank=3, max_rank=3), mlp_loader())
