"""VTAB-1k split files checked against each other before any run: the sizes VTAB-1k defines (800, 200, 1,000 and
the task's test count where the registry knows it), no image shared between what trains and what is reported, the
opt-out of the size check for a small folder (the overlap check has none), and the digits demo passing both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vtab_helpers import TINY_SPLITS, write_tiny_vtab, write_vtab_1k_sized

from flexlora_pl.cli import build_cli
from flexlora_pl.data.digits_vtab import DIGITS_TASK, DigitsVTABDataModule, build_digits_vtab
from flexlora_pl.data.vtab import VTAB_1K_SIZES, VTAB_TASKS, VTABDataError, VTABDataModule, VTABTask

ROOT = Path(__file__).resolve().parents[2]
TASK = "kitti"  # a registered task: the shipped config is used, the test count (unknown for kitti) is not checked


def flexlora(subcommand: str, tmp: Path, *extra: str):
    """``flexlora <subcommand>`` in-process on the shipped kitti config, shrunk to a seconds-long CPU run."""
    return build_cli([
        subcommand, "--config", str(ROOT / "configs" / "vtab" / f"{TASK}.yaml"),
        "--model.init_args.model_name", "test_vit", "--model.init_args.pretrained", "false",
        "--model.init_args.model_kwargs", "{patch_size: 8}",
        "--data.init_args.root", str(tmp / "vtab"), "--data.init_args.image_size", "32",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.max_epochs", "1", "--trainer.max_steps", "4", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--reallocation.b0", "1", "--reallocation.t_warmup", "1", "--reallocation.t_final", "1",
        "--reallocation.delta_t", "1", "--reallocation.b_schedule", "constant", *extra,
    ])


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _break(tmp: Path, case: str) -> list[str]:
    """Write a task folder broken as ``case`` says; returns the extra command-line arguments the case runs with."""
    if case.startswith("train800val200-"):  # VTAB-1k's sizes but for train800val200, of a registered task
        task = write_vtab_1k_sized(tmp / "vtab", TASK)
        train = _lines(task / "train800val200.txt")
        if case == "train800val200-one-short":
            train = train[:-1]
        else:  # one image more, a real one of its own
            (task / "images" / "extra").mkdir()
            (task / "images" / "extra" / "0.png").write_bytes((task / "images" / "val200" / "000000.png").read_bytes())
            train.append("images/extra/0.png 0")
        _write(task / "train800val200.txt", train)
        return []
    # The overlap check: on the tiny folder with the size check off, which never turns the overlap check off.
    task = write_tiny_vtab(tmp / "vtab", TASK, num_classes=4)
    off = ["--data.init_args.check_split_sizes", "false"]
    if case == "test-repeats-train":  # test.txt lines 3..9 are train800val200.txt lines 1..7
        test, train = _lines(task / "test.txt"), _lines(task / "train800val200.txt")
        _write(task / "test.txt", test[:2] + train[:7] + test[9:])
        return off
    if case == "test-repeats-train-spelled-otherwise":  # the same image, its path written another way
        test = _lines(task / "test.txt")
        _write(task / "test.txt", [*test[:5], "./images//val200/000003.png 3", *test[6:]])
        return off
    train800, val200 = _lines(task / "train800.txt"), _lines(task / "val200.txt")
    if case == "val200-repeats-train800":  # tune: val200 lines 2..4 are train800 lines 10..12
        _write(task / "val200.txt", val200[:1] + train800[9:12] + val200[4:])
    elif case == "test-repeats-train800":  # tune: the last test line is train800's first
        test = _lines(task / "test.txt")
        _write(task / "test.txt", test[:-1] + train800[:1])
    return [*off, "--data.init_args.protocol", "tune"]


# case (the test id) -> the message, as a regex
BAD_SPLITS = {
    "train800val200-one-short": r".*kitti/train800val200.txt:999: train800val200.txt lists 999 images where every "
                                r"VTAB-1k task has 1,000; the file ends on this line, 1 short. Regenerate the task "
                                r"folder with NOAH's VTAB-1k generator \(see docs/vtab.md\), or, for a task folder of "
                                r"other sizes, set data.init_args.check_split_sizes=false",
    "train800val200-one-extra": r".*kitti/train800val200.txt:1001: train800val200.txt lists 1,001 images where every "
                                r"VTAB-1k task has 1,000; the first image past the 1,000 is on this line\.",
    "test-repeats-train": r".*kitti/test.txt:3: image 'images/train800/000000.jpg' is also in the training split "
                          r"\(.*kitti/train800val200.txt:1\); 7 of the 16 images of test.txt are in "
                          r"train800val200.txt, and nothing trained on may be tested on. Remove those lines from "
                          r"test.txt, or regenerate the task folder with NOAH's VTAB-1k generator, whose splits are "
                          r"disjoint \(see docs/vtab.md\)",
    "test-repeats-train-spelled-otherwise": r".*kitti/test.txt:6: image './images//val200/000003.png' is also in the "
                                            r"training split \(.*kitti/train800val200.txt:28\); 1 of the 16 images",
    "val200-repeats-train800": r".*kitti/val200.txt:2: image 'images/train800/000009.png' is also in the training "
                               r"split \(.*kitti/train800.txt:10\); 3 of the 8 images of val200.txt are in "
                               r"train800.txt, and nothing trained on may be validated on",
    "test-repeats-train800": r".*kitti/test.txt:16: image 'images/train800/000000.jpg' is also in the training split "
                             r"\(.*kitti/train800.txt:1\); 1 of the 16 images of test.txt are in train800.txt",
}


@pytest.mark.parametrize("case, message", BAD_SPLITS.items(), ids=list(BAD_SPLITS))
def test_split_files_that_break_vtab_1k_stop_fit_before_the_run_folder(tmp_path, case, message):
    extra = _break(tmp_path, case)
    with pytest.raises(VTABDataError, match=message):
        flexlora("fit", tmp_path, *extra)
    assert not (tmp_path / "runs").exists()


def test_flexlora_test_refuses_a_test_split_that_repeats_training_images(tmp_path):
    task = write_tiny_vtab(tmp_path / "vtab", TASK, num_classes=4)
    off = ("--data.init_args.check_split_sizes", "false")
    fitted = flexlora("fit", tmp_path, *off)
    folder = Path(fitted.trainer.log_dir)
    test, train = _lines(task / "test.txt"), _lines(task / "train800val200.txt")
    _write(task / "test.txt", test[:-1] + train[-1:])  # val200's last image, trained on under final
    with pytest.raises(VTABDataError, match=r".*kitti/test.txt:16: image 'images/val200/000007.png' is also in the "
                                            r"training split \(.*kitti/train800val200.txt:32\); 1 of the 16"):
        flexlora("test", tmp_path, *off, "--ckpt_path", "last")
    assert "test" not in json.loads((folder / "metrics.json").read_text())  # nothing was scored


def test_the_registry_holds_vtab_1k_sizes_and_a_folder_of_those_sizes_passes(tmp_path):
    assert VTAB_1K_SIZES == {"train800": 800, "val200": 200, "train800val200": 1000}
    counts = {name: task.test_size for name, task in VTAB_TASKS.items()}
    assert counts == {
        "cifar": 10_000, "caltech101": 6_084, "dtd": 1_880, "oxford_flowers102": 6_149, "oxford_iiit_pet": 3_669,
        "svhn": 26_032, "sun397": 21_750, "patch_camelyon": 32_768, "eurosat": 5_400, "resisc45": 6_300,
        "diabetic_retinopathy": 42_670, "clevr_count": 15_000, "clevr_dist": 15_000, "dmlab": 22_735, "kitti": None,
        "dsprites_loc": 73_728, "dsprites_ori": 73_728, "smallnorb_azi": 12_150, "smallnorb_ele": 12_150}
    assert VTAB_TASKS["cifar"].split_sizes == {**VTAB_1K_SIZES, "test": 10_000}
    assert VTAB_TASKS["kitti"].split_sizes == VTAB_1K_SIZES  # its test count is not checked
    write_vtab_1k_sized(tmp_path, TASK)
    for protocol in ("final", "tune"):
        data = VTABDataModule(str(tmp_path), TASK, protocol=protocol)
        data.prepare_data()
        assert {role: len(lines) for role, lines in data._checked.items()} == (
            {"train": 1000, "test": 12} if protocol == "final" else {"train": 800, "val": 200, "test": 12})
    # the tiny folder is refused as it is, and passes with the size check off
    write_tiny_vtab(tmp_path / "tiny", TASK, num_classes=4)
    with pytest.raises(VTABDataError, match=r"train800val200.txt:32: train800val200.txt lists 32 images where every "
                                            r"VTAB-1k task has 1,000; the file ends on this line, 968 short"):
        VTABDataModule(str(tmp_path / "tiny"), TASK).prepare_data()
    data = VTABDataModule(str(tmp_path / "tiny"), TASK, check_split_sizes=False)
    data.prepare_data()
    assert len(data._checked["train"]) == TINY_SPLITS["train800"] + TINY_SPLITS["val200"]


class _MiniData(VTABDataModule):
    """A task outside the 19 that declares its test count."""

    def resolve_task(self, task: str) -> VTABTask:
        return VTABTask("mini", 4, "demo", test_size=12)


@pytest.mark.parametrize("test, message", [
    (13, r"mini/test.txt:13: test.txt lists 13 images where task mini has 12; the first image past the 12 is on this "
         r"line\. Regenerate the task folder"),
    (11, r"mini/test.txt:11: test.txt lists 11 images where task mini has 12; the file ends on this line, 1 short"),
], ids=["one-extra", "one-short"])
def test_a_test_split_of_another_size_than_the_tasks_is_refused(tmp_path, test, message):
    write_vtab_1k_sized(tmp_path, "mini", test=test)
    with pytest.raises(VTABDataError, match=message):
        _MiniData(str(tmp_path), "mini").setup("test")
    _MiniData(str(tmp_path), "mini", check_split_sizes=False).setup("test")  # the size check is off


def test_the_digits_demo_passes_both_checks_and_an_overlap_in_it_is_refused(tmp_path):
    assert DIGITS_TASK.split_sizes == {**VTAB_1K_SIZES, "test": 797}
    task = build_digits_vtab(tmp_path)
    for protocol in ("final", "tune"):
        data = DigitsVTABDataModule(str(tmp_path), protocol=protocol)
        data.prepare_data()
        assert len(data._checked["test"]) == 797
    train800 = _lines(task / "train800.txt")
    _write(task / "val200.txt", _lines(task / "val200.txt")[:-1] + train800[:1])
    with pytest.raises(VTABDataError, match=r"digits/val200.txt:200: image 'images/train800/\d{4}.png' is also in the "
                                            r"training split \(.*digits/train800.txt:1\); 1 of the 200 images"):
        DigitsVTABDataModule(str(tmp_path), protocol="tune").prepare_data()
