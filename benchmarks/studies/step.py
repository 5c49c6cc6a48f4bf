"""The step study: interleaved step time and peak memory of full fine-tuning, LoRA, AdaLoRA and FlexLoRA."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from benchmarks.harness import (
    Settings,
    StudyResult,
    interleave,
    markdown,
    median_ms,
    paired_ratio,
    register_study,
    timed,
)
from benchmarks.models import MODEL_SPECS
from benchmarks.runners import METHOD_NAMES, Batch, Runner, build_runners, peak_memory, train_step

TIME_GOAL, MEMORY_GOAL = 1.05, 1.05  # FlexLoRA ≤ 1.05× LoRA's step time; peak ≤ 1.05× LoRA's + r_max buffers


def benchmark_model(name: str, settings: Settings, precision: str, methods: Sequence[str] = METHOD_NAMES,
                    refused: dict[str, str] | None = None,
                    inspect: Callable[[dict[str, Runner], Batch], None] | None = None,
                    ) -> tuple[list[dict], dict | None]:
    """Interleaved step times and peak memory of ``methods`` (``lora`` among them) on one model.

    Returns the rows and the goal check of FlexLoRA against LoRA and AdaLoRA (``None`` when ``methods`` lacks one).
    ``refused``: as :func:`~benchmarks.runners.build_runners`' (methods that refuse this model are left out).
    ``inspect``: called with the runners (by method) and the batch once the timing is done, so a caller can take
    more steps of the same runners without building the model again.
    """
    if "lora" not in methods:
        raise ValueError(f"every ratio is to LoRA's step: methods {list(methods)} must include 'lora'")
    spec = MODEL_SPECS[name](settings.smoke)
    runners = {r.method: r for r in build_runners(spec, methods, settings, refused)}
    gen = torch.Generator().manual_seed(0)
    batch = {k: v.to(settings.device) for k, v in spec.batch(gen).items()}

    for runner in runners.values():
        for _ in range(settings.warmup):
            train_step(runner, batch, settings, precision)
    peaks = {m: peak_memory(r, batch, settings, precision) for m, r in runners.items()}

    events: dict[str, list[float]] = {m: [] for m in runners}

    def time_events() -> None:  # one event per method and round, after every method's step of that round
        for method, runner in runners.items():
            if runner.event is not None:
                events[method].append(timed(runner.event, settings.device))

    steps = {method: (lambda r=runner: train_step(r, batch, settings, precision)) for method, runner in runners.items()}
    # At least ``steps`` rounds; fast models go on for up to ``round_seconds`` (and 10× as many rounds),
    # since their millisecond steps are the noisiest.
    samples, rounds = interleave(steps, settings, settings.steps, settings.round_seconds, 10 * settings.steps,
                                 after_round=time_events)
    if inspect is not None:
        inspect(runners, batch)

    rows = []
    for method, runner in runners.items():
        event_ms = median_ms(events[method])
        amortised = [1e3 * t + event_ms / settings.delta_t for t in samples[method]]  # per round, ms
        rows.append({
            "model": name, "precision": precision, "method": method, "note": spec.note,
            "step_ms": statistics.median(amortised), "step_only_ms": median_ms(samples[method]),
            "event_ms": event_ms, "peak_bytes": peaks[method],
            "trainable_params": sum(p.numel() for p in runner.trainable()),
            "rounds": rounds, "step_samples_ms": amortised, "event_samples_ms": [1e3 * t for t in events[method]],
        })
    lora = next(r for r in rows if r["method"] == "lora")
    for row in rows:
        row["step_x_lora"] = paired_ratio(row["step_samples_ms"], lora["step_samples_ms"])
        row["peak_x_lora"] = row["peak_bytes"] / lora["peak_bytes"]
    goals = goal_check(rows, rmax_buffer_bytes(runners)) if {"flexlora", "adalora"} <= set(runners) else None
    return rows, goals


def rmax_buffer_bytes(runners: dict[str, Runner]) -> int:
    """What FlexLoRA's r_max capacity adds over LoRA's adapters: 4 copies (weight, gradient, two AdamW
    moments) of the extra adapter entries (the parameters each method names as its adapter)."""
    def adapter_bytes(runner: Runner) -> int:
        return sum(p.numel() * p.element_size() for p in runner.adapter_parameters())
    return 4 * (adapter_bytes(runners["flexlora"]) - adapter_bytes(runners["lora"]))


def goal_check(rows: list[dict], buffer_bytes: int) -> dict:
    by = {r["method"]: r for r in rows}
    flex, lora, ada = by["flexlora"], by["lora"], by["adalora"]
    memory_budget = MEMORY_GOAL * lora["peak_bytes"] + buffer_bytes
    time_vs_lora = paired_ratio(flex["step_samples_ms"], lora["step_samples_ms"])
    time_vs_adalora = paired_ratio(flex["step_samples_ms"], ada["step_samples_ms"])
    return {
        "model": flex["model"], "precision": flex["precision"],
        "time_vs_lora": time_vs_lora, "time_vs_adalora": time_vs_adalora,
        "peak_bytes": flex["peak_bytes"], "memory_budget_bytes": memory_budget,
        "rmax_buffer_bytes": buffer_bytes,
        "time_met": time_vs_lora <= TIME_GOAL,
        "below_adalora": time_vs_adalora < 1.0,
        "memory_met": flex["peak_bytes"] <= memory_budget,
    }


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


@register_study("step", help="step time and peak memory of full, lora, adalora, flexlora on --models")
def step_study(settings: Settings) -> StudyResult:
    """Step time and peak memory of every method on every model, at every precision."""
    rows, goals = [], []
    for precision in settings.precisions:
        for name in settings.models:
            model_rows, goal = benchmark_model(name, settings, precision)
            rows += model_rows
            if goal is not None:
                goals.append(goal)
    if not rows:
        return StudyResult({"results": [], "goals": []})
    rounds = {r["model"]: r["rounds"] for r in rows}
    models = "; ".join(f"{n}: {MODEL_SPECS[n](settings.smoke).note} ({rounds[n]} rounds)" for n in settings.models)
    text = f"{step_table(rows, settings.delta_t)}\n\nModels: {models}\n\nGoals\n{goal_lines(goals)}"
    return StudyResult({"results": rows, "goals": goals}, text)
