"""The docs match the code. Every worked example of ``docs/extending.md`` runs: the LoRA-FA method registers and
trains through ``FlexLoRAModule``, the importance override is the one the callback's scores come from, the new
task runs through the ``flexlora`` command, the new-direction initialisation draws what it says at an
event without changing the output, and the new export format is selectable through ``flexlora-export``. The
numbers and names the other docs quote are checked against the code."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_glue_run, tiny_bert

from flexlora_pl import FlexLoRAModule

DOCS = Path(__file__).parents[2] / "docs"
DOC = DOCS / "extending.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _block(language: str, containing: str) -> str:
    """The one ``language`` code block of extending.md that contains ``containing``."""
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S) if containing in b]
    assert len(blocks) == 1, f"expected one {language} block with {containing!r} in {DOC}, found {len(blocks)}"
    return blocks[0]


def _registries() -> list[dict]:
    """Every registry the examples write into; the fixture restores them so no other test file sees the examples."""
    from benchmarks.harness import STUDIES
    from flexlora_pl.core.allocation import EXPANSION_INITS
    from flexlora_pl.core.importance import IMPORTANCE_METRICS, STATEFUL_METRICS
    from flexlora_pl.export.formats import FORMATS
    from flexlora_pl.figures.registry import FIGURES
    from flexlora_pl.methods import METHODS

    return [METHODS, EXPANSION_INITS, IMPORTANCE_METRICS, STATEFUL_METRICS, FORMATS, FIGURES, STUDIES]


@contextlib.contextmanager
def _examples_run():
    """The namespace of extending.md's python blocks, run; on leaving, every registry is as it was before."""
    saved = [(registry, dict(registry)) for registry in _registries()]
    namespace: dict = {}
    try:
        for block in _python_blocks():
            exec(compile(block, str(DOC), "exec"), namespace)
        yield namespace
    finally:
        for registry, before in saved:
            registry.clear()
            registry.update(before)


@pytest.fixture(scope="module")
def examples():
    with _examples_run() as namespace:
        yield namespace


def test_the_examples_leave_the_registries_as_they_found_them():
    """Before, ``lora_fa`` stayed in ``METHODS`` after this module, and the benchmark smoke test on the same worker
    found one registered method more than the study had run."""
    before = [dict(registry) for registry in _registries()]
    with _examples_run():
        from flexlora_pl.methods import METHODS

        assert "lora_fa" in METHODS
    assert [dict(registry) for registry in _registries()] == before


def test_the_lora_fa_example_registers_and_trains_b_only(examples):
    from flexlora_pl.methods import METHODS

    lora_fa = examples["LoRAFA"]
    assert METHODS["lora_fa"] is lora_fa
    base = tiny_bert()
    inputs = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
    expected = base(**inputs).logits
    module = FlexLoRAModule(tiny_bert(), modules_to_save=["classifier"], init_seed=0,
                            method=lora_fa(["query", "value"], r=2, alpha=4.0),
                            optimizer=functools.partial(torch.optim.AdamW, lr=0.05))
    module.eval()
    assert torch.allclose(module(**inputs).logits, expected, atol=1e-5)  # B = 0: it starts as the identity
    a_factors = [p for n, p in module.named_parameters() if ".lora_A." in n]
    b_factors = [p for n, p in module.named_parameters() if ".lora_B." in n]
    assert len(a_factors) == len(b_factors) == 4
    assert not any(p.requires_grad for p in a_factors) and all(p.requires_grad for p in b_factors)
    assert {id(p) for p in module.adapter_parameters()} == {id(p) for p in b_factors}  # the optimizer's adapter
    before_a, before_b = [p.detach().clone() for p in a_factors], [p.detach().clone() for p in b_factors]
    module.train()
    optimizer = module.configure_optimizers()
    for _ in range(2):
        optimizer.zero_grad()
        module.compute_loss({**inputs, "labels": torch.tensor([0, 1])}).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before_a, a_factors, strict=True))  # A never moves
    assert all(not torch.equal(a, b) for a, b in zip(before_b, b_factors, strict=True))
    assert module.method_name == "lora_fa"


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


def test_every_python_block_is_covered_by_a_test():
    """A new example must come with a test: each block is one of those exercised in this file."""
    markers = ["class LoRAFA", "class EntropyTimesNorm", "class FirstTokenClassifier", "def uniform_init",
               "def participation_ratio", "def export_ranks", "def final_ranks"]
    blocks = _python_blocks()
    assert len(blocks) == len(markers)
    assert all(sum(marker in block for block in blocks) == 1 for marker in markers)


