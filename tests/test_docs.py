"""The worked examples of ``docs/extending.md`` run: the DoRA method registers and trains through
``FlexLoRAModule``, and the importance override is the one the callback's scores come from."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_glue_run, tiny_bert

from flexlora_pl import FlexLoRAModule

DOC = Path(__file__).parents[1] / "docs" / "extending.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def examples() -> dict:
    namespace: dict = {}
    for block in _python_blocks():
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_the_dora_example_registers_and_trains(examples):
    from flexlora_pl.methods import METHODS

    dora = examples["DoRA"]
    assert METHODS["dora"] is dora
    base = tiny_bert()
    inputs = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
    expected = base(**inputs).logits
    module = FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], init_seed=0,
                            method=dora(["query", "value"], r=2, alpha=4.0),
                            optimizer=functools.partial(torch.optim.AdamW, lr=0.05))
    module.eval()
    assert torch.allclose(module(**inputs).logits, expected, atol=1e-5)  # DoRA starts as the identity
    magnitudes = [p for n, p in module.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 4 and all(p.requires_grad for p in magnitudes)
    adapter = {id(p) for p in module.adapter_parameters()}
    assert all(id(p) in adapter for p in magnitudes)  # the magnitudes are in the optimizer's adapter group
    before = [p.detach().clone() for p in magnitudes]
    module.train()
    optimizer = module.configure_optimizers()
    loss = module.compute_loss({**inputs, "labels": torch.tensor([0, 1])})
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, magnitudes, strict=True))
    assert module.method_name == "dora"


def test_the_importance_override_example_scores_entropy_times_norm(examples, tmp_path, tiny_tokenizer_dir):
    from flexlora_pl.core.importance import importance_scores
    from flexlora_pl.methods import FlexLoRA

    make_tiny_glue_run(tmp_path, tiny_tokenizer_dir)
    module = examples["EntropyTimesNorm"](str(tmp_path / "model"), num_labels=2, init_seed=0,
                                          method=FlexLoRA(["query", "value"], init_rank=2, max_rank=4))
    for _, layer in module.flexlora_layers():
        layer.lora_lambda.data.uniform_(0.5, 1.5)
    layers = [layer for _, layer in module.flexlora_layers()]
    expected = importance_scores(layers, "entropy") * torch.stack([layer.masked_lambda().norm() for layer in layers])
    got = module.importance_scores("sensitivity")  # the override answers whatever metric is asked
    assert torch.allclose(got.float(), expected.float())
