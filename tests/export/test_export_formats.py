"""The export-format registry and the methods' export hooks.

``flexlora-export --format`` offers exactly the registered formats, with their help and their own flags; a
format registered by a test is selectable through the command and checked like the built-in ones. A method
answers for what an export holds: one without a peft form, a merge or FlexLoRA layers is refused with a
message that names it and the reason, and a plain model (no LightningModule around it) is exported by the
method its adapters show.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import pytest
import torch
from conftest import tiny_bert
from lightning.pytorch import LightningModule
from torch import nn

from flexlora_pl import FlexLoRAModule
from flexlora_pl.cli.export import build_parser, main
from flexlora_pl.core.inject import inject_flexlora
from flexlora_pl.export import (
    FORMATS,
    ExportFormat,
    FormatOption,
    export_merged,
    export_peft_adapter,
    merged_model,
    register_format,
    save_adapter_checkpoint,
)
from flexlora_pl.export.common import atomic_output, check_output_dir
from flexlora_pl.methods import AdaLoRA, AdaptationMethod, FlexLoRA, LoRA
from flexlora_pl.methods.base import recognize_method

BUILT_IN = ("adapter", "merged", "peft")


def format_action(parser):
    return next(action for action in parser._actions if action.dest == "format")


def test_format_choices_are_the_registry() -> None:
    assert set(BUILT_IN) <= set(FORMATS)
    action = format_action(build_parser())
    assert list(action.choices) == list(FORMATS)
    assert all(f"{fmt.name}: {fmt.help}" in action.help for fmt in FORMATS.values())
    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    assert {option.flag for fmt in FORMATS.values() for option in fmt.options} <= flags
    assert {"--tokenizer", "--task-type", "--base-model-name-or-path"} <= flags


# ----------------------------------------------------------------------------- a format registered by a test
class TinyModule(LightningModule):
    """The cheapest module a checkpoint can rebuild: one linear layer, its width a hyper-parameter."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, width)


def write_greeting(module: nn.Module, out_dir: str | Path, overwrite: bool = False, greeting: str = "",
                   shout: str | None = None) -> Path:
    out = check_output_dir(out_dir, overwrite)
    record = {"module": type(module).__name__, "greeting": greeting, "shout": shout}
    with atomic_output(out, overwrite) as tmp:
        (tmp / "greeting.json").write_text(json.dumps(record))
    return out


GREETING = ExportFormat("greeting", "greeting.json, for the registry's tests", write_greeting,
                        options=(FormatOption("--greeting", "what to write", required=True),
                                 FormatOption("--shout", "how loud", metavar="LEVEL")))


@pytest.fixture
def greeting_format():
    before = dict(FORMATS)
    register_format(GREETING)
    yield GREETING
    FORMATS.pop(GREETING.name)
    assert before == FORMATS


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    module = TinyModule(width=3)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def test_a_registered_format_is_selectable_through_the_cli(greeting_format, tiny_ckpt, tmp_path, capsys) -> None:
    assert "greeting" in format_action(build_parser()).choices
    args = ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "out"), "--format", "greeting",
            "--module-class", f"{__name__}.TinyModule"]
    assert main([*args, "--greeting", "hello"]) == 0
    assert "wrote greeting export" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "greeting.json").read_text())
    assert record == {"module": "TinyModule", "greeting": "hello", "shout": None}  # a flag not given is left out
    assert main([*args, "--greeting", "hi", "--shout", "loud", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "greeting.json").read_text())["shout"] == "loud"


def test_format_flags_are_checked_from_the_registry(greeting_format, tiny_ckpt, tmp_path, capsys) -> None:
    def refused(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "out"), *extra])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "--format greeting needs --greeting: what to write" in refused("--format", "greeting")
    assert "--task-type only applies to --format peft" in refused("--format", "greeting", "--greeting", "x",
                                                                 "--task-type", "SEQ_CLS")
    assert "--greeting only applies to --format greeting" in refused("--format", "peft", "--greeting", "x")
    assert "--tokenizer only applies to --format merged" in refused("--format", "adapter", "--tokenizer", "x")
    assert not (tmp_path / "out").exists()  # refused before the checkpoint is read


