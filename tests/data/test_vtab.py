"""VTAB-1k with timm ViTs: the shipped configs run through the real ``flexlora`` command on a tiny task folder
(FlexLoRA and the LoRA override), every bad input stops before training without leaving a run folder, the data
module and the classifier name every bad setting, the paper's parameter counts on the real ViT-B/16 architecture
(meta device), exact mid-epoch resume, the merged export carries the preprocessing, all 19 task configs parse and
differ only in their task lines, and every row of the inputs table of docs/reliability.md names tests that exist."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from vtab_helpers import TINY_SPLITS, write_tiny_vtab

from flexlora_pl.cli import build_cli
from flexlora_pl.data.vtab import VTAB_TASKS, VTABDataModule, vtab_data_config, vtab_transform
from flexlora_pl.methods import AdaLoRA, FlexLoRA, LoRA
from flexlora_pl.runs.cosine_schedule import WarmupCosine
from flexlora_pl.tasks.image_classification import ImageClassifier

ROOT = Path(__file__).resolve().parents[2]
VTAB = ROOT / "configs" / "vtab"
TASK = "kitti"  # 4 classes: the tiny folder is written under this name and its shipped config is used
OVERRIDES = {name: VTAB / "overrides" / f"{name}.yaml" for name in ("lora", "adalora", "appendix_h")}
STEPS_PER_EPOCH = (TINY_SPLITS["train800"] + TINY_SPLITS["val200"]) // 8  # final protocol, batch 8


def tiny_args(tmp: Path, epochs: int = 2) -> list[str]:
    """Command-line overrides that turn a shipped VTAB config into a seconds-long CPU run on the tiny folder."""
    return [
        "--model.init_args.model_name", "test_vit", "--model.init_args.pretrained", "false",
        "--model.init_args.model_kwargs", "{patch_size: 8}",
        "--data.init_args.root", str(tmp / "vtab"), "--data.init_args.image_size", "32",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--data.init_args.check_split_sizes", "false",  # the tiny folder is not VTAB-1k's 800 / 200 / 1,000
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--reallocation.b0", "1", "--reallocation.t_warmup", "1", "--reallocation.t_final", "2",
        "--reallocation.delta_t", "2", "--reallocation.b_schedule", "constant",
    ]


def run(subcommand: str, tmp: Path, *extra: str, configs: tuple[Path, ...] = (), epochs: int = 2):
    config_args = [arg for path in (VTAB / f"{TASK}.yaml", *configs) for arg in ("--config", str(path))]
    return build_cli([subcommand, *config_args, *tiny_args(tmp, epochs), *extra])


@pytest.fixture
def tiny(tmp_path) -> Path:
    write_tiny_vtab(tmp_path / "vtab", TASK, num_classes=4)
    return tmp_path


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# --------------------------------------------------------------------------- end to end
def test_flexlora_fit_then_test_and_a_merged_export_that_carries_its_preprocessing(tiny, monkeypatch):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from flexlora_pl.export import export_merged
    from flexlora_pl.export.load import load_module_from_checkpoint

    fitted = run("fit", tiny)
    folder = tiny / "runs" / f"vtab_{TASK}" / "version_0"
    assert Path(fitted.trainer.log_dir) == folder
    assert fitted.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert sum(fitted.trainer.num_val_batches) == 0  # protocol final: no validation loop at all
    checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and not any(name.startswith("best") for name in checkpoints)
    record = metrics(folder)
    assert record["fit"]["status"] == "finished" and record["fit"]["allocation"]["events"] >= 1
    assert record["run"]["method"] == "flexlora"
    model = fitted.model
    assert model.num_classes == 4 and model.hparams["data_config"] == vtab_data_config(32)
    assert model.adapted_modules == [f"blocks.{i}.mlp.{fc}" for i in range(6) for fc in ("fc1", "fc2")]
    assert model.modules_to_save == ["head"]

    tested = run("test", tiny, "--ckpt_path", "last")
    scores = metrics(folder)["test"]
    assert scores["ckpt_path"] == "checkpoints/last.ckpt" and scores["checkpoint_step"] == 2 * STEPS_PER_EPOCH
    assert 0.0 <= scores["metrics"]["test/accuracy"] <= 1.0
    assert scores["metrics"]["test/score"] == scores["metrics"]["test/accuracy"]
    with pytest.raises(ValueError, match="records no best checkpoint"):
        run("test", tiny, "--ckpt_path", "best")  # nothing was selected, least of all on test

    # Rebuilt from the checkpoint elsewhere (no seed_everything in that process: the recorded seed draws the same
    # random base), exported merged, loaded in plain timm; timm's transform from its config.json is the data module's.
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    rebuilt = load_module_from_checkpoint(folder / "checkpoints" / "last.ckpt")
    plain = export_merged(rebuilt, tiny / "merged")
    loaded = timm.create_model(f"local-dir:{tiny / 'merged'}", pretrained=True).eval()
    config = resolve_model_data_config(loaded)
    assert (tuple(config["input_size"]), config["interpolation"]) == ((3, 32, 32), "bicubic")
    assert (tuple(config["mean"]), tuple(config["std"])) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    image = Image.open(next((tiny / "vtab" / TASK / "images" / "test").glob("*.png"))).convert("RGB")
    ours = vtab_transform(32)(image)
    assert torch.allclose(create_transform(**config)(image), ours, atol=1e-6)
    tested.model.eval()
    with torch.no_grad():
        reference = tested.model(ours[None])
        assert torch.allclose(plain.eval()(ours[None]), reference, atol=1e-5)
        assert torch.allclose(loaded(ours[None]), reference, atol=1e-5)


def test_lora_override_runs_the_tune_protocol_with_validation(tiny):
    fitted = run("fit", tiny, "--data.init_args.protocol", "tune", configs=(OVERRIDES["lora"],), epochs=1)
    assert fitted.model.method_name == "lora" and fitted.model.method.r == 14
    assert fitted.trainer.global_step == TINY_SPLITS["train800"] // 8  # train800 only
    logged = fitted.trainer.callback_metrics
    assert 0.0 <= float(logged["val/accuracy"]) <= 1.0 and float(logged["val/score"]) == float(logged["val/accuracy"])
    assert set(fitted.model.validation_metric_names) == {name for name in logged if name.startswith("val")}
    assert type(fitted.model).validation_metrics_for(fitted.datamodule) == fitted.model.validation_metric_names
    record = metrics(Path(fitted.trainer.log_dir))
    assert record["run"]["method"] == "lora" and "allocation" not in record["fit"]


# --------------------------------------------------------------------------- bad inputs
def _break(folder: Path, case: str) -> None:
    task = folder / "vtab" / TASK
    train = task / "train800val200.txt"
    lines = train.read_text().splitlines()
    if case == "task-folder-missing":
        task.rename(folder / "vtab" / "kitti_old")
        return
    if case == "split-file-missing":
        train.unlink()
        return
    if case == "line-without-label":
        lines[2] = "images/train800/000002.jpg"
    elif case == "label-out-of-range":
        lines[3] = lines[3].rsplit(" ", 1)[0] + " 4"
    elif case == "image-missing":
        (task / lines[4].split()[0]).unlink()
    elif case == "not-an-image":
        (task / lines[5].split()[0]).write_bytes(b"not an image at all")
    train.write_text("\n".join(lines) + "\n")


# case (the test id) -> the start of the message, as a regex
BAD_DATA = {
    "task-folder-missing": r"task folder '.*kitti' does not exist; folders under .*: \['kitti_old'\]",
    "split-file-missing": r"split file '.*train800val200.txt' does not exist",
    "line-without-label": r"train800val200.txt:3: cannot parse 'images/train800/000002.jpg'; each line must be",
    "label-out-of-range": r"train800val200.txt:4: label 4 is out of range for this task's 4 classes \(0..3\)",
    "image-missing": r"train800val200.txt:5: image '.*000004.jpg' does not exist",
    "not-an-image": r"train800val200.txt:6: image '.*000005.png' cannot be read as an image",
}


@pytest.mark.parametrize("case, message", BAD_DATA.items(), ids=list(BAD_DATA))
def test_bad_data_stops_before_training_and_leaves_no_run_folder(tiny, case, message):
    _break(tiny, case)
    with pytest.raises(ValueError, match=message):
        run("fit", tiny)
    assert not (tiny / "runs").exists()


@pytest.mark.parametrize("setting, message", [
    ({"protocol": "train"}, r"protocol='train' is not one of \['final', 'tune'\]: 'final' trains on train800val200 "
                            r"and tests on test; 'tune' trains on train800 and validates on val200"),
    ({"image_size": 0}, r"image_size must be an integer >= 1, got 0"),
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"eval_batch_size": 2.5}, r"eval_batch_size must be an integer >= 1, got 2.5"),
    ({"num_workers": -1}, r"num_workers must be an integer >= 0, got -1"),
    ({"batch_size": True}, r"batch_size must be an integer >= 1, got True"),
    ({"check_split_sizes": "no"}, r"check_split_sizes must be true or false, got 'no'"),
], ids=["protocol", "image-size-0", "batch-size-0", "eval-batch-size-float", "num-workers-negative", "batch-size-bool",
        "check-split-sizes-not-bool"])
def test_bad_settings_stop_the_data_module_at_start_up(setting, message):
    with pytest.raises(ValueError, match=message):
        VTABDataModule("data", TASK, **setting)


def _check_broken(folder: Path, case: str) -> None:
    """Break the tiny folder as ``case`` says, then run the data module's step that has to find it."""
    task = folder / "vtab" / TASK
    if case == "root-missing":
        VTABDataModule(str(folder / "nowhere"), TASK).prepare_data()
    elif case == "split-file-blank":
        (task / "test.txt").write_text("\n  \n\n")
        VTABDataModule(str(folder / "vtab"), TASK, check_split_sizes=False).prepare_data()
    elif case == "validate-under-final":
        VTABDataModule(str(folder / "vtab"), TASK, check_split_sizes=False).setup("validate")
    elif case == "not-an-image-unchecked":
        (task / "images" / "test" / "000001.png").write_bytes(b"not an image at all")
        data = VTABDataModule(str(folder / "vtab"), TASK, check_images=False, check_split_sizes=False)
        data.setup("test")  # headers are not read: the damaged file passes the data check...
        data.datasets["test"][1]  # ...and stops the run when its batch is loaded


