"""The LoRA and AdaLoRA baselines: peft's layers in the same harness as FlexLoRA.

Parameter counts on the real DeBERTaV3-base architecture, in-place injection (names, outputs, seeds),
runs through the real ``flexlora`` command with ``configs/methods/*.yaml`` composed over a task config,
AdaLoRA's allocation driven once per optimizer step (gradient accumulation included) and resumed exactly,
its orthogonality term counted once, and exports that plain peft and transformers load.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_bert, tiny_run_folder
from shapes import DEBERTA_V3_BASE
from tiny_run import RUN_CHANGES

from flexlora_pl.cli import build_cli
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.export import export_merged, export_peft_adapter
from flexlora_pl.methods import METHODS, AdaLoRA, FlexLoRA, LoRA, build_method
from flexlora_pl.methods.lora import peft_tuner
from flexlora_pl.tasks.sequence_classification import DEBERTA_TARGETS, FlexLoRASequenceClassifier

ROOT = Path(__file__).resolve().parents[2]
METHOD_CONFIGS = {"lora": ROOT / "configs" / "methods" / "lora.yaml",
                  "adalora": ROOT / "configs" / "methods" / "adalora.yaml"}
TASK_CONFIGS = sorted([ROOT / "configs" / "demo.yaml", *(ROOT / "configs").glob("glue_*.yaml")])
TARGETS = ["query", "value"]


def tiny_method(name: str):
    """The method on the tiny BERT (hidden size 32): small ranks."""
    return LoRA(TARGETS, r=2, alpha=4) if name == "lora" else AdaLoRA(TARGETS, init_rank=4, target_rank=2, alpha=4)


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 64, (n, 9), generator=gen),
            "attention_mask": torch.ones(n, 9, dtype=torch.long), "labels": torch.randint(0, 2, (n,), generator=gen)}


def scramble(module, seed: int = 1) -> None:
    """Trained-looking adapters and head: every adapter and head parameter random (λ included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("method, expected", [
    (LoRA(DEBERTA_TARGETS, r=8), {"adapter": 1_327_104, "active": 1_327_104, "allocated": 1_327_104}),
    (AdaLoRA(DEBERTA_TARGETS, init_rank=12, target_rank=8),  # + one λ per direction: 72 matrices × 12
     {"adapter": 1_990_656 + 864, "active": 1_990_656 + 864, "allocated": 1_990_656 + 864}),
], ids=["lora", "adalora"])
def test_deberta_v3_base_adapter_counts_match_the_paper(method, expected):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    with torch.device("meta"):  # the real architecture, no weights, no download: peft injects on meta too
        model = DebertaV2ForSequenceClassification(DebertaV2Config(**DEBERTA_V3_BASE))
    model = method.adapt(model, ["pooler", "classifier"], seed=0)
    assert len(method.rank_pattern(model)) == 72
    assert sum(p.numel() for p in method.adapter_parameters(model)) == expected["adapter"]
    counts = method.parameter_counts(model)
    assert (counts["active"], counts["allocated"]) == (expected["active"], expected["allocated"])
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("pooler.", "classifier.")))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected["adapter"] + head
    if isinstance(method, AdaLoRA):  # at the end of a run: an average rank of 8
        for _, layer in method.layers(model):
            layer.rank_mask[8:] = False
        assert method.parameter_counts(model)["active"] == 1_327_104 + 576


