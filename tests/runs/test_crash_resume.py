"""A real ``flexlora fit`` killed with SIGKILL, or stopped by SIGTERM or Ctrl-C (SIGINT), mid-run and resumed
with ``--ckpt_path last`` finishes exactly like an uninterrupted run with the same seed: same rank trajectory,
same final rank pattern, same final adapter tensors (bitwise, on CPU). An interrupted run exits non-zero and
keeps everything it wrote; repeating a finished command starts a new run instead of resuming it. Under
gradient accumulation a stop at any micro-batch of a window waits for the window's optimizer step (the
epoch's last batch closes a partial window), so the resume is exact there too.

The config carries the callbacks of the shipped configs (ModelCheckpoints without ``dirpath``,
``InterruptCheckpoint``), so checkpoints live in the run folder ``runs/tiny/version_<n>/checkpoints``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_glue_run
from tiny_run import DROP, tiny_run_config

pytestmark = pytest.mark.slow



def _changes(out: Path, sleep: float) -> dict:
    """What the interrupted runs change in the tiny run (tests/helpers/tiny_run.yaml): four epochs of batches of 4,
    events every 2 steps at budget 2, one more target module, a schedule, checkpoints every 3 steps, a slow-down
    (so a signal lands mid-run) and a dump of the trained adapters to compare."""
    return {
        "seed_everything": 3,
        "trainer": {"max_epochs": 4, "enable_model_summary": DROP,
                    "callbacks": [
                        {"class_path": "flexlora_pl.RankHeatmap"},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"monitor": "val/score", "mode": "max", "filename": "best-{step}",
                                       "save_last": True}},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"every_n_train_steps": 3, "filename": "periodic-{step}"}},
                        {"class_path": "flexlora_pl.InterruptCheckpoint"},
                        {"class_path": "run_helpers.SlowDown", "init_args": {"seconds": sleep}},
                        {"class_path": "run_helpers.DumpAdapters", "init_args": {"path": f"{out}/final.pt"}}]},
        "reallocation": {"b0": 2, "t_warmup": 3, "t_final": 3, "delta_t": 2},
        "model": {"init_args": {"method": {"init_args": {"target_modules": ["query", "value",
                                                                            "attention.output.dense"]}},
                                "lr_scheduler": {"class_path": "flexlora_pl.LinearWarmupDecay"}}},
        "data": {"init_args": {"batch_size": 4}},
    }


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flexlora_pl.cli", "fit", "--config", str(config), *extra]


def _env() -> dict[str, str]:
    tests_dir = str(Path(__file__).parents[1] / "helpers")
    return {**os.environ, "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _write_config(root: Path, out: Path, sleep: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(tiny_run_config(root, out, _changes(out, sleep)))
    return path


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _ckpt_dir(out: Path, version: int = 0) -> Path:
    return out / "runs" / "tiny" / f"version_{version}" / "checkpoints"


def _interrupt(command: list[str], ckpt_dir: Path, sig: signal.Signals, after_step: int) -> tuple[int, str]:
    """Start the run, wait until a checkpoint at or after ``after_step`` exists, send ``sig``; returns the exit
    status and the run's stderr."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            steps = [int(p.stem.split("=")[-1]) for p in ckpt_dir.glob("periodic-step=*.ckpt")]
            if steps and max(steps) >= after_step:
                break
            assert process.poll() is None, process.stderr.read()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the checkpoint to interrupt after")
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
        return process.returncode, stderr
    finally:
        if process.poll() is None:
            process.kill()


def _final(out: Path, version: int = 0) -> tuple[dict, dict]:
    pattern = out / "runs" / "tiny" / f"version_{version}" / "rank_pattern.json"
    return json.loads(pattern.read_text()), torch.load(out / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer_dir):
    """The uninterrupted run every interrupted one must reproduce."""
    root, base = tmp_path_factory.mktemp("tiny"), tmp_path_factory.mktemp("out")
    make_tiny_glue_run(root, tiny_tokenizer_dir)
    out = base / "reference"
    config = _write_config(root, out, sleep=0.0)
    _run(_command(config))
    reference = _final(out)
    # The same command again is a new run from scratch (version_1), never a resume of the finished one.
    again = _run(_command(config))
    assert "this run writes" in again.stderr and str(out / "runs" / "tiny" / "version_1") in again.stderr
    assert json.loads((out / "runs/tiny/version_1/metrics.json").read_text())["fit"]["global_step"] == 48
    _assert_same_run(_final(out, version=1), reference)  # same seed, trained from scratch: the same run
    return root, base, reference