def test_register_format_refuses_clashes(greeting_format) -> None:
    register_format(GREETING)  # the same format again: nothing changes
    with pytest.raises(ValueError, match="'greeting' is taken"):
        register_format(ExportFormat("greeting", "another", write_greeting))
    with pytest.raises(ValueError, match="declares --shout otherwise than format 'greeting'"):
        register_format(ExportFormat("loud", "x", write_greeting, options=(FormatOption("--shout", "other help"),)))
    assert "loud" not in FORMATS
    with pytest.raises(ValueError, match="long flag"):
        FormatOption("-s", "short")
    with pytest.raises(ValueError, match="twice"):
        ExportFormat("twice", "x", write_greeting, options=(FormatOption("--a", "x"), FormatOption("--a", "x")))


def test_a_format_flag_that_clashes_with_a_common_flag_is_named(tmp_path) -> None:
    clash = ExportFormat("clash", "x", write_greeting, options=(FormatOption("--overwrite", "x"),))
    FORMATS["clash"] = clash  # past register_format's checks, as a careless edit of the registry would be
    try:
        with pytest.raises(ValueError, match="'clash' declares --overwrite, a flag flexlora-export has already"):
            build_parser()
    finally:
        FORMATS.pop("clash")


# ----------------------------------------------------------------------------- the methods' export hooks
class ShiftOnly(AdaptationMethod):
    """A toy method: it trains the classifier's bias only, and has no low-rank form at all."""

    name = "shift_only"

    def adapt(self, backbone: nn.Module, modules_to_save, seed: int) -> nn.Module:
        backbone.requires_grad_(False)
        backbone.classifier.bias.requires_grad_(True)
        return backbone

    def adapter_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.classifier.bias]

    def rank_pattern(self, model: nn.Module) -> dict[str, int]:
        return {}

    def max_ranks(self, model: nn.Module) -> dict[str, int]:
        return {}


def test_a_method_without_a_peft_form_is_refused_naming_it_and_why(tmp_path: Path) -> None:
    module = FlexLoRAModule(tiny_bert(), method=ShiftOnly(["classifier"]))
    with pytest.raises(ValueError, match=r"method 'shift_only' \(ShiftOnly\) cannot be exported as a peft adapter "
                                         r"because it defines no peft form"):
        export_peft_adapter(module, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"'shift_only' .* as a merged model because it defines no merge"):
        export_merged(module, tmp_path / "merged")
    with pytest.raises(ValueError, match=r"'shift_only' .* as a FlexLoRA adapter checkpoint because its adapters "
                                         "are not FlexLoRA layers"):
        save_adapter_checkpoint(module, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_peft_methods_refuse_the_flexlora_adapter_checkpoint(tmp_path: Path) -> None:
    module = FlexLoRAModule(tiny_bert(), method=LoRA(["query", "value"], r=2), modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"method 'lora' \(LoRA\) cannot be exported as a FlexLoRA adapter "
                                         r"checkpoint because its layers are peft's.*--format peft"):
        save_adapter_checkpoint(module, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_plain_models_are_exported_by_the_method_their_adapters_show(tmp_path: Path) -> None:
    plain = tiny_bert()
    inject_flexlora(plain, ["query"], init_rank=2, max_rank=3, alpha=4.0)
    assert isinstance(recognize_method(plain), FlexLoRA)
    lora = LoRA(["query", "value"], r=2, alpha=4.0, dropout=0.1).adapt(tiny_bert(), ["classifier"], seed=0)
    found = recognize_method(lora)
    assert type(found) is LoRA and (found.r, found.alpha, found.dropout) == (2, 4.0, 0.1)
    adalora = AdaLoRA(["query"], init_rank=4, target_rank=2, orth_reg_weight=0.3).adapt(tiny_bert(), [], seed=0)
    found = recognize_method(adalora)
    # peft's config is the method's less γ, which training keeps at 0 (the regulariser is the module's)
    assert type(found) is AdaLoRA and (found.init_rank, found.target_rank, found.orth_reg_weight) == (4, 2, 0.0)
    with torch.no_grad():
        for name, param in adalora.named_parameters():
            if "lora_" in name:
                param.normal_()
    x = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(merged_model(adalora)(**x).logits, adalora(**x).logits, atol=1e-5, rtol=0)
    config = export_peft_adapter(adalora, tmp_path / "adalora")
    assert config.peft_type == "ADALORA" and config.orth_reg_weight == 0.0
    with pytest.raises(ValueError, match="holds no adapter of a registered method.*no FlexLoRA layer"):
        merged_model(tiny_bert())
