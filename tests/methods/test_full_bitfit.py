"""Full fine-tuning and BitFit: the methods without ranks, in the same harness as the adapters.

Runs through the real ``flexlora`` command with ``configs/methods/{full,bitfit}.yaml`` composed over the tiny run
(the loss goes down, ``metrics.json`` and the run folder say what the run was, checkpoints resume bitwise), the
merged export equal to the trained model and the adapter exports refused, the parameter counts on the real
DeBERTaV3-base architecture against the paper's, and the refusals of a BitFit that would train nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_bert, tiny_llama, tiny_run_folder
from shapes import DEBERTA_V3_BASE
from tiny_run import RUN_CHANGES

from flexlora_pl.cli import build_cli
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.export import export_peft_adapter
from flexlora_pl.methods import METHODS, BitFit, FullFineTuning, build_method
from flexlora_pl.methods.base import recognize_method
from flexlora_pl.tasks.sequence_classification import DEBERTA_TARGETS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"full": ROOT / "configs" / "methods" / "full.yaml", "bitfit": ROOT / "configs" / "methods" / "bitfit.yaml"}
HEAD = ("backbone.classifier.weight", "backbone.classifier.bias")


@pytest.fixture
def run_root(tmp_path, tiny_glue_root) -> Path:
    """A fresh folder with the tiny model and data (links) and ``run.yaml``; runs go to ``<it>/runs``."""
    return tiny_run_folder(tmp_path, tiny_glue_root, RUN_CHANGES)


def cli_of(root: Path, method: str, *extra: str, run: bool = True, command: str = "fit"):
    """``flexlora <command> --config run.yaml --config configs/methods/<method>.yaml <extra>``."""
    args = ["--config", str(root / "run.yaml"), "--config", str(CONFIGS[method]), *extra]
    return build_cli([command, *args] if run else args, run=run)


def inputs(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 64, (n, 9), generator=gen), "attention_mask": torch.ones(n, 9, dtype=int)}


def trained_tensors(cli) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in cli.model.named_parameters() if p.requires_grad}


def build_module(method):
    from flexlora_pl import FlexLoRAModule

    return FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], method=method)


class _Losses(L.Callback):
    """The training loss of every optimizer step."""

    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


# --------------------------------------------------------------------------- runs through the CLI
@pytest.mark.parametrize("name", ["full", "bitfit"])
def test_each_method_trains_through_the_cli_records_itself_and_exports_merged_only(run_root, name, caplog, capsys):
    from transformers import AutoModelForSequenceClassification

    cli = cli_of(run_root, name, run=False)
    base = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    losses = _Losses()
    cli.trainer.callbacks.append(losses)
    with caplog.at_level(logging.INFO):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 12 and cli.model.method_name == name
    assert sum(losses.values[-3:]) < 0.9 * sum(losses.values[:3]), losses.values  # it learns

    # what it trained: everything (full), the biases (BitFit, all of them by default); the rest did not move
    moved = {n for n, p in cli.model.named_parameters() if not torch.equal(p, base[n])}
    trainable = set(trained_tensors(cli))
    expected = set(base) if name == "full" else {n for n in base if n.endswith(".bias")} | set(HEAD)
    assert trainable == expected and moved <= trainable and set(HEAD) <= moved
    if name == "full":  # a backbone weight moved too
        assert "backbone.bert.encoder.layer.0.attention.self.query.weight" in moved

    folder = Path(cli.trainer.log_dir)
    record = json.loads((folder / "metrics.json").read_text())
    assert record["run"]["method"] == name and record["fit"]["status"] == "finished"
    head = sum(p.numel() for n, p in cli.model.named_parameters() if n in HEAD)
    adapter_group = sum(p.numel() for n, p in cli.model.named_parameters() if n in trainable and n not in HEAD)
    assert record["parameters"] == {"trainable": adapter_group + head, "active": adapter_group,
                                    "allocated": adapter_group, "modules_to_save": head,
                                    "frozen": sum(p.numel() for p in base.values()) - adapter_group - head}
    assert "allocation" not in record["fit"]
    # the run says once that its checkpoints hold the whole model (full), and that it has no ranks to draw
    assert record["run"].get("method_facts") == ({"checkpoint": "whole model (nothing frozen)"} if name == "full"
                                                 else None)
    assert not (folder / "rank_pattern.json").exists()
    said = [r.getMessage() for r in caplog.records if "adapts no matrix" in r.getMessage()]
    assert said == [f"RankReallocation: method '{name}' adapts no matrix (it has no ranks); no allocation event "
                    "fires in this run",
                    f"RankHeatmap: method '{name}' adapts no matrix (it has no ranks): no rank heat-map and no "
                    "rank_pattern.json"]
    groups = [group["name"] for group in cli.trainer.optimizers[0].param_groups]
    assert groups == ["adapter", "modules_to_save"]  # the head in its own group, as under every method
    start = [r.getMessage() for r in caplog.records if "backbone parameters trained" in r.getMessage()]
    assert len(start) == 1 and start[0].startswith(f"{type(cli.model.method).__name__}: no adapter; "
                                                   f"{adapter_group:,} backbone parameters trained")

    tested = cli_of(run_root, name, "--ckpt_path", "last", command="test")
    ckpt = Path(tested.trainer.ckpt_path)  # the run's most trained state
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 12
    if name == "full":  # nothing frozen: the whole model, no base to rebuild
        assert "flexlora_base" not in saved and set(saved["state_dict"]) == set(cli.model.state_dict())
    else:  # slim: the frozen weights are left out
        assert saved["flexlora_base"]["frozen_tensors"] > 0
        assert {k for k in saved["state_dict"] if k.endswith(".weight")} == {HEAD[0]}

    assert "test/score" in tested.trainer.callback_metrics
    for n, p in tested.model.named_parameters():
        assert torch.equal(p, dict(cli.model.named_parameters())[n]), n

    x = inputs()
    expected_logits = cli.model.eval()(**x).logits
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "merged"), "--format", "merged"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(run_root / "merged").eval()
    torch.testing.assert_close(merged(**x).logits, expected_logits, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "peft"), "--format", "peft"]) == 1
    err = capsys.readouterr().err
    assert f"method '{name}' ({type(cli.model.method).__name__}) cannot be exported as a peft adapter" in err
    assert "--format merged" in err and not (run_root / "peft").exists()
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "adapter"), "--format", "adapter"]) == 1
    assert "cannot be exported as a FlexLoRA adapter checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["full", "bitfit"])
def test_resume_from_a_mid_run_checkpoint_is_bitwise_the_uninterrupted_run(run_root, name):
    first = cli_of(run_root, name, "--trainer.max_epochs", "1")  # stops at step 6 of 12
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    resumed = cli_of(run_root, name, "--ckpt_path", str(last))
    whole = cli_of(run_root, name)
    assert resumed.trainer.global_step == whole.trainer.global_step == 12
    a, b = trained_tensors(whole), trained_tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 2
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert not all(torch.equal(a[k], v) for k, v in trained_tensors(first).items())  # the second half moved them


def test_the_method_configs_compose_over_a_task_config_and_drop_the_adapters_settings(capsys):
    import yaml

    for name, init_args in (("full", None), ("bitfit", {"target_modules": "all"})):
        with pytest.raises(SystemExit) as done:
            build_cli(["fit", "--config", str(ROOT / "configs" / "glue_rte.yaml"), "--config", str(CONFIGS[name]),
                       "--print_config"])
        assert done.value.code in (0, None)
        method = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["method"]
        assert method["class_path"] == f"flexlora_pl.methods.{type(build_method(name)).__name__}"
        assert method.get("init_args") == init_args  # no rank, α, dropout or the task's LoRA targets


# --------------------------------------------------------------------------- counts
def _deberta_v3_base():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    # microsoft/deberta-v3-base has no absolute position table (position_biased_input: false); transformers'
    # default would add one of 512 x 768, which the adapters' counts never see but full fine-tuning's would
    with torch.device("meta"):
        return DebertaV2ForSequenceClassification(DebertaV2Config(**DEBERTA_V3_BASE, position_biased_input=False))


def test_deberta_v3_base_counts_full_fine_tuning_and_bitfit_against_the_paper():
    h, inner, layers, vocab = 768, 3072, 12, 128_100
    per_layer_biases = 4 * h + inner + h + 2 * h  # q, k, v, attention output, intermediate, output; 2 LayerNorms
    per_layer = 4 * h * h + 2 * h * inner + per_layer_biases + 2 * h  # + the LayerNorms' weights
    embeddings = vocab * h + 2 * h  # word embeddings and their LayerNorm
    relative = 2 * 256 * h + 2 * h  # the relative position embeddings (2 x position_buckets) and their LayerNorm
    head = h * h + h + 2 * h + 2  # pooler and a 2-label classifier (modules_to_save)
    cases = {
        FullFineTuning(): embeddings + relative + layers * per_layer,
        BitFit(): layers * per_layer_biases + 2 * h,  # + the two LayerNorm biases outside the layers
        BitFit(None).with_default_targets(DEBERTA_TARGETS): layers * (4 * h + inner + h),  # the 72 linear layers'
    }
    for method, expected in cases.items():
        model = method.adapt(_deberta_v3_base(), ["pooler", "classifier"], seed=0)
        counts = method.parameter_counts(model)
        assert counts == {"active": expected, "allocated": expected}, type(method).__name__
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + head
        assert method.rank_pattern(model) == method.max_ranks(model) == {}
    full, bitfit, bitfit_linear = cases.values()
    assert (full, bitfit, bitfit_linear, head) == (183_831_552, 102_912, 82_944, 592_130)
    # the paper prints 184.3M: 0.25 % more than the backbone alone (183.8M), 0.07 % less than with the head (184.4M)
    assert abs(full - 184.3e6) / 184.3e6 < 0.003 and abs(full + head - 184.3e6) / 184.3e6 < 0.001
    assert round(bitfit / 1e6, 1) == round(bitfit_linear / 1e6, 1) == 0.1  # the paper's 0.1M


# --------------------------------------------------------------------------- refusals and recognition
def test_bitfit_refuses_a_selection_without_biases_naming_the_modules_and_the_fix():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no bias term outside modules_to_save .*bias-free "
                                         r".*Use another method for this backbone \(lora, full\)"):
        BitFit().adapt(tiny_llama(), [], 0)
    with pytest.raises(ValueError, match=r"entry 'q_proj' selects only modules without a bias term "
                                         r"\(\['model.layers.0.self_attn.q_proj', .*or give 'all' for every bias"):
        BitFit(["q_proj", "v_proj"]).adapt(tiny_llama(), [], 0)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module in BertForSequenceClassification"):
        BitFit(["nope"]).adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match=r"\['classifier'\] are both targets and in modules_to_save"):
        BitFit(["classifier"]).adapt(tiny_bert(), ["classifier"], 0)
    model = BitFit(["LayerNorm"]).adapt(tiny_bert(), ["classifier"], 0)  # any module that owns a bias
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained - {"classifier.weight", "classifier.bias"} == {n for n, _ in model.named_parameters()
                                                                   if n.endswith("LayerNorm.bias")}


def test_bitfit_refuses_through_the_cli_before_the_run_folder_exists(run_root):
    with pytest.raises(ValueError, match="'word_embeddings' selects only modules without a bias term"):
        cli_of(run_root, "bitfit", "--model.init_args.method.init_args.target_modules", "[word_embeddings]")
    assert not (run_root / "runs").exists()


def test_no_plain_model_is_taken_for_full_fine_tuning_or_bitfit(tmp_path):
    model = FullFineTuning().adapt(tiny_bert(), ["classifier"], 0)
    assert FullFineTuning.recognize(model) is None and BitFit.recognize(model) is None
    with pytest.raises(ValueError, match="holds no adapter of a registered method"):
        recognize_method(model)  # a plain model is ambiguous: fully fine-tuned from what?
    for method in (FullFineTuning(), BitFit()):
        module = build_module(method)
        with pytest.raises(ValueError, match=f"method '{method.name}' .* cannot be exported as a peft adapter"):
            export_peft_adapter(module, tmp_path / method.name)
        assert not (tmp_path / method.name).exists()
        merged = method.merge(module.backbone)
        assert merged is not module.backbone and all(
            torch.equal(a, b) for a, b in zip(merged.state_dict().values(), module.backbone.state_dict().values(),
                                              strict=True))
    assert METHODS["full"] is FullFineTuning and METHODS["bitfit"] is BitFit
    assert build_method(BitFit().as_config()).target_modules == ["all"]