def _assert_same_run(resumed: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    assert [e["step"] for e in reference[0]["events"]] == [5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                                           33, 35, 37, 39, 41, 43]
    _assert_identical(resumed, reference)


def _assert_identical(resumed: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    (pattern, tensors), (ref_pattern, ref_tensors) = resumed, reference
    assert pattern["events"] == ref_pattern["events"]
    assert pattern["rank_pattern"] == ref_pattern["rank_pattern"]
    assert tensors.keys() == ref_tensors.keys()
    for key in ref_tensors:
        assert torch.equal(tensors[key], ref_tensors[key]), key


def test_sigkill_mid_epoch_then_resume_from_last_is_exact(reference):
    root, base, ref = reference
    out = base / "killed"
    config = _write_config(root, out, sleep=0.15)
    code, _ = _interrupt(_command(config), _ckpt_dir(out), signal.SIGKILL, after_step=15)  # epoch 2 of 4
    assert code == -signal.SIGKILL
    assert not (out / "final.pt").exists()
    _run(_command(config, "--ckpt_path", "last"))
    assert not (out / "runs" / "tiny" / "version_1").exists()  # resumed in the run's own folder
    _assert_same_run(_final(out), ref)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"])
def test_an_interrupted_run_exits_non_zero_keeps_its_logs_and_resumes_exactly(reference, sig, status):
    root, base, ref = reference
    out = base / sig.name
    config = _write_config(root, out, sleep=0.15)
    code, stderr = _interrupt(_command(config), _ckpt_dir(out), sig, after_step=8)
    assert code == status, stderr[-3000:]
    assert f"stopped by {sig.name}" in stderr and "--ckpt_path last --version 0" in stderr
    folder = out / "runs" / "tiny" / "version_0"
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "hparams.yaml", "metrics.json", "checkpoints"} <= names, names
    assert any(name.startswith("events.out.tfevents") for name in names)
    assert (folder / "checkpoints" / "on_exception.ckpt").exists()
    record = json.loads((folder / "metrics.json").read_text())["fit"]
    assert record["status"] == "interrupted" and 8 <= record["global_step"] < 48
    assert not (out / "final.pt").exists()
    _run(_command(config, "--ckpt_path", "last"))
    _assert_same_run(_final(out), ref)


ACCUMULATING = """
seed_everything: 3
trainer:
  max_epochs: 2
  accumulate_grad_batches: {accumulate}
  accelerator: cpu
  devices: 1
  precision: 32-true
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {out}/runs, name: tiny}}
  callbacks:
    - class_path: flexlora_pl.RankHeatmap
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true}}
    - class_path: flexlora_pl.InterruptCheckpoint
    - class_path: run_helpers.DumpAdapters
      init_args: {{path: {out}/final.pt}}
{stop}reallocation: {{b0: 2, t_warmup: 1, t_final: 1, delta_t: 1, b_schedule: constant}}
model:
  class_path: flexlora_pl.FlexLoRASequenceClassifier
  init_args:
    model_name_or_path: {root}/model
    method:
      class_path: flexlora_pl.methods.FlexLoRA
      init_args:
        target_modules: [query, value, attention.output.dense]
        init_rank: 2
        max_rank: 4
        alpha: 4
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 0.01}}
    lr_scheduler:
      class_path: flexlora_pl.LinearWarmupDecay
data:
  class_path: flexlora_pl.data.GLUEDataModule
  init_args:
    task_name: mrpc
    batch_size: 4
    data_files: {{train: {root}/train.csv, validation: {root}/dev.csv}}
"""

BATCHES_PER_EPOCH = 12  # 48 training rows, batch size 4


def _accumulating_config(root: Path, out: Path, accumulate: int, stop: tuple[int, str] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    callback = ("" if stop is None else
                f"    - class_path: run_helpers.SignalAt\n      init_args: {{batch: {stop[0]}, signal: {stop[1]}}}\n")
    path = out / "config.yaml"
    path.write_text(ACCUMULATING.format(root=root, out=out, accumulate=accumulate, stop=callback))
    return path


def _one_thread_env() -> dict[str, str]:
    """The accumulation runs use one thread each (the same for references, stops and resumes, so tensors compare
    bitwise), which lets two of them run at once on a 2-core machine."""
    return {**_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_one_thread(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=_one_thread_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# (accumulate_grad_batches, batch the signal arrives after): a window's first micro-batch (2, 4), one inside a
# window (4, 5), a window's last (4, 7: the stop falls on the optimizer step itself), and the partial window that
# ends epoch 0 (12 batches, windows of 5: 0-4, 5-9, 10-11). SIGTERM at even batches, Ctrl-C at odd ones.
STOPS = [(2, 4), (4, 5), (4, 7), (5, 10)]


def _stop_and_resume(base: Path, root: Path, accumulate: int, batch: int) -> dict:
    """One stop position: the stopped run's exit, its interrupt checkpoint's progress, and the resumed run's end."""
    sig = (signal.SIGTERM, signal.SIGINT)[batch % 2]  # both stop paths, each at positions inside a window
    out = base / f"stop-{accumulate}-{batch}"
    config = _accumulating_config(root, out, accumulate, (batch, sig.name))
    stopped = subprocess.run(_command(config), env=_one_thread_env(), capture_output=True, text=True, timeout=600)
    case = {"signal": sig, "stopped": stopped, "out": out}
    if stopped.returncode != 128 + sig:
        return case
    ckpt = torch.load(_ckpt_dir(out) / "on_exception.ckpt", map_location="cpu", weights_only=False)
    case["trained"] = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    case["step"] = ckpt["global_step"]
    case["resumed"] = subprocess.run(_command(config, "--ckpt_path", "last"), env=_one_thread_env(),
                                     capture_output=True, text=True, timeout=600)
    if case["resumed"].returncode == 0:
        case["final"] = _final(out)
    return case


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory, tiny_glue_root):
    """The uninterrupted run of each ``accumulate_grad_batches`` and every stop position's stop-and-resume, made
    two at a time (one thread each) and shared by the tests."""
    base = tmp_path_factory.mktemp("accumulating")

    def reference(accumulate: int) -> tuple[dict, dict]:
        out = base / f"reference-{accumulate}"
        _run_one_thread(_command(_accumulating_config(tiny_glue_root, out, accumulate)))
        return _final(out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        accumulations = sorted({a for a, _ in STOPS})
        references = dict(zip(accumulations, pool.map(reference, accumulations), strict=True))
        cases = dict(zip(STOPS, pool.map(lambda stop: _stop_and_resume(base, tiny_glue_root, *stop), STOPS),
                         strict=True))
    return references, cases


def test_the_accumulation_references_train_and_reallocate(accumulation_runs):
    references, _ = accumulation_runs
    for accumulate, (rank_record, state) in references.items():
        assert state["global_step"].item() == 2 * -(-BATCHES_PER_EPOCH // accumulate), accumulate
        assert rank_record["events"], "the schedule must reallocate, so ranks are compared too"


@pytest.mark.parametrize(("accumulate", "batch"), STOPS, ids=[f"accumulate{a}-batch{b}" for a, b in STOPS])
def test_a_stop_inside_an_accumulation_window_waits_for_its_optimizer_step(accumulation_runs, accumulate, batch):
    """A SIGTERM or a first Ctrl-C at any micro-batch stops after the window's optimizer step, and the resumed run
    is bitwise the uninterrupted one; a stop inside the window would drop the accumulated gradients."""
    references, cases = accumulation_runs
    case = cases[(accumulate, batch)]
    sig, stopped = case["signal"], case["stopped"]
    assert stopped.returncode == 128 + sig, stopped.stderr[-3000:]
    assert case["resumed"].returncode == 0, case["resumed"].stderr[-3000:]
    assert not (case["out"] / "runs" / "tiny" / "version_1").exists()  # resumed in the run's own folder
    _assert_identical(case["final"], references[accumulate])
    window_end = min((batch // accumulate + 1) * accumulate, BATCHES_PER_EPOCH)
    step = -(-window_end // accumulate)
    assert (case["trained"], case["step"]) == (window_end, step)
    assert f"stopped by {sig.name} at optimizer step {step}." in stopped.stderr, stopped.stderr[-3000:]
