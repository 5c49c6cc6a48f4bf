"""The model card every export carries: front matter the Hub reads, the run's scores, ranks, heat-map and loading.

One tiny run through the real ``flexlora`` command (fit, then test) is exported in every built-in format through
``flexlora-export``, with a fake Hugging Face token in the environment all along; the cards are read back and
compared with the run's own files (``metrics.json``, ``rank_pattern.json``, ``config.yaml``), their loading
snippets are run, and no file the run or the export wrote holds the token.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
import torch
import yaml
from conftest import tiny_run_folder, tiny_vit
from huggingface_hub import constants

from flexlora_pl.cli import build_cli
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.core.inject import inject_flexlora
from flexlora_pl.export import FORMATS, ExportFormat, load_module_from_checkpoint, register_format
from flexlora_pl.export.common import atomic_output, check_output_dir
from flexlora_pl.export.model_card import (
    CARD_NAME,
    HEATMAP_NAME,
    TRAINING_CONFIG_NAME,
    ModelCard,
    build_model_card,
    export_with_model_card,
    find_run_dir,
)
from flexlora_pl.methods.full import FullFineTuning
from flexlora_pl.tasks.sequence_classification import FlexLoRASequenceClassifier

FAKE_TOKEN = "hf_FakeTokenForTheCardTests0123456789abcd"
LIBRARIES = {"peft": "peft", "merged": "transformers", "adapter": "flexlora_pl"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_glue_root) -> dict[str, Path]:
    """A tiny fitted and tested run, exported in every built-in format, all with HF_TOKEN set to a fake token."""
    root = tiny_run_folder(tmp_path_factory.mktemp("card_run"), tiny_glue_root,
                           {"data": {"init_args": {"data_files": {"test": "{root}/dev.csv"}}}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", FAKE_TOKEN)
        fitted = build_cli(["fit", "--config", str(root / "run.yaml")])
        run = Path(fitted.trainer.log_dir)
        build_cli(["test", "--config", str(root / "run.yaml"), "--ckpt_path", "last"])
        ckpt = next((run / "checkpoints").glob("*.ckpt"))
        for fmt in LIBRARIES:
            assert export_main(["--ckpt", str(ckpt), "--out", str(root / "export" / fmt), "--format", fmt]) == 0
    return {"root": root, "run": run, "ckpt": ckpt, **{fmt: root / "export" / fmt for fmt in LIBRARIES}}


def split_card(text: str) -> tuple[dict, str]:
    """The front matter (parsed here with yaml.safe_load, not by the code under test) and the body."""
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def section(body: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", body, flags=re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``text``, less its header and ``---`` lines."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def read_card(folder: Path) -> tuple[dict, str]:
    return split_card((folder / CARD_NAME).read_text())


@pytest.mark.parametrize("fmt", list(LIBRARIES))
def test_card_front_matter_holds_the_runs_scores(exported, fmt: str) -> None:
    data, body = read_card(exported[fmt])
    metrics = json.loads((exported["run"] / "metrics.json").read_text())
    expected = {name: value for name, value in metrics["test"]["metrics"].items() if not name.endswith("/loss")}
    assert expected and data["library_name"] == LIBRARIES[fmt]
    assert data["pipeline_tag"] == "text-classification" and data["datasets"] == ["nyu-mll/glue"]
    assert {"flexlora_pl", "flexlora"} <= set(data["tags"])
    assert "base_model" not in data  # a local base folder has no Hub id: the card says so instead of inventing one
    assert f"local folder `{exported['root'] / 'model'}`" in body
    (index,) = data["model-index"]
    (result,) = index["results"]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"] == {"name": "GLUE MRPC", "type": "nyu-mll/glue", "config": "mrpc", "split": "test"}
    assert {m["name"]: m["value"] for m in result["metrics"]} == expected
    assert all(m["type"] == m["name"].rsplit("/", 1)[-1] for m in result["metrics"])
    shown = {name: float(value) for name, value in table_rows(section(body, "Results"))}
    assert shown == expected


@pytest.mark.parametrize("fmt", list(LIBRARIES))
def test_card_rank_table_heatmap_and_training_command(exported, fmt: str) -> None:
    _, body = read_card(exported[fmt])
    record = json.loads((exported["run"] / "rank_pattern.json").read_text())
    rows = table_rows(section(body, "Ranks"))
    assert {name: int(rank) for name, rank, _ in rows} == {
        name.removeprefix("backbone."): rank for name, rank in record["rank_pattern"].items()}
    assert {name: int(top) for name, _, top in rows} == {
        name.removeprefix("backbone."): rank for name, rank in record["max_rank"].items()}
    assert f"]({HEATMAP_NAME})" in body
    assert (exported[fmt] / HEATMAP_NAME).read_bytes().startswith(PNG_MAGIC)
    assert (exported[fmt] / TRAINING_CONFIG_NAME).read_text() == (exported["run"] / "config.yaml").read_text()
    assert f"flexlora fit --config {TRAINING_CONFIG_NAME}" in section(body, "Training")
    settings = dict(table_rows(section(body, "Method")))
    assert settings["init_rank"] == "2" and settings["max_rank"] == "4" and settings["target_modules"] == "query, value"


@pytest.mark.parametrize("fmt", list(LIBRARIES))
def test_card_loading_snippet_loads_the_export(exported, fmt: str, recwarn) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, body = read_card(exported[fmt])
    (code,) = re.findall(r"```python\n(.*?)```", section(body, "How to load"), flags=re.S)
    assert {"peft": "PeftModel.from_pretrained", "merged": "pipeline(\"text-classification\"",
            "adapter": "load_adapter_checkpoint"}[fmt] in code
    namespace: dict = {}
    if fmt == "adapter":  # the snippet applies the adapter to a base model the reader has built
        namespace["base"] = AutoModelForSequenceClassification.from_pretrained(str(exported["root"] / "model"))
    exec(compile(code, f"{fmt}-card", "exec"), namespace)
    model = namespace["model"].eval()
    if fmt == "peft":
        assert isinstance(model, PeftModel)
    if fmt == "merged":
        assert namespace["pipe"].task == "text-classification"
    module = load_module_from_checkpoint(exported["ckpt"]).eval()
    batch = {"input_ids": torch.randint(5, 64, (3, 8), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, module.backbone(**batch).logits, atol=1e-5, rtol=0)


def test_base_model_and_license_from_the_base_folders_card(exported, tmp_path: Path) -> None:
    module = load_module_from_checkpoint(exported["ckpt"])
    base = tmp_path / "base"
    shutil.copytree(exported["root"] / "model", base)
    (base / CARD_NAME).write_text("---\nlicense: apache-2.0\nbase_model: google-bert/bert-base-uncased\n---\n# base\n")
    module.hparams["model_name_or_path"] = str(base)
    card = build_model_card("peft", module, run_dir=exported["run"], repo_id="my-user/tiny-flexlora")
    data, body = split_card(card.text)
    assert data["base_model"] == "google-bert/bert-base-uncased" and data["license"] == "apache-2.0"
    assert data["model-index"][0]["name"] == "tiny-flexlora"
    assert 'from_pretrained("google-bert/bert-base-uncased", num_labels=2)' in body
    assert 'PeftModel.from_pretrained(base, "my-user/tiny-flexlora")' in body
    module.hparams["model_name_or_path"] = "google-bert/bert-base-uncased"  # a hub name is the base_model itself
    assert split_card(build_model_card("merged", module, run_dir=exported["run"]).text)[0]["base_model"] == \
        "google-bert/bert-base-uncased"


def test_loading_snippets_follow_the_library_and_where_the_export_lives(exported, tmp_path: Path) -> None:
    module = load_module_from_checkpoint(exported["ckpt"])
    on_hub = build_model_card("adapter", module, run_dir=exported["run"], repo_id="my-user/tiny").body
    assert 'load_adapter_checkpoint(base, snapshot_download("my-user/tiny"))' in on_hub
    local = build_model_card("adapter", module, run_dir=exported["run"], location=tmp_path / "adapter").body
    assert f'load_adapter_checkpoint(base, "{tmp_path / "adapter"}")' in local and "snapshot_download" not in local
    vit = tiny_vit()
    inject_flexlora(vit, ["qkv"], init_rank=2, max_rank=4)
    data, body = split_card(build_model_card("merged", vit, location=tmp_path / "vit").text)
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-classification"
    assert f'timm.create_model("local-dir:{tmp_path / "vit"}", pretrained=True)' in body
    assert 'timm.create_model("hf-hub:my-user/vit", pretrained=True)' in build_model_card("merged", vit,
                                                                                          repo_id="my-user/vit").body
    assert split_card(build_model_card("peft", vit).text)[0]["library_name"] == "peft"


def test_a_method_without_ranks_has_no_rank_table(tiny_glue_root) -> None:
    module = FlexLoRASequenceClassifier(str(tiny_glue_root / "model"), num_labels=2, method=FullFineTuning())
    card = build_model_card("merged", module)
    data, body = split_card(card.text)
    assert "trains without ranks" in section(body, "Ranks") and not table_rows(section(body, "Ranks"))
    assert HEATMAP_NAME not in card.files and HEATMAP_NAME not in body
    assert "full" in data["tags"] and "lora" not in data["tags"] and "model-index" not in data
    assert "records no scores" in section(body, "Results") and data["library_name"] == "transformers"


def test_merged_card_of_a_quantized_base_says_it_was_dequantized(exported) -> None:
    module = load_module_from_checkpoint(exported["ckpt"])
    assert "dequantized" not in build_model_card("merged", module).body
    module.backbone.config.quantization_config = {"bits": 4, "quant_method": "bitsandbytes"}
    assert "quantized to 4 bits; the merged export holds its weights dequantized" in \
        section(build_model_card("merged", module).body, "Quantization")
    assert "dequantized" not in build_model_card("peft", module).body


def write_notes(module, out_dir, overwrite: bool = False) -> Path:
    out = check_output_dir(out_dir, overwrite)
    with atomic_output(out, overwrite) as tmp:
        (tmp / "weights.txt").write_text("w")
        (tmp / CARD_NAME).write_text("This adapter holds twice the run's rank.\n")
    return out


NOTES = ExportFormat("notes", "weights.txt and notes, for the card's tests", write_notes)


def test_every_registered_format_gets_the_card_with_its_own_notes(exported, tmp_path: Path) -> None:
    register_format(NOTES)
    try:
        assert export_main(["--ckpt", str(exported["ckpt"]), "--out", str(tmp_path / "out"), "--format", "notes"]) == 0
    finally:
        FORMATS.pop(NOTES.name)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [CARD_NAME, HEATMAP_NAME, TRAINING_CONFIG_NAME, "weights.txt"])
    data, body = read_card(tmp_path / "out")
    assert "library_name" not in data and data["model-index"]
    assert section(body, "Notes on these files").strip() == "This adapter holds twice the run's rank."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_a_card_that_cannot_be_built_leaves_nothing(exported, tmp_path: Path, capsys) -> None:
    run = tmp_path / "runs" / "tiny" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(exported["ckpt"], run / "checkpoints" / "last.ckpt")
    (run / "metrics.json").write_text("{not json")
    assert find_run_dir(run / "checkpoints" / "last.ckpt") == run
    out = tmp_path / "out"
    assert export_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--format",
                        "adapter"]) == 1
    assert "metrics.json is not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no export, no temporary folder

    class Broken(ModelCard):
        def write(self, directory):
            raise OSError("disk full")

    module = load_module_from_checkpoint(exported["ckpt"])
    with pytest.raises(OSError, match="disk full"):
        export_with_model_card(FORMATS["adapter"], module, out, Broken(data={}, body=""))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records the calls, touches no network."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"])
                                                                       .iterdir())}))


def test_the_token_is_never_written(exported, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    RecordingHub.calls = []
    out = exported["root"] / "export" / "pushed"
    assert export_main(["--ckpt", str(exported["ckpt"]), "--out", str(out), "--format", "peft",
                        "--push-to-hub", "my-user/tiny-flexlora"]) == 0
    assert [name for name, _ in RecordingHub.calls] == ["create_repo", "upload_folder"]
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    files = [p for p in exported["root"].rglob("*") if p.is_file() and not p.is_symlink()]
    kinds = {p.name for p in files}
    assert {"config.yaml", "metrics.json", "rank_pattern.json", CARD_NAME, TRAINING_CONFIG_NAME} <= kinds
    assert any(name.startswith("events.out.tfevents") for name in kinds) and any(p.suffix == ".ckpt" for p in files)
    leaked = [p for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaked == []
