"""Commonsense reasoning with causal LMs: prompts, data and the errors for bad data or settings, answer extraction,
generation with left padding, the shipped configs through the CLI (fit, test of the 8 sets, predict), exports, bf16,
DDP and LLaMA3-8B counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from commonsense_helpers import TEST_SIZES, record, write_commonsense_data, write_tiny_llama

from flexlora_pl import flexlora_layers
from flexlora_pl.cli.main import build_cli
from flexlora_pl.data.commonsense import COMMONSENSE_SETS, PROMPT_TEMPLATES, CommonsenseDataModule
from flexlora_pl.experiments.grid import parse_sweep
from flexlora_pl.methods import AdaLoRA, FlexLoRA, LoRA
from flexlora_pl.tasks.answer_extraction import extract_answer, response_text
from flexlora_pl.tasks.causal_lm import LLAMA_TARGETS, FlexLoRACausalLM, generate_continuations

CONFIGS = Path(__file__).parents[2] / "configs"
R8, R32, R32_DDP = (CONFIGS / "commonsense" / f"llama3_8b_{name}.yaml" for name in ("r8", "r32", "r32_ddp"))
INDENT = " " * 16


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny LLaMA with its tokenizer in ``root/model`` and LLM-Adapters-layout data."""
    root = tmp_path_factory.mktemp("commonsense")
    write_tiny_llama(root / "model")
    write_commonsense_data(root)
    return root


def data_module(root: Path, **kwargs) -> CommonsenseDataModule:
    kwargs = {"val_size": 8, "eval_batch_size": 4, **kwargs}
    return CommonsenseDataModule(str(root / "model"), train_file=str(root / "commonsense_170k.json"),
                                 test_dir=str(root / "dataset"), **kwargs)


# --------------------------------------------------------------------------- prompts
def test_llm_adapters_templates_are_verbatim():
    template = PROMPT_TEMPLATES["llm_adapters"]
    task = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert template.training_prompt("Q?", "", "the correct answer is true") == (
        f"{task}  \n\n{INDENT}### Instruction:\n{INDENT}Q?\n{INDENT}\n{INDENT}### Response:\n{INDENT}"
        "the correct answer is true")
    assert template.eval_prompt("Q?") == (
        f"{task} \n\n{INDENT}### Instruction:\n{INDENT}Q?\n\n{INDENT}### Response:\n{INDENT}")
    with_input = template.eval_prompt("Q?", "ctx")
    assert "context. Write a response that appropriately completes the request.\n\n" in with_input
    assert with_input.endswith(f"### Input:\n{INDENT}ctx\n\n{INDENT}### Response:\n{INDENT}")
    assert template.training_prompt("Q?", "ctx", "A").endswith(f"ctx\n{INDENT}\n{INDENT}### Response:\n{INDENT}A")
    alpaca = PROMPT_TEMPLATES["alpaca"]
    assert alpaca.eval_prompt("Q?") == f"{task}\n\n### Instruction:\nQ?\n\n### Response:\n"
    assert alpaca.training_prompt("Q?", "", "A") == alpaca.eval_prompt("Q?") + "A"


# --------------------------------------------------------------------------- extraction
PROMPT = PROMPT_TEMPLATES["llm_adapters"].eval_prompt("Please choose ... Answer format: answer1/answer2")


@pytest.mark.parametrize("set_name, generation, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false. It is not true that", "false"),  # first match wins
    ("boolq", "The correct answer is True", None),  # case-sensitive, as the original
    ("boolq", "I do not know", None),
    ("piqa", "the correct answer is solution2\n\n### Instruction: solution1", "solution2"),
    ("piqa", "the correct answer is solution3", None),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "the correct answer is answer5", "answer5"),
    ("hellaswag", "the correct answer is ending4 because ending1 is odd", "ending4"),
    ("hellaswag", "the correct answer is ending5", None),
    ("winogrande", "the correct answer is option2", "option2"),
    ("winogrande", "the correct answer is Sam", None),
    ("ARC-Easy", "the correct answer is answer1", "answer1"),
    ("ARC-Challenge", "the correct answer is answer4.\n\nanswer2 is wrong", "answer4"),
    ("openbookqa", "the correct answer isanswer2", "answer2"),  # no word boundaries, as the original
    ("openbookqa", "", None),
])
def test_answer_extraction_per_set(set_name, generation, expected):
    assert extract_answer(set_name, PROMPT + generation) == expected
    assert extract_answer(set_name, generation) == expected  # a generation without the prompt reads the same


