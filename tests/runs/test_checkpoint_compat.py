"""Checkpoints written before allocation moved into driver objects still resume, and finish as they did.

``tests/fixtures/pre_refactor/`` holds checkpoints of a tiny FlexLoRA and a tiny AdaLoRA run at optimizer step 6
of 12, and what those runs held at the end, all written by the code before the move (``make.py`` there says
how). Resuming each checkpoint with today's ``flexlora fit`` must reproduce the same events (steps, ranks,
which modules moved) and the same final tensors: the checkpoint format and the training behaviour are both
unchanged. The configs name the model by its public path (``flexlora_pl.FlexLoRASequenceClassifier``), as the
shipped configs do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parents[1] / "fixtures" / "pre_refactor"


@pytest.mark.parametrize("method", ["flexlora", "adalora"])
def test_a_checkpoint_from_before_the_move_resumes_and_finishes_as_it_did(tmp_path, tiny_glue_root, monkeypatch,
                                                                          method):
    from flexlora_pl.cli import build_cli

    for name in ("model", "train.csv", "dev.csv"):
        (tmp_path / name).symlink_to(tiny_glue_root / name)
    for name in ("run.yaml", f"{method}.yaml"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))  # run_helpers.DumpTrained
    ckpt = FIXTURES / f"{method}_step6.ckpt"
    build_cli(["fit", "--config", "run.yaml", "--config", f"{method}.yaml", "--ckpt_path", str(ckpt)])

    then = torch.load(FIXTURES / f"{method}_final.pt", weights_only=False)
    now = torch.load(tmp_path / "final.pt", weights_only=False)
    assert now["global_step"] == then["global_step"] == 12
    moves = lambda history: [(e["step"], e["ranks"], e["pruned"], e["expanded"]) for e in history]  # noqa: E731
    assert moves(now["history"]) == moves(then["history"])
    assert len(then["history"]) >= 3 and any(e["step"] > 6 for e in then["history"])  # events after the resume
    for event_now, event_then in zip(now["history"], then["history"], strict=True):
        assert event_now["scores"] == pytest.approx(event_then["scores"], rel=1e-5, abs=1e-7)
    assert sorted(now["tensors"]) == sorted(then["tensors"])
    for name, tensor in then["tensors"].items():
        torch.testing.assert_close(now["tensors"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_that_recorded_a_deep_class_path_matches_a_config_naming_the_public_one(tmp_path):
    # configs now name classes by their public path (flexlora_pl.ImageClassifier); checkpoints written from the
    # older configs recorded the module path (flexlora_pl.tasks.image_classification.ImageClassifier)
    from jsonargparse import Namespace

    from flexlora_pl.runs.checkpoint_check import check_checkpoint_matches_config, same_class

    deep, public = "flexlora_pl.tasks.image_classification.ImageClassifier", "flexlora_pl.ImageClassifier"
    assert same_class(deep, public) and same_class(public, deep)
    assert not same_class(deep, "flexlora_pl.FlexLoRACausalLM")
    assert not same_class("my_package.ImageClassifier", public)  # outside the package: compared as written
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": deep, "num_classes": 10}}, ckpt)
    check_checkpoint_matches_config(str(ckpt), Namespace(class_path=public, init_args=Namespace(num_classes=10)))
    with pytest.raises(ValueError, match="was saved by flexlora_pl.tasks.image_classification.ImageClassifier but "
                                         "the config builds flexlora_pl.FlexLoRACausalLM"):
        check_checkpoint_matches_config(str(ckpt), Namespace(class_path="flexlora_pl.FlexLoRACausalLM",
                                                             init_args=Namespace()))


@pytest.mark.parametrize(("config", "deep"), [
    ("vtab/cifar.yaml", {"--model.class_path": "flexlora_pl.tasks.image_classification.ImageClassifier",
                         "--data.class_path": "flexlora_pl.data.vtab.VTABDataModule"}),
    ("commonsense/llama3_8b_r8.yaml", {"--model.class_path": "flexlora_pl.tasks.causal_lm.FlexLoRACausalLM",
                                       "--data.class_path": "flexlora_pl.data.commonsense.CommonsenseDataModule"}),
])
def test_configs_that_name_the_old_deep_class_paths_still_parse(config, deep, capsys):
    import yaml

    from flexlora_pl.cli import main

    shipped = Path(__file__).parents[2] / "configs" / config
    assert "class_path: flexlora_pl.tasks." not in shipped.read_text()  # the shipped configs use public paths
    args = ["fit", "--config", str(shipped)]
    for flag, path in deep.items():
        args += [flag, path]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == deep["--model.class_path"]
