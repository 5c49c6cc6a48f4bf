"""DDP consistency on 2 CPU processes (gloo): after every allocation event the masks, λ, P and Q are
bitwise identical across ranks, and the rank trajectory equals a single-process run with the same
global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[1] / "helpers" / "ddp_script.py"


def _run(out: Path, devices: int, batch_size: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "helpers"),
                                                  os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), str(batch_size), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ddp_ranks_agree_bitwise_and_match_a_single_process(tmp_path):
    _run(tmp_path / "ddp", devices=2, batch_size=4)
    _run(tmp_path / "single", devices=1, batch_size=8)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=False)
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=False)

    steps = [event["step"] for event in rank0["history"]]
    assert steps == list(range(4, 46, 2)), steps  # 3 epochs × 16 steps of 8 samples; events in (2, 48 - 2)
    assert sorted(rank0["snapshots"]) == steps
    for step in steps:
        for key, tensor in rank0["snapshots"][step].items():
            assert torch.equal(tensor, rank1["snapshots"][step][key]), f"ranks disagree on {key} after step {step}"
    assert rank0["history"] == rank1["history"]
    ddp_ranks = [(e["step"], e["ranks"], e["pruned"], e["expanded"]) for e in rank0["history"]]
    single_ranks = [(e["step"], e["ranks"], e["pruned"], e["expanded"]) for e in single["history"]]
    assert ddp_ranks == single_ranks
    assert any(e["pruned"] for e in rank0["history"]), "no rank ever moved"


def test_ddp_resume_with_dropout_is_exact_on_every_rank(tmp_path):
    # each rank draws its own dropout masks: the checkpoint must hold and restore every rank's RNG states
    _run(tmp_path / "full", 2, 4, "0.3")
    _run(tmp_path / "resumed", 2, 4, "0.3", str(tmp_path / "full" / "ckpt" / "epoch=0.ckpt"))
    for rank in (0, 1):
        full = torch.load(tmp_path / "full" / f"rank{rank}.pt", weights_only=False)
        resumed = torch.load(tmp_path / "resumed" / f"rank{rank}.pt", weights_only=False)
        assert resumed["history"] == full["history"]
        for name, tensor in full["final"].items():
            assert torch.equal(tensor, resumed["final"][name]), f"rank {rank}: {name} differs after resume"


def test_ddp_processes_that_decide_differently_stop_at_that_event(tmp_path):
    # rank 1 scores its modules in reverse at the event of step 6: the decisions differ, and the run must stop
    # there with an error naming the event, instead of DDP re-syncing rank 0's masks over diverged P, Q, λ
    done = _run(tmp_path / "diverged", 2, 4, "--diverge-at", "6", check=False)
    assert done.returncode != 0
    assert "DecisionMismatchError" in done.stderr, done.stderr[-3000:]
    assert "allocation event at optimizer step 6 decided differently across the 2 processes" in done.stderr
    assert not (tmp_path / "diverged" / "rank0.pt").exists()  # it never reached the end of training


@pytest.mark.parametrize("method", ["dylora", "dora", "pissa"])
def test_ddp_replicas_of_other_methods_stay_bitwise_equal(tmp_path, method):
    # each process has its own RNG stream: DyLoRA must still train the same truncated adapter everywhere
    _run(tmp_path / "ddp", 2, 4, "--method", method)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=False)
    assert rank0["final"] and rank0["final"].keys() == rank1["final"].keys()
    assert rank0["drawn"] == rank1["drawn"]  # DyLoRA: one b per step on every process
    assert (len(set(rank0["drawn"])) > 1) == (method == "dylora")
    for name, tensor in rank0["final"].items():
        assert torch.equal(tensor, rank1["final"][name]), f"{method}: the ranks disagree on {name}"