def test_extraction_cuts_after_the_last_response_marker():
    # the prompt's choices ("answer1/answer2") never count; a response that repeats the marker counts after it
    assert extract_answer("ARC-Easy", PROMPT + "I think\n### Response: answer2") == "answer2"
    assert extract_answer("ARC-Easy", PROMPT) is None
    assert response_text(PROMPT + "  the correct answer is answer1 \n") == "the correct answer is answer1"
    with pytest.raises(ValueError, match="boolq"):
        extract_answer("sciq", "answer1")


# a generation that repeats the template: LLM-Adapters' rule reads the first response, DoRA's the last
REPEATED = ("the correct answer is answer1\n\n### Instruction:\nPlease choose the correct answer\n\n"
            "### Response:\nthe correct answer is answer2")


def test_response_split_first_and_last_differ_on_a_generation_that_repeats_the_template():
    assert response_text(PROMPT + REPEATED, "last") == "the correct answer is answer2"
    assert response_text(PROMPT + REPEATED, "first") == (
        "the correct answer is answer1\n\n### Instruction:\nPlease choose the correct answer")
    assert extract_answer("ARC-Easy", PROMPT + REPEATED, "last") == "answer2"
    assert extract_answer("ARC-Easy", PROMPT + REPEATED, "first") == "answer1"
    assert extract_answer("ARC-Easy", PROMPT + REPEATED) == "answer2"  # the documented default: last
    # without a repeated marker the two rules agree, with or without the prompt
    for decoded in (PROMPT + "the correct answer is answer3", "the correct answer is answer3"):
        assert extract_answer("ARC-Easy", decoded, "first") == extract_answer("ARC-Easy", decoded, "last") == "answer3"
    with pytest.raises(ValueError, match=r"response_split='middle'.*'last'.*'first'"):
        extract_answer("ARC-Easy", PROMPT + REPEATED, "middle")


# --------------------------------------------------------------------------- data
def test_training_rows_carry_eos_labels_and_cutoff(root):
    data = data_module(root)
    data.setup("fit")
    tokenizer = data.tokenizer
    row = data.datasets["train"][0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id and row["labels"] == row["input_ids"]
    assert len(data.datasets["validation"]) == 8 and len(data.datasets["train"]) == 64

    response_only = data_module(root, train_on_inputs=False)
    response_only.setup("fit")
    masked = response_only.datasets["train"][0]
    prompt_len = masked["labels"].count(-100)
    labelled = tokenizer.decode([t for t in masked["labels"] if t != -100], skip_special_tokens=True)
    assert prompt_len > 20 and labelled.startswith("the correct answer is")

    short = data_module(root, cutoff_len=12)
    short.setup("fit")
    assert all(len(ids) == 12 and ids[-1] != tokenizer.eos_token_id for ids in short.datasets["train"]["input_ids"])

    batch = next(iter(data.train_dataloader()))
    assert batch["attention_mask"][:, 0].all()  # training rows are padded on the right
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_test_batches_are_left_padded_with_ids_and_answers(root):
    data = data_module(root, test_sets=["boolq", "piqa"])
    data.setup("test")
    loaders = data.test_dataloader()
    assert len(loaders) == 2 and data.predict_split_names == ["boolq", "piqa"]
    batches = list(loaders[1])
    seen = sorted(i for batch in batches for i in batch["index"])
    assert seen == list(range(TEST_SIZES["piqa"]))
    batch = batches[0]
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()  # left padding
    answers = {i: a for b in batches for i, a in zip(b["index"], b["answer"], strict=True)}
    assert answers == {n: record("piqa", 100 + n)["answer"] for n in range(TEST_SIZES["piqa"])}


def test_data_errors_name_the_problem(root, tmp_path):
    with pytest.raises(ValueError, match=r"'sciq'.*boolq.*openbookqa"):
        data_module(root, test_sets=["boolq", "sciq"])
    with pytest.raises(ValueError, match="prompt_template"):
        data_module(root, prompt_template="vicuna")
    with pytest.raises(FileNotFoundError, match="train_file"):
        CommonsenseDataModule(str(root / "model"), train_file=str(tmp_path / "none.json")).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"winogrande.*test_sets"):
        CommonsenseDataModule(str(root / "model"), test_dir=str(tmp_path), test_sets=["winogrande"]).setup("test")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "input": ""}, {"instruction": "r", "input": ""}]))
    with pytest.raises(ValueError, match=r"no \['output'\] field"):
        CommonsenseDataModule(str(root / "model"), train_file=str(bad), val_size=0).setup("fit")
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q", "answer": ""}]))
    with pytest.raises(ValueError, match=r"record 0 .* 'answer'"):
        CommonsenseDataModule(str(root / "model"), test_dir=str(tmp_path), test_sets=["boolq"]).setup("test")


