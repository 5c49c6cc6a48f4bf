"""LoRA with a fixed rank per module read from a run's ``rank_pattern.json`` (the fixed-pattern arm).

Every module gets exactly the rank of the pattern (rank 0: unadapted) at the scale α / r, the model starts as its
base, a FlexLoRA run's own record is read as written, a fit through the real ``flexlora`` command records where its
ranks came from and exports, and every bad input is refused before a run folder exists, naming the option, the file
and the fix.
"""

from __future__ import annotations

import json
import re
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_bert, tiny_run_folder
from torch import nn

from flexlora_pl import FlexLoRAModule, RankHeatmap
from flexlora_pl.cli import build_cli
from flexlora_pl.export import export_merged, export_peft_adapter
from flexlora_pl.methods import FlexLoRA, LoRA
from flexlora_pl.methods.lora import peft_tuner
from flexlora_pl.methods.rank_pattern import OPTION

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "methods" / "lora_fixed_pattern.yaml"
TARGETS = ["query", "value"]
# the tiny BERT's adapted matrices (width 32), as the backbone names them, with a pattern of total 8 = r (2) × 4
NAMES = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
RANKS = dict(zip(NAMES, [3, 1, 0, 4], strict=True))
INPUTS = {"input_ids": torch.randint(5, 64, (4, 9), generator=torch.Generator().manual_seed(0))}


def write_pattern(folder: Path, ranks: dict | None = None, **record) -> Path:
    """A ``rank_pattern.json`` as RankHeatmap writes it (names relative to the LightningModule) in ``folder``."""
    ranks = {f"backbone.{n}": r for n, r in RANKS.items()} if ranks is None else ranks
    content = {"global_step": 12, "method": "flexlora", "rank_pattern": ranks, "max_rank": dict.fromkeys(ranks, 4),
               "total_rank": sum(r for r in ranks.values() if isinstance(r, int)), "events": [], **record}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rank_pattern.json"
    path.write_text(json.dumps(content))
    return path


def adapted(source, r: int = 2, seed: int = 0) -> tuple[LoRA, nn.Module]:
    method = LoRA(TARGETS, r=r, alpha=4, rank_pattern=source)
    return method, method.adapt(tiny_bert(), ["classifier"], seed)


def assert_ranks(model: nn.Module, ranks: dict[str, int], scale: float) -> None:
    """Every module of ``ranks`` has exactly its rank in its peft factors (rank 0: a plain linear layer)."""
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        if rank == 0:
            assert type(layer) is nn.Linear, name
            continue
        assert layer.lora_A["default"].weight.shape == (rank, 32), name
        assert layer.lora_B["default"].weight.shape == (32, rank), name
        assert layer.scaling["default"] == pytest.approx(scale), name


