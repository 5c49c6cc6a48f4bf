"""A 4-bit base (QLoRA) for the causal-LM task: ``model.init_args.quantization: nf4 | fp4`` loads the frozen base
through bitsandbytes, the shipped ``configs/commonsense/llama3_8b_r8_qlora.yaml`` trains and moves ranks on it
through the ``flexlora`` command, its checkpoints hold neither the packed base nor its quantization statistics, a
resumed run is bitwise the uninterrupted one, and a merged export is the dequantized base with the update added,
in bfloat16, loadable without bitsandbytes. Runs on CPU (bitsandbytes' CPU path) with a tiny LLaMA whose linear
layers are 64 wide (its block size)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from commonsense_helpers import write_commonsense_data, write_tiny_llama

from flexlora_pl import flexlora_layers
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.cli.main import build_cli
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.quantized import dequantized_weight, is_quantized_linear, merge_into_dequantized
from flexlora_pl.export.merged import merged_model
from flexlora_pl.methods import AdaLoRA, LoRA
from flexlora_pl.tasks import causal_lm
from flexlora_pl.tasks.causal_lm import FlexLoRACausalLM

CONFIGS = Path(__file__).parents[2] / "configs"
QLORA = CONFIGS / "commonsense" / "llama3_8b_r8_qlora.yaml"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    write_tiny_llama(root / "model", hidden=64, intermediate=128)
    write_commonsense_data(root)
    return root


def qlora_args(root: Path, save_dir: str, *extra: str) -> list[str]:
    """The shipped QLoRA config on the tiny model and data: 4 optimizer steps an epoch, events from step 2."""
    return ["--config", str(QLORA), "--model.init_args.model_name_or_path", str(root / "model"),
            "--data.init_args.train_file", str(root / "commonsense_170k.json"),
            "--data.init_args.test_dir", str(root / "dataset"), "--data.init_args.val_size", "8",
            "--data.init_args.eval_batch_size", "8", "--model.init_args.max_new_tokens", "4",
            "--model.init_args.method.init_args.init_rank", "4", "--model.init_args.method.init_args.max_rank", "6",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.val_check_interval", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root / save_dir),
            "--reallocation.t_warmup", "1", "--reallocation.t_final", "1", "--reallocation.delta_t", "1",
            "--reallocation.total_steps", "8", "--model.init_args.lr_scheduler.init_args.warmup_steps", "1",
            "--model.init_args.lr_scheduler.init_args.total_steps", "8",  # a run cut in two keeps the whole's schedule
            "--model.init_args.optimizer.init_args.lr", "0.02", *extra]


def trained(cli) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad} | {
        n: b.clone() for n, b in cli.model.named_buffers() if n.endswith("rank_mask")}


@pytest.fixture(scope="module")
def runs(root):
    """The uninterrupted 2-epoch run, and the same run cut after epoch 1 and resumed from its last.ckpt."""
    whole = build_cli(["fit", *qlora_args(root, "whole", "--trainer.max_epochs", "2")])
    first = build_cli(["fit", *qlora_args(root, "cut", "--trainer.max_epochs", "1")])
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = build_cli(["fit", *qlora_args(root, "cut", "--trainer.max_epochs", "2", "--ckpt_path", "last")])
    return whole, first, last, resumed


def test_the_qlora_config_trains_flexlora_on_4_bit_layers_and_moves_ranks(runs):
    whole, first, _, _ = runs
    assert whole.trainer.global_step == 8 and first.trainer.global_step == 4
    layers = dict(flexlora_layers(whole.model.backbone))
    assert len(layers) == 10 and all(is_quantized_linear(layer.base) for layer in layers.values())
    assert all(layer.base.weight.dtype == torch.uint8 for layer in layers.values())  # packed: 2 weights a byte
    assert all(layer.lora_lambda.dtype == torch.float32 for layer in layers.values())
    pattern = json.loads((Path(whole.trainer.log_dir) / "rank_pattern.json").read_text())
    ranks = list(pattern["rank_pattern"].values())
    assert pattern["events"] and sum(ranks) == 4 * 10 and ranks != [4] * 10  # ranks moved, the total kept
    assert any(bool(layer.masked_lambda().abs().sum() > 0) for layer in layers.values())


def test_a_checkpoint_holds_neither_the_4_bit_base_nor_its_statistics(runs):
    last = runs[2]
    state = torch.load(last, map_location="cpu", weights_only=False)
    keys = list(state["state_dict"])
    assert not [k for k in keys if ".base.weight" in k or "absmax" in k or "quant_" in k], keys[:8]
    assert any(k.endswith("lora_lambda") for k in keys)
    assert state["flexlora_base"]["frozen_tensors"] > 10 * 6  # each 4-bit weight and its 5 statistics
    assert last.stat().st_size < 2_000_000


def test_a_resumed_run_is_bitwise_the_uninterrupted_one(runs):
    whole, _, last, resumed = runs
    assert resumed.trainer.global_step == 8 and Path(resumed.trainer.ckpt_path) == last
    a, b = trained(whole), trained(resumed)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_the_resumed_run_tests_and_predicts_on_its_4_bit_base(root, runs, caplog):
    """What a user runs next: ``flexlora test`` and ``predict`` of the resumed run's last.ckpt, generation through
    the 4-bit layers."""
    resumed, version = runs[3], Path(runs[3].trainer.log_dir)
    args = [*qlora_args(root, "cut"), "--ckpt_path", "last", "--version", version.name.removeprefix("version_")]
    with caplog.at_level("INFO"):
        tested = build_cli(["test", *args])
    assert "Commonsense accuracy" in caplog.text and "mean of 8" in caplog.text
    assert all(is_quantized_linear(layer.base) for _, layer in flexlora_layers(tested.model.backbone))
    metrics = json.loads((version / "metrics.json").read_text())["test"]["metrics"]
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    build_cli(["predict", *args])
    rows = [json.loads(line) for line in (version / "predictions" / "predictions_boolq.jsonl").read_text().splitlines()]
    assert rows and all({"prediction", "generation", "correct"} <= row.keys() for row in rows)
    assert resumed.trainer.global_step == 8


def test_the_merged_export_is_the_dequantized_base_plus_the_update_in_bf16(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    whole, _, _, _ = runs
    ckpt = Path(whole.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--format", "merged"]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert "dequantized" in (tmp_path / "merged" / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # no bitsandbytes config: a plain model
    assert not any(is_quantized_linear(m) for m in plain.modules())
    module = whole.model.eval()
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = module.backbone(input_ids=ids).logits.float()
        merged = plain(input_ids=ids).logits.float()
        base = merge_into_dequantized(_unadapted(module), {})(input_ids=ids).logits.float()
    # the update is in the export: the merged model is far nearer the adapted one than the base without ΔW is
    assert (merged - adapted).abs().max() < 0.25 * (base - adapted).abs().max()


def _unadapted(module) -> torch.nn.Module:
    """A copy of the module's backbone with each FlexLoRA layer replaced by its 4-bit base layer (no update)."""
    import copy

    plain = copy.deepcopy(module.backbone)
    for name, layer in list(flexlora_layers(plain)):
        plain.set_submodule(name, layer.base)
    return plain


