"""The rank heat-map (paper Figure 2): a labelled matplotlib figure, its (3, H, W) TensorBoard image, name
shortening, input checks, and the RankHeatmap callback inside a real Trainer.fit."""

from __future__ import annotations

import warnings

import lightning as L
import matplotlib
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import colormaps
from tiny_mlp import mlp_loader, mlp_module, mlp_trainer

import flexlora_pl.callbacks.rank_heatmap as rank_heatmap
from flexlora_pl import RankHeatmap, RankReallocation
from flexlora_pl.callbacks.rank_heatmap import heatmap_figure, render_heatmap, shorten_module_names

KINDS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense"]


def bert_names(layers: int, kinds: list[str] = KINDS) -> list[str]:
    """FlexLoRA layer names as ``FlexLoRAModule.flexlora_layers()`` yields them for a BERT backbone."""
    return [f"backbone.bert.encoder.layer.{i}.{kind}" for i in range(layers) for kind in kinds]


def demo_ranks(modules: int = 36, events: int = 14, r_max: int = 12) -> torch.Tensor:
    """A (modules, events) trajectory that spans 0..r_max, like a demo run's."""
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(1, r_max, (modules, events), generator=g)
    ranks[0, -1], ranks[1, -1] = 0, r_max
    return ranks


def labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


@pytest.fixture
def demo_figure():
    ranks = demo_ranks()
    fig = heatmap_figure(ranks, 12, module_names=bert_names(6), event_steps=[30 + 15 * e for e in range(14)])
    yield fig
    fig.clear()


# --------------------------------------------------------------------------- the image
def test_render_returns_a_large_chw_image_in_the_unit_range():
    image = render_heatmap(demo_ranks(), 12, module_names=bert_names(6), event_steps=list(range(14)))
    channels, height, width = image.shape
    assert channels == 3 and image.dtype == torch.float32
    # the old raw image was 36·6 × 14·6 = 216 × 84 px: one label line per row needs far more
    assert height >= 36 * 15 and width >= 600, f"image too small to read: {height}×{width}"
    assert image.min() >= 0.0 and image.max() <= 1.0
    # the viridis end colours of rank 0 and rank r_max appear among the pixels (the cells are drawn)
    pixels = image.permute(1, 2, 0).reshape(-1, 3)
    for rank in (0, 12):
        colour = torch.tensor(colormaps["viridis"](rank / 12)[:3], dtype=torch.float32)
        assert (pixels - colour).abs().max(dim=1).values.min() < 0.02, f"no cell in the colour of rank {rank}"


def test_dpi_scales_the_image():
    small = render_heatmap(demo_ranks(6, 3), 12, dpi=50)
    large = render_heatmap(demo_ranks(6, 3), 12, dpi=100)
    assert large.shape[1] == pytest.approx(2 * small.shape[1], abs=2)
    assert large.shape[2] == pytest.approx(2 * small.shape[2], abs=2)


def test_rendering_leaves_no_figure_behind_and_the_backend_alone():
    import matplotlib.pyplot as plt

    backend, before = matplotlib.get_backend(), plt.get_fignums()
    render_heatmap(demo_ranks(6, 3), 12)
    assert plt.get_fignums() == before, "render_heatmap opened a pyplot figure"
    assert matplotlib.get_backend() == backend


# --------------------------------------------------------------------------- the figure
def test_figure_has_title_axis_labels_and_a_zero_to_r_max_colour_bar(demo_figure):
    ax, colorbar_ax = demo_figure.axes
    assert ax.get_title() == "FlexLoRA rank allocation — step 225"
    assert ax.get_xlabel() == "allocation event (optimizer step)"
    assert ax.get_ylabel() == "adapted module (depth order)"
    assert colorbar_ax.get_ylabel() == "active rank"
    assert colorbar_ax.get_ylim() == (0, 12)
    ticks = [t for t in colorbar_ax.get_yticks() if 0 <= t <= 12]
    assert ticks[0] == 0 and ticks[-1] == 12 and all(float(t).is_integer() for t in ticks)
    (image,) = ax.get_images()
    assert image.get_cmap().name == "viridis"
    assert (image.norm.vmin, image.norm.vmax) == (0, 12)