# --------------------------------------------------------------------------- injection
@pytest.mark.parametrize("name", ["lora", "adalora"])
def test_adapted_backbone_keeps_its_names_its_output_and_the_global_rng(name):
    base = tiny_bert()
    x = batch()
    reference = base(**x).logits
    flex = FlexLoRA(TARGETS, init_rank=2, max_rank=4).adapt(tiny_bert(), ["classifier"], 0)
    flex_names = [n for n, m in flex.named_modules() if isinstance(m, FlexLoRALinear)]
    method = tiny_method(name)
    state = torch.random.get_rng_state()
    model = method.adapt(base, ["classifier"], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the seeded init leaves the global RNG alone
    assert torch.equal(model(**x).logits, reference)  # identity at start (B = 0, λ = 0): the same model object
    assert model is base and type(model).__name__ == "BertForSequenceClassification"
    assert list(method.rank_pattern(model)) == flex_names  # the same module names as FlexLoRA's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n} | {"classifier.weight",
                                                                                      "classifier.bias"}
    assert {id(p) for p in method.adapter_parameters(model)} == {
        id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert "bert.encoder.layer.0.attention.self.query.base_layer.weight" in model.state_dict()
    again = tiny_method(name).adapt(tiny_bert(), ["classifier"], seed=3)
    other = tiny_method(name).adapt(tiny_bert(), ["classifier"], seed=4)
    first = [p for n, p in sorted(model.named_parameters()) if ".lora_A" in n]
    assert all(torch.equal(a, b) for a, b in zip(first, [p for n, p in sorted(again.named_parameters())
                                                          if ".lora_A" in n], strict=True))
    assert not torch.equal(first[0], next(p for n, p in sorted(other.named_parameters()) if ".lora_A" in n))
    if name == "lora":
        assert method.regularizer(model) is None
    else:
        assert method.regularizer(model) > 0
    assert build_method(method.as_config()).as_config() == method.as_config()
    assert METHODS[name] is type(method)
    # pickling (ddp_spawn, torch.save of a module): the tuner travels with its model, plans are rebuilt
    method_copy, model_copy = pickle.loads(pickle.dumps((method, model)))
    assert peft_tuner(model_copy).model is model_copy and torch.equal(model_copy(**x).logits, reference)
    if name == "adalora":
        torch.testing.assert_close(method_copy.regularizer(model_copy), method.regularizer(model))


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"target_rank \(12\) must be below init_rank \(12\).*LoRA"):
        AdaLoRA(init_rank=12, target_rank=12)
    with pytest.raises(ValueError, match="beta1 must lie strictly between 0 and 1, got 1.0"):
        AdaLoRA(beta1=1.0)
    with pytest.raises(ValueError, match="LoRA: r must be an integer >= 1, got 0"):
        LoRA(r=0)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no nn.Linear"):
        LoRA(["nope"]).adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match="rank 40 exceeds min.in_features, out_features. of"):
        LoRA(TARGETS, r=40).adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        LoRA(TARGETS).adapt(tiny_bert(), ["head"], 0)
    model = LoRA(TARGETS, r=2).adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match="already holds adapters"):
        LoRA(TARGETS, r=2).adapt(model, ["classifier"], 0)
    method = AdaLoRA(TARGETS, init_rank=4, target_rank=2)
    adapted = method.adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match=r"has no budgeting phase .*t_warmup < T - t_final = 6.*train longer"):
        method.configure_schedule(adapted, total_step=10, tinit=6, tfinal=4, delta_t=2)


# --------------------------------------------------------------------------- runs through the CLI
@pytest.fixture
def run_root(tmp_path, tiny_glue_root) -> Path:
    """A fresh folder with the tiny model and data (links) and ``run.yaml``; runs go to ``<it>/runs``."""
    return tiny_run_folder(tmp_path, tiny_glue_root, RUN_CHANGES)


def fit(root: Path, method: str, *extra: str, command: str = "fit"):
    """``flexlora <command> --config run.yaml --config configs/methods/<method>.yaml`` with tiny ranks."""
    ranks = (["--model.init_args.method.init_args.r", "2"] if method == "lora" else
             ["--model.init_args.method.init_args.init_rank", "4", "--model.init_args.method.init_args.target_rank",
              "2"])
    return build_cli([command, "--config", str(root / "run.yaml"), "--config", str(METHOD_CONFIGS[method]),
                      *ranks, *extra])


def reallocation(cli):
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RankReallocation")


def adalora_state(cli) -> dict[str, torch.Tensor]:
    """What the allocation decided: every layer's mask and which λ are zero."""
    state = {}
    for name, layer in cli.model.method.layers(cli.model.backbone):
        state[f"{name}.rank_mask"] = layer.rank_mask.clone()
        state[f"{name}.zero"] = (layer.lora_E["default"] == 0).view(-1).clone()
    return state


