"""``SearchTrialReport``: a search trial's validation scores go to its Optuna trial, and a pruned trial stops.

A tuned sweep starts each trial as an ordinary ``flexlora fit`` with the environment variable
``FLEXLORA_SEARCH_TRIAL`` set to a JSON object (``storage``, ``study``, ``trial``: the trial's number,
``objective``: the metric, ``pruner``: ``{"type": "none" | "median" | "successive_halving", **options}``).
The ``flexlora`` command then adds this
callback by itself: nothing in the config changes. At each validation the objective's value is reported at the
optimizer step; when the study's pruner says the trial is behind, training stops after that validation and
``search_pruned.json`` in the run folder says at which step, so the trial is recorded as pruned, never scored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["PRUNED_FILENAME", "SEARCH_TRIAL_ENV", "SearchTrialReport", "build_pruner"]

SEARCH_TRIAL_ENV = "FLEXLORA_SEARCH_TRIAL"
PRUNED_FILENAME = "search_pruned.json"


def build_pruner(spec: dict[str, Any]) -> Any:
    """The Optuna pruner of ``{"type": ..., **options}``.

    ``median``: ``startup_trials`` (Optuna's ``n_startup_trials``, default 5), ``warmup_steps``
    (``n_warmup_steps``, default 0); ``successive_halving``: ``min_resource`` (default ``"auto"``),
    ``reduction_factor`` (default 4); ``none``: no pruning.

    Raises:
        ValueError: an unknown type or option.
    """
    import optuna

    options = {key: value for key, value in spec.items() if key != "type"}
    kind = spec.get("type", "none")
    names = {"none": {}, "median": {"startup_trials": "n_startup_trials", "warmup_steps": "n_warmup_steps"},
             "successive_halving": {"min_resource": "min_resource", "reduction_factor": "reduction_factor"}}
    if kind not in names or any(key not in names[kind] for key in options):
        raise ValueError(f"pruner {spec!r}: the type is none, median or successive_halving, with the options "
                         f"{names.get(kind, {})}")
    kwargs = {names[kind][key]: value for key, value in options.items()}
    if kind == "median":
        return optuna.pruners.MedianPruner(**kwargs)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**kwargs)
    return optuna.pruners.NopPruner()


class SearchTrialReport(Callback):
    """Report ``objective`` at every validation to trial ``trial`` of ``study`` and stop the fit when it is pruned.

    Args:
        storage: the study storage's URL (see :func:`flexlora_pl.experiments.search_study.open_storage`).
        study: the study's name.
        trial: the trial's number in the study.
        objective: the validation metric, e.g. ``val/score``.
        pruner: the study's pruner, ``{"type": ..., **options}`` (see :func:`build_pruner`); ``None`` or type
            ``none``: report only.
    """

    def __init__(self, storage: str, study: str, trial: int, objective: str,
                 pruner: dict[str, Any] | None = None) -> None:
        self.storage, self.study_name, self.number = storage, study, trial
        self.objective = objective
        self.pruner = dict(pruner or {"type": "none"})
        self.prune = self.pruner.get("type", "none") != "none"
        build_pruner(self.pruner)  # a bad spec fails here, before training
        self._trial: Any = None

    @classmethod
    def from_environment(cls) -> SearchTrialReport | None:
        """The callback a search trial asks for through ``FLEXLORA_SEARCH_TRIAL``, or ``None`` outside a search."""
        text = os.environ.get(SEARCH_TRIAL_ENV)
        if not text:
            return None
        try:
            spec = json.loads(text)
            return cls(str(spec["storage"]), str(spec["study"]), int(spec["trial"]), str(spec["objective"]),
                       spec.get("pruner"))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{SEARCH_TRIAL_ENV} must be a JSON object with storage, study, trial and objective "
                             f"(the sweep sets it for its search trials); got {text!r}") from err

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            from flexlora_pl.runs.study_storage import open_study_storage

            study = optuna.load_study(study_name=self.study_name, storage=open_study_storage(self.storage),
                                      pruner=build_pruner(self.pruner))
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, self.number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.objective)
        if value is None:
            return
        pruned = False
        if trainer.is_global_zero:  # one report per validation; every process learns the decision
            trial = self._optuna_trial()
            trial.report(float(value), trainer.global_step)
            pruned = bool(self.prune and trial.should_prune())
        if trainer.world_size > 1:
            pruned = bool(trainer.strategy.broadcast(pruned, src=0))
        if not pruned:
            return
        trainer.should_stop = True
        if trainer.is_global_zero and trainer.log_dir:
            Path(trainer.log_dir, PRUNED_FILENAME).write_text(json.dumps(
                {"step": trainer.global_step, "objective": self.objective, "value": float(value)}) + "\n")