def test_the_task_example_runs_through_the_flexlora_command(tmp_path, monkeypatch):
    from flexlora_pl.callbacks.run_record import read_metrics
    from flexlora_pl.cli import build_cli

    (tmp_path / "my_tasks.py").write_text(_block("python", "class FirstTokenClassifier"))
    (tmp_path / "first_token.yaml").write_text(_block("yaml", "my_tasks.FirstTokenClassifier"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_tasks", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread
    try:
        fit = build_cli(["fit", "--config", "first_token.yaml"])
        build_cli(["test", "--config", "first_token.yaml", "--ckpt_path", "last"])
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("my_tasks", None)
    assert fit.model.num_labels == 2  # linked from the data module
    run = tmp_path / "runs" / "first_token" / "version_0"
    metrics = read_metrics(run)
    assert metrics["fit"]["status"] == "finished" and metrics["fit"]["global_step"] == 60
    assert metrics["run"]["method"] == "flexlora"
    assert 0.0 <= metrics["test"]["metrics"]["test/score"] <= 1.0
    pattern = json.loads((run / "rank_pattern.json").read_text())
    assert len(pattern["rank_pattern"]) == 12 and pattern["events"]
    assert len(set(pattern["rank_pattern"].values())) > 1  # the reallocation: group moved rank
    assert any((run / "checkpoints").glob("last*.ckpt"))


def _event_with(examples, **settings):
    """One allocation event on a tiny BERT under ``settings``; the module, the callback, the masks before it, the
    outputs before it and the decision."""
    import lightning as L

    from flexlora_pl import RankReallocation, flexlora_layers

    callback = RankReallocation(b0=2, t_warmup=0, t_final=0, delta_t=1, total_steps=10, seed=3,
                                b_schedule="constant", **settings)
    module = FlexLoRAModule(tiny_bert(), ["query", "value"], init_rank=2, max_rank=4, modules_to_save=["classifier"],
                            init_seed=0)
    layers = [layer for _, layer in flexlora_layers(module)]
    for i, layer in enumerate(layers):  # distinct spectra, so the event has a clear order
        layer.lora_lambda.data[: layer.init_rank] = torch.tensor([1.0, 0.1 * (i + 1)])
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    callback.setup(trainer, module, "fit")
    module.eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
    before_out = module(**inputs).logits
    masks = [layer.rank_mask.clone() for layer in layers]
    decision = callback.reallocate(trainer, module, step=1)
    return module, layers, callback, masks, (inputs, before_out), decision


def test_the_initialisation_example_draws_uniform_zero_impact_directions(examples):
    from flexlora_pl.core.allocation import EXPANSION_INITS

    assert EXPANSION_INITS["uniform"] is examples["uniform_init"]
    module, layers, callback, masks, (inputs, before_out), decision = _event_with(examples, init="uniform")
    assert len(decision.expand) == 2
    torch.testing.assert_close(module(**inputs).logits, before_out)  # λ = 0: zero impact
    for i in decision.expand:
        layer = layers[i]
        slot = int((layer.rank_mask & ~masks[i]).nonzero()[0])
        p, q = layer.lora_P[:, slot], layer.lora_Q[slot]
        assert float(layer.lora_lambda[slot]) == 0.0
        assert p.abs().max() <= layer.out_features ** -0.5 and q.abs().max() <= layer.in_features ** -0.5
        assert p.abs().min() > 0 and q.abs().max() > 0.5 * layer.in_features ** -0.5  # drawn, not zero
    assert callback.history[-1]["expanded"]  # the built-in bookkeeping still ran


def test_the_importance_example_is_selectable_and_decides_the_event(examples):
    from flexlora_pl import RankReallocation
    from flexlora_pl.core.importance import IMPORTANCE_METRICS

    assert IMPORTANCE_METRICS["participation"] is examples["participation_ratio"]
    assert float(examples["participation_ratio"](torch.tensor([1.0, 1.0]))) == pytest.approx(1.0)
    assert float(examples["participation_ratio"](torch.tensor([1.0, 0.0]))) == pytest.approx(0.5)
    _, layers, callback, _, _, decision = _event_with(examples, importance="participation")
    scores = callback.history[-1]["scores"]
    expected = [float(examples["participation_ratio"](torch.tensor([1.0, 0.1 * (i + 1)]))) for i in range(len(layers))]
    assert scores == pytest.approx(expected)
    # λ = [1, 0.1 (i + 1)]: the ratio grows with i, so the first two matrices prune and the last two expand
    assert decision.prune == (0, 1) and set(decision.expand) == {2, 3}
    with pytest.raises(ValueError, match="importance='participations' is not one of"):
        RankReallocation(importance="participations")


def test_the_export_format_example_is_selectable_in_flexlora_export(examples, tmp_path, tiny_tokenizer_dir, capsys):
    import lightning as L

    from flexlora_pl import prune_direction
    from flexlora_pl.cli.export import main
    from flexlora_pl.export import FORMATS
    from flexlora_pl.methods import FlexLoRA
    from flexlora_pl.tasks.sequence_classification import FlexLoRASequenceClassifier

    try:
        assert FORMATS["ranks"].write is examples["export_ranks"]
        make_tiny_glue_run(tmp_path, tiny_tokenizer_dir)
        module = FlexLoRASequenceClassifier(str(tmp_path / "model"), num_labels=2, init_seed=0,
                                            method=FlexLoRA(["query", "value"], init_rank=2, max_rank=4))
        prune_direction(next(layer for _, layer in module.flexlora_layers()))  # ranks that differ
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                    "pytorch-lightning_version": L.__version__}, tmp_path / "run.ckpt")
        args = ["--ckpt", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "ranks"), "--format", "ranks",
                "--module-class", "flexlora_pl.tasks.sequence_classification.FlexLoRASequenceClassifier"]
        with pytest.raises(SystemExit):
            main([*args, "--tokenizer", "x"])  # the merged format's flag
        assert "--tokenizer only applies to --format merged" in capsys.readouterr().err
        assert main([*args, "--indent", "1"]) == 0
        text = (tmp_path / "ranks" / "ranks.json").read_text()
        assert text.startswith('{\n "method": "flexlora"')
        expected = module.method.rank_pattern(module.backbone)
        assert json.loads(text) == {"method": "flexlora", "rank_pattern": expected,
                                    "max_ranks": dict.fromkeys(expected, 4)}
        assert sorted(set(expected.values())) == [1, 2]
    finally:
        FORMATS.pop("ranks", None)  # the registry as it was for the other tests