@pytest.mark.parametrize("name", ["lora", "adalora"])
def test_each_method_fits_tests_validates_and_exports_through_the_cli(run_root, name):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cli = fit(run_root, name)
    folder = Path(cli.trainer.log_dir)
    assert cli.trainer.global_step == 12 and type(cli.model.method) is type(tiny_method(name))
    record = json.loads((folder / "metrics.json").read_text())
    assert record["run"]["method"] == name and record["fit"]["status"] == "finished"
    assert record["parameters"]["active"] == cli.model.parameter_counts()["active"]
    pattern = json.loads((folder / "rank_pattern.json").read_text())
    assert pattern["method"] == name and pattern["rank_pattern"] == cli.model.rank_pattern()
    orth = float(cli.trainer.callback_metrics["train/orth_reg"])
    if name == "lora":
        assert pattern["events"] == [] and set(pattern["rank_pattern"].values()) == {2} and orth == 0.0
    else:  # AdaLoRA moved ranks down to the target budget: 2 per matrix on average
        assert pattern["events"] and pattern["total_rank"] == 2 * len(pattern["rank_pattern"])
        assert pattern["events"][-1]["ranks"] == list(pattern["rank_pattern"].values())
        assert 0.0 < orth < float("inf")

    tested = fit(run_root, name, "--ckpt_path", "last", command="test")
    ckpt = Path(tested.trainer.ckpt_path)  # the run's most trained state
    assert "test/score" in tested.trainer.callback_metrics
    assert tested.model.rank_pattern() == cli.model.rank_pattern()
    validated = fit(run_root, name, "--ckpt_path", "last", command="validate")
    assert float(validated.trainer.callback_metrics["val/loss"]) == pytest.approx(
        float(cli.trainer.callback_metrics["val/loss"]), abs=1e-5)
    saved = torch.load(ckpt, weights_only=True)  # driver state included: tensors and plain types only
    assert saved["global_step"] == 12
    if name == "adalora":
        driver = saved["callbacks"][next(k for k in saved["callbacks"] if "RankReallocation" in k)]["driver"]
        assert driver["masked"] is True and driver["exp_avg_ipt"] == {}  # peft clears its EMAs at T - t_final
        assert any(k.endswith("rank_mask") for k in saved["state_dict"])

    # flexlora-export of the checkpoint: a plain peft adapter and a merged model, both equal to the run's model
    x = {k: v for k, v in batch().items() if k != "labels"}
    expected = cli.model.eval()(**x).logits
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "peft"), "--format", "peft"]) == 0
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "merged"), "--format", "merged"]) == 0
    base = AutoModelForSequenceClassification.from_pretrained(run_root / "model").eval()
    adapter = PeftModel.from_pretrained(base, str(run_root / "peft")).eval()
    torch.testing.assert_close(adapter(**x).logits, expected, rtol=1e-4, atol=1e-5)
    merged = AutoModelForSequenceClassification.from_pretrained(run_root / "merged").eval()
    torch.testing.assert_close(merged(**x).logits, expected, rtol=1e-4, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_modules())

    if name == "adalora":  # after T - t_final peft re-applies the final masks every step, also once resumed
        longer = fit(run_root, name, "--ckpt_path", "last", "--trainer.max_epochs", "3",
                     "--reallocation.total_steps", "12")
        assert longer.trainer.global_step == 18 and reallocation(longer).history == reallocation(cli).history
        assert longer.model.rank_pattern() == cli.model.rank_pattern()
        state = adalora_state(longer)
        for layer, _ in longer.model.method.layers(longer.model.backbone):
            assert torch.equal(state[f"{layer}.zero"], ~state[f"{layer}.rank_mask"])


def test_lora_fires_no_event_and_says_so_once(run_root, caplog):
    with caplog.at_level(logging.INFO):
        cli = fit(run_root, "lora", "--trainer.max_epochs", "1")
    said = [r.getMessage() for r in caplog.records if "keeps every rank fixed" in r.getMessage()]
    assert said == ["RankReallocation: method 'lora' keeps every rank fixed; no allocation event fires in this run"]
    realloc = reallocation(cli)
    assert realloc.history == [] and realloc._driver is None