@pytest.mark.parametrize("case, message", [
    ("root-missing", r"data root '.*nowhere' does not exist \(relative paths are resolved from '.*'\); set "
                     r"data.init_args.root to the folder that holds the VTAB-1k task folders"),
    ("split-file-blank", r"split file '.*test.txt' lists no images; regenerate the task folder"),
    ("validate-under-final", r"protocol 'final' has no validation split \(nothing may be selected on test\); use "
                             r"data.init_args.protocol=tune to validate on val200, or `flexlora test`"),
    ("not-an-image-unchecked", r"test.txt:2: cannot read image '.*000001.png' \(cannot identify image file .*\); "
                               r"replace the file or remove the line"),
], ids=["root-missing", "split-file-blank", "validate-under-final", "not-an-image-unchecked"])
def test_bad_data_is_named_by_the_data_module(tiny, case, message):
    with pytest.raises(ValueError, match=message):
        _check_broken(tiny, case)


@pytest.mark.parametrize("setting, message", [
    ({"num_classes": None}, r"num_classes is not set: the `flexlora` command links it from the data module's "
                            r"num_classes; with a data module that has none, or in Python, pass num_classes"),
    ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
    ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\), got 1.0"),
    ({"pretrained_path": "w.safetensors"}, r"pretrained_path='w.safetensors' is given but pretrained is false; set "
                                           r"pretrained: true to load it, or drop pretrained_path for random weights"),
    ({"model_name": "vit_base_patch16_224_typo"}, r"model_name='vit_base_patch16_224_typo' is not a timm model; close "
                                                  r"names: \['vit_base_patch16_224', .*\] \(timm.list_models\(\)"),
    ({"model_name": "qqqq"}, r"model_name='qqqq' is not a timm model; e.g. \['vit_base_patch16_224.orig_in21k'\]"),
    ({"data_config": {"size": 32}}, r"data_config has unknown keys \['size'\]; expected some of \['input_size', "
                                    r"'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'\]"),
], ids=["num-classes-none", "num-classes-1", "drop-path-rate-1", "path-without-pretrained", "model-name-typo",
        "model-name-unlike-any", "data-config-key"])
