"""The methods a study runs, built the way training builds them, and one training step of each.

Every adapter method is a name of the project's method registry (:data:`flexlora_pl.methods.METHODS`), built
with its registry defaults: ``FlexLoRAModule(backbone, target_modules=spec.targets, method=name,
modules_to_save=spec.modules_to_save)``, which looks the name up, adapts the backbone in place and trains the
head in full. A step is what Lightning's automatic optimisation runs for that module, minus the Trainer:

1. ``optimizer.zero_grad(set_to_none=True)`` (Lightning zeroes before the step, so the gradients of the last
   step are still there when its ``on_train_batch_end`` runs, as AdaLoRA's sensitivity update needs);
2. the method's ``before_training_batch`` (what ``on_train_batch_start`` calls: DyLoRA draws its rank there), then
   ``module.training_step(batch, 0)``: task loss + ``orth_reg_weight`` · the method's regulariser, and the
   non-finite guard (its ``self.log`` calls return at once without a Trainer);
3. ``backward``; ``RankReallocation.on_before_optimizer_step``; ``optimizer.step()`` (AdamW over the module's
   ``adapter`` and ``modules_to_save`` groups, from ``configure_optimizers``);
4. ``RankReallocation.on_train_batch_end``, which steps the method's allocation driver (none for LoRA).

The callback is the real one, set up by its ``setup`` and ``on_fit_start`` hooks on a stand-in Trainer that
holds only ``global_step``, ``optimizers`` and ``loggers``. Steps between events never land on an event step;
an event is timed on its own (:attr:`Runner.event`): the same ``on_train_batch_end`` at the next event step,
which is everything training runs after that optimizer step. ``full`` is the registry's full fine-tuning
(``flexlora_pl.methods.FullFineTuning``): every backbone parameter trained, through the same module and step.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from benchmarks.harness import Settings, autocast, storage_bytes, synchronize
from benchmarks.models import ModelSpec
from flexlora_pl import FlexLoRAModule, RankReallocation
from flexlora_pl.methods import METHODS

__all__ = ["FULL", "METHOD_NAMES", "Runner", "adapted_module", "build_runners", "describe_methods",
           "module_runner", "peak_memory", "train_step"]

#: what the step study runs: registry names, full fine-tuning (no adapter) and the three rank methods
FULL = "full"
METHOD_NAMES = (FULL, "lora", "adalora", "flexlora")
LR, WEIGHT_DECAY = 1e-4, 0.01
FAR_AWAY = 10**6  # a total step count that keeps every allocation schedule in its reallocation phase

Batch = dict[str, torch.Tensor]


@dataclass
class Runner:
    """One method on one model: what a training step calls, and one allocation event."""

    method: str
    model: nn.Module  # what is trained: the FlexLoRAModule
    optimizer: torch.optim.Optimizer
    loss: Callable[[Batch], torch.Tensor]  # what one step computes (``training_step``)
    objective: Callable[[Batch], torch.Tensor]  # forward + γ·R without the step's bookkeeping (to compile)
    delta_t: int
    before_step: Callable[[], None] | None = None  # after backward, before optimizer.step()
    after_step: Callable[[int], None] | None = None  # after optimizer.step(), given the optimizer step count
    event: Callable[[], None] | None = None  # one allocation event, through the training path
    method_state: Callable[[], list[torch.Tensor]] = list  # tensors the method keeps besides params/optimizer
    adapter_parameters: Callable[[], list[nn.Parameter]] = list
    callback: RankReallocation | None = None  # the real callback that drives the method's allocation
    step: int = 0  # optimizer steps counted so far (the stand-in Trainer's ``global_step``)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def next_step(self) -> int:
        """The count after one more step between events: event steps (multiples of ΔT) are left to :attr:`event`."""
        self.step += 1
        if self.step % self.delta_t == 0:
            self.step += 1
        return self.step


def describe_methods() -> str:
    """The ranks of the registered methods' defaults, as the tables' header quotes them."""
    lora, ada, flex = METHODS["lora"](), METHODS["adalora"](), METHODS["flexlora"]()
    return (f"r = {lora.r} (FlexLoRA r_init = {flex.init_rank}, r_max = {flex.max_rank}; "
            f"AdaLoRA {ada.init_rank}→{ada.target_rank})")


def adapted_module(name: str, backbone: nn.Module, targets: list[str], modules_to_save: list[str]) -> FlexLoRAModule:
    """The LightningModule training builds for the registered method ``name`` (its defaults) on ``backbone``."""
    if name not in METHODS:
        raise ValueError(f"{name!r} is not a registered method; registered: {sorted(METHODS)}")
    return FlexLoRAModule(backbone, target_modules=targets, modules_to_save=modules_to_save, method=name,
                          init_seed=0, optimizer=functools.partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY))


def module_runner(module: FlexLoRAModule, settings: Settings) -> Runner:
    """A :class:`Runner` of ``module``, its optimizer from ``configure_optimizers`` and a real ``RankReallocation``."""
    optimizer = module.configure_optimizers()
    callback = RankReallocation(t_warmup=0, t_final=0, delta_t=settings.delta_t, total_steps=FAR_AWAY)
    trainer = SimpleNamespace(global_step=0, optimizers=[optimizer], loggers=[])
    callback.setup(trainer, module, "fit")  # type: ignore[arg-type]  # the hooks Lightning calls before
    callback.on_fit_start(trainer, module)  # type: ignore[arg-type]  # the first training step, in order

    def before_step() -> None:
        callback.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]

    def after_step(step: int) -> None:
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]

    def objective(batch: Batch) -> torch.Tensor:
        return module.compute_loss(batch) + module.orth_reg_weight * module.orthogonality_loss()

    def loss(batch: Batch) -> torch.Tensor:  # what on_train_batch_start and training_step run (DyLoRA draws b)
        module.method.before_training_batch(module.backbone)
        return module.training_step(batch, 0)

    runner = Runner(module.method_name, module, optimizer, loss, objective,
                    settings.delta_t, before_step, after_step,
                    method_state=lambda: list(_tensors(callback.state_dict().get("driver", {}))),
                    adapter_parameters=module.adapter_parameters, callback=callback)

    def event() -> None:
        step = (runner.step // settings.delta_t + 1) * settings.delta_t
        fired = len(callback.history)
        runner.step = step
        after_step(step)
        if len(callback.history) != fired + 1:
            raise RuntimeError(f"{module.method_name}: no allocation event fired at step {step}, an event step of "
                               f"the schedule (t_warmup = t_final = 0, ΔT = {settings.delta_t})")

    if module.method.moves_ranks:
        runner.event = event
    return runner


def _tensors(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested state dict (a driver's: AdaLoRA's sensitivity EMAs, for instance)."""
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def build_runners(spec: ModelSpec, methods: Iterable[str], settings: Settings,
                  refused: dict[str, str] | None = None) -> list[Runner]:
    """One runner per registered method name, each on its own copy of the same weights.

    Args:
        refused: when given, a method that refuses the model (a ``ValueError`` while adapting: BitFit on a
            backbone without biases) is left out and its message kept here by name; otherwise the error propagates.
    """
    torch.manual_seed(0)
    base = spec.build()
    runners = []
    for method in methods:
        model = copy.deepcopy(base).to(settings.device).train()
        try:
            module = adapted_module(method, model, spec.targets, spec.modules_to_save).to(settings.device)
        except ValueError as err:
            if refused is None:
                raise
            refused[method] = str(err)
            continue
        runners.append(module_runner(module, settings))
    return runners


