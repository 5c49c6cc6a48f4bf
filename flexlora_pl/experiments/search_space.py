"""The ``search:`` section of a sweep file: what a tuned comparison searches, checked before anything runs.

A tuned comparison gives every method the same search: the same parameters (any ``flexlora`` flag), the
same sampler and the same number of trials, scored by the same validation metric on data carved from the
training split. The section reads::

    search:
      trials: 6                      # per task x method, the same for every method
      sampler: grid                  # tpe (default), random, or grid (exactly reproducible)
      seed: 0                        # the sampler's seed and every trial run's --seed_everything
      objective: val/score           # a validation metric the task logs
      direction: maximize            # or minimize
      rule: best                     # a trial's value: the best of its validations, or the last
      pruner: none                   # none (default), median, or successive_halving; or with options:
                                     # {type: median, startup_trials: 2, warmup_steps: 0}
      holdout: [--data.init_args.holdout_size, "0.2"]   # flags every trial gets: validation carved from training
      params:
        --model.init_args.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true, steps: 6}
        --model.init_args.method.init_args.dropout: {choices: [0.0, 0.1]}
      methods:                       # per method: more (or other) parameters
        flexlora: {params: {--model.init_args.lambda_lr_ratio: {low: 1, high: 10, log: true, steps: 3}}}

A parameter is a float or integer range (``low``/``high``, ``log``; ``type: int`` for integers; ``steps`` makes
a grid of that many values, geometric when ``log``) or a list of ``choices``. ``holdout`` may also map task names
to their flags (e.g. VTAB's ``[--data.init_args.protocol, tune]``). Per-method ``trials`` need
``allow_unequal_budgets: true``. A pruner judges a trial at each of its validations (the step is the optimizer
step): ``median`` stops a trial whose best value so far is behind the median of the earlier trials at that step
(``startup_trials`` finished trials first, default 5, no judgement before ``warmup_steps``);
``successive_halving`` keeps the best 1 / ``reduction_factor`` (default 4) of the trials at each rung
(``min_resource``: the first rung's step, default chosen by Optuna). Every error names the key at fault and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

__all__ = ["PRUNERS", "PRUNER_OPTIONS", "SAMPLERS", "Param", "SearchError", "SearchSpec", "parse_search"]

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "successive_halving")
PRUNER_OPTIONS = {"none": (), "median": ("startup_trials", "warmup_steps"),
                  "successive_halving": ("min_resource", "reduction_factor")}
RULES = ("best", "last")
_KEYS = ("trials", "sampler", "seed", "objective", "direction", "rule", "pruner", "holdout", "params", "methods",
         "allow_unequal_budgets")
_PARAM_KEYS = ("low", "high", "log", "type", "steps", "choices")
_METHOD_KEYS = ("params", "trials")


class SearchError(ValueError):
    """A ``search:`` section that cannot be run: the message names the key and the fix."""


@dataclass(frozen=True)
class Param:
    """One searched flag.

    Args:
        flag: the ``flexlora`` flag, with its leading ``--``.
        low: lower bound of a range (``None`` for choices).
        high: upper bound of a range.
        log: sample the range on a log scale.
        integer: the range holds integers.
        steps: number of grid values over the range (``None``: continuous).
        choices: the values of a categorical parameter.
    """

    flag: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    steps: int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        """The Optuna parameter name: the flag without its dashes."""
        return self.flag.lstrip("-")

    def grid(self) -> tuple[Any, ...]:
        """The values of a grid search: the choices, or ``steps`` values from ``low`` to ``high`` (both included)."""
        if self.choices:
            return self.choices
        if self.steps is None:
            raise SearchError(f"search.params.{self.flag}: a grid needs `steps` (how many values) or `choices`")
        assert self.low is not None and self.high is not None
        if self.steps == 1:
            values = [self.low]
        elif self.log:
            ratio = math.log(self.high / self.low) / (self.steps - 1)
            values = [self.low * math.exp(ratio * i) for i in range(self.steps)]
        else:
            values = [self.low + (self.high - self.low) * i / (self.steps - 1) for i in range(self.steps)]
        values[-1] = self.high  # exact end point, free of rounding
        if self.integer:
            values = sorted(dict.fromkeys(round(v) for v in values))
        else:
            values = [float(f"{v:.6g}") for v in values]  # readable values in folder configs and tables
        return tuple(values)

    def distribution(self, grid: bool = False) -> Any:
        """The Optuna distribution of this parameter.

        Args:
            grid: for a grid search, whose trials all come from the queue: a range of ``steps`` values is then the
                range that holds them (not a choice among them), so a grid widened later, in the same study, is
                still the same parameter to Optuna.
        """
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if grid and not self.choices and self.steps is not None:
            values = self.grid()
            low, high = min(self.low, values[0]), max(self.high, values[-1])  # type: ignore[type-var]
            if self.integer:
                return IntDistribution(int(low), int(high), log=self.log)
            return FloatDistribution(float(low), float(high), log=self.log)
        if self.choices or self.steps is not None:
            return CategoricalDistribution(list(self.grid()))
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def at_edge(self, value: Any) -> bool:
        """Whether a selected value lies at an end of the searched range (the range may need widening)."""
        if self.choices:
            ordered = [c for c in self.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            return len(ordered) == len(self.choices) and len(ordered) > 2 and value in (min(ordered), max(ordered))
        grid = self.grid() if self.steps is not None else (self.low, self.high)
        if self.steps is not None and len(grid) <= 2:
            return False
        low, high = grid[0], grid[-1]
        if self.steps is not None:
            return value in (low, high)
        span = (math.log(high) - math.log(low)) if self.log else (high - low)
        position = (math.log(value) - math.log(low)) if self.log else (value - low)
        return position <= 0.05 * span or position >= 0.95 * span

    def describe(self) -> str:
        """The searched range in words, for tables."""
        if self.choices:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        scale = "log" if self.log else "linear"
        grid = f", {self.steps} values" if self.steps is not None else ""
        return f"[{self.low:g}, {self.high:g}] ({scale}{grid})"


@dataclass(frozen=True)
class SearchSpec:
    """A checked ``search:`` section.

    Args:
        trials: method name → its number of trials per task.
        params: method name → its searched parameters.
        sampler: ``tpe``, ``random`` or ``grid``.
        seed: the sampler's seed and every trial's ``--seed_everything``.
        objective: the validation metric that scores a trial.
        direction: ``maximize`` or ``minimize``.
        rule: ``best`` (the best of a trial's validations) or ``last``.
        pruner: ``none``, ``median`` or ``successive_halving``.
        pruner_options: the pruner's options (``PRUNER_OPTIONS``), as given.
        holdout: task name → the flags every trial of that task gets.
    """

    trials: dict[str, int]
    params: dict[str, tuple[Param, ...]]
    sampler: str = "tpe"
    seed: int = 0
    objective: str = "val/score"
    direction: str = "maximize"
    rule: str = "best"
    pruner: str = "none"
    holdout: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pruner_options: dict[str, int] = field(default_factory=dict)

    @property
    def pruner_spec(self) -> dict[str, Any]:
        """The pruner as a trial's ``SearchTrialReport`` builds it: ``{"type": ..., **options}``."""
        return {"type": self.pruner, **self.pruner_options}

    def grid_points(self, method: str) -> list[dict[str, Any]]:
        """Every point of a grid search of ``method``, parameter name → value, in a fixed order."""
        params = self.params[method]
        return [dict(zip([p.name for p in params], values, strict=True))
                for values in product(*(p.grid() for p in params))]

    def trial_args(self, method: str, values: Mapping[str, Any]) -> list[str]:
        """The flags of one trial's parameter values (by Optuna name), in the order of the section."""
        args: list[str] = []
        for param in self.params[method]:
            args += [param.flag, _flag_value(values[param.name])]
        return args

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` beats ``b`` in the search's direction."""
        return a > b if self.direction == "maximize" else a < b


def parse_search(data: Any, methods: Sequence[str], tasks: Sequence[str], where: str = "<sweep>") -> SearchSpec:
    """Check a sweep file's ``search:`` section and build the :class:`SearchSpec`.

    Args:
        data: the loaded YAML of the section.
        methods: the sweep's method names (each gets the shared parameters plus its own).
        tasks: the sweep's task names (for a per-task ``holdout``).
        where: the file's name, for messages.
    """
    at = f"{where}: search"
    if not isinstance(data, Mapping):
        raise SearchError(f"{at}: expected a mapping with keys {', '.join(_KEYS)}; got {type(data).__name__}")
    _unknown(data, _KEYS, at)
    sampler = _choice(data.get("sampler", "tpe"), SAMPLERS, f"{at}.sampler")
    pruner, pruner_options = _pruner(data.get("pruner", "none"), f"{at}.pruner")
    rule = _choice(data.get("rule", "best"), RULES, f"{at}.rule")
    direction = _choice(data.get("direction", "maximize"), ("maximize", "minimize"), f"{at}.direction")
    objective = _objective(data.get("objective", "val/score"), f"{at}.objective")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SearchError(f"{at}.seed: a non-negative integer, got {seed!r}")

    shared = _params(data.get("params") or {}, f"{at}.params")
    raw_methods = data.get("methods") or {}
    if not isinstance(raw_methods, Mapping):
        raise SearchError(f"{at}.methods: a mapping of method name → {{params: ..., trials: ...}}, got {raw_methods!r}")
    unknown = [m for m in raw_methods if m not in methods]
    if unknown:
        raise SearchError(f"{at}.methods: {', '.join(map(str, unknown))} not among the sweep's methods "
                          f"({', '.join(methods)})")
    params: dict[str, tuple[Param, ...]] = {}
    own_trials: dict[str, int] = {}
    for method in methods:
        entry = raw_methods.get(method) or {}
        if not isinstance(entry, Mapping):
            raise SearchError(f"{at}.methods.{method}: a mapping with {', '.join(_METHOD_KEYS)}, got {entry!r}")
        _unknown(entry, _METHOD_KEYS, f"{at}.methods.{method}")
        merged = {p.flag: p for p in shared}
        merged.update({p.flag: p for p in _params(entry.get("params") or {}, f"{at}.methods.{method}.params")})
        if not merged:
            raise SearchError(f"{at}: method {method} searches nothing; give search.params (e.g. the optimizer's lr: "
                              "{--model.init_args.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}})")
        params[method] = tuple(merged.values())
        if "trials" in entry:
            own_trials[method] = _count(entry["trials"], f"{at}.methods.{method}.trials")

    trials = _budgets(data, sampler, params, own_trials, at)
    holdout = _holdout(data.get("holdout", []), tasks, f"{at}.holdout")
    return SearchSpec(trials=trials, params=params, sampler=sampler, seed=seed, objective=objective,
                      direction=direction, rule=rule, pruner=pruner, holdout=holdout,
                      pruner_options=pruner_options)


# ----------------------------------------------------------------------------- parts
def _unknown(data: Mapping, known: Sequence[str], at: str) -> None:
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SearchError(f"{at}: unknown key(s) {', '.join(map(str, unknown))}; it takes {', '.join(known)}")


def _choice(value: Any, allowed: Sequence[str], at: str) -> str:
    if value not in allowed:
        raise SearchError(f"{at}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _pruner(value: Any, at: str) -> tuple[str, dict[str, int]]:
    if not isinstance(value, Mapping):
        return _choice(value, PRUNERS, at), {}
    kind = _choice(value.get("type"), PRUNERS, f"{at}.type")
    _unknown(value, ("type", *PRUNER_OPTIONS[kind]), at)
    options = {}
    for key in PRUNER_OPTIONS[kind]:
        if key in value:
            number = value[key]
            least = 2 if key == "reduction_factor" else 1 if key == "min_resource" else 0
            if isinstance(number, bool) or not isinstance(number, int) or number < least:
                raise SearchError(f"{at}.{key}: an integer >= {least}, got {number!r}")
            options[key] = number
    return kind, options


def _count(value: Any, at: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SearchError(f"{at}: a number of trials (an integer >= 1), got {value!r}")
    return value


def _objective(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise SearchError(f"{at}: a validation metric name such as val/score, got {value!r}")
    if value.startswith("test/"):
        raise SearchError(f"{at}: {value!r} is a test metric; a search selects on held-out training data, never on "
                          "what the tables report. Use a validation metric, e.g. val/score")
    if not value.startswith("val/"):
        raise SearchError(f"{at}: {value!r} is not a validation metric (they start with val/, e.g. val/score, "
                          "val/accuracy, val/loss)")
    return value


def _number(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchError(f"{at}: a finite number, got {value!r} (write 1.0e-4, not 1e-4, so YAML reads a number)")
    return float(value)


def _params(data: Any, at: str) -> list[Param]:
    if not isinstance(data, Mapping):
        raise SearchError(f"{at}: a mapping of flexlora flag → range or choices, got {data!r}")
    params = []
    for flag, spec in data.items():
        where = f"{at}.{flag}"
        if not isinstance(flag, str) or not flag.lstrip("-") or " " in flag:
            raise SearchError(f"{where}: a flexlora flag, e.g. --model.init_args.optimizer.init_args.lr")
        flag = "--" + flag.lstrip("-")
        if flag in ("--seed_everything", "--name", "--version", "--config", "--ckpt_path"):
            raise SearchError(f"{where}: {flag} is set by the sweep for every run and cannot be searched")
        if not isinstance(spec, Mapping):
            raise SearchError(f"{where}: {{low: ..., high: ..., log: true}} or {{choices: [...]}}, got {spec!r}")
        _unknown(spec, _PARAM_KEYS, where)
        if "choices" in spec:
            choices = spec["choices"]
            extra = [k for k in spec if k != "choices"]
            if extra:
                raise SearchError(f"{where}: choices go alone (drop {', '.join(extra)})")
            if not isinstance(choices, list) or not choices:
                raise SearchError(f"{where}.choices: a non-empty list of values, got {choices!r}")
            if len({repr(c) for c in choices}) != len(choices):
                raise SearchError(f"{where}.choices: lists a value twice: {choices!r}")
            params.append(Param(flag, choices=tuple(choices)))
            continue
        if "low" not in spec or "high" not in spec:
            raise SearchError(f"{where}: a range needs low and high (or give choices)")
        low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
        if low >= high:
            raise SearchError(f"{where}: low ({low:g}) must be below high ({high:g})")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise SearchError(f"{where}.log: true or false, got {log!r}")
        if log and low <= 0:
            raise SearchError(f"{where}: a log range needs bounds > 0, got low = {low:g}; raise low or set log: false")
        kind = spec.get("type", "float")
        if kind not in ("float", "int"):
            raise SearchError(f"{where}.type: float or int, got {kind!r}")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise SearchError(f"{where}: an int range needs integer bounds, got {low:g} and {high:g}")
        steps = spec.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
            raise SearchError(f"{where}.steps: the number of grid values, an integer >= 2, got {steps!r}")
        params.append(Param(flag, low, high, log, kind == "int", steps))
    return params


def _budgets(data: Mapping, sampler: str, params: dict[str, tuple[Param, ...]], own: dict[str, int],
             at: str) -> dict[str, int]:
    allow = data.get("allow_unequal_budgets", False)
    if not isinstance(allow, bool):
        raise SearchError(f"{at}.allow_unequal_budgets: true or false, got {allow!r}")
    if sampler == "grid":
        for method, method_params in params.items():
            missing = [p.flag for p in method_params if not p.choices and p.steps is None]
            if missing:
                raise SearchError(f"{at}: sampler grid needs `steps` or `choices` for every parameter; method {method} "
                                  f"has continuous {', '.join(missing)}")
        sizes = {m: math.prod(len(p.grid()) for p in method_params) for m, method_params in params.items()}
        given = data.get("trials")
        for method, size in sizes.items():
            wanted = own.get(method, given)
            if wanted is not None and _count(wanted, f"{at}.trials") != size:
                raise SearchError(f"{at}.trials: a grid search runs every point; method {method}'s grid has {size} "
                                  f"points, not {wanted}. Drop trials or change the grid")
        trials = sizes
    else:
        if "trials" not in data and len(own) < len(params):
            raise SearchError(f"{at}.trials: the number of trials per task and method is required (the same for "
                              "every method, so the comparison is fair), e.g. trials: 8")
        default = _count(data["trials"], f"{at}.trials") if "trials" in data else None
        trials = {m: own.get(m, default) for m in params}  # type: ignore[misc]
    if len(set(trials.values())) > 1 and not allow:
        listed = ", ".join(f"{m}: {n}" for m, n in trials.items())
        raise SearchError(f"{at}: methods get unequal trial budgets ({listed}), so a better score may come from more "
                          "tuning; give every method the same budget, or set allow_unequal_budgets: true (the "
                          "results table prints each method's count)")
    return trials


def _holdout(value: Any, tasks: Sequence[str], at: str) -> dict[str, tuple[str, ...]]:
    def flags(item: Any, where: str) -> tuple[str, ...]:
        if isinstance(item, str):
            item = [item]
        if not isinstance(item, list) or any(isinstance(v, bool) or not isinstance(v, (str, int, float))
                                             for v in item):
            raise SearchError(f"{where}: a list of flags, e.g. [--data.init_args.holdout_size, '0.2'], got {item!r}")
        return tuple(str(v) for v in item)

    if isinstance(value, Mapping):
        unknown = [t for t in value if t not in tasks and t != "default"]
        if unknown:
            raise SearchError(f"{at}: {', '.join(map(str, unknown))} not among the sweep's tasks ({', '.join(tasks)}); "
                              "name tasks, or `default` for the others")
        default = flags(value.get("default", []), f"{at}.default") if "default" in value else ()
        return {task: flags(value[task], f"{at}.{task}") if task in value else default for task in tasks}
    shared = flags(value, at)
    return {task: shared for task in tasks}


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
