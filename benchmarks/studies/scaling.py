"""The scaling study: the FlexLoRA work that grows with the number of adapted modules, on real architectures."""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.harness import Settings, StudyResult, markdown, median_ms, register_study, timed
from benchmarks.models import ARCHS
from benchmarks.runners import adapted_module, module_runner
from flexlora_pl import FlexLoRALinear, FlexLoRAModule


def materialise_adapter(layer: FlexLoRALinear, device: str, gen: torch.Generator) -> None:
    """Give a FlexLoRA layer whose frozen base lives on the meta device real factors (unit-scale columns and
    rows, λ drawn, the first r_init directions active): the adapter is real, the base costs no memory."""
    d_in, d_out, r_max = layer.in_features, layer.out_features, layer.max_rank
    layer.lora_P = nn.Parameter((torch.randn(d_out, r_max, generator=gen) / math.sqrt(d_out)).to(device))
    layer.lora_Q = nn.Parameter((torch.randn(r_max, d_in, generator=gen) / math.sqrt(d_in)).to(device))
    layer.lora_lambda = nn.Parameter(torch.randn(r_max, generator=gen).to(device))
    layer.rank_mask = (torch.arange(r_max) < layer.init_rank).to(device)


def adapter_only_module(arch: str, device: str) -> FlexLoRAModule:
    """FlexLoRA, as the registry builds it, on every matrix of ``arch`` (bases on the meta device)."""
    _, n_layers, shapes = ARCHS[arch]
    backbone = nn.Sequential(*(nn.Linear(d_in, d_out, bias=False, device="meta")
                               for _ in range(n_layers) for d_in, d_out in shapes))
    module = adapted_module("flexlora", backbone, [r"re:\d+"], [])
    gen = torch.Generator().manual_seed(0)
    for _, layer in module.flexlora_layers():
        materialise_adapter(layer, device, gen)
    return module


def scaling_row(arch: str, settings: Settings) -> dict:
    label = ARCHS[arch][0]
    module = adapter_only_module(arch, settings.device)
    runner = module_runner(module, settings)
    layers = [layer for _, layer in module.flexlora_layers()]

    def regulariser_step() -> None:
        module.orthogonality_loss().backward()  # R as the module computes it (FlexLoRA's regulariser)

    regulariser_step()
    runner.optimizer.step()  # AdamW state exists, so the events do their optimizer-state surgery
    orth = [timed(regulariser_step, settings.device) for _ in range(settings.scaling_repeats)]
    event = [timed(runner.event, settings.device) for _ in range(settings.scaling_repeats)]
    orth_ms, event_ms = median_ms(orth), median_ms(event)
    adapter_params = sum(p.numel() for p in module.adapter_parameters())
    return {
        "arch": arch, "label": label, "modules": len(layers),
        "adapter_params": adapter_params,
        "orth_ms": orth_ms, "orth_us_per_module": 1e3 * orth_ms / len(layers),
        "orth_ms_per_m_params": orth_ms / (adapter_params / 1e6),
        "event_ms": event_ms, "event_us_per_module": 1e3 * event_ms / len(layers),
        "event_per_step_ms": event_ms / settings.delta_t,
    }


def scaling_table(rows: list[dict], delta_t: int) -> str:
    headers = ["modules", "adapters of", "adapter params (r_max)", "R fwd+bwd ms", "R ms per M params",
               "event ms", "event µs/module", f"event ÷ {delta_t} ms/step"]
    body = [[str(r["modules"]), r["label"], f"{r['adapter_params'] / 1e6:.2f}M", f"{r['orth_ms']:.2f}",
             f"{r['orth_ms_per_m_params']:.2f}", f"{r['event_ms']:.2f}", f"{r['event_us_per_module']:.1f}",
             f"{r['event_per_step_ms']:.3f}"] for r in rows]
    return markdown(headers, body)


@register_study("scaling", help="FlexLoRA's regulariser and one event against the module count (--no-scaling)")
def scaling_study(settings: Settings) -> StudyResult:
    """The orthogonality term and one allocation event on the adapters of real architectures."""
    rows = [scaling_row(arch, settings) for arch in settings.scaling]
    if not rows:
        return StudyResult({"scaling": []})
    text = ("\n## Scaling: FlexLoRA work that grows with the number of adapted modules\n\n"
            + scaling_table(rows, settings.delta_t))
    return StudyResult({"scaling": rows}, text)