def test_adalora_masks_move_with_one_update_per_optimizer_step_under_accumulation(run_root, monkeypatch):
    from peft.tuners.adalora import AdaLoraModel

    calls: list[tuple[int, bool]] = []
    original = AdaLoraModel.update_and_allocate

    def counted(self, global_step):
        grads = [p.grad for n, p in self.model.named_parameters() if ".lora_" in n]
        calls.append((global_step, all(g is not None and bool(g.abs().sum() > 0) for g in grads)))
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", counted)
    # 6 batches per epoch, 2 per optimizer step: 6 optimizer steps; masks at 4, the final budget at 5
    cli = build_cli(["--config", str(run_root / "run.yaml"), "--config", str(METHOD_CONFIGS["adalora"]),
                     "--model.init_args.method.init_args.init_rank", "4",
                     "--model.init_args.method.init_args.target_rank", "2",
                     "--trainer.accumulate_grad_batches", "2"], run=False)
    before = adalora_state(cli)
    assert all(bool(v.all()) for k, v in before.items() if k.endswith("rank_mask"))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6
    assert calls == [(step, True) for step in range(1, 7)]  # once per optimizer step, gradients still there
    history = reallocation(cli).history
    assert [event["step"] for event in history] == [4, 5]
    assert history[-1]["budget"] == 2 * 4 and sum(history[-1]["ranks"]) == 8
    assert history[0]["pruned"] and history[0]["budget"] < 16
    after = adalora_state(cli)
    for name, _ in cli.model.method.layers(cli.model.backbone):
        mask = after[f"{name}.rank_mask"]
        assert torch.equal(after[f"{name}.zero"], ~mask)  # peft's zeroed λ are exactly the masked directions
    assert not all(bool(v.all()) for k, v in after.items() if k.endswith("rank_mask"))
    names = reallocation(cli).layer_names
    assert names == list(cli.model.rank_pattern()) and names[0].startswith("backbone.bert.encoder.layer.0")
    # the λ peft scored at each event, active entries only, like FlexLoRA's (notebooks plot both)
    spectra = reallocation(cli).spectra
    assert [event["step"] for event in spectra] == [4, 5] and sorted(spectra[0]["spectra"]) == sorted(names)
    assert all(len(values) == 4 for values in spectra[0]["spectra"].values())  # all 4 directions active before
    assert [len(spectra[1]["spectra"][n]) for n in names] == history[0]["ranks"]


def test_adalora_resume_reproduces_the_uninterrupted_run(run_root):
    total = ["--reallocation.total_steps", "12"]  # the same schedule for the run cut in two
    first = fit(run_root, "adalora", *total, "--trainer.max_epochs", "1")  # stops at step 6 (events at 4 and 6)
    assert first.trainer.global_step == 6 and [e["step"] for e in reallocation(first).history] == [4, 6]
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the cut: between two events
    resumed = fit(run_root, "adalora", *total, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 12 and Path(resumed.trainer.ckpt_path) == last
    whole = fit(run_root, "adalora", *total)
    assert reallocation(resumed).history == reallocation(whole).history
    assert [e["step"] for e in reallocation(whole).history] == [4, 6, 8, 10, 11]
    assert resumed.model.rank_pattern() == whole.model.rank_pattern()
    a, b = adalora_state(whole), adalora_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (n, p), (m, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n


def test_adalora_orthogonality_term_is_peft_s_and_is_added_once(tiny_glue_root):
    method = AdaLoRA(TARGETS, init_rank=4, target_rank=2, alpha=4, orth_reg_weight=0.3)
    module = FlexLoRASequenceClassifier(model_name_or_path=str(tiny_glue_root / "model"), method=method)
    scramble(module)
    module.eval()  # no dropout: the forward passes below are comparable
    x = batch()
    backbone = module.backbone
    out = backbone(**x)
    # the model's own forward adds nothing: its loss is the task's cross-entropy
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, x["labels"]))
    reg = method.regularizer(backbone)
    # peft's own term, from its tuner's forward with orth_reg_weight 1 (what peft adds to outputs.loss)
    config = peft_tuner(backbone).peft_config["default"]
    assert config.orth_reg_weight == 0.0  # peft is never asked to add it
    config.orth_reg_weight = 1.0
    try:
        peft_term = peft_tuner(backbone)(**x).loss - out.loss
    finally:
        config.orth_reg_weight = 0.0
    torch.testing.assert_close(reg, peft_term, rtol=1e-5, atol=1e-6)
    # training_step: task loss + γ·R, R counted once
    loss = module.training_step(x, 0)
    torch.testing.assert_close(loss, module.compute_loss(x) + 0.3 * reg)
    assert module.orthogonality_loss() == reg and module.orth_reg_weight == 0.3