def test_bad_settings_stop_the_image_classifier_at_start_up(setting, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(**{"model_name": "test_vit", "num_classes": 3, "pretrained": False, **setting})


@pytest.mark.parametrize("suffix, error", [(".safetensors", "SafetensorError"), (".pth", None)],
                         ids=["safetensors", "pth"])
def test_a_damaged_weights_file_is_named_with_the_loaders_error(tmp_path, suffix, error):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"junk bytes, not weights")
    with pytest.raises(ValueError, match=rf"cannot load pretrained_path='.*model{suffix}' for test_vit \(\w+: .*\)\. "
                                         r"Give an intact weights file of test_vit") as raised:
        ImageClassifier("test_vit", num_classes=3, pretrained_path=str(path))
    cause = raised.value.__cause__  # the loader's own error, chained and named
    assert cause is not None and f"({type(cause).__name__}: " in str(raised.value)
    assert error is None or type(cause).__name__ == error


def test_an_unknown_task_lists_the_19():
    with pytest.raises(ValueError, match=r"task='cifar10' is not a VTAB-1k task; the 19 are: cifar, caltech101, .*"
                                         r"smallnorb_ele \(aliases: cifar100 = cifar, oxford_pet = oxford_iiit_pet\)"):
        VTABDataModule("data", "cifar10")
    assert VTABDataModule("data", "oxford_pet").task.name == "oxford_iiit_pet"
    assert VTABDataModule("data", "cifar100").num_classes == 100


