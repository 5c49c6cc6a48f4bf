"""DyLoRA: LoRA factors trained at a rank sampled per batch, evaluated and exported at ``eval_rank``.

Runs through the real ``flexlora`` command with ``configs/methods/dylora.yaml`` over the tiny run: the loss goes down,
every rank 1..r is drawn and counted in ``metrics.json``, validation runs at ``eval_rank`` (a hand-truncated forward
gives its logits), a run resumed mid-way is bitwise the uninterrupted one, and the merged and peft exports give the
trained logits. The ``frozen`` rule updates only the sampled rank's direction under AdamW; identity at start; the
counts on the meta-device DeBERTaV3-base beside the paper's Table 1; every bad setting refused with its fix.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_run_folder
from lightning.pytorch import Callback
from shapes import DEBERTA_V3_BASE
from tiny_run import RUN_CHANGES

from flexlora_pl import FlexLoRAModule
from flexlora_pl.cli import build_cli
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.core.dylora_layer import DyLoRALinear, dylora_layers
from flexlora_pl.export import export_merged, export_peft_adapter
from flexlora_pl.methods import METHODS, DyLoRA, LoRA, build_method
from flexlora_pl.methods.base import recognize_method
from flexlora_pl.tasks.sequence_classification import DEBERTA_TARGETS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "methods" / "dylora.yaml"
TARGETS = ["query", "value"]
RANK = ["--model.init_args.method.init_args.r", "3"]  # the tiny BERT is 32 wide: r = 3, ranks 1, 2, 3


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 64, (n, 9), generator=gen),
            "attention_mask": torch.ones(n, 9, dtype=torch.long), "labels": torch.randint(0, 2, (n,), generator=gen)}


def scramble(model: torch.nn.Module, seed: int = 1) -> None:
    """Trained-looking adapters and head: every trainable parameter random (B included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def truncated_by_hand(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A copy of the adapted ``model`` in which every DyLoRA layer is a plain ``nn.Linear`` holding
    W + (α / rank) Σ_{i < rank} B_i A_iᵀ, summed direction by direction from the layer's parameters."""
    plain = copy.deepcopy(model)
    for name, layer in list(dylora_layers(plain)):
        linear = layer.base
        with torch.no_grad():
            for i in range(rank):
                linear.weight += layer.alpha / rank * torch.outer(layer.lora_B[i], layer.lora_A[i])
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, linear)
    return plain.eval()


@pytest.fixture
def run_root(tmp_path, tiny_glue_root) -> Path:
    """A fresh folder with the tiny model and data and ``run.yaml``; runs go to ``<it>/runs``."""
    return tiny_run_folder(tmp_path, tiny_glue_root, RUN_CHANGES)


def cli_of(root: Path, *extra: str, command: str | None = "fit", run: bool = True):
    """``flexlora <command> --config run.yaml --config configs/methods/dylora.yaml --…r 3 <extra>``."""
    args = ["--config", str(root / "run.yaml"), "--config", str(CONFIG), *RANK, *extra]
    return build_cli(([command] if command else []) + args, run=run)


class _Record(Callback):
    """Every training batch's loss and sampled rank; every validation's first batch, with its logits and those of
    hand-truncated copies of the adapter at each rank."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ranks: list[int] = []
        self.validations: list[tuple[bool, torch.Tensor, dict[int, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ranks.append(next(layer for _, layer in dylora_layers(pl_module.backbone)).rank)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        # the first batch of every validation after training began: the logits the module gives while validating,
        # and those of hand-truncated copies at ranks 1..r made from the adapter as it is at that moment
        if batch_idx == 0 and not trainer.sanity_checking and trainer.global_step > 0:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                logits = pl_module(**inputs).logits
                by_hand = {rank: truncated_by_hand(pl_module.backbone, rank)(**inputs).logits for rank in (1, 2, 3)}
            self.validations.append((pl_module.training, logits, by_hand))


# --------------------------------------------------------------------------- runs through the CLI
def test_dylora_trains_samples_every_rank_and_validates_at_eval_rank(run_root):
    cli = cli_of(run_root, "--trainer.max_epochs", "3", "--model.init_args.method.init_args.eval_rank", "2",
                 command=None, run=False)
    record = _Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    method = cli.model.method
    assert type(method) is DyLoRA and (method.r, method.eval_rank, method.update) == (3, 2, "frozen")
    steps = cli.trainer.global_step
    assert steps == 18 and len(record.losses) == len(record.ranks) == steps
    # the loss goes down
    assert sum(record.losses[-6:]) < sum(record.losses[:6])
    # every rank is drawn, the counts are what was drawn, in every layer, and metrics.json records them
    assert sorted(set(record.ranks)) == [1, 2, 3]
    drawn = {rank: record.ranks.count(rank) for rank in (1, 2, 3)}
    for _, layer in dylora_layers(cli.model.backbone):
        assert layer.lora_rank_counts.tolist() == [drawn[1], drawn[2], drawn[3]]
    folder = Path(cli.trainer.log_dir)
    facts = json.loads((folder / "metrics.json").read_text())["run"]["method_facts"]
    assert facts == {"eval_rank": 2, "update": "frozen", "sampled_ranks": {str(k): v for k, v in drawn.items()}}
    # reports at eval_rank
    assert set(cli.model.rank_pattern().values()) == {2} and set(cli.model.max_ranks().values()) == {3}
    pattern = json.loads((folder / "rank_pattern.json").read_text())
    assert pattern["method"] == "dylora" and pattern["events"] == [] and set(pattern["rank_pattern"].values()) == {2}
    # every validation ran at eval_rank 2: the logits of a hand-truncated forward at rank 2, not at the others
    assert len(record.validations) == 3  # one per epoch
    for training, logits, by_hand in record.validations:
        assert not training
        torch.testing.assert_close(logits, by_hand[2], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(logits, by_hand[3], atol=1e-4) and not torch.allclose(logits, by_hand[1], atol=1e-4)


def test_a_resumed_run_is_bitwise_the_uninterrupted_one(run_root):
    first = cli_of(run_root, "--trainer.max_epochs", "1")
    assert first.trainer.global_step == 6
    resumed = cli_of(run_root, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 12
    whole = cli_of(run_root)
    for (n, p), (m, q) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert n == m and torch.equal(p, q), n
    counts = next(layer for _, layer in dylora_layers(whole.model.backbone)).lora_rank_counts
    assert int(counts.sum()) == 12
    assert whole.model.method.facts()["sampled_ranks"] == resumed.model.method.facts()["sampled_ranks"]
    assert first.model.method.facts()["sampled_ranks"] != whole.model.method.facts()["sampled_ranks"]


def test_exports_of_a_run_load_and_give_the_trained_logits_at_eval_rank(run_root, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cli = cli_of(run_root, "--model.init_args.method.init_args.eval_rank", "2")
    tested = cli_of(run_root, "--model.init_args.method.init_args.eval_rank", "2", "--ckpt_path", "last",
                    command="test")
    assert "test/score" in tested.trainer.callback_metrics
    ckpt = Path(tested.trainer.ckpt_path)  # the run's most trained state
    assert torch.load(ckpt, weights_only=True)["global_step"] == cli.trainer.global_step == 12
    x = {k: v for k, v in batch().items() if k != "labels"}
    expected = truncated_by_hand(cli.model.backbone, 2)(**x).logits
    with torch.no_grad():
        torch.testing.assert_close(cli.model.eval()(**x).logits, expected, rtol=1e-5, atol=1e-6)
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "peft"), "--format", "peft"]) == 0
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "merged"), "--format", "merged"]) == 0
    saved = json.loads((run_root / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 2 and saved["lora_alpha"] == 4  # α / 2: DyLoRA's scale
    base = AutoModelForSequenceClassification.from_pretrained(run_root / "model").eval()
    adapter = PeftModel.from_pretrained(base, str(run_root / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(**x).logits, expected, rtol=1e-5, atol=1e-5)
        merged = AutoModelForSequenceClassification.from_pretrained(run_root / "merged").eval()
        torch.testing.assert_close(merged(**x).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # no FlexLoRA adapter checkpoint of DyLoRA layers: refused with the formats that work, nothing written
    assert export_main(["--ckpt", str(ckpt), "--out", str(run_root / "adapter"), "--format", "adapter"]) == 1
    assert "--format peft" in capsys.readouterr().err and not (run_root / "adapter").exists()


def test_bad_settings_through_the_cli_stop_before_a_run_folder_exists(run_root):
    with pytest.raises(ValueError, match=r"eval_rank=4 exceeds r=3.*Choose eval_rank in 1..3"):
        cli_of(run_root, "--model.init_args.method.init_args.eval_rank", "4")
    with pytest.raises(ValueError, match=r"update='some' is not one of \['frozen', 'all'\]"):
        cli_of(run_root, "--model.init_args.method.init_args.update", "some")
    assert not (run_root / "runs").exists()


# --------------------------------------------------------------------------- the layer and the method
def module_of(method: DyLoRA, lr: float = 0.05) -> FlexLoRAModule:
    return FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], init_seed=0, method=method,
                          optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.1))


@pytest.mark.parametrize("update", ["frozen", "all"])
def test_the_update_rule_decides_which_directions_an_adamw_step_moves(update):
    torch.manual_seed(3)
    module = module_of(DyLoRA(TARGETS, r=4, alpha=4, update=update))
    scramble(module.backbone)
    optimizer = module.configure_optimizers()
    layers = [layer for _, layer in dylora_layers(module.backbone)]
    ranks = []
    for step in range(8):  # enough steps that AdamW holds moments (and decays) for every direction
        module.on_train_batch_start(None, step)  # draws this batch's rank
        rank = layers[0].rank
        ranks.append(rank)
        before = [([a.detach().clone() for a in layer.lora_A], [b.detach().clone() for b in layer.lora_B])
                  for layer in layers]
        optimizer.zero_grad()
        module.compute_loss(batch(seed=step)).backward()
        optimizer.step()
        learning = {rank - 1} if update == "frozen" else set(range(rank))
        for layer, (a_before, b_before) in zip(layers, before, strict=True):
            assert layer.rank == rank
            for i in range(layer.r):
                moved = not torch.equal(layer.lora_A[i], a_before[i]), not torch.equal(layer.lora_B[i], b_before[i])
                assert moved == ((True, True) if i in learning else (False, False)), (update, rank, i, moved)
                if i not in learning:
                    assert layer.lora_A[i].grad is None and layer.lora_B[i].grad is None
    assert len(set(ranks)) > 2  # the rule was seen at several ranks


def test_dylora_starts_as_the_base_model_at_every_rank_and_leaves_the_global_rng_alone():
    base = tiny_bert()
    x = {k: v for k, v in batch().items() if k != "labels"}
    reference = base(**x).logits
    method = DyLoRA(TARGETS, r=4, alpha=4)
    model = tiny_bert()
    state = torch.random.get_rng_state()
    model = method.adapt(model, ["classifier"], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the seeded draws leave the global RNG alone
    layers = [layer for _, layer in dylora_layers(model)]
    assert len(layers) == 4 and all(isinstance(layer, DyLoRALinear) for layer in layers)
    for rank in (1, 2, 3, 4):  # B = 0: the base model at every evaluation rank
        for layer in layers:
            layer.eval_rank = rank
        assert torch.equal(model.eval()(**x).logits, reference)
    for module in model.modules():  # and at every training rank (train mode, the backbone's dropout off)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    for rank in (1, 2, 3, 4):
        for layer in layers:
            layer.rank = rank
        assert torch.equal(model(**x).logits, reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n} | {"classifier.weight",
                                                                                      "classifier.bias"}
    again = DyLoRA(TARGETS, r=4, alpha=4).adapt(tiny_bert(), ["classifier"], seed=3)
    other = DyLoRA(TARGETS, r=4, alpha=4).adapt(tiny_bert(), ["classifier"], seed=4)
    first = next(dylora_layers(model))[1].lora_A[0]
    assert torch.equal(first, next(dylora_layers(again))[1].lora_A[0])
    assert not torch.equal(first, next(dylora_layers(other))[1].lora_A[0])
    assert build_method(method.as_config()).as_config() == method.as_config() and METHODS["dylora"] is DyLoRA
    recognized = recognize_method(model)
    assert type(recognized) is DyLoRA and (recognized.r, recognized.alpha, recognized.evaluation_rank) == (4, 4.0, 4)


def test_exports_of_a_module_equal_it_at_eval_rank_and_leave_it_untouched(tiny_glue_root, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from flexlora_pl.tasks.sequence_classification import FlexLoRASequenceClassifier

    method = DyLoRA(TARGETS, r=4, alpha=6, eval_rank=3, loraplus_ratio=16)
    module = FlexLoRASequenceClassifier(model_name_or_path=str(tiny_glue_root / "model"), method=method).eval()
    scramble(module.backbone)
    x = {k: v for k, v in batch().items() if k != "labels"}
    expected = truncated_by_hand(module.backbone, 3)(**x).logits
    state = copy.deepcopy(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(module(**x).logits, expected, rtol=1e-5, atol=1e-6)
    config = export_peft_adapter(module, tmp_path / "peft")
    assert (config.r, config.lora_alpha, config.modules_to_save) == (3, 6.0, ["classifier"])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_glue_root / "model").eval()
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(loaded(**x).logits, expected, rtol=1e-5, atol=1e-5)
        export_merged(module, tmp_path / "merged")
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(**x).logits, expected, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    groups = method.optimizer_groups(module.backbone)  # LoRA+: every B column at 16 × the rate of A
    assert [g["name"] for g in groups] == ["adapter", "adapter_B"] and groups[1]["lr_scale"] == 16.0
    assert len(groups[1]["params"]) == len(groups[0]["params"]) == 4 * 4


def test_deberta_v3_base_counts_beside_the_paper_s_table_1():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    def adapted(method: DyLoRA):
        with torch.device("meta"):  # the real architecture, no weights, no download
            model = DebertaV2ForSequenceClassification(DebertaV2Config(**DEBERTA_V3_BASE))
        return method.adapt(model, ["pooler", "classifier"], seed=0)

    six = DyLoRA(DEBERTA_TARGETS, r=8)  # the task's targets, what configs/methods/dylora.yaml keeps: LoRA r=8's
    model = adapted(six)
    assert len(six.rank_pattern(model)) == 72
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("pooler.", "classifier.")))
    assert head == 768 * 768 + 768 + 768 * 2 + 2 == 592_130
    assert sum(p.numel() for p in six.adapter_parameters(model)) == 1_327_104
    assert six.parameter_counts(model) == {"active": 1_327_104, "allocated": 1_327_104}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_327_104 + head
    lora = LoRA(DEBERTA_TARGETS, r=8)
    with torch.device("meta"):
        plain = DebertaV2ForSequenceClassification(DebertaV2Config(**DEBERTA_V3_BASE))
    assert lora.parameter_counts(lora.adapt(plain, ["pooler", "classifier"], 0))["active"] == 1_327_104
    half = DyLoRA(DEBERTA_TARGETS, r=8, eval_rank=4)
    assert half.parameter_counts(adapted(half)) == {"active": 663_552, "allocated": 1_327_104}
    # the DyLoRA paper's own targets, query and value: 0.29M; with the trained head 0.887M, the paper's "0.9M"
    qv = DyLoRA(["query_proj", "value_proj"], r=8)
    qv_counts = qv.parameter_counts(adapted(qv))
    assert qv_counts == {"active": 294_912, "allocated": 294_912}
    assert round((qv_counts["active"] + head) / 1e6, 1) == 0.9
    # the only target sets of the six at r = 8 that round to 0.9M: one attention matrix and both FFN matrices
    ffn = DyLoRA(["value_proj", "intermediate.dense", r"re:.*layer\.\d+\.output\.dense"], r=8)
    assert ffn.parameter_counts(adapted(ffn))["active"] == 884_736
    assert round(1_327_104 / 1e6, 1) == 1.3 != 0.9  # all six at r = 8 is LoRA r = 8's 1.3M


def test_bad_settings_are_refused_with_the_fix():
    option = "model.init_args.method.init_args"
    with pytest.raises(ValueError, match=rf"DyLoRA: {option}.r must be an integer >= 1.*got 0"):
        DyLoRA(r=0)
    with pytest.raises(ValueError, match=rf"{option}.eval_rank=9 exceeds r=8.*Choose eval_rank in 1..8, or raise r"):
        DyLoRA(r=8, eval_rank=9)
    with pytest.raises(ValueError, match=rf"DyLoRA: {option}.eval_rank must be an integer >= 1.*got 0"):
        DyLoRA(eval_rank=0)
    with pytest.raises(ValueError, match=r"update='rows' is not one of \['frozen', 'all'\]"):
        DyLoRA(update="rows")
    for ratio in (0, -1.0):
        with pytest.raises(ValueError, match="loraplus_ratio must be a number above 0"):
            DyLoRA(loraplus_ratio=ratio)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no nn.Linear"):
        DyLoRA(["nope"]).adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match=r"matches '.*LayerNorm', a LayerNorm, not an nn.Linear"):
        DyLoRA(["LayerNorm"]).adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match=rf"{option}.r=40 exceeds min.in_features, out_features. of .*r <= 32"):
        DyLoRA(TARGETS, r=40).adapt(tiny_bert(), ["classifier"], 0)
    with pytest.raises(ValueError, match=r"needs target_modules"):
        DyLoRA().adapt(tiny_bert(), ["classifier"], 0)
    for adapter in (DyLoRA(TARGETS, r=2), LoRA(TARGETS, r=2)):
        model = adapter.adapt(tiny_bert(), ["classifier"], 0)
        with pytest.raises(ValueError, match="DyLoRA: the backbone already holds adapters; adapt a fresh model"):
            DyLoRA(TARGETS, r=2).adapt(model, ["classifier"], 0)
    with pytest.raises(ValueError, match="DyLoRALinear: r=40 exceeds min"):
        DyLoRALinear(torch.nn.Linear(32, 16), r=40, alpha=4)
    with pytest.raises(ValueError, match="cannot be exported as a FlexLoRA adapter checkpoint"):
        DyLoRA(TARGETS, r=2).adapter_checkpoint_layers(DyLoRA(TARGETS, r=2).adapt(tiny_bert(), ["classifier"], 0))


def test_a_checkpoint_is_evaluated_at_another_eval_rank_but_resumed_only_at_its_own(run_root):
    cli_of(run_root, "--trainer.max_epochs", "1")  # eval_rank None: r = 3
    tested = cli_of(run_root, "--model.init_args.method.init_args.eval_rank", "1", "--ckpt_path", "last",
                    command="test")
    assert tested.model.method.eval_rank == 1 and set(tested.model.rank_pattern().values()) == {1}
    assert "test/score" in tested.trainer.callback_metrics
    x = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():  # the tested model is the trained one, truncated at rank 1
        torch.testing.assert_close(tested.model.eval()(**x).logits,
                                   truncated_by_hand(tested.model.backbone, 1)(**x).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"method\.init_args\.eval_rank=None in the checkpoint"):
        cli_of(run_root, "--model.init_args.method.init_args.eval_rank", "1", "--ckpt_path", "last")  # fit: refused


def _draws(module: FlexLoRAModule, n: int, noise: bool) -> list[int]:
    ranks = []
    for _ in range(n):
        if noise:  # another process's dropout masks, or any other use of the global RNG, between batches
            torch.rand(17)
        module.method.before_training_batch(module.backbone)
        ranks.append(next(layer for _, layer in dylora_layers(module.backbone)).rank)
    return ranks


def test_the_rank_draws_ignore_the_global_rng_and_continue_from_the_counts():
    # what keeps DDP processes on one b per batch (their global RNGs differ) and a resumed run on its sequence
    torch.manual_seed(0)
    plain = _draws(module_of(DyLoRA(["query", "value"], r=4)), 12, noise=False)
    torch.manual_seed(1)
    noisy = _draws(module_of(DyLoRA(["query", "value"], r=4)), 12, noise=True)
    assert plain == noisy and set(plain) == {1, 2, 3, 4}
    resumed = module_of(DyLoRA(["query", "value"], r=4))
    for _, layer in dylora_layers(resumed.backbone):  # a checkpoint's counts after the first 5 batches
        for rank in plain[:5]:
            layer.lora_rank_counts[rank - 1] += 1
    assert _draws(resumed, 7, noise=True) == plain[5:]
