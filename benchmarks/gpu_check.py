"""A prepared GPU check: one command, one table, one JSON file, under 8 minutes on one H200-class GPU.

    python -m benchmarks.gpu_check --json gpu_check.json      # on a CUDA GPU
    python -m benchmarks.gpu_check --dry-run                  # tiny shapes, 1-2 steps, on CPU: checks the script

What it checks, one section each (``--sections`` picks some), every figure a row of the printed table:

step_memory
    Step time and peak memory of FlexLoRA, LoRA and AdaLoRA as ratios to LoRA's, in bf16-mixed autocast, on a
    DeBERTaV3-base-shaped classifier (d=768, 12 layers, vocab 128100, batch 32x128, the six matrices per layer of
    the GLUE configs) and a LLaMA-shaped model of about 1.1B parameters (d=2048, 16 layers, 32 heads, 8 KV heads,
    ffn 8192, vocab 32000, batch 8x512; q/k/v/up/down adapted), both built from their configs with random weights.
    The methods come from the registry with their defaults and are stepped by :mod:`benchmarks.runners` through
    the real ``RankReallocation`` callback, interleaved and paired as the step study does
    (:func:`benchmarks.studies.step.benchmark_model`).
host_syncs
    Host-device synchronisations per training step between allocation events, for each method on both models:
    ``torch.cuda.set_sync_debug_mode("warn")`` during a step and the warnings it raises counted, with the source
    lines that raised them, on the step_memory section's runners after their timing (one build per model). On CPU
    the same steps run with the counter but nothing can be counted ("n/a on CPU").
recompiles
    ``torch.compile`` (inductor) of FlexLoRA's and LoRA's objective on a LLaMA-shaped model (d=512, 4 layers), an
    allocation event between every round: graphs compiled after warm-up (must be 0), as the compile study counts
    them (:func:`benchmarks.studies.torch_compile.compile_rows`).
four_bit
    A LLaMA-shaped model (d=512, 4 layers) saved from its config with random weights to a temporary folder,
    loaded in 4 bits (``BitsAndBytesConfig``: nf4, double quantisation, bf16 compute), adapted with the registry's
    LoRA and trained a few steps: finite losses and the step time. Needs a CUDA GPU and ``bitsandbytes``; without
    either the row says what is missing.
resume
    A tiny ``flexlora fit`` (the real command, in-process) on the run's device, crashed mid-epoch at an optimizer
    step and resumed with ``--ckpt_path last``, against the same run uninterrupted: every trainable tensor and rank
    mask compared bitwise (and the largest absolute difference). On CUDA the runs use ``bf16-mixed`` and
    ``trainer.deterministic: warn`` (deterministic kernels, as ``docs/reliability.md`` advises for exactness on a
    GPU; an op without one warns instead of stopping the check).

``--dry-run`` runs every section on toy shapes (a 2-layer DeBERTa and LLaMA of width 32 and 64) with one step
per round and dynamo's ``eager`` backend in place of inductor, on CPU (one thread) unless ``--device cuda``: it
checks the code path, its figures mean nothing. A section that fails is a FAILED row with its error (the others
still run) and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built from a config: never download

import torch
from lightning.pytorch import Callback

from benchmarks.harness import Settings, environment, markdown, median_ms, quiet_libraries, timed
from benchmarks.models import MODEL_SPECS
from benchmarks.runners import Batch, Runner, adapted_module, module_runner, train_step
from benchmarks.studies.step import benchmark_model
from benchmarks.studies.torch_compile import compile_rows

SECTIONS = ("step_memory", "host_syncs", "recompiles", "four_bit", "resume")
METHODS = ("lora", "adalora", "flexlora")  # LoRA first: every ratio is to it
PRECISION = "bf16"  # bf16 autocast over fp32 weights: what Lightning's bf16-mixed runs
SYNC_WARNING = "synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says for each sync
# The resume run: 6 steps an epoch, 2 epochs, crashed after the first step of the second; events at 4, 6 and 8, so
# one of them comes after the resume.
CRASH_STEP, RESUME_STEPS = 7, 12


@dataclass
class Plan:
    """What one check runs: the models and sizes of each section (full on a GPU, toy in a dry run)."""

    models: list[str]  # step_memory and host_syncs
    compile_model: str
    sync_steps: int
    four_bit_shape: dict[str, int]
    four_bit_steps: int
    sections: list[str]


def plan_for(dry_run: bool, sections: list[str]) -> Plan:
    if dry_run:
        return Plan(["deberta-tiny", "llama-tiny"], "llama-tiny", 1,
                    {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 172, "vocab": 512, "batch": 2,
                     "seq": 32}, 2, sections)
    return Plan(["deberta-v3-base", "llama-1b"], "llama-medium", 5,
                {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "ffn": 1376, "vocab": 8192, "batch": 4,
                 "seq": 256}, 5, sections)


def check_settings(device: str, dry_run: bool, plan: Plan) -> Settings:
    """The harness settings the sections share: bf16 autocast, events every 100 steps, LoRA as the reference."""
    return Settings(device=device, precisions=[PRECISION], models=plan.models, steps=1 if dry_run else 10,
                    round_seconds=0.0 if dry_run else 5.0, warmup=1 if dry_run else 3, delta_t=100, scaling=[],
                    scaling_repeats=1, compile_models=[plan.compile_model],
                    # dynamo's graphs are what is counted; the dry run skips the backends' compile time
                    compile_backend="eager" if dry_run else "inductor", smoke=dry_run)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="toy shapes, 1-2 steps, no inductor: checks the script (on CPU unless --device cuda)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when present, else cpu (cpu only with --dry-run)")
    parser.add_argument("--json", default=None, help="write every figure of the check to this file")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run, in this order: " + ", ".join(SECTIONS))
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; the check needs a CUDA GPU "
                     "(--dry-run --device cpu checks the script on CPU)")
    if args.device == "cpu" and not args.dry_run:
        parser.error("the GPU check needs a CUDA GPU and none is available here; add --dry-run to check the script "
                     "on CPU with tiny shapes")
    args.sections = [s for s in SECTIONS if s in args.sections]
    return args


# ----------------------------------------------------------------------------- step time, memory, host syncs
@contextmanager
def sync_warnings(device: str) -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside; on CUDA, with the sync debug mode on, each host sync raises one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def host_syncs(model: str, runner: Runner, batch: Batch, settings: Settings, steps: int) -> dict[str, Any]:
    """Host syncs in each of ``steps`` training steps of ``runner`` between events (``None`` off CUDA)."""
    events_before = len(runner.callback.history) if runner.callback is not None else 0
    per_step, sites = [], Counter()
    for _ in range(steps):
        with sync_warnings(settings.device) as caught:
            train_step(runner, batch, settings, PRECISION)
        syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
        per_step.append(len(syncs))
        sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    events = (len(runner.callback.history) if runner.callback is not None else 0) - events_before
    if events:
        raise RuntimeError(f"{runner.method}: {events} allocation events during the steps counted between events")
    measured = settings.device == "cuda"
    return {"model": model, "method": runner.method, "steps": steps,
            "syncs_per_step": per_step if measured else None, "sites": dict(sites.most_common(5)) if measured else {}}


def step_memory_and_syncs(settings: Settings, plan: Plan, with_syncs: bool) -> tuple[list[dict], list[dict]]:
    """Section step_memory (the step study's rows for :data:`METHODS`) and host_syncs, on the same runners."""
    rows, sync_rows = [], []
    for name in plan.models:
        def inspect(runners: dict[str, Runner], batch: Batch, name: str = name) -> None:
            if with_syncs:
                sync_rows.extend(host_syncs(name, runners[m], batch, settings, plan.sync_steps) for m in METHODS)

        model_rows, goal = benchmark_model(name, settings, PRECISION, methods=METHODS, inspect=inspect)
        for row in model_rows:
            row["goals"] = goal if row["method"] == "flexlora" else None
        rows += model_rows
    return rows, sync_rows


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- recompiles
def recompiles(settings: Settings, plan: Plan) -> list[dict]:
    """The compile study's rows (LoRA and FlexLoRA, eager against compiled, an event every round) on one model."""
    rows = compile_rows(plan.compile_model, settings)
    for row in rows:
        row["events"] = settings.steps + 1  # one inside the warm-up, one after every round
    return rows


# ----------------------------------------------------------------------------- 4-bit base
def four_bit_missing(device: str) -> list[str]:
    """What the 4-bit section needs that this machine lacks (empty: it can run)."""
    missing = []
    if device != "cuda":
        missing.append("needs a CUDA GPU (bitsandbytes' 4-bit kernels)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed: pip install bitsandbytes")
    return missing


def four_bit_step(settings: Settings, plan: Plan) -> dict[str, Any]:
    """A few LoRA steps on a 4-bit (nf4) LLaMA-shaped base saved from its config; or what is missing for them."""
    shape = plan.four_bit_shape
    label = f"LLaMA d={shape['hidden']} L={shape['layers']}, nf4, {shape['batch']}x{shape['seq']}"
    missing = four_bit_missing(settings.device)
    if missing:
        return {"ran": False, "model": label, "missing": missing}
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=shape["seq"])
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.bfloat16,
                                                     device_map={"": torch.cuda.current_device()})
    quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    if not quantized:
        raise RuntimeError("the model loaded with BitsAndBytesConfig(load_in_4bit=True) has no Linear4bit layer")
    module = adapted_module("lora", model.train(), MODEL_SPECS["llama-tiny"](True).targets, [])
    runner = module_runner(module, settings)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen).to(settings.device)
    batch = {"input_ids": ids, "labels": ids}
    losses: list[torch.Tensor] = []

    def loss(b: Batch) -> torch.Tensor:
        value = runner.loss(b)
        losses.append(value.detach())
        return value

    times = [timed(lambda: train_step(runner, batch, settings, PRECISION, loss), settings.device)
             for _ in range(plan.four_bit_steps)]
    values = [float(v) for v in losses]
    result = {"ran": True, "model": label, "missing": [], "quantized_linears": quantized,
              "adapted_modules": len(module.adapted_modules), "losses": values,
              "loss_finite": all(math.isfinite(v) for v in values),
              "step_ms": median_ms(times[1:] or times), "step_samples_ms": [1e3 * t for t in times]}
    return result


