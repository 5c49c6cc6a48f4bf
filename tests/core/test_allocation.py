"""Allocation decisions (a pure function) and applying them: prune, expand, optimizer state."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import BACKBONES, run_backbone
from torch import nn

from flexlora_pl import (
    FlexLoRALinear,
    decide_allocation,
    expand_direction,
    flexlora_layers,
    inject_flexlora,
    orthogonality_penalty,
    prune_direction,
)
from flexlora_pl.core.allocation import event_generator
from flexlora_pl.core.orthogonality import group_by_shape


# ------------------------------------------------------------------ decisions
def test_default_mode_conserves_total_rank_and_respects_bounds():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        r_max = rng.randint(1, 6)
        r_min = rng.randint(0, r_max)
        ranks = [rng.randint(0, r_max) for _ in range(n)]
        scores = [rng.choice([0.1, 0.5, 0.9, rng.random()]) for _ in range(n)]  # many ties
        budget = rng.randint(0, 5)
        d = decide_allocation(scores, ranks, r_min, r_max, budget)
        assert len(d.prune) == len(d.expand) <= budget
        assert not set(d.prune) & set(d.expand)
        assert all(ranks[i] > r_min for i in d.prune)
        assert all(ranks[i] < r_max for i in d.expand)
        assert d == decide_allocation(scores, ranks, r_min, r_max, budget)  # deterministic


def test_lowest_prune_highest_expand_with_ties_broken_by_module_order():
    scores = [0.5, 0.2, 0.9, 0.2, 0.9, 0.7]
    d = decide_allocation(scores, [4] * 6, r_min=1, r_max=8, budget=2)
    assert d.prune == (1, 3)
    assert d.expand == (2, 4)


def test_modules_at_their_limits_are_skipped():
    scores = [0.1, 0.2, 0.3, 0.8, 0.9]
    d = decide_allocation(scores, [1, 3, 3, 3, 6], r_min=1, r_max=[6, 6, 6, 6, 6], budget=1)
    assert d.prune == (1,)  # module 0 sits at r_min
    assert d.expand == (3,)  # module 4 sits at r_max


def test_prune_only_and_expand_only():
    scores, ranks = [0.3, 0.1, 0.9, 0.5], [2, 2, 2, 2]
    p = decide_allocation(scores, ranks, 1, 4, 2, mode="prune_only")
    assert p.prune == (1, 0) and p.expand == ()
    e = decide_allocation(scores, ranks, 1, 4, 3, mode="expand_only")
    assert e.expand == (2, 3, 0) and e.prune == ()


def test_a_budget_larger_than_the_candidates_is_clamped():
    d = decide_allocation([0.1, 0.9], [2, 2], 1, 4, budget=4)
    assert d.prune == (0,) and d.expand == (1,)


def test_bad_decision_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown allocation mode"):
        decide_allocation([0.1], [1], 1, 2, 1, mode="grow")
    with pytest.raises(ValueError, match="not finite"):
        decide_allocation([float("nan"), 0.2], [2, 2], 1, 4, 1)
    with pytest.raises(ValueError, match="2 scores for 3 modules"):
        decide_allocation([0.1, 0.2], [1, 1, 1], 1, 2, 1)


# ------------------------------------------------------------------- applying
def _layer(seed: int = 0) -> FlexLoRALinear:
    torch.manual_seed(seed)
    layer = FlexLoRALinear(nn.Linear(12, 9), init_rank=4, max_rank=6, alpha=8)
    with torch.no_grad():
        layer.lora_lambda[:4] = torch.tensor([0.5, -0.05, 2.0, 0.3])
    return layer


def test_prune_removes_smallest_magnitude_not_smallest_signed_lambda():
    layer = _layer()
    assert prune_direction(layer) == 1  # |−0.05| is smallest; signed argmin would pick it too, so:
    with torch.no_grad():
        layer.lora_lambda[0] = -3.0  # signed argmin is now 0, |λ| argmin is 3
    assert prune_direction(layer) == 3
    assert layer.rank == 2
    for index in (1, 3):
        assert layer.lora_lambda[index] == 0
        assert torch.all(layer.lora_P[:, index] == 0) and torch.all(layer.lora_Q[index] == 0)


@pytest.mark.parametrize("init", ["zero_impact", "orthogonal"])
def test_expansion_leaves_the_model_output_unchanged(init):
    factory, targets, _, make_inputs = BACKBONES["bert"]
    model = factory()
    inject_flexlora(model, targets, init_rank=2, max_rank=4, alpha=8)
    layers = [layer for _, layer in flexlora_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_lambda[:2].normal_()
    inputs = make_inputs()
    with torch.no_grad():
        before = run_backbone(model, inputs)
    for i, layer in enumerate(layers):
        index = expand_direction(layer, init=init, generator=event_generator(0, 10, i))
        assert index == 2 and layer.rank == 3
        assert layer.lora_P[:, index].norm() > 0 and layer.lora_Q[index].norm() > 0
    with torch.no_grad():
        after = run_backbone(model, inputs)
    assert torch.equal(before, after)


def test_orthogonal_init_is_orthogonal_to_active_directions_and_zero_init_stays_frozen():
    layer = _layer()
    index = expand_direction(layer, init="orthogonal", generator=torch.Generator().manual_seed(1))
    active = [i for i in range(4)]
    assert layer.lora_P[:, active].T.matmul(layer.lora_P[:, index]).abs().max() < 1e-5
    assert layer.lora_Q[active].matmul(layer.lora_Q[index]).abs().max() < 1e-5
    assert layer.lora_P[:, index].norm().item() == pytest.approx(1.0, abs=1e-5)
    z = expand_direction(layer, init="zero")
    layer(torch.randn(3, 12)).pow(2).sum().backward()
    assert layer.rank_mask[z]
    assert layer.lora_lambda.grad[z] == 0 and torch.all(layer.lora_P.grad[:, z] == 0)


def test_small_init_sets_a_small_nonzero_lambda():
    layer = _layer()
    index = expand_direction(layer, init="small", generator=torch.Generator().manual_seed(0))
    assert 0 < layer.lora_lambda[index].item() <= 1e-2


def test_zero_impact_draws_depend_only_on_seed_step_and_module():
    a, b = _layer(), _layer()
    expand_direction(a, generator=event_generator(3, 40, 7))
    expand_direction(b, generator=event_generator(3, 40, 7))
    assert torch.equal(a.lora_P, b.lora_P) and torch.equal(a.lora_Q, b.lora_Q)
    c = _layer()
    expand_direction(c, generator=event_generator(3, 41, 7))
    assert not torch.equal(a.lora_P, c.lora_P)
    std = a.lora_P[:, 4].std().item()  # σ = 1/√d_out gives unit expected norm
    assert 0.1 < std < 1.0


def test_limits_raise_clear_errors():
    layer = FlexLoRALinear(nn.Linear(3, 3), init_rank=2, max_rank=2, alpha=2)
    with pytest.raises(ValueError, match="full capacity"):
        expand_direction(layer)
    with pytest.raises(ValueError, match="unknown expansion init"):
        prune_direction(layer)
        expand_direction(layer, init="random")


def test_optimizer_moments_of_touched_directions_are_zeroed_and_the_rest_kept():
    layer = _layer()
    params = [layer.lora_P, layer.lora_lambda, layer.lora_Q]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(5, 12)).pow(2).sum().backward()
        opt.step()
    kept = {k: v.clone() for k, v in opt.state[layer.lora_P].items()}
    index = prune_direction(layer, [opt])
    for param in params:
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[param][key]
            sliced = state[:, index] if param is layer.lora_P else state[index]
            assert torch.all(sliced == 0), key
    others = [i for i in range(6) if i != index]
    assert torch.equal(opt.state[layer.lora_P]["exp_avg"][:, others], kept["exp_avg"][:, others])
    assert opt.state[layer.lora_P]["step"] == kept["step"]
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_masked_entries_stay_exactly_zero_through_adamw_with_weight_decay_and_orth_loss():
    factory, targets, _, make_inputs = BACKBONES["llama"]
    model = factory()
    inject_flexlora(model, targets, init_rank=3, max_rank=5, alpha=8)
    layers = [layer for _, layer in flexlora_layers(model)]
    groups = group_by_shape(layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            out = run_backbone(model, make_inputs())
            (out.pow(2).mean() + 0.1 * orthogonality_penalty(groups)).backward()
            opt.step()

    train(5)
    for layer in layers:  # move ranks mid-training: pruned slots must stay zero too
        prune_direction(layer, [opt])
    expand_direction(layers[0], [opt], generator=event_generator(0, 5, 0))
    train(20)
    for layer in layers:
        off = ~layer.rank_mask
        assert off.any()
        assert torch.all(layer.lora_lambda[off] == 0)
        assert torch.all(layer.lora_P[:, off] == 0)
        assert torch.all(layer.lora_Q[off] == 0)
        assert torch.all(layer.lora_lambda[layer.rank_mask] != 0)  # active ones did train


def test_orthogonality_penalty_is_the_masked_eq2_averaged_over_modules():
    layers = [_layer(seed) for seed in range(3)] + [FlexLoRALinear(nn.Linear(5, 4), 2, 3, alpha=1)]
    with torch.no_grad():
        layers[1].rank_mask[1] = False
    expected = []
    for layer in layers:
        act = layer.rank_mask
        P, Q = layer.lora_P[:, act], layer.lora_Q[act]
        eye = torch.eye(int(act.sum()))
        expected.append((P.T @ P - eye).pow(2).sum() + (Q @ Q.T - eye).pow(2).sum())
    got = orthogonality_penalty(group_by_shape(layers))
    torch.testing.assert_close(got, torch.stack(expected).mean())