# ----------------------------------------------------------------------------- one step
def train_step(runner: Runner, batch: Batch, settings: Settings, precision: str,
               loss_fn: Callable[[Batch], torch.Tensor] | None = None,
               on_saved: Callable[[torch.Tensor], None] | None = None,
               on_gradients: Callable[[], None] | None = None) -> None:
    """zero_grad, the loss (``loss_fn`` instead of the runner's), backward, the method's hooks around AdamW.

    ``on_saved`` sees every tensor saved for backward; ``on_gradients`` runs once the gradients exist.
    """
    runner.optimizer.zero_grad(set_to_none=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(_seen(on_saved), lambda t: t) if on_saved else None
    with autocast(settings, precision):
        if hooks is None:
            loss = (loss_fn or runner.loss)(batch)
        else:
            with hooks:
                loss = (loss_fn or runner.loss)(batch)
    loss.backward()
    if on_gradients is not None:
        on_gradients()
    if runner.before_step is not None:
        runner.before_step()
    runner.optimizer.step()
    step = runner.next_step()
    if runner.after_step is not None:
        runner.after_step(step)


def _seen(on_saved: Callable[[torch.Tensor], None] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def pack(t: torch.Tensor) -> torch.Tensor:
        if on_saved is not None:
            on_saved(t)
        return t
    return pack


# ----------------------------------------------------------------------------- memory
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def peak_memory(runner: Runner, batch: Batch, settings: Settings, precision: str) -> int:
    """Peak bytes of one training step of ``runner``.

    Resident: parameters, buffers, optimizer state and the method's state (its allocation driver's tensors).
    CUDA adds ``max_memory_allocated`` during the step above what was allocated before it (gradients freed
    first); CPU adds the gradients and every tensor saved for backward, each storage counted once.
    """
    runner.optimizer.zero_grad(set_to_none=True)
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

    train_step(runner, batch, settings, precision, on_saved=lambda t: count([t]),
               on_gradients=lambda: count(p.grad for p in runner.model.parameters()))
    return resident + transient