def test_rows_are_the_shortened_module_names_and_columns_the_event_steps(demo_figure):
    ax = demo_figure.axes[0]
    rows = labels(ax.get_yticklabels())
    assert rows == [f"{i}.{kind}" for i in range(6) for kind in KINDS]
    assert list(ax.get_yticks()) == list(range(36))
    assert labels(ax.get_xticklabels()) == [str(30 + 15 * e) for e in range(14)]
    assert ax.yaxis_inverted(), "the first (shallowest) module must be the top row"


def test_without_names_or_steps_rows_and_columns_are_numbered():
    fig = heatmap_figure(demo_ranks(3, 2), 12)
    ax = fig.axes[0]
    assert labels(ax.get_yticklabels()) == ["module 0", "module 1", "module 2"]
    assert labels(ax.get_xticklabels()) == ["1", "2"]
    assert ax.get_title() == "FlexLoRA rank allocation"
    assert heatmap_figure(demo_ranks(3, 2), 12, title="mine").axes[0].get_title() == "mine"


def test_all_72_glue_rows_are_labelled_in_a_legible_font():
    fig = heatmap_figure(demo_ranks(72, 40), 12, module_names=bert_names(12), event_steps=list(range(40)))
    rows = fig.axes[0].get_yticklabels()
    assert labels(rows) == shorten_module_names(bert_names(12))
    assert min(t.get_fontsize() for t in rows) >= 6
    assert fig.get_figheight() * fig.dpi <= 1400, "the figure must still fit a screen"


def test_with_hundreds_of_rows_and_events_every_kth_is_labelled():
    names = [f"backbone.model.layers.{i}.{p}" for i in range(32) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    steps = [100 * (e + 1) for e in range(250)]
    fig = heatmap_figure(demo_ranks(224, 250), 12, module_names=names, event_steps=steps)
    ax = fig.axes[0]
    rows, columns = labels(ax.get_yticklabels()), labels(ax.get_xticklabels())
    assert 1 < len(rows) < 224 and 1 < len(columns) < 250
    row_stride = int(ax.get_yticks()[1] - ax.get_yticks()[0])
    column_stride = int(ax.get_xticks()[1] - ax.get_xticks()[0])
    assert list(ax.get_yticks()) == list(range(0, 224, row_stride))
    assert rows == shorten_module_names(names)[::row_stride]
    assert columns == [str(s) for s in steps[::column_stride]]
    # matplotlib hides a minor tick under a major one: together they mark every row
    assert set(ax.get_yticks()) | set(ax.yaxis.get_minorticklocs()) == set(range(224))
    assert fig.get_figheight() * fig.dpi <= 1400


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (bert_names(2, ["attention.self.query", "output.dense"]),
         ["0.attention.self.query", "0.output.dense", "1.attention.self.query", "1.output.dense"]),
        (["backbone.0", "backbone.2", "backbone.4"], ["0", "2", "4"]),
        (["backbone.blocks.0.attn.qkv"], ["qkv"]),  # a single module keeps its last component
        (["enc.a", "enc.a.b"], ["a", "a.b"]),  # a name that is another's prefix is not emptied
        (["encoder.q", "decoder.q"], ["encoder.q", "decoder.q"]),  # nothing shared: unchanged
        ([], []),
    ],
    ids=["bert", "sequential", "single", "nested", "no-shared-prefix", "empty"],
)
def test_shorten_module_names(names, expected):
    assert shorten_module_names(names) == expected


@pytest.mark.parametrize("names", [bert_names(12), ["m.a.x", "m.a.y", "m.b.x"], ["a", "a.b", "a.b.c"],
                                   ["x.0", "x.1", "x.10", "x.1.0"]])
