"""``FlexLoRAModule``: the LightningModule that owns an adapted backbone, for every adaptation method.

The method (:mod:`flexlora_pl.methods`; FlexLoRA by default) adds the adapters and names its regulariser;
the module adds ``γ · R`` to the task loss, builds the optimizer and LR scheduler from injected callables,
reports adapter parameter counts and writes slim checkpoints (:mod:`flexlora_pl.runs.slim_checkpoint`) with
every process's RNG states and a non-finite loss guard (:mod:`flexlora_pl.runs.nonfinite`).
Researchers subclass it and override one method:

* :meth:`compute_loss` to change the task loss (or the batch layout),
* :meth:`importance_scores` to change how modules are scored at allocation events,
* :meth:`orthogonality_loss` to change the regulariser.

Rank reallocation itself runs in the :class:`~flexlora_pl.RankReallocation` callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from flexlora_pl.callbacks.rank_reallocation import RankReallocation, sensitivity_tracker
from flexlora_pl.core.importance import STATEFUL_METRICS, importance_scores
from flexlora_pl.core.inject import flexlora_layers
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.methods import AdaptationMethod, FlexLoRA, build_method
from flexlora_pl.runs.lr_scheduler import wants_keyword
from flexlora_pl.runs.nonfinite import nonfinite_error, record_nonfinite
from flexlora_pl.runs.rng_state import gather_rng_states, restore_rng_states, rng_states_of_rank
from flexlora_pl.runs.seeding import resolve_seed
from flexlora_pl.runs.slim_checkpoint import (
    base_fingerprint,
    check_checkpoint_layout,
    drop_frozen_base,
    frozen_parameter_names,
    restore_frozen_base,
    trained_state,
)
from flexlora_pl.runs.strategy import refuse_sharded_strategy

__all__ = ["FlexLoRAModule", "refuse_sharded_strategy"]


class FlexLoRAModule(LightningModule):
    """A LightningModule that trains an adapted backbone: FlexLoRA by default, or any registered method.

    The adaptation method (:mod:`flexlora_pl.methods`: ``FlexLoRA``, ``LoRA``, ``AdaLoRA``, …) adds the
    adapters and names the regulariser; this module owns the adapted backbone, adds ``γ · R`` to the task
    loss, builds the optimizer and LR scheduler from injected callables, and reports parameter counts.
    ``FlexLoRAModule(backbone, target_modules, init_rank=…, …)`` is short for
    ``FlexLoRAModule(backbone, method=FlexLoRA(target_modules, init_rank=…, …))``.

    Args:
        backbone: the model to adapt, or a zero-argument callable that builds it.
        target_modules: linear layers to adapt: dotted-name suffixes (``query``) or ``re:<regex>``; with a
            ``method`` that names none, these are its targets.
        init_rank: FlexLoRA's initial rank ``r_init`` (when ``method`` is not given).
        max_rank: FlexLoRA's rank capacity ``r_max`` (when ``method`` is not given).
        alpha: LoRA α (when ``method`` is not given).
        dropout: dropout on the adapter inputs (when ``method`` is not given).
        modules_to_save: modules trained in full (e.g. ``["classifier"]``).
        orth_reg_weight: γ, the weight of the orthogonality regulariser (when ``method`` is not given).
        optimizer: builds the optimizer from parameter groups (default AdamW).
        lr_scheduler: builds the LR scheduler from the optimizer; stepped every optimizer step. If it
            accepts ``total_steps``, the Trainer's number of optimizer steps is passed.
        init_seed: seed of the adapters' initial draws; ``None`` follows ``seed_everything``.
        method: the adaptation method: an object, a registered name (``"lora"``) or a
            ``{"class_path", "init_args"}`` dict; ``None`` builds FlexLoRA from the arguments above.
    """

    def __init__(
        self,
        backbone: nn.Module | Callable[[], nn.Module],
        target_modules: Sequence[str] | None = None,
        init_rank: int = 8,
        max_rank: int = 12,
        alpha: float = 16.0,
        dropout: float = 0.0,
        modules_to_save: Sequence[str] | None = None,
        orth_reg_weight: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_seed: int | None = None,
        method: AdaptationMethod | dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        if orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")
        if not isinstance(backbone, nn.Module):
            if not callable(backbone):
                raise TypeError(f"backbone must be an nn.Module or a callable building one, got {backbone!r}")
            backbone = backbone()
            if not isinstance(backbone, nn.Module):
                raise TypeError(f"the backbone factory returned {type(backbone).__name__}, not an nn.Module")
        if method is None:
            if target_modules is None:
                raise ValueError("give target_modules (the linear layers to adapt) or a method that names them")
            method = FlexLoRA(target_modules, init_rank=init_rank, max_rank=max_rank, alpha=alpha, dropout=dropout,
                              orth_reg_weight=orth_reg_weight)
        self.method = build_method(method)
        if target_modules is not None:
            self.method.with_default_targets(target_modules)
        self.modules_to_save = list(modules_to_save or [])
        # Lightning keeps each sub-module's train/eval mode, and ``from_pretrained`` returns models in eval
        # mode: switch to train mode so the backbone's own dropout acts during fitting.
        self.backbone = self.method.adapt(backbone.train(), self.modules_to_save, resolve_seed(init_seed)).train()
        self.target_modules = list(self.method.target_modules or [])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._rng_to_restore: dict[str, Any] | None = None
        # Step of the first non-finite training loss (-1: none yet). Kept on the device and only read
        # where the host syncs anyway (logging cadence, events, checkpoints), not every step.
        self.register_buffer("_first_nonfinite_step", torch.tensor(-1), persistent=False)

    @property
    def method_name(self) -> str:
        """The adaptation method's registry name (``flexlora``, ``lora``, ``adalora``, …)."""
        return self.method.name

    @property
    def orth_reg_weight(self) -> float:
        """γ, the weight of the method's regulariser in the loss."""
        return self.method.orth_reg_weight

    @property
    def adapted_modules(self) -> list[str]:
        """Names of the adapted matrices, relative to the backbone."""
        return list(self.method.rank_pattern(self.backbone))

    def rank_pattern(self) -> dict[str, int]:
        """Active rank of every adapted matrix, by module name relative to this module, in depth order."""
        return {f"backbone.{name}": rank for name, rank in self.method.rank_pattern(self.backbone).items()}

    def max_ranks(self) -> dict[str, int]:
        """Rank capacity of every adapted matrix, named as in :meth:`rank_pattern`."""
        return {f"backbone.{name}": rank for name, rank in self.method.max_ranks(self.backbone).items()}

    # -------------------------------------------------------------- structure
    def flexlora_layers(self) -> Iterator[tuple[str, FlexLoRALinear]]:
        """``(name, layer)`` for every FlexLoRA layer, in model order (names relative to the module)."""
        return flexlora_layers(self)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter parameters (the optimizer's ``adapter`` group), as the method names them."""
        return self.method.adapter_parameters(self.backbone)

    def saved_module_parameters(self) -> list[nn.Parameter]:
        adapter = {id(p) for p in self.adapter_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in adapter]

    def parameter_counts(self) -> dict[str, int]:
        """Adapter parameters *active* (what the papers count) and *allocated* (with spare rank capacity),
        plus parameters of ``modules_to_save`` and the frozen rest."""
        counts = self.method.parameter_counts(self.backbone)
        adapter = sum(p.numel() for p in self.adapter_parameters())
        saved = sum(p.numel() for p in self.saved_module_parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"active": counts["active"], "allocated": counts["allocated"], "modules_to_save": saved,
                "frozen": total - adapter - saved}

    # ------------------------------------------------------------------ steps
    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.backbone(*args, **kwargs)

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The task loss of one batch. Override to change the loss or the batch layout.

        Default: a mapping is passed as keyword arguments and the output's ``loss`` is used (the
        Hugging Face convention); an ``(x, y)`` pair gives ``cross_entropy(self(x), y)``.
        """
        if isinstance(batch, Mapping):
            out = self(**batch)
            loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
            if loss is None:
                raise ValueError("the backbone returned no loss: pass labels in the batch or override compute_loss")
            return loss
        x, y = batch
        return F.cross_entropy(self(x), y)

    def orthogonality_loss(self) -> torch.Tensor:
        """R, the method's regulariser (FlexLoRA: the masked orthogonality term averaged over modules), no
        host sync. Zero for a method without one."""
        reg = self.method.regularizer(self.backbone)
        return reg if reg is not None else self._first_nonfinite_step.new_zeros((), dtype=torch.float32)

    def importance_scores(self, metric: str) -> torch.Tensor:
        """Importance of every FlexLoRA layer, shape (num_layers,), in :meth:`flexlora_layers` order.

        The single entry point for scores: :class:`~flexlora_pl.RankReallocation` calls it at every
        event with its ``importance`` metric, whichever metric that is (``sensitivity`` included), and
        moves rank by what it returns. Override it for a new score; an override can still reach the
        built-in scores with ``super().importance_scores(metric)``. Host syncs are fine here: it only
        runs at events.

        Args:
            metric: a λ-based metric (``entropy``, ``nuclear``, ``frobenius``, ``elem_energy_entropy``,
                ``mat_energy_entropy``), computed from the current λ, or ``sensitivity``, read from the
                :class:`~flexlora_pl.core.importance.SensitivityTracker` that the Trainer's
                ``RankReallocation(importance="sensitivity")`` callback feeds before every optimizer step.
        """
        named = list(self.flexlora_layers())
        if metric in STATEFUL_METRICS:
            return sensitivity_tracker(self._trainer, metric).scores(named)
        return importance_scores([layer for _, layer in named], metric)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Task loss plus γ · R, without a host sync.

        ``train/loss`` and ``train/orth_reg`` go to the loggers, which Lightning reads only at the
        logging cadence. Lightning converts every metric logged with ``prog_bar=True`` to a Python
        number after *every* batch, bar or no bar (a host sync per step for a tensor on the GPU), so
        the progress bar gets ``loss`` instead: a CPU copy of the task loss, taken only when a progress
        bar is attached and only on steps the loggers write (every ``log_every_n_steps`` optimizer
        steps), which Lightning then re-reads from host memory at no cost.

        Args:
            batch: the batch, as :meth:`compute_loss` takes it.
            batch_idx: its index in the epoch.
        """
        task_loss = self.compute_loss(batch)
        orth = self.orthogonality_loss()
        self.log("train/loss", task_loss)
        self.log("train/orth_reg", orth)
        trainer = self._trainer
        if trainer is not None and trainer.progress_bar_callback is not None:
            every = trainer.log_every_n_steps
            if every > 0 and (trainer.global_step + 1) % every == 0:  # this step is logged: sync anyway
                self.log("loss", task_loss.detach().to("cpu"), prog_bar=True, logger=False)
        loss = task_loss + self.orth_reg_weight * orth
        record_nonfinite(self._first_nonfinite_step, loss, self._trainer.global_step if self._trainer else 0)
        return loss

    # ---------------------------------------------------------------- numerics
    def check_finite(self, where: str) -> None:
        """Raise if any training loss so far was NaN or inf, naming its step and the last good checkpoint.

        Called at the logging cadence, at allocation events and before every checkpoint is written, so a
        diverged run stops before it can overwrite a good checkpoint.
        """
        step = int(self._first_nonfinite_step)
        if step >= 0:
            raise nonfinite_error(step, where, self.trainer)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite(f"at step {self.trainer.global_step}")

    # ------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite("while saving a checkpoint")
        checkpoint["flexlora_rng_states"] = gather_rng_states()  # one entry per process, rank order
        if not any(layer.merged for _, layer in self.flexlora_layers()):  # merged: the base holds ΔW, keep it
            drop_frozen_base(self, checkpoint, self._base_source())

    def frozen_parameter_names(self) -> list[str]:
        """Names (as in :meth:`state_dict`) of the parameters training never changes: the frozen base."""
        return frozen_parameter_names(self)

    def base_fingerprint(self) -> str:
        """A cheap fingerprint of the frozen base (:func:`~flexlora_pl.runs.slim_checkpoint.base_fingerprint`)."""
        return base_fingerprint(self)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen_base(self, checkpoint, self._base_source())
        check_checkpoint_layout(trained_state(self), checkpoint.get("state_dict", {}))
        self._rng_to_restore = rng_states_of_rank(checkpoint.get("flexlora_rng_states") or [], self.global_rank)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not when the checkpoint is loaded: the sanity-check validation in between
        # must not shift the dropout masks of the resumed run.
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self.method.before_training_batch(self.backbone)

    @override
    def on_validation_start(self) -> None:
        self.method.on_evaluation(self.backbone)

    @override
    def on_test_start(self) -> None:
        self.method.on_evaluation(self.backbone)

    @override
    def on_predict_start(self) -> None:
        self.method.on_evaluation(self.backbone)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        return loss

    @property
    def validation_metric_names(self) -> list[str]:
        """The metrics every validation logs (a subclass that logs more lists them): what a search may select on."""
        return ["val/loss"]

    @classmethod
    def validation_metrics_for(cls, data: Any) -> list[str]:
        """:attr:`validation_metric_names` of this module on the data module ``data``, known before the module (and
        its backbone) is built: a tuned sweep checks its objective against it before any run starts."""
        return ["val/loss"]

    # ---------------------------------------------------------------- set-up
    def _base_source(self) -> str | None:
        """Where the frozen base came from: ``model_name_or_path`` (Hugging Face) or ``model_name`` (timm)."""
        hparams = getattr(self, "hparams", {})
        return hparams.get("model_name_or_path") or hparams.get("model_name")

    @override
    def setup(self, stage: str) -> None:
        """Refuse strategies that shard parameters; subclasses that override ``setup`` call this first."""
        if self._trainer is not None:
            refuse_sharded_strategy(self.trainer)

    @override
    def on_fit_start(self) -> None:
        if self.method.moves_ranks and not any(isinstance(cb, RankReallocation) for cb in self.trainer.callbacks):
            rank_zero_warn(
                f"the {type(self.method).__name__} method moves ranks, but no RankReallocation callback is attached: "
                "ranks will stay fixed. Add RankReallocation to trainer callbacks (the `flexlora` command always "
                "does, from the `reallocation:` group)."
            )
        counts = self.parameter_counts()
        if self.adapted_modules:
            rank_zero_info(
                f"{type(self.method).__name__}: {len(self.adapted_modules)} adapted layers, {counts['active']:,} "
                f"active adapter parameters ({counts['allocated']:,} allocated), {counts['modules_to_save']:,} in "
                "modules_to_save"
            )
        else:  # full fine-tuning, BitFit: the method trains backbone weights themselves, no adapter
            rank_zero_info(
                f"{type(self.method).__name__}: no adapter; {counts['active']:,} backbone parameters trained, "
                f"{counts['modules_to_save']:,} in modules_to_save, {counts['frozen']:,} frozen"
            )

    @override
    def configure_optimizers(self) -> Any:
        groups = [dict(group) for group in self.method.optimizer_groups(self.backbone) if group["params"]]
        saved = self.saved_module_parameters()
        if saved:
            groups.append({"params": saved, "name": "modules_to_save"})
        scales = [float(group.pop("lr_scale", 1.0)) for group in groups]
        optimizer = self.optimizer_factory(groups)
        for group, scale in zip(optimizer.param_groups, scales, strict=True):
            if scale != 1.0:  # before the scheduler is built, so that its initial_lr is the scaled rate
                group["lr"] *= scale
        if self.lr_scheduler_factory is None:
            return optimizer
        kwargs = {}
        if wants_keyword(self.lr_scheduler_factory, "total_steps"):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_scheduler_factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

