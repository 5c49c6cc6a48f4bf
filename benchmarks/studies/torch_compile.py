"""The torch.compile study: eager against compiled loss for LoRA and FlexLoRA, with FlexLoRA events between."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from benchmarks.harness import Settings, StudyResult, interleave, markdown, median_ms, register_study
from benchmarks.models import MODEL_SPECS
from benchmarks.runners import build_runners, train_step

METHODS = ("lora", "flexlora")


@contextmanager
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_rows(name: str, settings: Settings) -> list[dict]:
    """Eager against ``torch.compile`` of the objective (forward + γ·R), interleaved, an event every round."""
    spec = MODEL_SPECS[name](settings.smoke)
    gen = torch.Generator().manual_seed(0)
    batch = {k: v.to(settings.device) for k, v in spec.batch(gen).items()}
    precision = settings.precisions[-1]
    with fresh_dynamo():
        runners = build_runners(spec, METHODS, settings)
        variants = {(r.method, False): (r, r.objective) for r in runners}
        variants |= {(r.method, True): (r, torch.compile(r.objective, backend=settings.compile_backend))
                     for r in runners}

        def events() -> None:  # ranks move between every round: the compiled graph must survive it
            for runner in runners:
                if runner.event is not None:
                    runner.event()

        # Warm-up compiles; one event inside it, so a graph that depended on it would show now.
        for runner, fn in variants.values():
            for _ in range(max(settings.warmup, 2)):
                train_step(runner, batch, settings, precision, fn)
        events()
        graphs_after_warmup = compiled_graphs()
        steps = {key: (lambda r=runner, f=fn: train_step(r, batch, settings, precision, f))
                 for key, (runner, fn) in variants.items()}
        times, _ = interleave(steps, settings, settings.steps, after_round=events)
        recompiles = compiled_graphs() - graphs_after_warmup
    rows = []
    for method in METHODS:
        eager, compiled = median_ms(times[(method, False)]), median_ms(times[(method, True)])
        rows.append({"model": name, "precision": precision, "method": method, "backend": settings.compile_backend,
                     "eager_ms": eager, "compiled_ms": compiled, "compiled_x_eager": compiled / eager,
                     "new_graphs_after_warmup": recompiles})
    return rows


def compile_table(rows: list[dict]) -> str:
    headers = ["model", "method", "backend", "eager ms", "compiled ms", "compiled/eager",
               "graphs recompiled after warm-up (events every round)"]
    body = [[f"{r['model']} ({r['precision']})", r["method"], r["backend"], f"{r['eager_ms']:.1f}",
             f"{r['compiled_ms']:.1f}", f"{r['compiled_x_eager']:.3f}", str(r["new_graphs_after_warmup"])]
            for r in rows]
    return markdown(headers, body)


@register_study("compile", help="torch.compile against eager for lora and flexlora on --compile-models "
                                "(--no-compile)")
def compile_study(settings: Settings) -> StudyResult:
    """``torch.compile`` of the loss for LoRA and FlexLoRA against eager, with events between the rounds."""
    rows = [row for name in settings.compile_models for row in compile_rows(name, settings)]
    if not rows:
        return StudyResult({"compile": []})
    text = ("\n## torch.compile (loss = forward + γ·R compiled; backward through the compiled graph)\n\n"
            + compile_table(rows))
    return StudyResult({"compile": rows}, text)