@pytest.mark.parametrize("setting, message", [
    ({"tokenizer_name_or_path": None}, r"tokenizer_name_or_path is required: set model.init_args.model_name_or_path "
                                       r"\(the `flexlora` command links it\) or data.init_args.tokenizer_name_or_path"),
    ({"tokenizer_name_or_path": "./no-such-folder/tokenizer"},
     r"tokenizer_name_or_path='\./no-such-folder/tokenizer' is not an existing folder; give the folder that holds"),
    ({"test_sets": []}, r"test_sets is empty; name at least one of the 8 sets: \['boolq', 'piqa', .*'openbookqa'\]$"),
    ({"test_sets": ["boolq", "boolq"]}, r"test_sets=\['boolq', 'boolq'\] names a set twice"),
    ({"cutoff_len": 1}, r"cutoff_len must be >= 2, got 1"),
    ({"val_size": -1}, r"val_size must be >= 0, got -1"),
    ({"batch_size": 0}, r"batch_size must be >= 1, got 0"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be >= 1, got 0"),
    ({"num_workers": -1}, r"num_workers must be >= 0, got -1"),
], ids=["no-tokenizer", "tokenizer-folder-missing", "test-sets-empty", "test-set-twice", "cutoff-len-1",
        "val-size-negative", "batch-size-0", "eval-batch-size-0", "num-workers-negative"])
def test_bad_settings_stop_the_data_module_at_start_up(setting, message):
    # a hub name: nothing is loaded at start-up, so no tokenizer is needed
    with pytest.raises(ValueError, match=message):
        CommonsenseDataModule(**{"tokenizer_name_or_path": "owner/tokenizer", **setting})


def _check_broken(root: Path, folder: Path, case: str) -> None:
    """Write the bad input ``case`` names under ``folder``, then run the data module's step that has to find it."""
    tokenizer, train_file, val_size = str(root / "model"), folder / "train.json", 0
    if case == "tokenizer-without-eos":
        from transformers import AutoTokenizer

        no_eos = AutoTokenizer.from_pretrained(tokenizer)
        no_eos.eos_token = None
        no_eos.save_pretrained(folder / "no_eos")
        tokenizer = str(folder / "no_eos")
    elif case == "no-records-list":
        train_file.write_text("[]")
    elif case == "no-records-empty-file":
        train_file.write_bytes(b"")
    elif case == "val-size-too-large":
        train_file.write_text(json.dumps([record("boolq", n) for n in range(10)]))
        val_size = 120
    data = CommonsenseDataModule(tokenizer, train_file=str(train_file), test_dir=str(root / "dataset"),
                                 val_size=val_size)
    if case == "validate-without-val-size":
        data.setup("validate")
    data.prepare_data()


@pytest.mark.parametrize("case, message", [
    ("tokenizer-without-eos", r"the tokenizer '.*no_eos' has no EOS token; training appends EOS to every answer so "
                              r"that generation learns to stop"),
    ("no-records-list", r"'.*train.json' holds no records; point it at the LLM-Adapters file"),
    ("no-records-empty-file", r"'.*train.json' holds no records; point it at the LLM-Adapters file"),
    ("val-size-too-large", r"'.*train.json' has 10 records, not more than val_size=120; lower data.init_args.val_size "
                           r"\(0: no validation\)"),
    ("validate-without-val-size", r"validate needs a held-out slice: set data.init_args.val_size > 0"),
], ids=["tokenizer-without-eos", "no-records-list", "no-records-empty-file", "val-size-too-large",
        "validate-without-val-size"])
def test_bad_data_is_named_by_the_data_module(root, tmp_path, case, message):
    with pytest.raises(ValueError, match=message):
        _check_broken(root, tmp_path, case)


# --------------------------------------------------------------------------- generation
def trained_like(root: Path, method=None, dtype: torch.dtype = torch.float64) -> FlexLoRACausalLM:
    """The tiny model with non-zero adapters (as after training), in float64 so argmax never ties."""
    module = FlexLoRACausalLM(str(root / "model"), method=method, init_seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.adapter_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return module.to(dtype).eval()


def prompts(root: Path, set_name: str = "hellaswag", count: int = 4) -> tuple[dict, list[list[int]]]:
    data = data_module(root, test_sets=[set_name], eval_batch_size=count)
    data.setup("test")
    batch = next(iter(data.test_dataloader()[0]))
    mask = batch["attention_mask"].bool()
    assert len({int(n) for n in mask.sum(1)}) > 1, "the fixture prompts must differ in length"
    return batch, [row[m].tolist() for row, m in zip(batch["input_ids"], mask, strict=True)]


def generate(model, batch, tokenizer_ids=(1, 3)) -> list[list[int]]:
    new = generate_continuations(model, batch["input_ids"], batch["attention_mask"], pad_token_id=tokenizer_ids[0],
                                 eos_token_id=tokenizer_ids[1], max_new_tokens=8)
    return [[t for t in row.tolist() if t != tokenizer_ids[0]] for row in new]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(root):
    module = trained_like(root)
    batch, rows = prompts(root)
    batched = generate(module.backbone, batch)
    for row, expected in zip(rows, batched, strict=True):
        alone = {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
        assert generate(module.backbone, alone) == [expected]
    right = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="left"):
        generate(module.backbone, right)


@pytest.mark.parametrize("method", ["flexlora", "lora"])
def test_merged_and_peft_exports_generate_the_same_answers(root, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flexlora_pl.export import export_peft_adapter, merged_model

    module = trained_like(root, method=None if method == "flexlora" else LoRA(r=2))
    batch, _ = prompts(root, count=5)
    expected = generate(module.backbone, batch)
    assert generate(merged_model(module).eval(), batch) == expected
    export_peft_adapter(module, tmp_path / "peft", task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float64)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).to(torch.float64).eval()
    assert generate(loaded, batch) == expected


# --------------------------------------------------------------------------- precision and methods
@pytest.mark.parametrize("method", [None, LoRA(r=2), AdaLoRA(init_rank=3, target_rank=2)], ids=["flex", "lora", "ada"])
def test_bf16_base_with_float32_adapters_trains_under_autocast(root, method):
    module = FlexLoRACausalLM(str(root / "model"), method=method, torch_dtype="bfloat16", init_seed=0)
    assert {p.dtype for p in module.adapter_parameters()} == {torch.float32}
    assert {p.dtype for p in module.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert len(module.adapted_modules) == 2 * len(LLAMA_TARGETS)
    data = data_module(root)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(module.adapter_parameters(), lr=1e-2)
    before = [p.detach().clone() for p in module.adapter_parameters()]
    module.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.compute_loss(batch) + module.orth_reg_weight * module.orthogonality_loss()
    loss.backward()
    assert torch.isfinite(loss)
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, module.adapter_parameters(), strict=True))
    assert {p.dtype for p in module.adapter_parameters()} == {torch.float32}


def test_gradient_checkpointing_gives_the_same_loss(root):
    data = data_module(root)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    losses, grads = [], []
    for checkpointing in (False, True):
        module = FlexLoRACausalLM(str(root / "model"), init_seed=0, gradient_checkpointing=checkpointing).train()
        switch = "is_activation_checkpointing" if hasattr(module.backbone, "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        assert getattr(module.backbone, switch) is checkpointing
        with torch.no_grad():
            for p in module.adapter_parameters():
                p.add_(0.1)
        loss = module.compute_loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in module.adapter_parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


# --------------------------------------------------------------------------- counts
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192}


@pytest.mark.parametrize("method, active, allocated", [
    (LoRA(LLAMA_TARGETS, r=8), 14_155_776, 14_155_776),
    (LoRA(LLAMA_TARGETS, r=32), 56_623_104, 56_623_104),
    (FlexLoRA(LLAMA_TARGETS, init_rank=8, max_rank=12), 14_155_776 + 160 * 8, 21_233_664 + 160 * 12),
    (FlexLoRA(LLAMA_TARGETS, init_rank=32, max_rank=48), 56_623_104 + 160 * 32, 84_934_656 + 160 * 48),
    (AdaLoRA(LLAMA_TARGETS, init_rank=12, target_rank=8), 21_233_664 + 160 * 12, 21_233_664 + 160 * 12),
], ids=["lora8", "lora32", "flexlora8", "flexlora32", "adalora8"])
def test_llama3_8b_adapter_counts_match_the_paper(method, active, allocated):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # the real architecture, no weights, no download
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
    model = method.adapt(model, [], seed=0)
    if isinstance(method, FlexLoRA):  # meta tensors hold no values: give the rank masks theirs (r_init active)
        for _, layer in flexlora_layers(model):
            layer.rank_mask = torch.arange(layer.max_rank) < layer.init_rank
    assert len(method.rank_pattern(model)) == 160
    counts = method.parameter_counts(model)
    assert (counts["active"], counts["allocated"]) == (active, allocated)
    assert sum(p.numel() for p in method.adapter_parameters(model)) == allocated  # what the optimizer holds


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", [R8, R32, R32_DDP], ids=lambda p: p.stem)
def test_shipped_configs_parse_with_table9_settings(path, capsys):
    with pytest.raises(SystemExit) as done:  # parses and checks every value without building the 8B model
        build_cli(["fit", "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    init = config["model"]["init_args"]
    method = init["method"]["init_args"]
    rank = 8 if path is R8 else 32
    assert (method["init_rank"], method["max_rank"], method["alpha"], method["dropout"]) == (rank, rank * 3 // 2, 16,
                                                                                            0.05)
    assert method["target_modules"] == LLAMA_TARGETS and init["torch_dtype"] == "bfloat16"
    assert init["optimizer"]["init_args"]["lr"] == 3e-4 and init["lr_scheduler"]["init_args"]["warmup_steps"] == 100
    realloc = config["reallocation"]
    assert (realloc["b0"], realloc["t_warmup"], realloc["t_final"], realloc["delta_t"]) == (4, 5000, 5000, 1000)
    trainer, data = config["trainer"], config["data"]["init_args"]
    assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] * trainer["num_nodes"] == 16
    assert trainer["max_epochs"] == 3 and trainer["precision"] == "bf16-mixed"
    assert (data["cutoff_len"], data["val_size"], data["prompt_template"]) == (256, 120, "llm_adapters")
    assert data["train_on_inputs"] is True
    if path is R32_DDP:
        assert trainer["strategy"] == "ddp" and trainer["devices"] == 4


def cli_args(root: Path, config: Path, *extra: str) -> list[str]:
    """The shipped config with the tiny model and data, a few optimizer steps, and a run folder under ``root``."""
    return ["--config", str(config), "--model.init_args.model_name_or_path", str(root / "model"),
            "--data.init_args.train_file", str(root / "commonsense_170k.json"),
            "--data.init_args.test_dir", str(root / "dataset"), "--data.init_args.val_size", "8",
            "--data.init_args.eval_batch_size", "8", "--model.init_args.max_new_tokens", "4",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root / "runs"),
            "--reallocation.t_warmup", "1", "--reallocation.t_final", "1", "--reallocation.delta_t", "1",
            "--model.init_args.lr_scheduler.init_args.warmup_steps", "1", *extra]


@pytest.fixture(scope="module")
def fitted(root) -> Path:
    """``flexlora fit`` of the shipped r = 8 config on the tiny model: 64 records, 1 epoch of 4 optimizer steps."""
    cli = build_cli(["fit", *cli_args(root, R8)])
    assert cli.trainer.global_step == 4  # 16 micro-batches of 4, accumulated by 4
    return Path(cli.trainer.log_dir)


def test_fit_moves_ranks_and_records_the_run(fitted):
    record = json.loads((fitted / "metrics.json").read_text())
    assert record["fit"]["status"] == "finished" and record["fit"]["best"]["monitor"] == "val/loss"
    assert record["run"]["method"] == "flexlora"
    pattern = json.loads((fitted / "rank_pattern.json").read_text())
    assert [event["step"] for event in pattern["events"]] == [2]  # t_warmup = 1 < t < T - t_final = 3
    ranks = list(pattern["rank_pattern"].values())
    assert sum(ranks) == 8 * 10 and ranks != [8] * 10  # rank moved between matrices, the total is conserved
    active = sum(r * (i + o + 1) for r, (i, o) in zip(ranks, TINY_SHAPES, strict=True))
    assert (record["parameters"]["active"], record["parameters"]["allocated"]) == (
        active, sum(12 * (i + o + 1) for i, o in TINY_SHAPES))


TINY_SHAPES = [(32, 32), (32, 16), (32, 16), (32, 48), (48, 32)] * 2  # q, k, v, up, down of 2 layers


def test_test_scores_the_8_sets_and_predict_writes_what_it_scored(root, fitted, caplog):
    version = fitted.name.removeprefix("version_")
    with caplog.at_level("INFO"):
        # generation and memory settings may differ from the fit's (beams, tokens, checkpointing)
        build_cli(["test", *cli_args(root, R8), "--ckpt_path", "last", "--version", version,
                   "--model.init_args.gradient_checkpointing", "true"])
    assert "Commonsense accuracy" in caplog.text and "mean of 8" in caplog.text
    metrics = json.loads((fitted / "metrics.json").read_text())["test"]["metrics"]
    accuracies = {name: metrics[f"test/{name}/accuracy"] for name in COMMONSENSE_SETS}
    assert {name: metrics[f"test/{name}/examples"] for name in COMMONSENSE_SETS} == TEST_SIZES
    assert metrics["test/accuracy"] == pytest.approx(sum(accuracies.values()) / 8)

    cli = build_cli(["predict", *cli_args(root, R8), "--ckpt_path", "last", "--version", version])
    assert cli.trainer.world_size == 1
    for name in COMMONSENSE_SETS:
        rows = [json.loads(line) for line in (fitted / "predictions" / f"predictions_{name}.jsonl").read_text()
                .splitlines()]
        assert [row["id"] for row in rows] == list(range(TEST_SIZES[name]))
        for row in rows:  # the scoring is the extraction rule applied to what was generated
            assert row["prediction"] == extract_answer(name, row["prompt"] + row["generation"])
            assert row["correct"] == (row["prediction"] == row["answer"] == record(name, 100 + row["id"])["answer"])
        assert sum(row["correct"] for row in rows) / len(rows) == pytest.approx(accuracies[name])


@pytest.mark.parametrize("method, override", [("lora", "lora_r32.yaml"), ("adalora", "adalora_r32.yaml")])
def test_baselines_compose_over_the_r32_config(method, override, capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(R32), "--config", str(CONFIGS / "methods" / f"{method}.yaml"),
                   "--config", str(CONFIGS / "commonsense" / "overrides" / override), "--print_config"])
    spec = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["method"]
    assert spec["class_path"] == {"lora": "flexlora_pl.methods.LoRA", "adalora": "flexlora_pl.methods.AdaLoRA"}[method]
    expected = {"lora": {"r": 32}, "adalora": {"init_rank": 48, "target_rank": 32}}[method]
    args = spec["init_args"]
    assert {k: args[k] for k in expected} == expected
    assert (args["dropout"], args["alpha"], args["target_modules"]) == (0.05, 16, LLAMA_TARGETS)


