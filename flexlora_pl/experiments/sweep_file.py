"""Sweep files: a grid of tasks × methods × seeds in YAML, checked and expanded into runs.

A sweep file names its tasks (one or more ``--config`` files each), its methods (override configs
applied after the task's, possibly depending on the task) and its seeds::

    name: table1_glue            # run folders: <save_dir>/<name>/<task>/<method>/seed<k>
    save_dir: runs               # optional (default: runs)
    seeds: [0, 1, 2, 3, 4]
    test: false                  # optional default for every task: false, last or best
    args: []                     # optional: flags added to every command, e.g. [--trainer.max_epochs, "1"]
    configs: []                  # optional: config files applied to every run, after the method's
    tasks:
      glue_cola: configs/glue_cola.yaml                  # one config file, or a list of them
      vtab_dtd: {configs: [configs/vtab/dtd.yaml], test: last, args: []}
    methods:
      flexlora: []                                       # the task config's own method
      lora: configs/methods/lora.yaml
      adalora:                                           # a different override per task
        llama3_8b_r8: configs/methods/adalora.yaml
        llama3_8b_r32: configs/commonsense/overrides/adalora_r32.yaml
    slurm: {partition: gpu, time: 240, gpus: 1}          # optional: jobs of --executor slurm (SLURM_KEYS)

Paths are relative to the directory the sweep is run from (the repository root for the shipped
sweeps), as ``flexlora --config`` paths are. Every error names the key at fault and how to fix it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flexlora_pl.experiments.search_space import SearchError, SearchSpec, parse_search

__all__ = ["SLURM_KEYS", "TEST_CHOICES", "Run", "Sweep", "SweepError", "load_sweep", "parse_sweep"]

TEST_CHOICES = ("last", "best")
"""Which checkpoint a task's ``test`` stage evaluates: the end of training or the best validation score."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_TOP_KEYS = ("name", "save_dir", "seeds", "test", "args", "configs", "tasks", "methods", "search", "reference",
             "slurm")
SLURM_KEYS = {
    "partition": "sbatch --partition",
    "time": "each job's time limit in minutes",
    "gpus": "GPUs per job",
    "cpus": "CPU cores per job",
    "mem": "memory per job in GB",
    "array_parallelism": "how many jobs of an array run at once",
    "sbatch": "more sbatch options, e.g. {account: myproject, qos: normal}",
}
"""The keys of a sweep file's ``slurm:`` section (the jobs of ``flexlora-sweep --executor slurm``) and their meaning."""
# sbatch options that the other keys or submitit itself set
_SBATCH_OWN = ("partition", "time", "gpus-per-node", "cpus-per-task", "mem", "array", "signal", "output", "error",
               "job-name", "open-mode")
_TASK_KEYS = ("configs", "test", "args")


