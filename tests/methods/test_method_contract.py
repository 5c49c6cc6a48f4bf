"""The contract every registered adaptation method keeps, checked for each entry of ``METHODS``.

A new method is tested by registering it: built with its defaults on a tiny BERT it must start as the base
model (identity at wrapping time), train only its adapters and the task head, report ranks and parameter counts
that agree with each other, rebuild from its own config, and offer an allocation driver exactly when its ranks
can move. A method without ranks (an empty ``rank_pattern``: it trains the model's own parameters and adds no
adapter) trains exactly what :data:`OWN_PARAMETERS` says of it, and counts those parameters as active.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_bert

from flexlora_pl import FlexLoRAModule
from flexlora_pl.core.allocator import AllocationSettings
from flexlora_pl.methods import METHODS, AdaptationMethod, AllocationDriver, build_method

TARGETS = ["query", "value"]
INPUTS = {"input_ids": torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(0)),
          "labels": torch.tensor([0, 1, 1, 0])}
#: the methods without ranks -> which of the tiny BERT's own parameters (outside the head) they train
OWN_PARAMETERS = {"full": lambda name: True, "bitfit": lambda name: name.endswith(".bias")}


def _module(name: str) -> FlexLoRAModule:
    method = build_method(name).with_default_targets(TARGETS)
    return FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], init_seed=0, method=method,
                          optimizer=functools.partial(torch.optim.AdamW, lr=0.05))


@pytest.fixture(params=sorted(METHODS))
def name(request) -> str:
    return request.param


def test_a_method_starts_as_the_base_model(name):
    base = tiny_bert()
    module = _module(name).eval()
    with torch.no_grad():
        torch.testing.assert_close(module(input_ids=INPUTS["input_ids"]).logits,
                                   base(input_ids=INPUTS["input_ids"]).logits, rtol=1e-5, atol=1e-5)


def test_a_method_trains_its_adapters_and_the_head_only(name):
    module = _module(name)
    adapters = module.adapter_parameters()
    assert adapters and all(p.requires_grad for p in adapters)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    if name in OWN_PARAMETERS:  # no adapter: the method trains the model's own parameters
        head = {"backbone.classifier.weight", "backbone.classifier.bias"}
        own = {n for n, _ in module.named_parameters() if n not in head and OWN_PARAMETERS[name](n)}
        assert head <= trainable and trainable - head == own, sorted(trainable)
        # the adapter group holds those, the head keeps its own (modules_to_save) group
        assert {id(p) for p in adapters} == {id(p) for n, p in module.named_parameters() if n in own}
    else:
        assert all(n.startswith("backbone.classifier") or "lora" in n.lower() for n in trainable), sorted(trainable)
        assert any(".encoder.layer.0.attention.self.query." in n for n in frozen)  # the adapted base weight: frozen
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    before = [p.detach().clone() for p in adapters]
    for _ in range(2):  # B (LoRA) or λ (SVD forms) start at zero: the second step moves every factor
        optimizer.zero_grad()
        loss = module.compute_loss(INPUTS) + module.orth_reg_weight * module.orthogonality_loss()
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, adapters, strict=True)), "no adapter moved"
    for n, p in module.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{name} changed the frozen {n}"


def test_a_method_reports_ranks_and_counts_that_agree(name):
    module = _module(name)
    ranks, caps = module.rank_pattern(), module.max_ranks()
    counts = module.parameter_counts()
    if name in OWN_PARAMETERS:  # no adapted matrix: every trained parameter outside the head is active
        assert ranks == caps == {}
        assert counts["active"] == counts["allocated"] == sum(p.numel() for p in module.adapter_parameters()) > 0
    else:
        assert len(ranks) == 2 * len(TARGETS)  # 2 layers of the tiny BERT
        assert list(ranks) == list(caps) and all(0 < ranks[k] <= caps[k] for k in ranks)
    assert 0 < counts["active"] <= counts["allocated"]
    assert counts["modules_to_save"] == sum(p.numel() for n, p in module.named_parameters() if "classifier" in n)
    reg = module.method.regularizer(module.backbone)
    assert reg is None or (reg.dim() == 0 and torch.isfinite(reg))


def test_a_method_rebuilds_from_its_config(name):
    method = _module(name).method
    config = method.as_config()
    assert config["class_path"].startswith("flexlora_pl.methods.") or "." in config["class_path"]
    again = build_method(config)
    assert type(again) is type(method) and again.as_config() == config
    assert METHODS[method.name] is type(method)


def test_a_method_offers_a_driver_exactly_when_its_ranks_move(name):
    module = _module(name)
    driver = module.method.allocation_driver(AllocationSettings(t_warmup=1, t_final=1, delta_t=1))
    assert module.method.moves_ranks == (driver is not None)
    if driver is not None:
        assert isinstance(driver, AllocationDriver)
        names = driver.bind(module)
        assert names == list(module.rank_pattern())  # the driver's layers are the module's adapted matrices


def test_an_unregistered_subclass_is_not_a_registered_method():
    class Unnamed(AdaptationMethod):
        def adapt(self, backbone, modules_to_save, seed):
            return backbone

        def adapter_parameters(self, model):
            return []

        def rank_pattern(self, model):
            return {}

        def max_ranks(self, model):
            return {}

    assert Unnamed not in METHODS.values()
    with pytest.raises(ValueError, match="unknown method 'unnamed'; registered methods"):
        build_method("unnamed")