def test_shortened_names_stay_unique(names):
    short = shorten_module_names(names)
    assert len(set(short)) == len(names) and all(short)


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("ranks", "r_max", "kwargs", "message"),
    [
        (torch.ones(5), 4, {}, r"non-empty \(modules, events\) matrix, got shape \(5,\)"),
        (torch.ones(0, 3), 4, {}, r"non-empty .* got shape \(0, 3\)"),
        (torch.ones(2, 3), 0, {}, r"r_max must be an integer >= 1, got 0"),
        (torch.ones(2, 3), 2.5, {}, r"r_max must be an integer >= 1, got 2.5"),
        (torch.full((2, 3), float("nan")), 4, {}, r"ranks must be finite"),
        (torch.ones(2, 3), 4, {"module_names": ["a"]}, r"module_names has 1 entries but ranks has 2 rows"),
        (torch.ones(2, 3), 4, {"event_steps": [1, 2]}, r"event_steps has 2 entries but ranks has 3 columns"),
        (torch.ones(2, 3), 4, {"dpi": 0}, r"dpi must be >= 1"),
    ],
    ids=["1d", "empty", "r_max-0", "r_max-float", "nan", "names-mismatch", "steps-mismatch", "dpi"],
)
def test_bad_inputs_raise_naming_the_problem(ranks, r_max, kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_heatmap(ranks, r_max, **kwargs)


# --------------------------------------------------------------------------- the callback
def test_callback_arguments_stay_compatible():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning unless cell is passed
        assert RankHeatmap().filename == "rank_pattern.json"
    with pytest.warns(DeprecationWarning, match="cell"):
        callback = RankHeatmap(filename="ranks.json", cell=8)
    assert callback.filename == "ranks.json"
    with pytest.warns(DeprecationWarning, match="cell"):
        assert render_heatmap(demo_ranks(3, 2), 12, cell=8).shape[0] == 3  # the notebook's call
    with pytest.raises(ValueError, match="filename must end in .json"):
        RankHeatmap(filename="ranks.txt")
    with pytest.raises(ValueError, match="cell must be >= 1"):
        RankHeatmap(cell=0)
    with pytest.raises(ValueError, match="dpi must be an integer >= 1"):
        RankHeatmap(dpi=0)


def test_callback_logs_a_labelled_image_during_fit(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls: list[dict] = []

    def spy(ranks, r_max, *args, **kwargs):
        image = render_heatmap(ranks, r_max, *args, **kwargs)
        calls.append({"ranks": ranks, "r_max": r_max, **kwargs, "shape": tuple(image.shape)})
        return image

    monkeypatch.setattr(rank_heatmap, "render_heatmap", spy)
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, b_schedule="constant")
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = mlp_trainer(tmp_path, [realloc, RankHeatmap()], max_epochs=2, logger=logger)
    trainer.fit(mlp_module(), mlp_loader(), val_dataloaders=mlp_loader(batches=2))

    steps = [event["step"] for event in realloc.history]
    assert steps == [5, 8, 11]
    assert len(calls) == 3  # epoch 1 validation, epoch 2 validation, fit end (no image before any event)
    last = calls[-1]
    assert last["module_names"] == realloc.layer_names == ["backbone.0", "backbone.2", "backbone.4"]
    assert last["event_steps"] == steps and last["r_max"] == 6
    assert torch.equal(last["ranks"], torch.tensor([e["ranks"] for e in realloc.history]).T)
    assert last["title"] == f"FlexLoRA rank allocation — step {trainer.global_step}"

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    images = events.Images("flexlora/rank_heatmap")
    assert [i.step for i in images] == [8, 16, 16]
    assert (images[-1].height, images[-1].width) == last["shape"][1:]
    assert (tmp_path / "run" / "version_0" / "rank_pattern.json").exists()


def test_heatmap_figure_matches_the_rendered_image():
    """The image is the figure, drawn: same pixel size (figure inches × dpi)."""
    fig = heatmap_figure(demo_ranks(), 12, module_names=bert_names(6), dpi=80)
    image = render_heatmap(demo_ranks(), 12, module_names=bert_names(6), dpi=80)
    width, height = fig.get_size_inches() * fig.dpi
    assert image.shape[1] == pytest.approx(height, abs=1) and image.shape[2] == pytest.approx(width, abs=1)


def test_the_figure_registry_draws_a_runs_rank_record():
    from matplotlib.figure import Figure

    from flexlora_pl.figures import FIGURES, register_figure

    record = {"rank_pattern": {"backbone.a": 3, "backbone.b": 1}, "max_rank": {"backbone.a": 4, "backbone.b": 4},
              "events": [{"step": 5, "ranks": [3, 1]}, {"step": 7, "ranks": [2, 2]}]}
    figure = FIGURES["rank_heatmap"](record)
    assert isinstance(figure, Figure)
    image = figure.axes[0].images[0].get_array()
    assert image.tolist() == [[3, 2], [1, 2]]  # modules × events
    with pytest.raises(ValueError, match="holds no allocation event"):
        FIGURES["rank_heatmap"]({**record, "events": []})
    with pytest.raises(ValueError, match="figure name 'rank_heatmap' is taken"):
        register_figure("rank_heatmap")(lambda record: None)