# ----------------------------------------------------------------------------- exact resume
class CrashAt(Callback):
    """Raise a ``RuntimeError`` after optimizer step ``step``: the resume section's stand-in for a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"gpu_check: simulated crash at optimizer step {self.step}")


WORDS = ["the movie is good", "a bad film", "i love this story", "they hate the plot", "we see a city"]
RESUME_CONFIG = """\
seed_everything: 7
trainer:
  max_epochs: 2
  accelerator: {accelerator}
  devices: 1
  precision: {precision}
  deterministic: {deterministic}
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: "{root}/runs", name: tiny}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true}}
    - class_path: flexlora_pl.InterruptCheckpoint
reallocation: {{b0: 1, t_warmup: 2, t_final: 2, delta_t: 2, b_schedule: constant}}
model:
  class_path: flexlora_pl.FlexLoRASequenceClassifier
  init_args:
    model_name_or_path: "{root}/model"
    method:
      class_path: flexlora_pl.methods.FlexLoRA
      init_args: {{target_modules: [query, value, attention.output.dense], init_rank: 2, max_rank: 4, alpha: 4,
                   dropout: 0.1}}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 0.01}}
    lr_scheduler:
      class_path: flexlora_pl.LinearWarmupDecay
data:
  class_path: flexlora_pl.data.GLUEDataModule
  init_args:
    task_name: mrpc
    batch_size: 8
    data_files: {{train: "{root}/train.csv", validation: "{root}/dev.csv"}}