class SweepError(ValueError):
    """A sweep file that cannot be run: the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Task:
    """One task of a sweep: the config files that define it and whether it has a test stage.

    Args:
        name: the task's folder name in the run layout.
        configs: ``--config`` files, in order.
        test: ``None`` (no test stage), ``"last"`` or ``"best"`` (the checkpoint ``flexlora test`` evaluates).
        args: extra flags for this task's commands.
    """

    name: str
    configs: tuple[str, ...]
    test: str | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    """One run of a sweep: a task, a method and a seed, with the commands that run it.

    Args:
        sweep: the sweep's name (the first folder under ``save_dir``).
        task: the task's name.
        method: the method's name.
        seed: the seed (``--seed_everything``; the run folder is ``seed<seed>``).
        configs: every ``--config`` file, in order: the task's, the method's, the sweep's.
        args: extra flags: the sweep's, then the task's.
        test: the test stage's checkpoint (``"last"``/``"best"``) or ``None``.
        save_dir: the root of all run folders.
    """

    sweep: str
    task: str
    method: str
    seed: int
    configs: tuple[str, ...]
    args: tuple[str, ...] = ()
    test: str | None = None
    save_dir: str = "runs"

    @property
    def name(self) -> str:
        """The run's ``--name``: ``<sweep>/<task>/<method>``."""
        return f"{self.sweep}/{self.task}/{self.method}"

    @property
    def version(self) -> str:
        """The run's ``--version``: ``seed<k>``."""
        return f"seed{self.seed}"

    @property
    def folder(self) -> Path:
        """The run folder: ``<save_dir>/<name>/<version>`` (``<save_dir>/<sweep>/<task>/<method>/seed<k>``)."""
        return Path(self.save_dir) / self.name / self.version

    @property
    def label(self) -> str:
        return f"{self.task} / {self.method} / seed {self.seed}"

    @property
    def log_stem(self) -> str:
        """The name of the run's log file in ``<save_dir>/<sweep>/logs/``, without ``.log``."""
        return f"{self.task}.{self.method}.seed{self.seed}"

    def command(self, stage: str, extra: Sequence[str] = (), ckpt_path: str | None = None) -> list[str]:
        """The ``flexlora`` arguments (without the program) of one stage: ``fit`` or ``test``.

        Args:
            stage: the subcommand.
            extra: flags appended last (the sweep command line's ``-- ...``), so they win.
            ckpt_path: ``last`` to resume a fit, ``last``/``best`` for the test stage.
        """
        command = [stage]
        for config in self.configs:
            command += ["--config", config]
        command += ["--trainer.logger.init_args.save_dir", self.save_dir, "--name", self.name,
                    "--version", self.version, "--seed_everything", str(self.seed)]
        if ckpt_path is not None:
            command += ["--ckpt_path", ckpt_path]
        return [*command, *self.args, *extra]


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file.

    Args:
        name: the sweep's name.
        tasks: the tasks, in file order.
        methods: method name → task name → override config files.
        seeds: the seeds, in file order.
        save_dir: the root of the run folders.
        configs: config files applied to every run after the method's.
        args: flags added to every command.
        source: the file it was read from.
        search: the ``search:`` section of a tuned comparison (``None``: every run at the configs' values).
        reference: the method the results' paired differences are taken against (``None``: no such table).
        slurm: the ``slurm:`` section (:data:`SLURM_KEYS`), checked; ``--slurm-*`` flags override it.
    """

    name: str
    tasks: tuple[Task, ...]
    methods: dict[str, dict[str, tuple[str, ...]]]
    seeds: tuple[int, ...]
    save_dir: str = "runs"
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    source: str = "<sweep>"
    search: SearchSpec | None = None
    reference: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)

    def runs(self, tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None,
             seeds: Sequence[int] | None = None, save_dir: str | None = None) -> list[Run]:
        """Every run of the grid (task-major, then method, then seed), optionally filtered.

        Args:
            tasks: keep only these tasks (names must exist in the sweep).
            methods: keep only these methods.
            seeds: keep only these seeds.
            save_dir: another root for the run folders than the file's ``save_dir``.
        """
        _check_filter("--tasks", tasks, [t.name for t in self.tasks], self.source)
        _check_filter("--methods", methods, list(self.methods), self.source)
        _check_filter("--seeds", seeds, list(self.seeds), self.source)
        runs = []
        for task in self.tasks:
            if tasks is not None and task.name not in tasks:
                continue
            for method, per_task in self.methods.items():
                if methods is not None and method not in methods:
                    continue
                for seed in self.seeds:
                    if seeds is not None and seed not in seeds:
                        continue
                    runs.append(Run(
                        sweep=self.name, task=task.name, method=method, seed=seed,
                        configs=(*task.configs, *per_task[task.name], *self.configs),
                        args=(*self.args, *task.args), test=task.test, save_dir=save_dir or self.save_dir,
                    ))
        return runs

    def config_files(self) -> list[str]:
        """Every config file the sweep refers to, once each, in order of first use."""
        files = [f for task in self.tasks for f in task.configs]
        files += [f for per_task in self.methods.values() for configs in per_task.values() for f in configs]
        return list(dict.fromkeys([*files, *self.configs]))

    def missing_files(self, root: str | os.PathLike = ".") -> list[str]:
        """The config files that do not exist (relative paths are taken from ``root``)."""
        return [f for f in self.config_files() if not (Path(root) / f).is_file()]


def load_sweep(path: str | os.PathLike, check_files: bool = True) -> Sweep:
    """Read and check a sweep file.

    Args:
        path: the YAML file.
        check_files: also check that every config file it names exists (relative to the current directory).

    Raises:
        SweepError: the file is missing, not YAML, breaks the schema, or names missing config files.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist; the shipped sweeps are in configs/sweeps/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {str(path)!r} is not valid YAML: {err}") from err
    sweep = parse_sweep(data, source=str(path))
    if check_files:
        missing = sweep.missing_files()
        if missing:
            raise SweepError(
                f"{path}: config files not found (paths are relative to the directory the sweep runs from, "
                f"{os.getcwd()}): {', '.join(missing)}. Run the sweep from the repository root, or fix the paths."
            )
    return sweep


def parse_sweep(data: Any, source: str = "<sweep>") -> Sweep:
    """Check a sweep file's content (already loaded from YAML) and build the :class:`Sweep`.

    Args:
        data: the loaded YAML.
        source: the file's name, for error messages.
    """
    where = source
    if not isinstance(data, Mapping):
        raise SweepError(f"{where}: a sweep file is a mapping with keys {', '.join(_TOP_KEYS)}; got "
                         f"{type(data).__name__}")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; a sweep file has "
                         f"{', '.join(_TOP_KEYS)}")
    for key in ("name", "tasks", "methods", "seeds"):
        if key not in data:
            raise SweepError(f"{where}: the key '{key}' is required (see docs/experiments.md for the schema)")
    name = _name(data["name"], f"{where}: name")
    save_dir = data.get("save_dir", "runs")
    if not isinstance(save_dir, str) or not save_dir:
        raise SweepError(f"{where}: save_dir must be a folder path (a string), got {save_dir!r}")
    seeds = _seeds(data["seeds"], where)
    default_test = _test(data.get("test", False), f"{where}: test")
    args = _strings(data.get("args", []), f"{where}: args", "flags, e.g. [--trainer.max_epochs, '1']")
    configs = _strings(data.get("configs", []), f"{where}: configs", "config files")

    raw_tasks = data["tasks"]
    if not isinstance(raw_tasks, Mapping) or not raw_tasks:
        raise SweepError(f"{where}: tasks must be a non-empty mapping of task name → config file(s), e.g. "
                         "{glue_cola: configs/glue_cola.yaml}")
    tasks = tuple(_task(task_name, value, default_test, where) for task_name, value in raw_tasks.items())
    task_names = [task.name for task in tasks]

    raw_methods = data["methods"]
    if not isinstance(raw_methods, Mapping) or not raw_methods:
        raise SweepError(f"{where}: methods must be a non-empty mapping of method name → override config(s); use "
                         "[] for the task config's own method, e.g. {flexlora: [], lora: configs/methods/lora.yaml}")
    methods = {_name(method, f"{where}: method name"): _method(str(method), value, task_names, where)
               for method, value in raw_methods.items()}
    reference = data.get("reference")
    if reference is not None and reference not in methods:
        raise SweepError(f"{where}: reference: {reference!r} is not one of the sweep's methods ({', '.join(methods)}); "
                         "name the method the others are compared against, e.g. reference: lora")
    search = None
    if data.get("search") is not None:
        try:
            search = parse_search(data["search"], list(methods), task_names, where)
        except SearchError as err:
            raise SweepError(str(err)) from err
    slurm = _slurm(data.get("slurm") or {}, f"{where}: slurm")
    return Sweep(name=name, tasks=tasks, methods=methods, seeds=seeds, save_dir=save_dir, configs=configs,
                 args=args, source=source, search=search, reference=reference, slurm=slurm)


