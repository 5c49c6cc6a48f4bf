"""What every study shares: the settings and their flags, the study registry, interleaved timing, medians and
paired ratios, storage accounting, markdown tables and the note on the machine's load.

A study is a function of :class:`Settings` that returns a :class:`StudyResult` (its JSON entries and the text
it prints), registered under a name with :func:`register_study`. ``python -m benchmarks.step_time`` runs every
registered study in registration order (``--studies`` picks some); ``benchmarks/studies/__init__.py`` lists
the study files that ship.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from benchmarks.models import CUDA_MODELS, DEFAULT_ARCHS, DEFAULT_MODELS, MODEL_SPECS, SMOKE_ARCHS, SMOKE_MODELS

__all__ = ["STUDIES", "Settings", "Study", "StudyResult", "autocast", "environment", "interleave", "load_note",
           "markdown", "median_ms", "paired_ratio", "parse_args", "quiet_libraries", "register_study",
           "storage_bytes", "synchronize", "timed"]

K = TypeVar("K", bound=Hashable)


# ----------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """One run's settings, from the command line (:func:`parse_args`); every study reads what it needs."""

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
    methods_models: list[str] = field(default_factory=list)
    json_path: str | None = None
    studies: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None, description: str = "") -> Settings:
    """:class:`Settings` from the command line ``argv`` (``None``: ``sys.argv``); sets torch's CPU threads."""
    parser = argparse.ArgumentParser(description=description)
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
    parser.add_argument("--methods-models", nargs="+", default=None,
                        help="models of the methods study (every registered method against LoRA; default minilm, "
                             "the demo's backbone; smoke: vit-test)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--studies", nargs="+", default=None, choices=list(STUDIES),
                        help="studies to run, in registration order (default: all). "
                             + "; ".join(f"{s.name}: {s.help}" for s in STUDIES.values()))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.delta_t < 2:
        parser.error("--delta-t must be at least 2: events are timed apart from the steps between them")
    precisions = args.precision or (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    smoke = args.smoke
    models = args.models or (SMOKE_MODELS if smoke else CUDA_MODELS if device == "cuda" else DEFAULT_MODELS)
    unknown = [m for m in models + (args.compile_models or []) + (args.methods_models or []) if m not in MODEL_SPECS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODEL_SPECS)}")
    studies = [name for name in STUDIES if args.studies is None or name in args.studies]
    compile_models = [] if args.no_compile else (args.compile_models or ["llama-tiny"])
    return Settings(
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
        methods_models=args.methods_models or (["vit-test"] if smoke else ["minilm"]),
        json_path=args.json,
        studies=studies,
    )


# ----------------------------------------------------------------------------- the study registry
@dataclass
class StudyResult:
    """What a study hands back: ``entries`` go into the run's JSON (one key each), ``text`` is printed."""

    entries: dict[str, Any]
    text: str = ""


@dataclass(frozen=True)
class Study:
    name: str
    run: Callable[[Settings], StudyResult]
    help: str


#: study name -> study, in the order a run prints them; filled by :func:`register_study`
STUDIES: dict[str, Study] = {}


def register_study(name: str, help: str = "") -> Callable[[Callable[[Settings], StudyResult]],
                                                          Callable[[Settings], StudyResult]]:
    """Decorator: run the decorated ``study(settings) -> StudyResult`` in every benchmark run, as ``name``.

    Args:
        name: the study's name (``--studies`` selects by it); one function per name.
        help: one line for ``--help`` (default: the first line of the function's docstring).
    """
    def decorate(run: Callable[[Settings], StudyResult]) -> Callable[[Settings], StudyResult]:
        taken = STUDIES.get(name)
        if taken is not None and _qualified(taken.run) != _qualified(run):
            raise ValueError(f"study name {name!r} is taken by {_qualified(taken.run)}")
        STUDIES[name] = Study(name, run, help or (run.__doc__ or "").strip().split("\n")[0])
        return run
    return decorate


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


# ----------------------------------------------------------------------------- timing
def autocast(settings: Settings, precision: str) -> AbstractContextManager[Any]:
    """bf16 autocast on the run's device for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(settings.device, dtype=torch.bfloat16)
    return nullcontext()


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


def interleave(steps: Mapping[K, Callable[[], Any]], settings: Settings, min_rounds: int, seconds: float = 0.0,
               max_rounds: int | None = None,
               after_round: Callable[[], None] | None = None) -> tuple[dict[K, list[float]], int]:
    """Time every function of ``steps`` once per round, in turns (A B C, A B C, …); returns seconds per key and
    the number of rounds.

    At least ``min_rounds`` rounds; then more while fewer than ``seconds`` have passed and fewer than
    ``max_rounds`` (default ``min_rounds``) have run. ``after_round`` runs after each round, untimed here.
    """
    samples: dict[K, list[float]] = {key: [] for key in steps}
    start, rounds = time.perf_counter(), 0
    most = max_rounds if max_rounds is not None else min_rounds
    while rounds < min_rounds or (time.perf_counter() - start < seconds and rounds < most):
        rounds += 1
        for key, fn in steps.items():
            samples[key].append(timed(fn, settings.device))
        if after_round is not None:
            after_round()
    return samples, rounds


def median_ms(samples: list[float]) -> float:
    """The median of ``samples`` (seconds) in milliseconds; 0 for none."""
    return 1e3 * statistics.median(samples) if samples else 0.0


def paired_ratio(samples: list[float], reference: list[float]) -> float:
    """Median over rounds of a sample over the reference's of the same round: what ran back to back in one
    round shared the machine's state, so the pairing cancels drifts between rounds."""
    return statistics.median(a / b for a, b in zip(samples, reference, strict=True))


# ----------------------------------------------------------------------------- memory
def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[tuple[str, int]]) -> int:
    """Bytes of the storages behind ``tensors`` not already in ``seen`` (views share a storage); adds them."""
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


# ----------------------------------------------------------------------------- output
def markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment(settings: Settings) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "device": settings.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                           "machine": platform.machine()}
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


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the output to the tables while inside: model-loading notices, the callback's start-up line and the
    note that ``self.log`` is a no-op without a Trainer (the benchmark calls ``training_step`` without one).
    Everything is as it was afterwards, so a run inside another program leaves its logging alone."""
    import transformers

    lightning_logger = logging.getLogger("lightning.pytorch")
    level, verbosity = lightning_logger.level, transformers.logging.get_verbosity()
    progress_bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    lightning_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
            yield
    finally:
        lightning_logger.setLevel(level)
        transformers.logging.set_verbosity(verbosity)
        if progress_bar:
            transformers.utils.logging.enable_progress_bar()