def test_pretrained_weights_from_a_file_and_a_clear_error_offline(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the hub's sentence and ours join with one full stop
    with pytest.raises(ValueError, match=r"pretrained weights of test_vit from the Hugging Face hub \(HF_HUB_OFFLINE "
                                         r"is set\): [^\n]*[^.]\. Pass model\.init_args\.pretrained_path="):
        ImageClassifier("test_vit", num_classes=3, pretrained=True)
    torch.manual_seed(5)
    source = timm.create_model("test_vit", num_classes=1000)  # a checkpoint with another head: it is replaced
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    loaded = ImageClassifier("test_vit", num_classes=3, pretrained_path=str(tmp_path / "model.safetensors"))
    frozen = loaded.backbone.get_submodule("blocks.0.mlp.fc1").base.weight  # under the adapter
    assert torch.equal(frozen, source.blocks[0].mlp.fc1.weight) and loaded.backbone.head.out_features == 3
    with pytest.raises(ValueError, match="pretrained_path='nowhere.safetensors' is not a file"):
        ImageClassifier("test_vit", num_classes=3, pretrained_path="nowhere.safetensors")


# --------------------------------------------------------------------------- parameter counts
MLP_DIRECTION = 768 + 3072  # one direction of mlp.fc1 (768 -> 3072) or mlp.fc2 (3072 -> 768)


@pytest.mark.parametrize("method, active, allocated", [
    (LoRA(r=14), 1_290_240, 1_290_240),  # the paper's 1.29M (Table 3, LoRA r = 14)
    # a direction also has its λ: 24 matrices × 14 active, × 21 allocated
    (FlexLoRA(init_rank=14, max_rank=21), 1_290_240 + 24 * 14, 1_935_360 + 24 * 21),
    (AdaLoRA(init_rank=21, target_rank=14), 1_935_360 + 24 * 21, 1_935_360 + 24 * 21),  # 21 until pruned
], ids=["lora", "flexlora", "adalora"])
def test_vit_b16_adapter_counts(method, active, allocated):
    with torch.device("meta"):  # the real ViT-B/16 architecture, no weights, no download
        module = ImageClassifier(num_classes=100, pretrained=False, method=method)
    if isinstance(method, FlexLoRA):  # meta tensors hold no values: a fresh layer's mask is its first r_init
        for _, layer in module.flexlora_layers():
            layer.rank_mask = torch.arange(layer.max_rank) < layer.init_rank
    assert len(module.adapted_modules) == 24 and module.modules_to_save == ["head"]
    assert 24 * 14 * MLP_DIRECTION == 1_290_240 and 24 * 21 * MLP_DIRECTION == 1_935_360
    counts = module.parameter_counts()
    assert (counts["active"], counts["allocated"]) == (active, allocated)
    assert counts["modules_to_save"] == 768 * 100 + 100  # the new head, trained in full
    assert sum(p.numel() for p in module.adapter_parameters()) == allocated


# --------------------------------------------------------------------------- exact resume
def _trained_state(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["state_dict"]


def test_a_crash_mid_epoch_resumes_bitwise(tiny):
    crash = '--trainer.callbacks+={"class_path": "run_helpers.CrashAt", "init_args": {"step": 6}}'
    whole = run("fit", tiny, "--name", "whole", "--model.init_args.drop_path_rate", "0.3")
    assert whole.trainer.global_step == 2 * STEPS_PER_EPOCH and 2 * STEPS_PER_EPOCH > 6 > STEPS_PER_EPOCH
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        run("fit", tiny, "--name", "crashed", "--model.init_args.drop_path_rate", "0.3", crash)
    folder = tiny / "runs" / "crashed" / "version_0"
    assert (folder / "checkpoints" / "on_exception.ckpt").exists()
    resumed = run("fit", tiny, "--name", "crashed", "--model.init_args.drop_path_rate", "0.3", "--ckpt_path", "last")
    assert resumed.trainer.ckpt_path == str(folder / "checkpoints" / "on_exception.ckpt")
    assert resumed.trainer.global_step == whole.trainer.global_step
    expected, got = _trained_state(tiny / "runs" / "whole" / "version_0"), _trained_state(folder)
    assert expected.keys() == got.keys()
    same = {k: torch.equal(expected[k], got[k]) if torch.is_tensor(expected[k]) else expected[k] == got[k]
            for k in expected}
    assert all(same.values()), [k for k, equal in same.items() if not equal]


# --------------------------------------------------------------------------- configs
TASK_CONFIGS = [VTAB / f"{name}.yaml" for name in VTAB_TASKS]


def test_there_is_one_config_per_task_and_they_differ_only_in_the_task():
    assert sorted(p.stem for p in VTAB.glob("*.yaml")) == sorted([*VTAB_TASKS, "demo_digits"])
    reference = TASK_CONFIGS[0].read_text().splitlines()
    for path in TASK_CONFIGS:
        name, lines = path.stem, path.read_text().splitlines()
        assert len(lines) == len(reference), path
        differing = [(ours, theirs) for ours, theirs in zip(lines[1:], reference[1:], strict=True) if ours != theirs]
        assert all(ours.replace(name, "cifar") == theirs for ours, theirs in differing), (path, differing)
        config = yaml.safe_load(path.read_text())
        assert config["data"]["init_args"]["task"] == name
        assert config["trainer"]["logger"]["init_args"]["name"] == f"vtab_{name}"
    # Table 11, and the literature defaults for what it leaves open (docs/vtab.md)
    config = yaml.safe_load(TASK_CONFIGS[0].read_text())
    model, method = config["model"]["init_args"], config["model"]["init_args"]["method"]["init_args"]
    assert config["trainer"]["max_epochs"] == 100 and config["data"]["init_args"]["batch_size"] == 32
    assert model["optimizer"]["init_args"] == {"lr": 1e-3, "weight_decay": 1e-4}
    assert model["model_name"] == "vit_base_patch16_224.orig_in21k" and model["drop_path_rate"] == 0.1
    assert model["lr_scheduler"]["init_args"] == {"warmup_ratio": 0.1}
    assert (method["init_rank"], method["max_rank"], method["alpha"]) == (14, 21, 16)
    assert method["target_modules"] == ["mlp.fc1", "mlp.fc2"]
    assert {k: config["reallocation"][k] for k in ("b0", "t_warmup", "t_final", "delta_t")} == {
        "b0": 4, "t_warmup": 500, "t_final": 500, "delta_t": 100}
    assert config["data"]["init_args"]["protocol"] == "final" and config["data"]["init_args"]["image_size"] == 224
    # the final protocol selects nothing: no checkpoint monitors a metric
    assert not any("monitor" in (cb.get("init_args") or {}) for cb in config["trainer"]["callbacks"])


def _printed(capsys, *configs: Path) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *(arg for path in configs for arg in ("--config", str(path))), "--print_config"])
    assert exit_info.value.code in (0, None), configs
    return yaml.safe_load(capsys.readouterr().out)


