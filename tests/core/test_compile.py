"""FlexLoRA under ``torch.compile``: rank changes flip mask values, never shapes, so nothing recompiles.

The compiled loss is the training objective (forward + γ·R). ``fullgraph=True`` also proves the hot path
has no graph break, and so no ``.item()`` or Python branch on a tensor value: on CUDA either would be a
host-device synchronisation every step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexlora_pl.core.allocation import event_generator, expand_direction, prune_direction
from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.orthogonality import group_by_shape, orthogonality_penalty

GAMMA = 0.1


def tiny_model() -> tuple[nn.Module, list[FlexLoRALinear]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    inject_flexlora(model, ["0", "2", "4"], init_rank=2, max_rank=4, alpha=4.0)
    layers = [layer for _, layer in flexlora_layers(model)]
    with torch.no_grad():  # non-zero λ, so the output depends on which directions are active
        for layer in layers:
            layer.lora_lambda.normal_()
            layer.lora_lambda.mul_(layer.rank_mask)
    return model, layers


def make_loss(model: nn.Module, layers: list[FlexLoRALinear]):
    groups = group_by_shape(layers)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return model(x).pow(2).mean() + GAMMA * orthogonality_penalty(groups)

    return loss_fn


def train_step(loss_fn, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    loss = loss_fn(x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def allocation_event(layers: list[FlexLoRALinear], optimizer: torch.optim.Optimizer, step: int) -> None:
    """What an event does to the model: one layer prunes a direction, another gains one."""
    prune_direction(layers[0], [optimizer])
    expand_direction(layers[1], [optimizer], "zero_impact", event_generator(0, step, 1))


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_no_recompile_at_prune_and_expand(backend: str) -> None:
    model, layers = tiny_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    compiled = torch.compile(make_loss(model, layers), backend=backend, fullgraph=True)
    x = torch.randn(8, 16)

    for _ in range(2):
        train_step(compiled, x, optimizer)
    graphs = unique_graphs()
    assert graphs == 1
    ranks = [layer.rank for layer in layers]

    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in (10, 20):
            allocation_event(layers, optimizer, step)
            train_step(compiled, x, optimizer)
    assert unique_graphs() == graphs
    assert [layer.rank for layer in layers] == [ranks[0] - 2, ranks[1] + 2, ranks[2]]


def test_compiled_loss_follows_the_masks() -> None:
    """The graph reads the masks as inputs, not as constants baked in at compile time."""
    model, layers = tiny_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = make_loss(model, layers)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 16)
    train_step(compiled, x, optimizer)

    before = loss_fn(x).detach()
    with torch.no_grad():  # λ of a pruned direction is zeroed; flip a mask alone to see the graph read it
        layers[2].rank_mask[0] = False
    eager = loss_fn(x)
    assert not torch.equal(eager.detach(), before)
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss = compiled(x)
    torch.testing.assert_close(loss, eager)

    loss.backward()
    inactive = ~layers[2].rank_mask
    assert torch.count_nonzero(layers[2].lora_P.grad[:, inactive]) == 0
    assert torch.count_nonzero(layers[2].lora_Q.grad[inactive]) == 0
    assert torch.count_nonzero(layers[2].lora_lambda.grad[inactive]) == 0


def test_masked_entries_stay_zero_through_compiled_steps() -> None:
    model, layers = tiny_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    compiled = torch.compile(make_loss(model, layers), backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 16)
    train_step(compiled, x, optimizer)
    prune_direction(layers[2], [optimizer])
    for _ in range(3):
        train_step(compiled, x, optimizer)
    inactive = ~layers[2].rank_mask
    assert inactive.any()
    for tensor in (layers[2].lora_P[:, inactive], layers[2].lora_Q[inactive], layers[2].lora_lambda[inactive]):
        assert torch.count_nonzero(tensor) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation needs CUDA")
def test_no_host_sync_on_a_step_without_event() -> None:
    model, layers = tiny_model()
    model.cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = make_loss(model, layers)
    x = torch.randn(8, 16, device="cuda")
    train_step(loss_fn, x, optimizer)  # the first step creates optimizer state
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(loss_fn, x, optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