# --------------------------------------------------------------------------- ranks, scale, identity
@pytest.mark.parametrize("kind", ["file", "run folder", "inline, the file's names", "inline, the backbone's names"])
def test_every_module_gets_the_rank_of_the_pattern_and_the_model_starts_as_its_base(tmp_path, kind):
    path = write_pattern(tmp_path / "run")
    source = {"file": str(path), "run folder": str(path.parent),
              "inline, the file's names": {f"backbone.{n}": r for n, r in RANKS.items()},
              "inline, the backbone's names": dict(RANKS)}[kind]
    reference = tiny_bert()(**INPUTS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mean rank 2 = r: no scale warning
        method, model = adapted(source)
    assert_ranks(model, RANKS, scale=4 / 2)
    assert method.rank_pattern(model) == {n: r for n, r in RANKS.items() if r}  # rank 0: left unadapted
    assert sum(method.rank_pattern(model).values()) == sum(RANKS.values()) == 8
    assert method.parameter_counts(model)["active"] == 8 * (32 + 32)
    assert torch.equal(model(**INPUTS).logits, reference)  # B = 0: the base model's output
    facts = method.facts()
    assert facts["total_rank"] == 8 and sum(facts["rank_pattern"].values()) == 8
    assert facts["rank_pattern_source"] == (str(path) if kind in ("file", "run folder") else "inline")
    assert method.as_config()["init_args"]["rank_pattern"] == source  # what checkpoints rebuild it from
    assert LoRA(**method.as_config()["init_args"]).fixed_pattern == method.fixed_pattern


def test_a_flexlora_run_s_own_record_is_read_as_written(tmp_path):
    flex = FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], method=FlexLoRA(TARGETS, init_rank=2,
                                                                                        max_rank=4, alpha=4))
    layers = dict(flex.flexlora_layers())
    moved = {f"backbone.{NAMES[0]}": 4, f"backbone.{NAMES[2]}": 0}
    for name, rank in moved.items():  # what allocation events leave behind: the budget moved between modules
        layers[name].rank_mask.copy_(torch.arange(4) < rank)
    trainer = types.SimpleNamespace(callbacks=[], global_step=12, log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    RankHeatmap().write_json(trainer, flex)
    written = json.loads((tmp_path / "rank_pattern.json").read_text())
    assert written["rank_pattern"] == flex.rank_pattern() and written["total_rank"] == 8
    method, model = adapted(str(tmp_path))
    assert_ranks(model, {n.removeprefix("backbone."): r for n, r in flex.rank_pattern().items()}, scale=4 / 2)
    assert {f"backbone.{n}": r for n, r in method.rank_pattern(model).items()} == {
        n: r for n, r in flex.rank_pattern().items() if r}


def test_a_uniform_pattern_is_uniform_lora_and_the_scale_is_alpha_over_r(tmp_path):
    # the pattern changes the allocation and nothing else: a pattern of r everywhere builds LoRA at rank r, draw by draw
    _, fixed = adapted(dict.fromkeys(NAMES, 2), seed=3)
    plain = LoRA(TARGETS, r=2, alpha=4).adapt(tiny_bert(), ["classifier"], 3)
    assert fixed.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in fixed.state_dict().items())
    assert_ranks(fixed, dict.fromkeys(NAMES, 2), scale=4 / 2)
    # r sets the scale α / r of every module, whatever its rank (peft's default would be α / r_m)
    with pytest.warns(UserWarning, match=r"mean rank of 2.00, not r = 4; every layer is scaled by alpha / r = 1"):
        _, model = adapted(dict(RANKS), r=4)
    assert_ranks(model, RANKS, scale=4 / 4)
    config = peft_tuner(model).peft_config["default"]
    assert config.rank_pattern == {n: r for n, r in RANKS.items() if r}
    assert config.alpha_pattern == {n: 4 * r / 4 for n, r in RANKS.items() if r}


# --------------------------------------------------------------------------- bad input
ENTRIES = {f"backbone.{n}": r for n, r in RANKS.items()}  # the good pattern, named as rank_pattern.json names it
KEYS = list(ENTRIES)
PLACEHOLDER, NO_PATH, NO_FILE = "no path given (the config's placeholder)", "a path that does not exist", \
    "a folder without the file"


def _record(ranks: dict) -> dict:
    return {"method": "flexlora", "rank_pattern": ranks, "events": []}


# case -> (what the rank_pattern.json holds: a record, or raw text; what its error says)
BAD_FILES = {
    "a file that is not JSON": ("{'rank_pattern': ", "is not a JSON file"),
    "a JSON without rank_pattern": ({"ranks": ENTRIES}, r"has no 'rank_pattern' mapping \(found \['ranks'\]"),
    "an empty pattern": (_record({}), "lists no module"),
    "a negative rank": (_record({**ENTRIES, KEYS[0]: -1}),
                        r"the rank of '.*query' must be an integer >= 0 \(0 leaves the module unadapted.*got -1"),
    "a fractional rank": (_record({**ENTRIES, KEYS[1]: 2.5}), "must be an integer >= 0.*got 2.5"),
    "a rank written as text": (_record({**ENTRIES, KEYS[1]: "3"}), "must be an integer >= 0.*got '3'"),
    "a module that is no target": (
        _record({**ENTRIES, "backbone.bert.encoder.layer.0.output.dense": 2}),
        r"1 of its modules match no target module of the backbone, e\.g\. \['backbone\.bert\.encoder\.layer\.0\."
        r"output\.dense'\]; the target modules are named like \['bert\.encoder\.layer\.0\.attention\.self\.query'"
        r".*target_modules of the run that wrote the pattern"),
    "a target without a rank": (
        _record({k: v for k, v in ENTRIES.items() if k != KEYS[3]}),
        r"has no rank for 1 target modules, e\.g\. \['bert\.encoder\.layer\.1\.attention\.self\.value'\]"
        r".*add their ranks to the pattern"),
    "a module named twice": (_record({**ENTRIES, NAMES[0]: 3}), f"names '{NAMES[0]}' twice"),
    "every rank 0": (_record(dict.fromkeys(ENTRIES, 0)), "gives every module rank 0"),
}
BAD = [PLACEHOLDER, NO_PATH, NO_FILE, *BAD_FILES]


