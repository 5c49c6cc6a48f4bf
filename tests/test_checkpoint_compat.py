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

FIXTURES = Path(__file__).parent / "fixtures" / "pre_refactor"


@pytest.mark.parametrize("method", ["flexlora", "adalora"])
def test_a_checkpoint_from_before_the_move_resumes_and_finishes_as_it_did(tmp_path, tiny_glue_root, monkeypatch,
                                                                          method):
    from flexlora_pl.cli import build_cli

    for name in ("model", "train.csv", "dev.csv"):
        (tmp_path / name).symlink_to(tiny_glue_root / name)
    for name in ("run.yaml", f"{method}.yaml"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # run_helpers.DumpTrained
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