def test_faq_budget_table_is_what_the_schedule_computes():
    from flexlora_pl.core.schedule import budget_at, event_steps

    faq = (DOCS / "faq.md").read_text()
    total = -(-8551 // 32) * 20  # CoLA: 8,551 sentences, batch 32, 20 epochs
    assert f"T = {total:,}" in faq
    budgets = {step: budget_at(step, 4, 1000, 1000, total) for step in event_steps(1000, 1000, 200, total)}
    assert len(budgets) == 16 and "the 16 events" in faq
    assert [s for s, b in budgets.items() if b == 3] == [1200, 1400, 1600]
    assert [s for s, b in budgets.items() if b == 2] == [1800, 2000, 2200]
    assert [s for s, b in budgets.items() if b == 1] == [2400, 2600, 2800, 3000]
    assert [s for s, b in budgets.items() if b == 0] == list(range(3200, 4201, 200))
    for row in ("| 1200, 1400, 1600 | 3 |", "| 1800, 2000, 2200 | 2 |", "| 2400 – 3000 | 1 |", "| 3200 – 4200 | 0 |"):
        assert row in faq
    # the thresholds the FAQ quotes for b0 = 4 and b0 = 1, as fractions x of T - t_final
    for b0, x, expected in ((4, 0.043, 4), (4, 0.045, 3), (4, 0.144, 3), (4, 0.146, 2), (4, 0.278, 2), (4, 0.28, 1),
                            (4, 0.499, 1), (4, 0.501, 0), (1, 0.20, 1), (1, 0.21, 0)):
        assert budget_at(round(x * 100_000), b0, 0, 0, 100_000) == expected, (b0, x)


def test_method_and_faq_quote_the_code_defaults_and_option_names():
    import inspect

    from flexlora_pl import RankReallocation
    from flexlora_pl.core.importance import EPS
    from flexlora_pl.methods import FlexLoRA

    method = (DOCS / "method.md").read_text()
    flex = inspect.signature(FlexLoRA).parameters
    realloc = inspect.signature(RankReallocation).parameters
    assert (flex["init_rank"].default, flex["max_rank"].default, flex["alpha"].default) == (8, 12, 16.0)
    assert "| `init_rank`, `max_rank`, `alpha` | 8, 12, 16 |" in method
    assert flex["orth_reg_weight"].default == 0.1 and flex["orth_reg_form"].default == "squared"
    defaults = [realloc[k].default for k in ("b0", "t_warmup", "t_final", "delta_t")]
    assert f"| `b0`, `t_warmup`, `t_final`, `delta_t` | {', '.join(map(str, defaults))} |" in method
    named = [realloc[k].default for k in ("importance", "mode", "init", "r_min", "b_schedule")]
    assert "| `{}`, `{}`, `{}`, {}, `{}` |".format(*named) in method
    assert EPS == 1e-8 and "ε = 1e-8" in method
    for doc in ("method.md", "faq.md", "architecture.md"):
        text = (DOCS / doc).read_text()
        for option in re.findall(r"`reallocation\.(\w+)", text) + re.findall(r"`(\w+): ", text):
            assert option in realloc or option in flex or option in ("strategy", "precision", "max_rank"), (doc, option)


def test_architecture_names_files_that_exist():
    root = DOCS.parent
    text = (DOCS / "architecture.md").read_text()
    rows = re.findall(r"^\| `(flexlora_pl/[\w/.]+|configs/|notebooks/|benchmarks/|tests/)` \| (.*) \|$", text,
                      flags=re.M)
    assert len(rows) >= 10
    for folder, description in rows:
        assert (root / folder).exists(), folder
        if folder.endswith("/"):
            for name in re.findall(r"`(\w+\.(?:py|ipynb))`", description):
                assert (root / folder / name).is_file(), f"{folder}{name} is named in architecture.md but missing"


def test_the_benchmark_study_example_runs_in_the_benchmark(tmp_path, capsys, monkeypatch):
    """The study of "Add a benchmark study" registers and runs through ``benchmarks.step_time.main``. Its block is
    fenced ``py``, not ``python``: executed with the other examples it would register a study in every test's
    process, so this test alone runs it (and unregisters it)."""
    monkeypatch.syspath_prepend(str(DOCS.parent))  # ``benchmarks`` is a folder of the repository
    from benchmarks.harness import STUDIES
    from benchmarks.step_time import main

    namespace: dict = {}
    try:
        exec(compile(_block("py", "register_study"), str(DOC), "exec"), namespace)
        assert STUDIES["forward"].run is namespace["forward_study"]
        out = tmp_path / "forward.json"
        result = main(["--smoke", "--studies", "forward", "--models", "llama-tiny", "--steps", "1", "--json", str(out)])
    finally:
        STUDIES.pop("forward", None)
    stdout = capsys.readouterr().out
    assert "## Forward pass" in stdout and "| model | method | forward ms |" in stdout
    assert "| model | method | step ms |" not in stdout  # --studies ran this study alone
    rows = json.loads(out.read_text())["forward"]
    assert rows == result["forward"]
    assert [r["method"] for r in rows] == ["full", "lora", "adalora", "flexlora"]
    assert all(r["model"] == "llama-tiny" and r["forward_ms"] > 0 for r in rows)


def test_the_figure_example_draws_a_run_s_rank_record(examples, tmp_path):
    import json

    from matplotlib.figure import Figure

    from flexlora_pl.figures import FIGURES

    assert FIGURES["final_ranks"] is examples["final_ranks"]
    ranks = {"backbone.layer.0.query": 3, "backbone.layer.0.value": 1, "backbone.layer.1.query": 2}
    record = {"rank_pattern": ranks, "max_rank": dict.fromkeys(ranks, 4),
              "events": [{"step": 4, "ranks": [3, 1, 2]}]}
    (tmp_path / "rank_pattern.json").write_text(json.dumps(record))
    figure = FIGURES["final_ranks"](json.loads((tmp_path / "rank_pattern.json").read_text()))
    assert isinstance(figure, Figure)
    bars = figure.axes[0].patches
    assert [bar.get_height() for bar in bars] == [4, 4, 4, 3, 1, 2]  # capacity outlines, then the final ranks
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == ["0.query", "0.value", "1.query"]
    figure.savefig(tmp_path / "final_ranks.png")
    assert (tmp_path / "final_ranks.png").stat().st_size > 0