@pytest.mark.parametrize("method", [LoRA(r=2, alpha=4), AdaLoRA(init_rank=4, target_rank=2, alpha=4)],
                         ids=["lora", "adalora"])
def test_peft_methods_adapt_the_4_bit_layers_and_merge_into_the_dequantized_weights(root, method):
    module = FlexLoRACausalLM(str(root / "model"), method=method, quantization="fp4")
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(module.method.adapter_parameters(module.backbone), lr=0.05)
    for _ in range(3):
        module.backbone(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layers = list(module.method.layers(module.backbone))
    assert len(layers) == 10 and all(is_quantized_linear(layer.get_base_layer()) for _, layer in layers)
    plain = merged_model(module)
    assert not any(is_quantized_linear(m) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    for name, layer in layers:  # each weight is the dequantized base plus the layer's ΔW, rounded once to bf16
        expected = dequantized_weight(layer.get_base_layer()) + module.method.layer_delta_weight(layer).float()
        merged = plain.get_submodule(name).weight
        assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected.to(torch.bfloat16)), name
    assert any(bool(module.method.layer_delta_weight(layer).abs().max() > 0) for _, layer in layers)


def test_merge_into_dequantized_adds_each_delta_in_float32(root):
    module = FlexLoRACausalLM(str(root / "model"), method=LoRA(r=2), quantization="nf4")
    plain = module.method.unloaded_copy(module.backbone, merge=False)
    name, layer = next(iter(_quantized(plain)))
    delta = torch.randn(layer.out_features, layer.in_features, generator=torch.Generator().manual_seed(2)) * 1e-3
    expected = dequantized_weight(layer) + delta
    merge_into_dequantized(plain, {name: delta}, dtype=torch.float32)
    assert torch.equal(plain.get_submodule(name).weight, expected)
    with pytest.raises(ValueError, match="name no 4-bit linear layer"):
        merge_into_dequantized(module.method.unloaded_copy(module.backbone, merge=False), {"lm_head": delta})


def _quantized(model):
    return [(n, m) for n, m in model.named_modules() if is_quantized_linear(m)]


def test_a_flexlora_layer_refuses_to_merge_into_a_4_bit_weight_in_place(root):
    module = FlexLoRACausalLM(str(root / "model"), quantization="nf4")
    layer = next(layer for _, layer in flexlora_layers(module.backbone))
    assert isinstance(layer, FlexLoRALinear)
    with pytest.raises(ValueError, match="quantized base.*flexlora-export --format merged"):
        layer.merge()


@pytest.mark.parametrize(("extra", "message"), [
    (["--config", str(CONFIGS / "methods" / "dora.yaml")], "'dora'.*cannot adapt a 4-bit base.*flexlora"),
    (["--config", str(CONFIGS / "methods" / "full.yaml")], "'full'.*cannot adapt a 4-bit base"),
    (["--model.init_args.quantization", "int4"], "quantization"),
], ids=["dora", "full", "int4"])
def test_a_4_bit_base_that_cannot_be_is_refused_before_the_base_is_loaded(root, monkeypatch, capsys, extra, message):
    def loaded(*args, **kwargs):
        raise AssertionError("the base was loaded before the refusal")

    monkeypatch.setattr(causal_lm, "_load_backbone", loaded)
    with pytest.raises((ValueError, SystemExit)) as refused:
        build_cli(["fit", *qlora_args(root, "refused"), *extra])
    text = str(refused.value) + capsys.readouterr().err
    assert re.search(message, text, flags=re.S), text[-2000:]
    assert not (root / "refused").exists()


def test_without_bitsandbytes_the_refusal_names_the_extra(root, monkeypatch):
    real = causal_lm.importlib.util.find_spec
    monkeypatch.setattr(causal_lm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r'bitsandbytes, which is not installed: pip install -e "\.\[qlora\]"'):
        FlexLoRACausalLM(str(root / "model"), quantization="nf4")


def test_quantization_is_refused_by_a_task_that_has_no_4_bit_base(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(CONFIGS / "demo.yaml"), "--model.init_args.quantization", "nf4",
                   "--print_config"])
    assert "quantization" in capsys.readouterr().err