# --------------------------------------------------------------------------- the published protocol
PUBLISHED = CONFIGS / "commonsense" / "overrides" / "published_protocol.yaml"
TABLE2 = CONFIGS / "sweeps" / "table2_commonsense.yaml"


def printed(args: list[str], capsys) -> dict:
    """The config the real CLI composes from ``args`` (``--print_config``: nothing is built)."""
    with pytest.raises(SystemExit) as done:
        build_cli([*args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def with_published_protocol(args: list[str]) -> list[str]:
    """``cli_args`` with the override right after the task config, and without the tiny runs' eval batch size
    (so the override's batch 1 holds)."""
    at = args.index("--data.init_args.eval_batch_size")
    args = [*args[:at], *args[at + 2:]]
    return [*args[:2], "--config", str(PUBLISHED), *args[2:]]


def _check_published(fit: dict, test: dict) -> None:
    assert fit.get("ckpt_path") is None and test["ckpt_path"] == "best"  # the lowest validation loss is tested
    init, data = test["model"]["init_args"], test["data"]["init_args"]
    assert (init["num_beams"], init["response_split"], data["eval_batch_size"]) == (4, "last", 1)
    trainer = fit["trainer"]
    assert fit["data"]["init_args"]["val_size"] == 120
    assert trainer["val_check_interval"] / trainer["accumulate_grad_batches"] == 80  # optimizer steps


@pytest.mark.parametrize("path", [R8, R32, R32_DDP], ids=lambda p: p.stem)
def test_published_protocol_composes_over_each_shipped_config(path, capsys):
    configs = ["--config", str(path), "--config", str(PUBLISHED)]
    extra = ["--trainer.val_check_interval", "80"] if path is R32_DDP else []  # no accumulation: its header says so
    fit = printed(["fit", *configs, *extra], capsys)
    test = printed(["test", *configs, "--ckpt_path", "best"], capsys)
    _check_published(fit, test)
    assert test["model"]["init_args"]["method"] == fit["model"]["init_args"]["method"]  # the task's own method


def test_table2_sweep_runs_the_published_protocol_with_test_best(capsys, monkeypatch):
    # the shipped sweep plus `configs: [the override]` and `test: best`: every run's test stage is the published one
    monkeypatch.chdir(CONFIGS.parent)  # the sweep's paths are relative to the repository root
    spec = {**yaml.safe_load(TABLE2.read_text()), "configs": [str(PUBLISHED)], "test": "best"}
    runs = parse_sweep(spec, source=str(TABLE2)).runs()
    assert len(runs) == 6
    for run in runs:
        fit = printed(run.command("fit"), capsys)
        test = printed(run.command("test", ckpt_path=run.test), capsys)
        _check_published(fit, test)
        assert test["model"]["init_args"]["method"]["class_path"].rsplit(".", 1)[-1].lower() == run.method


def test_published_protocol_tests_the_best_checkpoint_with_4_beams_one_prompt_at_a_time(root, fitted, caplog):
    version = fitted.name.removeprefix("version_")
    with caplog.at_level("INFO"):
        cli = build_cli(["test", *with_published_protocol(cli_args(root, R8, "--ckpt_path", "best",
                                                                   "--version", version))])
    assert cli.model.num_beams == 4 and cli.datamodule.eval_batch_size == 1
    assert all(loader.batch_size == 1 for loader in cli.trainer.test_dataloaders)
    assert "4-beam search" in caplog.text and "mean of 8" in caplog.text
    record = json.loads((fitted / "metrics.json").read_text())
    best = record["fit"]["best"]["checkpoint"]
    assert record["test"]["ckpt_path"] == best and Path(best).name.startswith("best-")  # not last.ckpt
    assert {name: record["test"]["metrics"][f"test/{name}/examples"] for name in COMMONSENSE_SETS} == TEST_SIZES
    saved = yaml.safe_load((fitted / "config.test.yaml").read_text())  # the test's settings, beside config.yaml
    assert (saved["model"]["init_args"]["num_beams"], saved["data"]["init_args"]["eval_batch_size"]) == (4, 1)
    assert saved["model"]["init_args"]["response_split"] == "last"


def test_response_split_reaches_the_scoring_from_the_config(root, fitted, monkeypatch):
    from transformers import AutoTokenizer

    from flexlora_pl.tasks import causal_lm

    version = fitted.name.removeprefix("version_")
    ids = AutoTokenizer.from_pretrained(root / "model")(REPEATED, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(causal_lm, "generate_continuations",  # every prompt "answered" by repeating the template
                        lambda model, input_ids, attention_mask, **kwargs: torch.tensor([ids] * len(input_ids)))
    for split, expected in (("first", "answer1"), ("last", "answer2")):
        cli = build_cli(["predict", *cli_args(root, R8, "--ckpt_path", "last", "--version", version,
                                              "--data.init_args.test_sets", "[ARC-Easy]",
                                              "--model.init_args.response_split", split)])
        assert cli.model.response_split == split
        rows = [json.loads(line) for line in (fitted / "predictions" / "predictions_ARC-Easy.jsonl").read_text()
                .splitlines()]
        assert len(rows) == TEST_SIZES["ARC-Easy"] and {row["prediction"] for row in rows} == {expected}
        saved = yaml.safe_load((fitted / "config.predict.yaml").read_text())
        assert saved["model"]["init_args"]["response_split"] == split  # recorded with the run's settings


def test_a_bad_response_split_is_refused_before_anything_is_built(monkeypatch, capsys):
    from flexlora_pl.cli.main import FlexLoRACLI
    from flexlora_pl.tasks import causal_lm

    def built(*args, **kwargs):
        raise AssertionError("a bad response_split got past the parser")

    monkeypatch.setattr(FlexLoRACLI, "instantiate_classes", built)
    monkeypatch.setattr(causal_lm, "_load_backbone", built)
    with pytest.raises(SystemExit) as done:
        build_cli(["test", "--config", str(R8), "--model.init_args.response_split", "middle"])
    assert done.value.code == 2
    message = capsys.readouterr().err
    assert "response_split" in message and "'last', 'first'" in message and "middle" in message
    with pytest.raises(ValueError, match=r"model.init_args.response_split='middle'.*'last'.*'first'"):
        FlexLoRACausalLM("unused", response_split="middle")  # from Python: refused before the model loads


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_ranks_decide_alike_and_score_every_record_once(root, tmp_path):
    script = Path(__file__).parents[1] / "helpers" / "ddp_causal_lm_script.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "helpers"),
                                                  os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(root), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["history"] and ranks[0]["history"] == ranks[1]["history"]
    assert any(event["pruned"] for event in ranks[0]["history"])
    for key, tensor in ranks[0]["adapters"].items():
        assert torch.equal(tensor, ranks[1]["adapters"][key]), f"ranks disagree on {key}"
    for name in COMMONSENSE_SETS:
        seen = [ranks[r]["seen"].get(name, []) for r in (0, 1)]
        assert not set(seen[0]) & set(seen[1]), f"{name}: a record was scored on both ranks"
        assert sorted(seen[0] + seen[1]) == list(range(TEST_SIZES[name]))
        assert ranks[0]["metrics"][f"test/{name}/examples"] == TEST_SIZES[name]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