def bad_source(tmp_path: Path, case: str) -> tuple[str, str, str]:
    """``(rank_pattern, the file its error must name, what the error must say)`` of one bad input."""
    if case == PLACEHOLDER:
        return "required", "configs/methods/lora_fixed_pattern.yaml", "is required by this config.*version_<n>/"
    if case == NO_PATH:
        return str(tmp_path / "nope.json"), str(tmp_path / "nope.json"), "does not exist; give the rank_pattern.json"
    if case == NO_FILE:
        below = write_pattern(tmp_path / "runs" / "version_0")
        return (str(tmp_path / "runs"), str(tmp_path / "runs"),
                f"holds no rank_pattern.json; give one of the run folders below it: .*{re.escape(str(below))}")
    content, message = BAD_FILES[case]
    path = tmp_path / "bad" / "rank_pattern.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path), str(path), message


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_naming_the_option_the_file_and_the_fix(tmp_path, case):
    source, named, message = bad_source(tmp_path, case)
    with pytest.raises(ValueError, match=message) as refused:
        adapted(source)
    assert OPTION in str(refused.value) and named in str(refused.value)


# --------------------------------------------------------------------------- through the flexlora command
CHANGES = {"trainer": {"callbacks": [
    {"class_path": "flexlora_pl.RankHeatmap"},
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]}}


def fixed_pattern_cli(root: Path, *extra: str, command: str = "fit"):
    return build_cli([command, "--config", str(root / "run.yaml"), "--config", str(CONFIG),
                      "--model.init_args.method.init_args.r", "2", *extra])


def test_a_fit_through_the_cli_keeps_the_pattern_records_it_and_exports(tmp_path, tiny_glue_root):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    root = tiny_run_folder(tmp_path, tiny_glue_root, CHANGES)
    pattern = write_pattern(tmp_path / "flexlora_run")
    cli = fixed_pattern_cli(root, f"{OPTION}", str(pattern))
    folder = Path(cli.trainer.log_dir)
    assert cli.trainer.global_step == 6 and type(cli.model.method) is LoRA
    assert_ranks(cli.model.backbone, RANKS, scale=4 / 2)  # the alpha of tiny_run.yaml's method, r = 2
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["init_args"]["method"]["init_args"]["rank_pattern"] == str(pattern)
    facts = json.loads((folder / "metrics.json").read_text())["run"]["method_facts"]
    assert facts == {"rank_pattern_source": str(pattern), "rank_pattern_method": "flexlora", "total_rank": 8,
                     "rank_pattern": {f"backbone.{n}": r for n, r in RANKS.items()}}
    own = json.loads((folder / "rank_pattern.json").read_text())
    assert own["method"] == "lora" and own["events"] == [] and own["total_rank"] == 8
    assert own["rank_pattern"] == {f"backbone.{n}": r for n, r in RANKS.items() if r}

    # the checkpoint matches the config it came from, and its exports hold the pattern's ranks
    validated = fixed_pattern_cli(root, f"{OPTION}", str(pattern), "--ckpt_path", "last", command="validate")
    assert validated.model.rank_pattern() == cli.model.rank_pattern()
    model = cli.model.eval()
    expected = model(**INPUTS).logits
    export_merged(model, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**INPUTS).logits, expected, rtol=1e-4, atol=1e-5)
    export_peft_adapter(model, tmp_path / "peft")
    base = AutoModelForSequenceClassification.from_pretrained(root / "model").eval()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(loaded(**INPUTS).logits, expected, rtol=1e-4, atol=1e-5)
    assert_ranks(loaded.get_base_model(), RANKS, scale=4 / 2)


@pytest.mark.parametrize("case", [PLACEHOLDER, NO_PATH, "a module that is no target"])
def test_bad_input_through_the_cli_stops_before_a_run_folder_exists(tmp_path, tiny_glue_root, case):
    (tmp_path / "root").mkdir()
    root = tiny_run_folder(tmp_path / "root", tiny_glue_root, CHANGES)
    source, named, message = bad_source(tmp_path, case)
    extra = [] if source == "required" else [OPTION, str(source)]
    with pytest.raises(ValueError, match=message) as refused:
        fixed_pattern_cli(root, *extra)
    assert OPTION in str(refused.value) and named in str(refused.value)
    assert not (root / "runs").exists()
