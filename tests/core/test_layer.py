"""FlexLoRALinear and inject_flexlora: identity at injection, trainable set, merge, bf16, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKBONES, run_backbone
from torch import nn

from flexlora_pl import FlexLoRALinear, flexlora_layers, inject_flexlora


def test_injection_is_the_identity_and_freezes_the_base(backbone_case):
    name, factory, targets, save, make_inputs = backbone_case
    model = factory()
    inputs = make_inputs()
    with torch.no_grad():
        before = run_backbone(model, inputs)
    adapted = inject_flexlora(model, targets, init_rank=4, max_rank=6, alpha=16, modules_to_save=save)
    with torch.no_grad():
        after = run_backbone(model, inputs)
    assert torch.equal(before, after), f"{name}: injection changed the output"
    assert adapted == [n for n, _ in flexlora_layers(model)]
    assert len(adapted) > 0
    for pname, param in model.named_parameters():
        is_adapter = pname.rsplit(".", 1)[-1] in {"lora_P", "lora_lambda", "lora_Q"}
        is_saved = any(pname.startswith(s + ".") for s in save)
        assert param.requires_grad == (is_adapter or is_saved), pname


def test_fused_qkv_is_adapted_like_any_linear():
    model = BACKBONES["vit"][0]()
    adapted = inject_flexlora(model, ["qkv"], init_rank=2, max_rank=3, alpha=4)
    layer = model.get_submodule(adapted[0])
    assert isinstance(layer, FlexLoRALinear)
    assert layer.out_features == 3 * layer.in_features


def _trained_layer(seed: int = 0) -> FlexLoRALinear:
    torch.manual_seed(seed)
    layer = FlexLoRALinear(nn.Linear(10, 7), init_rank=3, max_rank=5, alpha=6)
    with torch.no_grad():
        layer.lora_lambda.normal_()
        layer.lora_P.normal_()
        layer.lora_Q.normal_()
        layer.rank_mask.copy_(torch.tensor([True, False, True, True, False]))
    return layer


def test_forward_matches_the_dense_formula_and_ignores_masked_directions():
    layer = _trained_layer()
    x = torch.randn(4, 3, 10)
    m = layer.rank_mask.float()
    delta = layer.lora_P @ torch.diag(layer.lora_lambda * m) @ layer.lora_Q * (6 / 3)
    expected = x @ (layer.base.weight + delta).T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_equals_adapted_output_and_unmerge_restores():
    layer = _trained_layer()
    x = torch.randn(5, 10)
    weight = layer.base.weight.clone()
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        merged = layer(x)
        assert layer.merged
        torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), adapted)


def test_merged_model_equals_adapted_model():
    model = BACKBONES["bert"][0]()
    inject_flexlora(model, ["query", "value", "dense"], init_rank=2, max_rank=4, alpha=8)
    for _, layer in flexlora_layers(model):
        with torch.no_grad():
            layer.lora_lambda[: layer.init_rank].normal_()
    inputs = BACKBONES["bert"][3]()
    with torch.no_grad():
        adapted = run_backbone(model, inputs)
        for _, layer in flexlora_layers(model):
            layer.merge()
        merged = run_backbone(model, inputs)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_adapter_parameters_fp32():
    layer = _trained_layer()
    x = torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q))
    out.float().sum().backward()
    assert layer.lora_lambda.grad is not None and layer.lora_lambda.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), layer(x), rtol=5e-2, atol=5e-2)


def test_mask_is_a_persistent_buffer_in_the_state_dict():
    layer = _trained_layer()
    state = layer.state_dict()
    assert torch.equal(state["rank_mask"], layer.rank_mask)
    fresh = FlexLoRALinear(nn.Linear(10, 7), init_rank=3, max_rank=5, alpha=6)
    fresh.load_state_dict(state)
    assert fresh.rank == 3 and torch.equal(fresh.rank_mask, layer.rank_mask)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["nonexistent"]}, "match no nn.Linear"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": ["query"], "init_rank": 8, "max_rank": 4}, "max_rank \\(4\\) must be >= init_rank"),
        ({"target_modules": ["query"], "init_rank": 0}, "init_rank must be an integer >= 1"),
        ({"target_modules": ["query"], "max_rank": -1}, "max_rank must be an integer >= 1"),
        ({"target_modules": ["query"], "alpha": 0}, "alpha must be positive"),
        ({"target_modules": ["query"], "dropout": 1.0}, "dropout must be in"),
        ({"target_modules": ["attention"]}, "not an nn.Linear"),
        ({"target_modules": ["re:(unclosed"]}, "not a valid regular expression"),
        ({"target_modules": ["query"], "modules_to_save": ["heady"]}, "matches no module"),
        ({"target_modules": ["query", "classifier"], "max_rank": 4}, "more than layer 'classifier' can use"),
    ],
)
def test_bad_injection_arguments_raise_before_touching_the_model(kwargs, message):
    model = BACKBONES["bert"][0]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        inject_flexlora(model, **{"init_rank": 2, "max_rank": 4, "alpha": 8, **kwargs})
    assert not any(isinstance(m, FlexLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert state.keys() == model.state_dict().keys()


def test_a_max_rank_above_a_layers_rank_is_refused_naming_layer_shape_limit_and_fix():
    # tiny BERT: hidden 32, intermediate 48, so every attention and MLP matrix has rank <= 32
    model = BACKBONES["bert"][0]()
    with pytest.raises(ValueError) as err:
        inject_flexlora(model, ["query", "intermediate.dense"], init_rank=8, max_rank=40, alpha=8)
    message = str(err.value)
    for part in ("max_rank=40", "'bert.encoder.layer.0.attention.self.query'", "32×32", "= 32",
                 "8 r_max directions would be allocated and trained for nothing", "3 more adapted layers",
                 "Set max_rank <= 32", "out of target_modules"):
        assert part in message, (part, message)
    assert not any(isinstance(m, FlexLoRALinear) for m in model.modules()), "touched the model before refusing"
    # exactly min(d_in, d_out) is allowed, on a wide and on a tall layer
    assert len(inject_flexlora(model, ["query", "intermediate.dense"], init_rank=8, max_rank=32, alpha=8)) == 4
    FlexLoRALinear(nn.Linear(3, 10), init_rank=1, max_rank=3, alpha=1)
    with pytest.raises(ValueError, match=r"max_rank=4 is more than the layer can use: its weight is 10×3 .* = 3"):
        FlexLoRALinear(nn.Linear(3, 10), init_rank=1, max_rank=4, alpha=1)


def test_unknown_target_error_lists_candidates():
    model = BACKBONES["bert"][0]()
    with pytest.raises(ValueError, match="bert.encoder.layer.0.attention.self.query"):
        inject_flexlora(model, ["qery"])


def test_regex_targets_select_by_full_match():
    model = BACKBONES["llama"][0]()
    adapted = inject_flexlora(model, [r"re:.*layers\.1\.self_attn\.(q|v)_proj"], init_rank=2, max_rank=2)
    assert adapted == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_a_state_dict_taken_while_merged_reloads_as_merged():
    layer = _trained_layer()
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        fresh = FlexLoRALinear(nn.Linear(10, 7), init_rank=3, max_rank=5, alpha=6)
        fresh.load_state_dict(layer.state_dict())
        assert fresh.merged
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
