"""The method switch leaves FlexLoRA as it was: a module built through ``method=FlexLoRA(...)`` (or a config's
``{class_path, init_args}``) trains step for step like the pre-method construction written out by hand from
the core primitives (inject, task loss + γ · orthogonality penalty, AdamW over adapter and head groups)."""

from __future__ import annotations

import functools

import torch
from conftest import tiny_bert

from flexlora_pl import FlexLoRAModule
from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.orthogonality import group_by_shape, orthogonality_penalty
from flexlora_pl.methods import FlexLoRA, build_method

TARGETS = ["query", "value", "attention.output.dense"]


def _batches(steps: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (4, 7), generator=generator),
             "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(steps)]


def _by_hand(steps: int) -> list[float]:
    """The construction before methods existed: inject, then loss + γ·R, AdamW over two groups."""
    backbone = tiny_bert().train()
    inject_flexlora(backbone, TARGETS, init_rank=2, max_rank=4, alpha=4.0, modules_to_save=["classifier"], seed=5)
    layers = [layer for _, layer in flexlora_layers(backbone)]
    adapter = [p for layer in layers for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)]
    head = [p for p in backbone.parameters() if p.requires_grad and all(p is not q for q in adapter)]
    optimizer = torch.optim.AdamW([{"params": adapter}, {"params": head}], lr=0.01)
    plan = group_by_shape(layers)
    losses = []
    for batch in _batches(steps):
        loss = backbone(**batch).loss + 0.1 * orthogonality_penalty(plan)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _through_module(method, steps: int) -> list[float]:
    module = FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], init_seed=5, method=method,
                            optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
    optimizer = module.configure_optimizers()
    losses = []
    for batch in _batches(steps):
        loss = module.compute_loss(batch) + module.orth_reg_weight * module.orthogonality_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_flexlora_through_the_method_trains_exactly_like_the_hand_construction():
    reference = _by_hand(6)
    config = {"class_path": "flexlora_pl.methods.FlexLoRA",
              "init_args": {"target_modules": TARGETS, "init_rank": 2, "max_rank": 4, "alpha": 4.0}}
    for method in (FlexLoRA(TARGETS, init_rank=2, max_rank=4, alpha=4.0), config):
        assert _through_module(method, 6) == reference
    shortcut = FlexLoRAModule(tiny_bert(), TARGETS, init_rank=2, max_rank=4, alpha=4.0, modules_to_save=["classifier"],
                              init_seed=5)
    assert isinstance(shortcut.method, FlexLoRA) and shortcut.method.max_rank == 4


def test_a_method_round_trips_through_its_config():
    method = FlexLoRA(TARGETS, init_rank=3, max_rank=5, alpha=6.0, dropout=0.1, orth_reg_weight=0.2)
    config = method.as_config()
    assert config["class_path"] == "flexlora_pl.methods.FlexLoRA"
    rebuilt = build_method(config)
    assert rebuilt.as_config() == config and rebuilt is not method
    assert build_method("flexlora").as_config()["init_args"]["init_rank"] == 8