def test_every_config_parses(capsys):
    for path in [*TASK_CONFIGS, VTAB / "demo_digits.yaml"]:
        printed = _printed(capsys, path)
        assert printed["data"]["init_args"]["task" if path in TASK_CONFIGS else "root"] is not None
    # the overrides over a task config: they switch what they say and keep the rest
    method = _printed(capsys, TASK_CONFIGS[0], OVERRIDES["lora"])["model"]["init_args"]["method"]
    assert method["class_path"].endswith("LoRA") and method["init_args"]["r"] == 14
    assert method["init_args"]["target_modules"] == ["mlp.fc1", "mlp.fc2"] and method["init_args"]["alpha"] == 16
    method = _printed(capsys, TASK_CONFIGS[0], OVERRIDES["adalora"])["model"]["init_args"]["method"]
    assert (method["init_args"]["init_rank"], method["init_args"]["target_rank"]) == (21, 14)
    printed = _printed(capsys, TASK_CONFIGS[0], OVERRIDES["appendix_h"])["model"]["init_args"]
    assert printed["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert (printed["optimizer"]["init_args"]["lr"], printed["optimizer"]["init_args"]["weight_decay"]) == (2e-3, 1e-3)
    assert printed["method"]["class_path"].endswith("FlexLoRA") and printed["method"]["init_args"]["max_rank"] == 21


def test_warmup_cosine_rises_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, total_steps=100, warmup_ratio=0.1)
    factors = [schedule._factor(step) for step in range(101)]
    assert factors[9] == pytest.approx(10 / 11) and factors[10] == 1.0
    assert factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        WarmupCosine(optimizer)


