"""The paper's ablations and the authors' code's behaviours: every override file parses over every task config,
and every switch changes what an event (or the regulariser) does."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tiny_mlp import mlp_backbone, mlp_loader, mlp_module, mlp_trainer
from torch import nn

from flexlora_pl import FlexLoRALinear, FlexLoRAModule, LinearWarmupDecay, RankReallocation
from flexlora_pl.cli import build_cli
from flexlora_pl.core.allocation import AllocationDecision, decide_allocation, expand_direction, prune_direction
from flexlora_pl.core.importance import IMPORTANCE_METRICS
from flexlora_pl.core.orthogonality import group_by_shape, orthogonality_penalty
from flexlora_pl.core.schedule import budget_at
from flexlora_pl.methods import FlexLoRA

CONFIGS = Path(__file__).parents[2] / "configs"
TASKS = sorted([CONFIGS / "demo.yaml", *CONFIGS.glob("glue_*.yaml")])
OVERRIDES = sorted((CONFIGS / "ablations").glob("*.yaml"))
SWITCHES = {
    "importance": ["entropy", "nuclear", "frobenius", "sensitivity", "elem_energy_entropy", "mat_energy_entropy"],
    "mode": ["prune_and_expand", "prune_only", "expand_only"],
    "init": ["zero_impact", "small", "zero", "orthogonal"],
    # the method-level questions (docs/results.md): off by default, one file each for the switched-on value
    "new_direction_moments": ["warm"],
    "expand_cooldown": [1],
}


# ------------------------------------------------------------------ the shipped files
def test_one_override_file_per_ablation_value_and_one_for_the_reference_code():
    expected = {f"{switch}_{value}" for switch, values in SWITCHES.items() for value in values} | {"reference_code"}
    assert {path.stem for path in OVERRIDES} == expected
    for switch, values in SWITCHES.items():
        for value in values:
            text = (CONFIGS / "ablations" / f"{switch}_{value}.yaml").read_text()
            assert yaml.safe_load(text) == {"reallocation": {switch: value}}
            assert "Compose: flexlora fit --config configs/" in text  # says how to use it


def _printed(task: Path, override: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(task), "--config", str(override), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("override", OVERRIDES, ids=[p.stem for p in OVERRIDES])
@pytest.mark.parametrize("task", TASKS, ids=[p.stem for p in TASKS])
def test_every_override_composes_over_every_task_config(task, override, capsys):
    printed = _printed(task, override, capsys)
    wanted = yaml.safe_load(override.read_text())
    assert set(wanted["reallocation"]) <= set(printed["reallocation"])
    task_realloc = yaml.safe_load(task.read_text())["reallocation"]
    for key, value in printed["reallocation"].items():
        if key in wanted["reallocation"]:
            assert value == wanted["reallocation"][key], key
        elif key in task_realloc:  # everything the override leaves alone keeps the task's value
            assert value == task_realloc[key], key
    method = printed["model"]["init_args"]["method"]
    assert method["class_path"] == "flexlora_pl.methods.FlexLoRA"
    task_method = yaml.safe_load(task.read_text())["model"]["init_args"]["method"]["init_args"]
    want_method = (wanted.get("model") or {}).get("init_args", {}).get("method", {}).get("init_args", {})
    for key, value in {**task_method, **want_method}.items():  # the override's method args merge into the task's
        assert method["init_args"][key] == value, key


def test_the_reference_code_file_turns_every_reference_switch_on(capsys):
    printed = _printed(CONFIGS / "glue_rte.yaml", CONFIGS / "ablations" / "reference_code.yaml", capsys)
    assert {k: printed["reallocation"][k] for k in ("b0", "b_schedule", "budget_formula", "rank_cap", "prune_by",
                                                    "new_direction_std", "rebuild_optimizer")} == {
        "b0": 4, "b_schedule": "constant", "budget_formula": "reference", "rank_cap": False, "prune_by": "signed",
        "new_direction_std": "unit", "rebuild_optimizer": True}
    assert printed["model"]["init_args"]["method"]["init_args"]["orth_reg_form"] == "plain"
    defaults = RankReallocation()  # and every one of them is off by default
    assert (defaults.budget_formula, defaults.rank_cap, defaults.prune_by, defaults.new_direction_std,
            defaults.rebuild_optimizer) == ("paper", True, "magnitude", "scaled", False)
    assert FlexLoRA(["q"]).orth_reg_form == "squared"


def test_new_arguments_are_validated():
    for kwargs, message in [
        ({"budget_formula": "adalora"}, "budget_formula='adalora' is not one of \\['paper', 'reference'\\]"),
        ({"prune_by": "abs"}, "prune_by='abs' is not one of \\['magnitude', 'signed'\\]"),
        ({"new_direction_std": 1.0}, "new_direction_std=1.0 is not one of \\['scaled', 'unit'\\]"),
        ({"rank_cap": "no"}, "rank_cap must be true or false, got 'no'"),
        ({"rebuild_optimizer": 1}, "rebuild_optimizer must be true or false, got 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            RankReallocation(**kwargs)
    with pytest.raises(ValueError, match="orth_reg_form='frobenius' is not one of \\['squared', 'plain'\\]"):
        FlexLoRA(["q"], orth_reg_form="frobenius")


# ------------------------------------------------------------------ a callback ready for a hand-run event
def _ready(tmp_path, module: FlexLoRAModule | None = None, **kwargs):
    """A RankReallocation inside a real Trainer that took one optimizer step and ran no event yet, so that
    ``reallocate`` can be called by hand on λ set by hand (3 layers at rank 3 of 6)."""
    L.seed_everything(0)
    settings = {"b0": 1, "t_warmup": 2, "t_final": 2, "delta_t": 3, "total_steps": 16, "b_schedule": "constant"}
    realloc = RankReallocation(**{**settings, **kwargs})
    module = module if module is not None else mlp_module()
    trainer = mlp_trainer(tmp_path, [realloc], max_steps=1)
    trainer.fit(module, mlp_loader())
    assert not realloc.history
    return module, realloc, trainer


def _set_lambdas(module: FlexLoRAModule, values: list[list[float]]) -> list[FlexLoRALinear]:
    layers = [layer for _, layer in module.flexlora_layers()]
    with torch.no_grad():
        for layer, lam in zip(layers, values, strict=True):
            layer.lora_lambda.zero_()
            layer.lora_lambda[: len(lam)] = torch.tensor(lam)
    return layers


# λ of the three layers: the metrics disagree on their scores (and on the order)
SPECTRA = [[1.0, 1.0, 1.0], [3.0, 0.1, 0.1], [0.2, 0.2, 0.1]]


@pytest.mark.parametrize("importance", SWITCHES["importance"])
def test_each_importance_name_scores_with_its_metric(tmp_path, importance):
    module, realloc, trainer = _ready(tmp_path, importance=importance)
    layers = _set_lambdas(module, SPECTRA)
    by_metric = {name: [float(fn(layer.lora_lambda.detach()[layer.rank_mask])) for layer in layers]
                 for name, fn in IMPORTANCE_METRICS.items()}
    if importance == "sensitivity":
        expected = realloc.sensitivity.scores(list(module.flexlora_layers())).tolist()  # gathered over the step taken
        assert all(s > 0 for s in expected)
    else:
        expected = by_metric[importance]
    realloc.reallocate(trainer, module, 5)
    got = realloc.history[-1]["scores"]
    assert got == pytest.approx(expected, rel=1e-6)
    for other, scores in by_metric.items():  # the scores are this metric's and no other's
        if other != importance:
            assert got != pytest.approx(scores, rel=1e-3), other
    lowest, highest = min(range(3), key=lambda i: (expected[i], i)), min(range(3), key=lambda i: (-expected[i], i))
    assert realloc.history[-1]["pruned"] == [realloc.layer_names[lowest]]
    assert realloc.history[-1]["expanded"] == [realloc.layer_names[highest]]


class _Ranks(Callback):
    def __init__(self):
        self.total: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.total[trainer.global_step] = sum(layer.rank for _, layer in pl_module.flexlora_layers())


@pytest.mark.parametrize(("mode", "final_total"), [("prune_and_expand", 9), ("prune_only", 6), ("expand_only", 12)])
def test_modes_lower_raise_or_keep_the_total_rank(tmp_path, mode, final_total):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, b_schedule="constant", mode=mode)
    ranks = _Ranks()
    trainer = mlp_trainer(tmp_path, [realloc, ranks], max_epochs=2)
    module = mlp_module()
    trainer.fit(module, mlp_loader())
    assert [e["step"] for e in realloc.history] == [5, 8, 11]
    assert ranks.total[4] == 9 and ranks.total[16] == final_total  # 3 events of one direction each
    assert all(bool(e["pruned"]) == (mode != "expand_only") for e in realloc.history)
    assert all(bool(e["expanded"]) == (mode != "prune_only") for e in realloc.history)
    if mode == "prune_and_expand":
        assert [layer.rank for _, layer in module.flexlora_layers()] != [3, 3, 3]


def _new_slot(layer: FlexLoRALinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """P column, Q row and λ of slot 3, the first free one of a layer that started at rank 3."""
    assert bool(layer.rank_mask[3])
    return layer.lora_P.detach()[:, 3], layer.lora_Q.detach()[3], float(layer.lora_lambda.detach()[3])


def _cosines(vector: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """|cos| between ``vector`` and each column of ``others``."""
    return (others.T @ vector).abs() / (others.norm(dim=0) * vector.norm())


@pytest.mark.parametrize("init", SWITCHES["init"])
def test_each_init_gives_new_directions_with_its_statistics(tmp_path, init):
    module, realloc, trainer = _ready(tmp_path, init=init)
    layers = _set_lambdas(module, SPECTRA)  # entropy: layer 0 (flat spectrum) expands, layer 1 prunes
    realloc.reallocate(trainer, module, 5)
    assert realloc.history[-1]["expanded"] == [realloc.layer_names[0]]
    layer = layers[0]  # Linear(16, 32): P column of 32, Q row of 16
    p, q, lam = _new_slot(layer)
    active_p, active_q = layer.lora_P.detach()[:, :3], layer.lora_Q.detach()[:3].T
    if init == "zero":
        assert lam == 0 and torch.count_nonzero(p) == 0 and torch.count_nonzero(q) == 0
        return
    assert lam == pytest.approx(1e-3 if init == "small" else 0.0, abs=1e-9)
    if init == "zero_impact":  # Gaussian, σ = 1/√d, not orthogonalised
        assert 0.5 < p.std().item() * math.sqrt(32) < 1.5 and 0.5 < q.std().item() * math.sqrt(16) < 1.5
        assert _cosines(p, active_p).max() > 1e-3 and _cosines(q, active_q).max() > 1e-3
    else:  # small, orthogonal: unit vectors orthogonal to the active directions
        assert p.norm().item() == pytest.approx(1.0, abs=1e-5) and q.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert _cosines(p, active_p).max() < 1e-5 and _cosines(q, active_q).max() < 1e-5


# ------------------------------------------------------------------ the authors' code's behaviours
class _OptimizerWatch(Callback):
    """After every step (and after the event of that step): the optimizer, its LR, weight decay, step counts."""

    def __init__(self):
        self.seen: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.seen[trainer.global_step] = {
            "optimizer": optimizer,
            "lr": {group["lr"] for group in optimizer.param_groups},
            "weight_decay": {group["weight_decay"] for group in optimizer.param_groups},
            "steps": {int(state["step"]) for state in optimizer.state.values()},
            "moments": [v.clone() for s in optimizer.state.values() for k, v in s.items() if k.startswith("exp_avg")],
        }


@pytest.mark.parametrize("rebuild", [False, True])
def test_rebuild_optimizer_loses_every_moment_drops_weight_decay_and_detaches_the_lr_schedule(tmp_path, rebuild):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, b_schedule="constant",
                               rebuild_optimizer=rebuild)
    watch = _OptimizerWatch()
    trainer = mlp_trainer(tmp_path, [realloc, watch], max_epochs=2)
    module = mlp_module(optimizer=functools.partial(torch.optim.AdamW, lr=5e-2, weight_decay=0.01),
                     lr_scheduler=functools.partial(LinearWarmupDecay, warmup_ratio=0.1))
    trainer.fit(module, mlp_loader())
    seen, events = watch.seen, [5, 8, 11]
    assert [e["step"] for e in realloc.history] == events
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is seen[1]["optimizer"]  # the schedule always drives the optimizer it was built on
    scheduled = scheduler.get_last_lr()[0]
    assert scheduled < 0.01  # it decayed to near zero at step 16
    if not rebuild:
        assert all(s["optimizer"] is seen[1]["optimizer"] for s in seen.values())
        assert seen[7]["steps"] == {7} and seen[16]["weight_decay"] == {0.01} and seen[16]["lr"] == {scheduled}
        return
    for step in events:  # a new optimizer at every event: no state, so every moment starts again from zero
        assert seen[step]["optimizer"] is not seen[step - 1]["optimizer"]
        assert seen[step]["steps"] == set() and seen[step]["moments"] == []
        assert seen[step + 1]["steps"] == {1} and seen[step + 2]["steps"] == {2}
        assert all(torch.count_nonzero(m) > 0 for m in seen[step - 1]["moments"])  # there was state to lose
    assert seen[4]["weight_decay"] == {0.01} and sorted(seen[4]["lr"]) == [pytest.approx(0.04)]  # scheduled so far
    for step in range(5, 17):  # then weight decay 0 and the base LR, whatever the schedule says
        assert seen[step]["weight_decay"] == {0.0} and seen[step]["lr"] == {5e-2}
    assert seen[16]["optimizer"] is trainer.optimizers[0] and seen[16]["steps"] == {5}


def test_a_run_with_rebuild_optimizer_resumes_exactly(tmp_path):
    def run(root, ckpt_path=None):
        L.seed_everything(0)
        realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, b_schedule="constant",
                                   rebuild_optimizer=True, seed=3)
        ckpt = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        trainer = mlp_trainer(root, [realloc, ckpt], max_epochs=3)
        module = mlp_module()
        trainer.fit(module, mlp_loader(), ckpt_path=ckpt_path)
        return module, realloc, trainer

    full, full_realloc, _ = run(tmp_path / "full")
    # epoch=0 ends at step 8, after the events at 5 and 8: the checkpoint holds a rebuilt optimizer
    resumed, resumed_realloc, trainer = run(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=0.ckpt")
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is not trainer.optimizers[0]
    assert resumed_realloc.history == full_realloc.history
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, name


def test_reference_budget_formula_gives_the_authors_numbers():
    # paper eq. 4 normalises by T − t_final and cubes the remaining fraction; the authors' code normalises by
    # T − t_final − t_warmup and cubes the progress p: b = round(b0 · (1 − p³)), halves to even
    args = {"b0": 4, "t_warmup": 100, "t_final": 100, "total_steps": 1000}
    paper = [budget_at(t, **args) for t in (200, 300, 500, 700, 899)]
    reference = [budget_at(t, **args, formula="reference") for t in (200, 300, 500, 700, 899)]
    assert paper == [3, 2, 1, 0, 0]  # (1 − 100/900)³ · 4 = 2.81, (7/9)³ · 4 = 1.88, (5/9)³ · 4 = 0.69, ...
    assert reference == [4, 4, 4, 2, 0]  # p = 1/8, 1/4, 1/2, 3/4, 799/800: 4 · (1 − p³) = 3.99, 3.94, 3.5, 2.31, 0.01
    assert budget_at(500, 12, 100, 100, 1000, formula="reference") == 10  # 12 · (1 − 1/8) = 10.5: half to even
    assert budget_at(500, 12, 100, 100, 1000, schedule="constant", formula="reference") == 12
    with pytest.raises(ValueError, match="unknown budget formula 'adalora'"):
        budget_at(500, 4, 100, 100, 1000, formula="adalora")


@pytest.mark.parametrize(("formula", "budgets"), [("paper", [2, 1, 0]), ("reference", [4, 4, 2])])
def test_the_callback_uses_the_budget_formula(tmp_path, formula, budgets):
    L.seed_everything(0)
    realloc = RankReallocation(b0=4, t_warmup=2, t_final=2, delta_t=3, b_schedule="cubic", budget_formula=formula)
    trainer = mlp_trainer(tmp_path, [realloc], max_epochs=2)
    trainer.fit(mlp_module(), mlp_loader())
    assert [(e["step"], e["budget"]) for e in realloc.history] == list(zip([5, 8, 11], budgets, strict=True))


def test_without_the_rank_cap_the_top_modules_expand_even_when_pruned_and_a_full_one_forfeits_its_slot():
    scores, ranks = [0.1, 0.2, 0.9, 0.7, 0.5], [4, 4, 6, 4, 4]  # module 2, the most important, is at r_max = 6
    capped = decide_allocation(scores, ranks, r_min=1, r_max=6, budget=2)
    assert (capped.prune, capped.expand) == ((0, 1), (3, 4))  # module 2 cannot grow: the slot goes to 4
    uncapped = decide_allocation(scores, ranks, r_min=1, r_max=6, budget=2, rank_cap=False)
    assert (uncapped.prune, uncapped.expand) == ((0, 1), (3,))  # module 2 wins a slot and cannot use it
    assert decide_allocation(scores, ranks, 1, 6, 2, "expand_only").expand == (3, 4)
    assert decide_allocation(scores, ranks, 1, 6, 2, "expand_only", rank_cap=False).expand == (3,)
    assert decide_allocation(scores, ranks, 1, 6, 2, "prune_only", rank_cap=False).prune == (0, 1)
    # a module may prune and expand at one event (the selections are made independently)
    overlap = [0.1, 0.5, 0.9], [4, 4, 4]
    assert decide_allocation(*overlap, r_min=1, r_max=6, budget=2) == AllocationDecision((0,), (2,))
    assert decide_allocation(*overlap, r_min=1, r_max=6, budget=2, rank_cap=False) == AllocationDecision((0, 1), (2, 1))
    # pruning comes first, so a full module that also prunes has room to expand again
    full_and_pruned = decide_allocation([0.2, 0.1], [6, 3], r_min=1, r_max=6, budget=2, rank_cap=False)
    assert full_and_pruned == AllocationDecision(prune=(1, 0), expand=(0, 1))


class _FavourFirst(FlexLoRAModule):
    def importance_scores(self, metric):
        return torch.tensor([3.0, 2.0, 1.0])


@pytest.mark.parametrize(("rank_cap", "final"), [(True, [4, 3, 2]), (False, [4, 2, 1])])
def test_rank_cap_off_lets_a_full_layer_take_the_expansion_slot_and_waste_it(tmp_path, rank_cap, final):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, b_schedule="constant", rank_cap=rank_cap)
    trainer = mlp_trainer(tmp_path, [realloc], max_epochs=2)
    module = _FavourFirst(backbone=mlp_backbone, method=FlexLoRA(["0", "2", "4"], init_rank=3, max_rank=4, alpha=6.0),
                          modules_to_save=["6"], optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    trainer.fit(module, mlp_loader())
    assert [layer.rank for _, layer in module.flexlora_layers()] == final
    # capped: layer 0 fills up at the first event and then layer 1 takes its slot; uncapped: layer 0 keeps
    # winning the slot and wasting it, as the authors' code would (there, layer 0 would grow to 6)
    assert [len(e["expanded"]) for e in realloc.history] == ([1, 1, 1] if rank_cap else [1, 0, 0])


def test_signed_pruning_removes_the_most_negative_lambda(tmp_path):
    layer = FlexLoRALinear(nn.Linear(12, 9), init_rank=4, max_rank=6, alpha=8)
    with torch.no_grad():
        layer.lora_lambda[:4] = torch.tensor([0.5, -0.05, 2.0, -3.0])
    signed = FlexLoRALinear(nn.Linear(12, 9), init_rank=4, max_rank=6, alpha=8)
    signed.load_state_dict(layer.state_dict())
    assert prune_direction(layer) == 1  # smallest |λ|
    assert prune_direction(signed, by="signed") == 3  # the strongest direction goes
    with pytest.raises(ValueError, match="unknown pruning criterion 'abs'"):
        prune_direction(signed, by="abs")
    # and through the callback: layer 1 (lowest entropy) prunes its λ = −3, not its λ = 0.1
    for prune_by, gone in (("magnitude", 1), ("signed", 0)):
        module, realloc, trainer = _ready(tmp_path / prune_by, prune_by=prune_by)
        layers = _set_lambdas(module, [[1.0, 1.0, 1.0], [-3.0, 0.1, 0.2], [0.2, 0.2, 0.1]])
        realloc.reallocate(trainer, module, 5)
        assert realloc.history[-1]["pruned"] == [realloc.layer_names[1]]
        assert layers[1].rank_mask.tolist()[:3] == [i != gone for i in range(3)]


def test_unit_new_direction_std_draws_sigma_one(tmp_path):
    for std, sigma in (("scaled", None), ("unit", 1.0)):
        layer = FlexLoRALinear(nn.Linear(1024, 512), init_rank=1, max_rank=2, alpha=1)
        expand_direction(layer, generator=torch.Generator().manual_seed(0), std=std)
        p, q = layer.lora_P.detach()[:, 1], layer.lora_Q.detach()[1]
        assert p.std().item() == pytest.approx(sigma or 1 / math.sqrt(512), rel=0.1)
        assert q.std().item() == pytest.approx(sigma or 1 / math.sqrt(1024), rel=0.1)
        assert float(layer.lora_lambda[1]) == 0.0  # still zero impact
    with pytest.raises(ValueError, match="unknown new-direction std 'big'"):
        expand_direction(layer, std="big")
    # and through the callback (layer 0 is Linear(16, 32)): σ ≈ 1 instead of 1/√32
    module, realloc, trainer = _ready(tmp_path, new_direction_std="unit")
    _set_lambdas(module, SPECTRA)
    realloc.reallocate(trainer, module, 5)
    p, q, lam = _new_slot(next(layer for _, layer in module.flexlora_layers()))
    assert lam == 0 and 0.6 < p.std().item() < 1.5 and 0.6 < q.std().item() < 1.5


def _factor_layer(rank: int = 2) -> FlexLoRALinear:
    """Linear(5, 4) at rank 2 of 3 whose active factors have a residual computable by hand."""
    layer = FlexLoRALinear(nn.Linear(5, 4), init_rank=rank, max_rank=3, alpha=1)
    with torch.no_grad():
        layer.lora_P.zero_()
        layer.lora_Q.zero_()
        layer.lora_P[0, 0], layer.lora_P[1, 1], layer.lora_P[3, 2] = 1.0, 2.0, 7.0  # column 2 is inactive
        layer.lora_Q[0, 0], layer.lora_Q[0, 1], layer.lora_Q[2, 4] = 1.0, 1.0, 5.0  # row 1 zero, row 2 inactive
    return layer


def test_plain_regulariser_is_the_unsquared_norm_averaged_over_factor_matrices():
    layer = _factor_layer()
    # PᵀP − I = diag(1, 4) − I = diag(0, 3): ‖·‖_F = 3.   QQᵀ − I = [[2, 0], [0, 0]] − I: ‖·‖_F = √2.
    one = group_by_shape([layer])
    assert orthogonality_penalty(one).item() == pytest.approx(3**2 + 2)  # squared, per module
    assert orthogonality_penalty(one, "plain").item() == pytest.approx((3 + math.sqrt(2)) / 2)  # per factor matrix
    empty = FlexLoRALinear(nn.Linear(5, 4), init_rank=1, max_rank=3, alpha=1)
    with torch.no_grad():
        empty.rank_mask.zero_()  # rank 0: a zero residual, whose norm must still have a finite gradient
    both = group_by_shape([layer, empty])
    value = orthogonality_penalty(both, "plain")
    assert value.item() == pytest.approx((3 + math.sqrt(2)) / 4)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_P, layer.lora_Q, empty.lora_P, empty.lora_Q))
    with pytest.raises(ValueError, match="unknown orthogonality regulariser form 'l1'"):
        orthogonality_penalty(one, "l1")


def test_the_method_passes_its_regulariser_form_through():
    for form, expected in (("squared", 11.0), ("plain", (3 + math.sqrt(2)) / 2)):
        method = FlexLoRA(["0"], init_rank=2, max_rank=3, alpha=1, orth_reg_form=form)
        module = FlexLoRAModule(backbone=nn.Sequential(nn.Linear(5, 4)), method=method)
        layer = module.backbone[0]
        hand = _factor_layer()
        with torch.no_grad():
            layer.lora_P.copy_(hand.lora_P)
            layer.lora_Q.copy_(hand.lora_Q)
        assert module.orthogonality_loss().item() == pytest.approx(expected)
        assert method.as_config()["init_args"]["orth_reg_form"] == form  # saved with the checkpoint's hparams
