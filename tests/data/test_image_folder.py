"""``ImageFolderDataModule``: your own image folders through the real ``flexlora`` command (fit, test, predict, the
merged export) with the shipped ``configs/own_images.yaml``; class names in predictions, ``metrics.json`` and the
export; the seeded stratified carve; the preprocessing of the model's timm data config and the ``augment`` switch;
exact mid-epoch resume; and every bad input, refused before a run folder exists."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flexlora_pl.cli import build_cli
from flexlora_pl.data import ImageFolderDataModule, ImageFolderError

CONFIG = Path(__file__).parents[2] / "configs" / "own_images.yaml"
CLASSES = ["cat", "dog", "fox"]  # sorted: their ids are 0, 1, 2


def write_images(folder: Path, per_class: int = 8, classes: list[str] = CLASSES, offset: int = 0) -> Path:
    """``folder/<class>/<i>.png``: 32x32 noise with one bright quadrant per class (the class is in the pixels)."""
    rng = np.random.default_rng(offset)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            row, col = divmod(label % 4, 2)
            pixels[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] += 150
            Image.fromarray(pixels).save(folder / name / f"{offset + i:03d}.png")
    return folder


def tiny_args(tmp: Path, root: Path, epochs: int = 2) -> list[str]:
    """Overrides that turn the shipped config into a seconds-long CPU run on ``root``."""
    return [
        "--data.init_args.root", str(root), "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.image_size", "16",
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--reallocation.b0", "1", "--reallocation.t_warmup", "1", "--reallocation.t_final", "2",
        "--reallocation.delta_t", "2", "--reallocation.b_schedule", "constant",
    ]


def run(subcommand: str, tmp: Path, root: Path, *extra: str, epochs: int = 2):
    return build_cli([subcommand, "--config", str(CONFIG), *tiny_args(tmp, root, epochs), *extra])


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture
def one_folder(tmp_path) -> Path:
    return write_images(tmp_path / "images")


@pytest.fixture
def split_folder(tmp_path) -> Path:
    root = tmp_path / "split"
    write_images(root / "train", per_class=6)
    write_images(root / "val", per_class=2, offset=100)
    write_images(root / "test", per_class=3, offset=200)
    return root


# --------------------------------------------------------------------------- end to end
def test_fit_test_predict_and_a_merged_export_carry_the_class_names(tmp_path, one_folder, monkeypatch):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from flexlora_pl.export import export_merged
    from flexlora_pl.export.load import load_module_from_checkpoint

    carve = ("--data.init_args.val_size", "0.25", "--data.init_args.test_size", "3")
    fitted = run("fit", tmp_path, one_folder, *carve)
    folder = tmp_path / "runs" / "own_images" / "version_0"
    data = fitted.datamodule
    assert Path(fitted.trainer.log_dir) == folder
    assert (data.label_names, data.num_classes, fitted.model.label_names) == (CLASSES, 3, CLASSES)
    # 24 images: 3 carved for test (one per class), then 0.25 of the 21 left (5) for validation, 16 train
    assert [len(data.examples[role]) for role in ("train", "val", "test")] == [16, 5, 3]
    assert fitted.trainer.global_step == 2 * 4  # batches of 4, two epochs
    record = metrics(folder)
    assert record["run"]["label_names"] == CLASSES and record["fit"]["status"] == "finished"
    assert record["fit"]["carved_validation"] == {"val_size": 0.25, "rows": 5, "train_rows": 16, "seed": 42,
                                                  "stratified": True, "test_size": 3, "test_rows": 3}
    assert 0.0 <= record["fit"]["final"]["val/accuracy"] <= 1.0
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["data"]["init_args"]["label_names"] == CLASSES
    assert data.model_name == "test_vit" and data.data_config["mean"] == (0.5, 0.5, 0.5)  # the model's, linked

    run("test", tmp_path, one_folder, *carve, "--ckpt_path", "last")
    scores = metrics(folder)["test"]
    assert scores["ckpt_path"] == "checkpoints/last.ckpt" and 0.0 <= scores["metrics"]["test/accuracy"] <= 1.0

    predicted = run("predict", tmp_path, one_folder, *carve, "--ckpt_path", "last")
    rows = [json.loads(line) for line in (folder / "predictions" / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["label"] == CLASSES[row["prediction"]] for row in rows)
    images = torch.stack([predicted.datamodule.datasets["test"][i][0] for i in range(3)])
    predicted.model.eval()
    with torch.no_grad():
        assert [row["prediction"] for row in rows] == predicted.model(images).argmax(-1).tolist()

    # rebuilt from the checkpoint elsewhere, merged, loaded in plain timm: names and preprocessing come along
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    rebuilt = load_module_from_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert rebuilt.label_names == CLASSES
    export_merged(rebuilt, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["label_names"] == CLASSES and config["pretrained_cfg"]["label_names"] == CLASSES
    loaded = timm.create_model(f"local-dir:{tmp_path / 'merged'}", pretrained=True).eval()
    assert list(loaded.pretrained_cfg["label_names"]) == CLASSES
    image = Image.open(predicted.datamodule.examples["test"][0].path).convert("RGB")
    ours = predicted.datamodule.datasets["test"][0][0]
    assert torch.allclose(create_transform(**resolve_model_data_config(loaded))(image), ours, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(loaded(ours[None]), predicted.model(ours[None]), atol=1e-5)


def test_the_split_layout_validates_on_val_and_tests_on_test(tmp_path, split_folder):
    fitted = run("fit", tmp_path, split_folder, "--data.init_args.val_size", "null")
    data = fitted.datamodule
    assert [len(data.examples[role]) for role in ("train", "val", "test")] == [18, 6, 9]
    assert data.carved_validation is None and "carved_validation" not in metrics(Path(fitted.trainer.log_dir))["fit"]
    assert {Path(e.path).parent.parent.name for e in data.examples["val"]} == {"val"}
    assert "val/accuracy" in fitted.trainer.callback_metrics
    tested = run("test", tmp_path, split_folder, "--data.init_args.val_size", "null", "--ckpt_path", "last")
    assert tested.trainer.callback_metrics["test/accuracy"] >= 0.0


# --------------------------------------------------------------------------- the carve
def test_the_carve_is_stratified_disjoint_and_the_same_for_the_same_seed(tmp_path):
    root = tmp_path / "images"
    write_images(root, per_class=10)
    write_images(root, per_class=20, classes=["owl"], offset=50)  # a larger class: 50 images in all
    carved = [ImageFolderDataModule(str(root), val_size=0.2, seed=seed, num_workers=0) for seed in (3, 3, 4)]
    paths = [{role: [e.path for e in data.examples[role]] for role in ("train", "val")} for data in carved]
    assert paths[0] == paths[1] and paths[0]["val"] != paths[2]["val"]
    for data, split in zip(carved, paths, strict=True):
        assert not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == sorted(str(p) for p in root.rglob("*.png"))
        # 10 images of 20% per class: the classes in proportion to their size
        assert Counter(e.label for e in data.examples["val"]) == {0: 2, 1: 2, 2: 2, 3: 4}
        assert data.carved_validation == {"val_size": 0.2, "rows": 10, "train_rows": 40, "seed": data.seed,
                                          "stratified": True}
    assert ImageFolderDataModule(str(root), val_size=7, seed=3, num_workers=0).carved_validation["rows"] == 7


def test_label_names_fix_the_id_order(one_folder):
    data = ImageFolderDataModule(str(one_folder), label_names=["fox", "cat", "dog"], num_workers=0)
    assert data.label_names == ["fox", "cat", "dog"]
    assert {Path(e.path).parent.name for e in data.examples["train"] if e.label == 0} == {"fox"}


# --------------------------------------------------------------------------- preprocessing
def test_preprocessing_follows_the_timm_model_and_augment_switches_to_timms_training_transform(one_folder):
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    data = ImageFolderDataModule(str(one_folder), model_name="resnet50", image_size=24, num_workers=0)
    expected = resolve_data_config(args={"input_size": (3, 24, 24)}, pretrained_cfg=get_pretrained_cfg("resnet50")
                                   .to_dict())
    assert data.data_config == {key: expected[key] for key in data.data_config}
    assert data.data_config["mean"] == (0.485, 0.456, 0.406) and data.data_config["input_size"] == (3, 24, 24)
    data.setup("fit")
    image, label = data.datasets["train"][0]
    pil = Image.open(data.examples["train"][0].path).convert("RGB")
    assert torch.equal(image, create_transform(**data.data_config)(pil)) and label == 0
    assert torch.equal(image, data.datasets["train"][0][0])  # no augmentation: the same every time

    augmented = ImageFolderDataModule(str(one_folder), model_name="test_vit", image_size=16, augment=True,
                                      batch_size=4, num_workers=0, seed=1)
    augmented.setup("fit")
    train = augmented.datasets["train"]
    assert "RandomResizedCrop" in repr(train.transform)
    before = torch.random.get_rng_state()
    draws = [train[(0, 5)][0], train[(0, 5)][0], train[(1, 5)][0]]
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG (dropout's) is left alone
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # seeded by epoch and image
    batch = next(iter(augmented.train_dataloader()))
    assert batch[0].shape == (4, 3, 16, 16)


# --------------------------------------------------------------------------- exact resume
def _trained_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_a_crash_mid_epoch_resumes_bitwise(tmp_path, one_folder, augment):
    crash = '--trainer.callbacks+={"class_path": "run_helpers.CrashAt", "init_args": {"step": 6}}'
    extra = ("--data.init_args.val_size", "4", "--data.init_args.augment", str(augment).lower(),
             "--model.init_args.drop_path_rate", "0.3")
    whole = run("fit", tmp_path, one_folder, "--name", "whole", *extra)
    assert whole.trainer.global_step == 2 * 5 and 2 * 5 > 6 > 5  # 20 training images, batches of 4
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        run("fit", tmp_path, one_folder, "--name", "crashed", *extra, crash)
    folder = tmp_path / "runs" / "crashed" / "version_0"
    resumed = run("fit", tmp_path, one_folder, "--name", "crashed", *extra, "--ckpt_path", "last")
    assert resumed.trainer.ckpt_path == str(folder / "checkpoints" / "on_exception.ckpt")
    assert resumed.trainer.global_step == whole.trainer.global_step
    expected, got = _trained_state(tmp_path / "runs" / "whole" / "version_0"), _trained_state(folder)
    assert expected.keys() == got.keys()
    same = {k: torch.equal(expected[k], got[k]) if torch.is_tensor(expected[k]) else expected[k] == got[k]
            for k in expected}
    assert all(same.values()), [k for k, equal in same.items() if not equal]


# --------------------------------------------------------------------------- bad input
def _break(root: Path, case: str) -> None:
    if case == "root-missing":
        root.rename(root.with_name("moved"))
    elif case == "train-folder-missing":  # the split layout without its train/ folder
        root.rename(root.with_name("old"))
        write_images(root / "val", per_class=2)
    elif case == "train-folder-empty":
        for name in CLASSES:
            (root / name).rename(root / f"x_{name}")
        (root / "train").mkdir()
    elif case == "non-image-files":
        for i in range(7):
            (root / "dog" / f"notes{i}.txt").write_text("not an image")
    elif case == "one-class":
        for name in CLASSES[1:]:
            for path in (root / name).iterdir():
                path.unlink()
            (root / name).rmdir()
    elif case == "empty-class":
        (root / "emu").mkdir()
    elif case == "loose-image":
        (root / "cat" / "000.png").rename(root / "stray.png")
    elif case == "corrupt-image":
        (root / "fox" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif case == "too-small-to-stratify":
        for path in sorted((root / "fox").iterdir())[1:]:
            path.unlink()


# case -> (extra options, the message as a regex)
BAD_INPUT = {
    "root-missing": ((), r"data root '.*images' does not exist .*set data.init_args.root to your image folder"),
    "train-folder-missing": ((), r"'.*images' holds val/ but no train/ folder: the split layout is "
                                 r"root/train/<class>/<image> beside root/val/<class>/<image>"),
    "train-folder-empty": ((), r"training folder '.*images/train' holds no class folder; lay the images out as "),
    "non-image-files": ((), r"training folder '.*images': 7 file\(s\) in the class folders are not images "
                            r"\('dog/notes0.txt', 'dog/notes1.txt', .* and 2 more\); an image's name ends in one of "
                            r"\.jpg"),
    "one-class": ((), r"training folder '.*images' holds one class folder \('cat'\); classification needs two or more"),
    "empty-class": ((), r"class folder '.*images/emu' holds no image; put the images of class 'emu' in it, or "
                        r"remove the folder"),
    "loose-image": ((), r"1 image\(s\) lie beside the class folders and belong to no class \('stray.png'\)"),
    "corrupt-image": ((), r"training folder '.*images': 1 image\(s\) cannot be read \('fox/003.png'\); the first, "
                          r"'.*fox/003.png': "),
    "too-small-to-stratify": (("--data.init_args.val_size", "0.25"),
                              r"class 'fox' has 1 of the 17 images, too few to stratify a val_size carve of 4 "
                              r"images: .* Give the class at least 2 images"),
    "val-size-leaves-nothing": (("--data.init_args.val_size", "24"),
                                r"val_size=24 carves 24 of its 24 images, which leaves no image to train on; set "
                                r"data.init_args.val_size to fewer than 24"),
    "val-size-fraction-1": (("--data.init_args.val_size", "1.0"), r"val_size=1.0 is a fraction of the training "
                                                                  r"images and must lie in \(0, 1\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_refused_before_a_run_folder_exists(tmp_path, one_folder, case):
    extra, message = BAD_INPUT[case]
    _break(one_folder, case)
    with pytest.raises(ValueError, match=message):  # the command's parser wraps the ImageFolderError
        run("fit", tmp_path, one_folder, *extra)
    assert not (tmp_path / "runs").exists()


def test_a_validation_or_test_class_that_training_lacks_is_refused(tmp_path, split_folder):
    write_images(split_folder / "test", per_class=1, classes=["cat", "yak"], offset=300)
    with pytest.raises(ValueError, match=r"test folder '.*split/test' has class folder\(s\) \['yak'\] that "
                                               r"the training folder lacks \(its classes: \['cat', 'dog', 'fox'\]\)"):
        run("fit", tmp_path, split_folder, "--data.init_args.val_size", "null")
    assert not (tmp_path / "runs").exists()
    (split_folder / "validation").mkdir()
    with pytest.raises(ImageFolderError, match=r"holds both val/ and validation/; keep one validation folder"):
        ImageFolderDataModule(str(split_folder))


@pytest.mark.parametrize("setting, message", [
    ({"val_size": 0}, r"val_size=0 carves no image"),
    ({"val_size": "10%"}, r"val_size must be a count of training images \(an integer >= 1\) or a fraction"),
    ({"test_size": 2}, r"test_size=2 carves a test split out of a one-folder layout, but '.*split' holds a train/"),
    ({"val_size": 0.1}, r"'.*split/val' is a validation folder and val_size=0.1 is set"),
    ({"label_names": ["cat", "dog"]}, r"label_names=\['cat', 'dog'\] must list exactly the class folders of "),
    ({"augment": "yes"}, r"augment must be true or false, got 'yes'"),
    ({"model_name": "no_such_vit"}, r"model_name='no_such_vit' has no timm pretrained config"),
], ids=["val-size-0", "val-size-text", "test-size-with-test-folder", "val-size-with-val-folder", "label-names",
        "augment-text", "model-name"])
def test_bad_settings_are_named(split_folder, setting, message):
    with pytest.raises(ImageFolderError, match=message):
        ImageFolderDataModule(str(split_folder), **setting)


def test_a_stage_without_its_split_is_refused_naming_the_fix(one_folder):
    data = ImageFolderDataModule(str(one_folder), num_workers=0)
    assert data.roles_for_stage("fit") == ["train"] and data.val_dataloader() == []
    with pytest.raises(ImageFolderError, match=r"has no test split, which `predict` needs: .* set "
                                               r"data.init_args.test_size"):
        data.setup("predict")
    with pytest.raises(ImageFolderError, match=r"has no validation split: .* set data.init_args.val_size"):
        data.setup("validate")