"""


def write_tiny_run(root: Path, device: str) -> Path:
    """A tiny BERT (width 32, 2 layers) with a word-level tokenizer, MRPC-layout CSVs (48 and 16 rows) and the
    run's config in ``root``; returns the config's path."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for s in WORDS for w in s.split()})]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=512)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    BertTokenizerFast(str(root / "vocab.txt")).save_pretrained(root / "model")
    for name, n in (("train.csv", 48), ("dev.csv", 16)):
        rows = ["sentence1,sentence2,label"]
        rows += [f"{WORDS[i % 5]},{WORDS[(i * 3) % 5]},{int(i % 5 == (i * 3) % 5)}" for i in range(n)]
        (root / name).write_text("\n".join(rows) + "\n")
    cuda = device == "cuda"
    path = root / "run.yaml"
    path.write_text(RESUME_CONFIG.format(root=root, accelerator="gpu" if cuda else "cpu",
                                         precision="bf16-mixed" if cuda else "32-true",
                                         # deterministic kernels where torch has them; a warning for the rest
                                         deterministic="warn" if cuda else "false"))
    return path


def trained_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor and rank mask of a fitted module, on the CPU."""
    state = {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}
    state.update({name: b.detach().cpu() for name, b in module.named_buffers() if name.endswith("rank_mask")})
    return state


def events_of(trainer: Any) -> list[int]:
    realloc = next(cb for cb in trainer.callbacks if type(cb).__name__ == "RankReallocation")
    return [event["step"] for event in realloc.history]


def exact_resume(settings: Settings) -> dict[str, Any]:
    """A tiny ``flexlora fit`` uninterrupted, and crashed at :data:`CRASH_STEP` then resumed with ``--ckpt_path
    last``: their final trainable tensors and rank masks, compared bitwise."""
    from flexlora_pl.cli import build_cli

    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    argv = sys.argv
    sys.argv = argv[:1]  # the fits get their arguments from here, not from this script's command line
    try:
        with tempfile.TemporaryDirectory() as folder:
            config = write_tiny_run(Path(folder), settings.device)
            fit = ["fit", "--config", str(config)]
            whole = build_cli([*fit, "--name", "whole"])
            crash = json.dumps({"class_path": "benchmarks.gpu_check.CrashAt", "init_args": {"step": CRASH_STEP}})
            try:
                build_cli([*fit, "--name", "interrupted", f"--trainer.callbacks+={crash}"])
            except RuntimeError as err:
                if "simulated crash" not in str(err):
                    raise
            else:
                raise RuntimeError(f"the run was not interrupted at step {CRASH_STEP}")
            resumed = build_cli([*fit, "--name", "interrupted", "--ckpt_path", "last"])
            resumed_from = Path(resumed.trainer.ckpt_path).name
            steps = (whole.trainer.global_step, resumed.trainer.global_step)
            events = (events_of(whole.trainer), events_of(resumed.trainer))
            expected, got = trained_tensors(whole.model), trained_tensors(resumed.model)
    finally:
        sys.argv = argv
        # the CUDA runs set these (trainer.deterministic); leave them as they were
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = deterministic[2]
    if expected.keys() != got.keys():
        raise RuntimeError(f"the resumed run trains other tensors: {sorted(expected.keys() ^ got.keys())}")
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    max_diff = max((float((expected[k].double() - got[k].double()).abs().max()) for k in expected), default=0.0)
    cuda = settings.device == "cuda"
    return {"equal": not differing and steps[0] == steps[1] == RESUME_STEPS and events[0] == events[1],
            "tensors": len(expected), "differing": differing, "max_abs_diff": max_diff,
            "global_steps": list(steps), "events_whole": events[0], "events_resumed": events[1],
            "crash_step": CRASH_STEP, "resumed_from": resumed_from, "precision": "bf16-mixed" if cuda else "32-true",
            "deterministic": "warn" if cuda else False}


# ----------------------------------------------------------------------------- the table
def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_rows(sections: dict[str, Any], errors: dict[str, str], settings: Settings) -> list[list[str]]:
    """One row per figure: check, model, method, result, detail."""
    rows: list[list[str]] = []
    for row in sections.get("step_memory", []):
        goal = row.get("goals")
        verdict = ""
        if goal is not None:
            met = goal["time_met"] and goal["below_adalora"] and goal["memory_met"]
            verdict = "; goals (≤1.05× LoRA time, < AdaLoRA, memory) " + ("met" if met else "MISSED")
        event = f", event {row['event_ms']:.1f} ms per {settings.delta_t} steps" if row["event_ms"] else ""
        rows.append(["step time, peak memory ×LoRA (bf16-mixed)", row["model"], row["method"],
                     f"time {row['step_x_lora']:.3f}× · peak {row['peak_x_lora']:.3f}×",
                     f"{row['step_ms']:.1f} ms/step{event}, peak {row['peak_bytes'] / 2**20:.1f} MB, "
                     f"{plural(row['rounds'], 'round')}{verdict}"])
    for row in sections.get("host_syncs", []):
        if row["syncs_per_step"] is None:
            result, detail = "n/a on CPU", f"{plural(row['steps'], 'step')} taken with the counter; counting needs CUDA"
        else:
            result = str(max(row["syncs_per_step"]))
            sites = ", ".join(f"{site} ×{n}" for site, n in row["sites"].items())
            detail = f"most in one of {plural(row['steps'], 'step')}; per step {row['syncs_per_step']}" + (
                f"; at {sites}" if sites else "")
        rows.append(["host syncs per step between events", row["model"], row["method"], result, detail])
    for row in sections.get("recompiles", []):
        if row["method"] != "flexlora":
            continue
        rows.append([f"graphs recompiled across events (torch.compile, {row['backend']})", row["model"], "flexlora",
                     str(row["new_graphs_after_warmup"]),
                     f"{plural(row['events'], 'event')}; compiled {row['compiled_ms']:.1f} ms vs eager "
                     f"{row['eager_ms']:.1f} ms"])
    four = sections.get("four_bit")
    if four is not None:
        if not four["ran"]:
            result, detail = "not run", "; ".join(four["missing"])
        else:
            result = "loss finite" if four["loss_finite"] else "loss NOT finite"
            detail = (f"{four['step_ms']:.1f} ms/step, {four['quantized_linears']} Linear4bit layers, "
                      f"{four['adapted_modules']} adapted; losses {[round(v, 3) for v in four['losses']]}")
        rows.append(["4-bit base step (nf4, double quant, bf16 compute)", four["model"], "lora", result, detail])
    resume = sections.get("resume")
    if resume is not None:
        rows.append([f"exact resume (flexlora fit crashed at step {resume['crash_step']}, --ckpt_path last)",
                     f"tiny BERT, {resume['precision']}", "flexlora",
                     "bitwise equal" if resume["equal"] else "DIFFERS",
                     f"{resume['tensors']} tensors, max abs diff {resume['max_abs_diff']:.3g}, steps "
                     f"{resume['global_steps']}, events {resume['events_whole']}, from {resume['resumed_from']}"
                     + (f"; differing: {resume['differing'][:3]}" if resume["differing"] else "")])
    rows += [[f"{name}", "–", "–", "FAILED", error] for name, error in errors.items()]
    return [[cell(c) for c in row] for row in rows]


# ----------------------------------------------------------------------------- the run
def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections (each in turn; a failure is kept as an error) and return the check's JSON."""
    plan = plan_for(args.dry_run, args.sections)
    settings = check_settings(args.device, args.dry_run, plan)
    sections: dict[str, Any] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}

    def attempt(names: list[str], fn: Callable[[], tuple[Any, ...]]) -> None:
        """Run ``fn``, which returns one figure per section of ``names``, and keep them (or its error)."""
        start = time.perf_counter()
        try:
            sections.update(dict(zip(names, fn(), strict=True)))
        except Exception as err:  # one failing section must not cost the others' figures
            traceback.print_exc()
            for name in names:
                errors[name] = f"{type(err).__name__}: {err}"[:300]
        free_memory()  # what the section built goes before the next one starts
        seconds["+".join(names)] = time.perf_counter() - start
        print(f"gpu_check: {' + '.join(names)} in {seconds['+'.join(names)]:.1f} s", file=sys.stderr, flush=True)

    timing = [s for s in ("step_memory", "host_syncs") if s in plan.sections]
    if timing:
        def both() -> tuple[list[dict], list[dict]]:
            rows, syncs = step_memory_and_syncs(settings, plan, "host_syncs" in timing)
            return tuple(part for name, part in (("step_memory", rows), ("host_syncs", syncs)) if name in timing)
        attempt(timing, both)
    if "recompiles" in plan.sections:
        attempt(["recompiles"], lambda: (recompiles(settings, plan),))
    if "four_bit" in plan.sections:
        attempt(["four_bit"], lambda: (four_bit_step(settings, plan),))
    if "resume" in plan.sections:
        attempt(["resume"], lambda: (exact_resume(settings),))

    return {"date": datetime.datetime.now(datetime.UTC).date().isoformat(), "dry_run": args.dry_run,
            "environment": environment(settings), "settings": asdict(settings), "plan": asdict(plan),
            "sections": sections, "errors": errors, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Run the check, print its table and (``--json``) write its figures; 1 when a section failed."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.dry_run and args.device == "cpu":
        torch.set_num_threads(1)  # toy shapes: threads only add OpenMP stalls on a shared machine
    start = time.perf_counter()
    try:
        with quiet_libraries():
            result = run_check(args)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process
    result["total_seconds"] = time.perf_counter() - start
    env = result["environment"]
    where = env.get("gpu", f"CPU, {env['threads']} threads")
    print(f"# FlexLoRA GPU check ({args.device}: {where}; torch {env['torch']}; {result['date']}"
          f"{'; DRY RUN: toy shapes, figures mean nothing' if args.dry_run else ''})\n")
    settings = Settings(**result["settings"])
    print(markdown(["check", "model", "method", "result", "detail"],
                   table_rows(result["sections"], result["errors"], settings)))
    print(f"\n{result['total_seconds']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