# --------------------------------------------------------------------------- docs
RELIABILITY = ROOT / "docs" / "reliability.md"
INPUTS_SECTION = "### VTAB-1k and commonsense inputs"


def _table_rows(doc: Path, heading: str) -> list[list[str]]:
    """The body rows of the table under ``heading`` (up to the next heading), each as its list of cells."""
    section = doc.read_text().split(heading, 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines[2:]]  # no header


def _test_module(path: Path) -> ModuleType:
    """The test module at ``path``: the one pytest imported, or loaded from its file."""
    if path.stem in sys.modules and Path(sys.modules[path.stem].__file__ or "").resolve() == path.resolve():
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _missing_test(node_id: str) -> str | None:
    """Why ``node_id`` (``tests/<folder>/<file>.py::<test>[<id>]``) names no test of this suite, or ``None`` if it does.

    Parametrized cases are found through the explicit ``ids=`` of their ``parametrize`` mark."""
    path, _, name = node_id.partition("::")
    function_name, _, case = name.partition("[")
    if not path.startswith("tests/") or not (ROOT / path).is_file():
        return f"{path} is not a file under tests/"
    function = getattr(_test_module(ROOT / path), function_name, None)
    if not function_name.startswith("test_") or function is None:
        return f"{path} has no test {function_name}"
    if not case:
        return None
    marks = [mark for mark in getattr(function, "pytestmark", []) if mark.name == "parametrize"]
    ids = [case_id for mark in marks for case_id in mark.kwargs.get("ids") or []]
    if case.removesuffix("]") not in ids:
        return f"{function_name} has no case {case.removesuffix(']')!r} among its explicit ids= {ids}"
    return None


def test_every_row_of_the_inputs_table_names_tests_that_exist():
    rows = _table_rows(RELIABILITY, INPUTS_SECTION)
    assert len(rows) > 30 and all(len(row) == 4 for row in rows), "the table has 4 columns"
    untested = [row[0] for row in rows if not re.findall(r"`([^`]+)`", row[3])]
    assert not untested, f"rows of {INPUTS_SECTION!r} that name no test: {untested}"
    node_ids = [node_id for row in rows for node_id in re.findall(r"`([^`]+)`", row[3])]
    problems = [f"{node_id}: {why}" for node_id in node_ids if (why := _missing_test(node_id))]
    assert not problems, "\n".join(problems)