def test_peft_exports_equal_the_model_mid_run_and_leave_it_untouched(tiny_glue_root, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    method = AdaLoRA(TARGETS, init_rank=4, target_rank=2, alpha=4)
    module = FlexLoRASequenceClassifier(model_name_or_path=str(tiny_glue_root / "model"), method=method).eval()
    scramble(module)
    layers = list(method.layers(module.backbone))
    with torch.no_grad():  # mid-run: a pruned λ grew back (soft mask), a matrix at rank 1, one at rank 0
        layers[0][1].rank_mask[1] = False
        for i in (1, 2, 3):
            layers[1][1].lora_E["default"][i] = 0.0
            layers[1][1].rank_mask[i] = False
        layers[2][1].lora_E["default"].zero_()
        layers[2][1].rank_mask.zero_()
    x = {k: v for k, v in batch().items() if k != "labels"}
    expected = module(**x).logits
    state = copy.deepcopy(module.state_dict())
    config = export_peft_adapter(module, tmp_path / "peft")
    assert config.rank_pattern[f"{layers[0][0]}.lora_E"] == [True] * 4  # what the model computes with
    assert config.rank_pattern[f"{layers[1][0]}.lora_E"] == [True, False, False, False]
    assert set(config.target_modules) == {layers[0][0], layers[1][0], layers[3][0]}  # rank 0: left out
    assert config.orth_reg_weight == method.orth_reg_weight and config.modules_to_save == ["classifier"]
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4
    base = AutoModelForSequenceClassification.from_pretrained(tiny_glue_root / "model").eval()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(loaded(**x).logits, expected, rtol=1e-4, atol=1e-5)
    export_merged(module, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**x).logits, expected, rtol=1e-4, atol=1e-5)
    # the trained model is untouched: same layers, same state, same outputs
    assert [n for n, _ in method.layers(module.backbone)] == [n for n, _ in layers]
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert torch.equal(module(**x).logits, expected)


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("task", TASK_CONFIGS, ids=[c.stem for c in TASK_CONFIGS])
def test_method_configs_compose_over_every_task_config(task, capsys):
    task_method = yaml.safe_load(task.read_text())["model"]["init_args"]["method"]["init_args"]
    for name, path in METHOD_CONFIGS.items():
        with pytest.raises(SystemExit) as done:
            build_cli(["fit", "--config", str(task), "--config", str(path), "--print_config"])
        assert done.value.code in (0, None)
        method = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["method"]
        args = method["init_args"]
        assert method["class_path"] == f"flexlora_pl.methods.{'LoRA' if name == 'lora' else 'AdaLoRA'}"
        assert args["target_modules"] == task_method["target_modules"]
        assert args["alpha"] == task_method["alpha"]
        if name == "lora":
            assert args["r"] == 8 and {"target_modules", "r", "alpha", "dropout", "rank_pattern"} <= set(args)
            assert args["rank_pattern"] is None  # uniform LoRA: rank r everywhere
            assert args["loraplus_ratio"] is None  # one learning rate unless loraplus.yaml is composed on top
        else:
            assert (args["init_rank"], args["target_rank"], args["beta1"], args["beta2"]) == (12, 8, 0.85, 0.85)
            assert args["orth_reg_weight"] == task_method["orth_reg_weight"]


class _DropoutModes(L.Callback):
    """Whether every dropout layer of the backbone is in train mode, at each training and validation batch."""

    def __init__(self):
        self.train: list[bool] = []
        self.val: list[bool] = []

    @staticmethod
    def _active(pl_module) -> bool:
        layers = [m for m in pl_module.backbone.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        assert layers, "the tiny backbone has no dropout to check"
        return all(m.training for m in layers)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(self._active(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(self._active(pl_module))


@pytest.mark.parametrize("method", ["flexlora", "lora", "adalora"])
def test_the_backbone_s_dropout_is_active_while_fitting_for_every_method(run_root, method):
    # from_pretrained returns the model in eval mode, and Lightning keeps sub-modules' modes: without the
    # module's switch to train mode, dropout would stay off for one method and not another
    args = ["--config", str(run_root / "run.yaml"), "--trainer.max_epochs", "1"]
    if method != "flexlora":
        args += ["--config", str(METHOD_CONFIGS[method]),
                 *(["--model.init_args.method.init_args.r", "2"] if method == "lora" else
                   ["--model.init_args.method.init_args.init_rank", "4",
                    "--model.init_args.method.init_args.target_rank", "2"])]
    cli = build_cli(args, run=False)
    modes = _DropoutModes()
    cli.trainer.callbacks.append(modes)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert modes.train and all(modes.train)
    assert modes.val and not any(modes.val)


def test_the_static_control_fires_its_events_but_moves_no_rank(run_root):
    # configs/methods/static.yaml over a FlexLoRA task: FlexLoRA's adapter, b0 = 0 at every event
    static = ROOT / "configs" / "methods" / "static.yaml"
    cli = build_cli(["--config", str(run_root / "run.yaml"), "--config", str(static), "--trainer.max_epochs", "2"],
                    run=False)
    before = cli.model.rank_pattern()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    history = reallocation(cli).history
    assert history and all(event["budget"] == 0 and not event["pruned"] and not event["expanded"] for event in history)
    assert cli.model.rank_pattern() == before and cli.model.method_name == "flexlora"
