"""Importance metrics (paper eq. 3, 7, 10, 11) and the budget schedule (eq. 4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flexlora_pl import FlexLoRALinear, budget_at, event_steps, is_event_step, spectral_entropy
from flexlora_pl.core.importance import IMPORTANCE_METRICS, SensitivityTracker, importance_scores


def _entropy_by_hand(lam: list[float]) -> float:
    energy = [v * v for v in lam]
    total = sum(energy)
    shares = [e / total for e in energy]
    return -sum(s * math.log(s + 1e-8) for s in shares) / math.log(len(lam))


@pytest.mark.parametrize("lam", [[1.0, 2.0, 3.0], [0.5, -0.5], [3.0, 1e-3, 1e-3, 2.0, -7.0], [1.0] * 8])
def test_entropy_matches_eq3(lam):
    assert spectral_entropy(torch.tensor(lam)).item() == pytest.approx(_entropy_by_hand(lam), abs=1e-6)


def test_entropy_bounds_and_ordering():
    uniform = spectral_entropy(torch.ones(6))
    peaked = spectral_entropy(torch.tensor([10.0, 0.1, 0.1, 0.1, 0.1, 0.1]))
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= peaked.item() < uniform.item()


ENTROPIES = ("entropy", "elem_energy_entropy", "mat_energy_entropy")


@pytest.mark.parametrize("lam", [torch.tensor([2.5]), torch.zeros(4), torch.zeros(0), torch.tensor([-3.0])])
def test_entropy_metrics_are_zero_on_edge_cases(lam):
    for name in ENTROPIES:
        value = IMPORTANCE_METRICS[name](lam)
        assert torch.isfinite(value) and value.item() == 0.0, name


@pytest.mark.parametrize("lam", [torch.zeros(4), torch.zeros(0), torch.tensor([1e-30, 0.0]), torch.tensor([1e30, 1.0])])
def test_no_metric_is_ever_nan_or_inf(lam):
    for name, fn in IMPORTANCE_METRICS.items():
        assert torch.isfinite(fn(lam)), name


def test_norm_and_energy_metrics_match_their_formulas():
    lam = torch.tensor([1.0, -2.0, 4.0])
    r = 3
    s = lam**2 / (lam**2).sum()
    plogs = (s * torch.log(s + 1e-8)).sum()
    assert IMPORTANCE_METRICS["nuclear"](lam).item() == pytest.approx(7 / 3)
    assert IMPORTANCE_METRICS["frobenius"](lam).item() == pytest.approx(math.sqrt(21) / 3)
    elem = -(lam.abs() * s * torch.log(s + 1e-8)).sum() / (r * math.log(r))
    assert IMPORTANCE_METRICS["elem_energy_entropy"](lam).item() == pytest.approx(elem.item(), rel=1e-6)
    mat = -lam.abs().sum() * plogs / (r * math.log(r))
    assert IMPORTANCE_METRICS["mat_energy_entropy"](lam).item() == pytest.approx(mat.item(), rel=1e-6)


def test_importance_scores_use_active_entries_only():
    layer = FlexLoRALinear(nn.Linear(4, 4), init_rank=2, max_rank=3, alpha=2)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([1.0, 1.0, 50.0]))  # the masked 50 must not count
    assert importance_scores([layer], "entropy").tolist() == pytest.approx([1.0], abs=1e-6)
    with pytest.raises(ValueError, match="unknown importance metric"):
        importance_scores([layer], "bogus")


def test_entropy_rejects_non_vectors():
    with pytest.raises(ValueError, match="1-D"):
        spectral_entropy(torch.ones(2, 2))


def test_sensitivity_tracker_smooths_and_sums_active_directions():
    layer = FlexLoRALinear(nn.Linear(3, 2), init_rank=1, max_rank=2, alpha=1)
    tracker = SensitivityTracker(beta1=0.5, beta2=0.5)
    for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q):
        p.data.fill_(2.0)
        p.grad = torch.ones_like(p)
    tracker.update([("a", layer)])
    # I = 2 everywhere; Ī = 1, Ū = 0.5·|2 − 1| = 0.5, so each entry scores 0.5; direction = 0.5·3
    assert tracker.scores([("a", layer)]).tolist() == pytest.approx([1.5])
    tracker.reset_direction("a", 0)
    assert tracker.scores([("a", layer)]).tolist() == pytest.approx([0.0])


def test_restored_sensitivity_statistics_follow_the_parameters_device_and_dtype(monkeypatch):
    # Lightning loads checkpoints on the CPU: a GPU resume must move the statistics to the parameters'
    # device before the first update. On CPU, a float64 state stands in for the foreign device.
    def fresh_layer():
        layer = FlexLoRALinear(nn.Linear(3, 2), init_rank=1, max_rank=2, alpha=1)
        for value, p in zip((2.0, -1.0, 0.5), (layer.lora_P, layer.lora_lambda, layer.lora_Q), strict=True):
            p.data.fill_(value)
            p.grad = torch.full_like(p, 3.0)
        return layer

    layer = fresh_layer()
    reference = SensitivityTracker()
    reference.update([("a", layer)])
    state = reference.state_dict()
    foreign = {**state, "avg": {"a": [t.double() for t in state["avg"]["a"]]},
               "unc": {"a": [t.double() for t in state["unc"]["a"]]}}
    restored = SensitivityTracker()
    restored.load_state_dict(foreign)
    assert foreign["avg"]["a"][0].dtype == torch.float64

    moves = []
    original_to = torch.Tensor.to

    def to(tensor, *args, **kwargs):
        moves.append(kwargs.get("device"))
        return original_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    restored.update([("a", layer)])
    monkeypatch.undo()
    assert moves.count(layer.lora_P.device) == 6, "every restored statistic goes to the parameters' device"
    for t in restored.avg["a"] + restored.unc["a"]:
        assert t.dtype == torch.float32 and t.device == layer.lora_P.device
    reference.update([("a", layer)])
    assert restored.scores([("a", layer)]).tolist() == reference.scores([("a", layer)]).tolist()
    assert foreign["avg"]["a"][0].dtype == torch.float64, "the loaded state itself is not modified"
    moves.clear()
    monkeypatch.setattr(torch.Tensor, "to", to)
    restored.update([("a", layer)])  # moved once: later updates do not move anything
    monkeypatch.undo()
    assert moves.count(layer.lora_P.device) == 0


# ---------------------------------------------------------------- schedule (eq. 4)
@pytest.mark.parametrize("step", [101, 150, 300, 500, 899])
def test_cubic_budget_matches_eq4(step):
    b0, tw, tf, total = 4, 100, 100, 1000
    expected = math.floor(b0 * (1 - (step - tw) / (total - tf)) ** 3 + 0.5)
    assert budget_at(step, b0, tw, tf, total) == min(max(expected, 0), b0)


def test_budget_is_clamped_and_constant_schedule_is_flat():
    assert budget_at(50, 4, 100, 100, 1000) == 4  # before warm-up the cube exceeds 1: clamp to b0
    assert budget_at(2000, 4, 100, 100, 1000) == 0
    assert budget_at(899, 4, 100, 100, 1000, "constant") == 4
    with pytest.raises(ValueError, match="unknown budget schedule"):
        budget_at(5, 4, 0, 0, 10, "linear")


def test_event_steps_agree_with_is_event_step():
    total, tw, tf, dt = 57, 10, 12, 4
    expected = [t for t in range(total + 1) if is_event_step(t, tw, tf, dt, total)]
    assert list(event_steps(tw, tf, dt, total)) == expected == [14, 18, 22, 26, 30, 34, 38, 42]
    assert list(event_steps(50, 10, 4, 57)) == []