# ----------------------------------------------------------------------------- parts
def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise SweepError(f"{where}: {value!r} is not a usable name; names become folders, so use letters, digits, "
                         "'_', '-', '.' and '+' (no slashes or spaces), starting with a letter or digit")
    return value


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise SweepError(f"{where}: seeds must be a list of integers, e.g. [0, 1, 2], or a count (3 = [0, 1, 2]); "
                         f"got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise SweepError(f"{where}: seeds: a count of seeds must be at least 1, got {value}")
        return tuple(range(value))
    if not value or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value):
        raise SweepError(f"{where}: seeds must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError(f"{where}: seeds lists a seed twice: {value!r}")
    return tuple(value)


def _test(value: Any, where: str) -> str | None:
    if value is False or value is None:
        return None
    if value in TEST_CHOICES:
        return str(value)
    raise SweepError(f"{where}: {value!r} is not one of false, last, best (the checkpoint `flexlora test` "
                     "evaluates after the fit: last = the end of training, best = the best validation score)")


def _strings(value: Any, where: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or any(not isinstance(v, (str, int, float)) or isinstance(v, bool)
                                          for v in value):
        raise SweepError(f"{where}: expected a list of {what}, got {value!r}")
    return tuple(str(v) for v in value)


def _task(name: Any, value: Any, default_test: str | None, where: str) -> Task:
    name = _name(name, f"{where}: task name")
    at = f"{where}: tasks.{name}"
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in _TASK_KEYS]
        if unknown:
            raise SweepError(f"{at}: unknown key(s) {', '.join(map(str, unknown))}; a task has "
                             f"{', '.join(_TASK_KEYS)}")
        if "configs" not in value:
            raise SweepError(f"{at}: a task given as a mapping needs 'configs' (its config file or files)")
        configs = _strings(value["configs"], f"{at}.configs", "config files")
        test = _test(value["test"], f"{at}.test") if "test" in value else default_test
        args = _strings(value.get("args", []), f"{at}.args", "flags")
    else:
        configs, test, args = _strings(value, at, "config files (or a mapping with configs/test/args)"), \
            default_test, ()
    if not configs:
        raise SweepError(f"{at}: a task needs at least one config file")
    return Task(name, configs, test, args)


def _method(name: str, value: Any, task_names: list[str], where: str) -> dict[str, tuple[str, ...]]:
    at = f"{where}: methods.{name}"
    if value is None:
        value = []
    if not isinstance(value, Mapping):
        configs = _strings(value, at, "override config files ([] for the task config's own method)")
        return {task: configs for task in task_names}
    unknown = [k for k in value if k not in task_names]
    missing = [t for t in task_names if t not in value]
    if unknown or missing:
        problems = ([f"names unknown task(s) {', '.join(map(str, unknown))}"] if unknown else []) + \
                   ([f"has no entry for task(s) {', '.join(missing)}"] if missing else [])
        raise SweepError(f"{at}: a per-task mapping must give the override files of every task of the sweep "
                         f"({', '.join(task_names)}); it {' and '.join(problems)}")
    return {task: _strings(value[task] if value[task] is not None else [], f"{at}.{task}", "config files")
            for task in task_names}


def _slurm(value: Any, where: str) -> dict[str, Any]:
    known = ", ".join(f"{key} ({meaning})" for key, meaning in SLURM_KEYS.items())
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: expected a mapping with the keys {known}; got {value!r}")
    unknown = [str(k) for k in value if k not in SLURM_KEYS]
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; the slurm section has {known}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        at = f"{where}.{key}"
        if key == "partition":
            if not isinstance(item, str) or not item.strip():
                raise SweepError(f"{at}: expected a partition name (a string), got {item!r}")
        elif key == "mem":
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not item > 0:
                raise SweepError(f"{at}: expected the memory per job in GB (a number > 0), e.g. 64; got {item!r}")
        elif key == "sbatch":
            item = _sbatch(item, at)
        else:
            least = 0 if key == "gpus" else 1
            if isinstance(item, bool) or not isinstance(item, int) or item < least:
                raise SweepError(f"{at}: expected {SLURM_KEYS[key]} as a whole number >= {least}, got {item!r}")
        out[key] = item
    return out


def _sbatch(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: expected a mapping of sbatch options to values, e.g. {{account: myproject}}; "
                         f"got {value!r}")
    out = {}
    for key, item in value.items():
        name = str(key).replace("_", "-")
        if name in _SBATCH_OWN:
            raise SweepError(f"{where}.{key}: set by flexlora-sweep itself (partition, time, gpus, cpus and mem "
                             "are keys of the slurm section; array, signal, output and error belong to submitit)")
        if isinstance(item, (Mapping, list)) or item is None:
            raise SweepError(f"{where}.{key}: expected one value (a string, number or true), got {item!r}")
        out[name] = item
    return out


def _check_filter(flag: str, chosen: Sequence[Any] | None, known: list[Any], source: str) -> None:
    if chosen is None:
        return
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise SweepError(f"{flag}: {', '.join(map(str, unknown))} not in {source} (it has: "
                         f"{', '.join(map(str, known))})")
