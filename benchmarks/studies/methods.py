"""The methods study: every registered method's step time and peak memory as a ratio to LoRA's, in one run.

Each method of :data:`flexlora_pl.methods.METHODS` is built with its registry defaults through the same
``FlexLoRAModule`` and ``RankReallocation`` callback that training uses (:mod:`benchmarks.runners`), on copies of one
model (``--methods-models``; default ``minilm``, the demo's backbone), fed the same batch, and stepped in interleaved
rounds with LoRA, so that a drift of the machine hits every method alike. "×LoRA" is the median over rounds of the
step time divided by LoRA's in the same round, and the peak-memory ratio is that of one step's peak (see
:func:`benchmarks.runners.peak_memory`). The study prints the trainable parameter count of each method beside it.
"""

from __future__ import annotations

from benchmarks.harness import Settings, StudyResult, markdown, register_study
from benchmarks.models import MODEL_SPECS
from benchmarks.studies.step import benchmark_model
from flexlora_pl.methods import METHODS

#: the order of the table: the reference first, then the fixed-rank LoRA family, sampling, moving ranks, no adapter
ORDER = ("lora", "rslora", "dora", "pissa", "milora", "dylora", "adalora", "flexlora", "bitfit", "full")


def method_names() -> list[str]:
    """Every registered method, LoRA first, in :data:`ORDER` and then by name."""
    return sorted(METHODS, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))


def methods_table(rows: list[dict]) -> str:
    headers = ["model", "method", "trainable params", "step ms", "×LoRA", "peak MB", "×LoRA"]
    body = [[f"{r['model']} ({r['precision']})", r["method"], f"{r['trainable_params']:,}", f"{r['step_ms']:.1f}",
             f"{r['step_x_lora']:.3f}", f"{r['peak_bytes'] / 2**20:.1f}", f"{r['peak_x_lora']:.3f}"] for r in rows]
    return markdown(headers, body)


@register_study("methods", help="every registered method's step time and peak memory as a ratio to LoRA on "
                                "--methods-models")
def methods_study(settings: Settings) -> StudyResult:
    """Step time and peak memory of every registered method against LoRA on each of ``settings.methods_models``."""
    rows, refusals = [], []
    for precision in settings.precisions:
        for name in settings.methods_models:
            refused: dict[str, str] = {}
            model_rows, _ = benchmark_model(name, settings, precision, methods=method_names(), refused=refused)
            rows += model_rows
            refusals += [{"model": name, "precision": precision, "method": m, "reason": why}
                         for m, why in refused.items()]
    if not rows:
        return StudyResult({"methods": [], "methods_refused": refusals})
    notes = "; ".join(f"{n}: {MODEL_SPECS[n](settings.smoke).note}" for n in settings.methods_models)
    left_out = "".join(f"\n- {r['method']} on {r['model']}: not run, the method refuses it ({r['reason'][:160]})"
                       for r in refusals)
    return StudyResult({"methods": rows, "methods_refused": refusals},
                       f"Every registered method against LoRA\n\n{methods_table(rows)}\n\nModels: {notes}{left_out}")
