"""The model card of an export: the ``README.md`` the Hugging Face Hub shows, written into every export folder.

:func:`build_model_card` reads the run folder the checkpoint lies in (``config.yaml``, ``metrics.json``,
``rank_pattern.json``, the heat-map) and the rebuilt module, and returns a :class:`ModelCard`:

* YAML front matter the Hub reads (``huggingface_hub.ModelCardData``): ``library_name`` (``peft`` for the peft
  adapter, ``transformers`` or ``timm`` for a merged model, ``flexlora_pl`` for the adapter-only checkpoint),
  ``base_model`` when the base is a hub model, ``license`` when the base's own card names one (read from the base
  folder or the local hub cache, never downloaded), ``datasets``, ``tags``, ``pipeline_tag`` and the scores of
  ``metrics.json`` as ``model-index`` (the test scores, else the best validation scores);
* the method and its settings, the final rank of every adapted matrix (a table; a method without ranks says so)
  and the heat-map of the run (``rank_heatmap.png`` next to the card);
* the training command (the run's ``config.yaml`` travels as ``training_config.yaml``) and how to load the export.

:func:`export_with_model_card` is the one place an export gets its card (``flexlora-export`` calls it for every
format): the format writes into a folder inside the atomic output, the card joins it, and only then is the
output renamed into place, so a failure leaves neither a half-written export nor one without its card. A
``README.md`` the format wrote itself (notes on what its files hold) becomes a section of the card.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from flexlora_pl.export.common import adapted, atomic_output, backbone_of, check_output_dir
from flexlora_pl.export.formats import ExportFormat
from flexlora_pl.methods.base import AdaptationMethod
from flexlora_pl.runs.run_folder import run_folder_of
from flexlora_pl.sources import looks_local

__all__ = ["CARD_NAME", "HEATMAP_NAME", "TRAINING_CONFIG_NAME", "ModelCard", "build_model_card",
           "export_with_model_card", "find_run_dir", "front_matter"]

CARD_NAME = "README.md"
HEATMAP_NAME = "rank_heatmap.png"
TRAINING_CONFIG_NAME = "training_config.yaml"
_RUN_FILES = ("config.yaml", "metrics.json", "rank_pattern.json")
_NO_RANKS = ("full", "bitfit")  # methods without a low-rank adapter: no "lora" tag

# the hub model a FlexLoRASequenceClassifier without model_name_or_path starts from (shipped in a pip package)
_DEFAULT_TEXT_BASE = "sentence-transformers/all-MiniLM-L6-v2"

# transformers class-name suffix -> (Hub pipeline tag, the Auto class that loads it)
_HEADS = {
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "ForQuestionAnswering": ("question-answering", "AutoModelForQuestionAnswering"),
    "ForCausalLM": ("text-generation", "AutoModelForCausalLM"),
    "ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
}

# data module class -> (dataset type for model-index, Hub dataset id or None, how its task is named)
_DATASETS = {
    "GLUEDataModule": ("nyu-mll/glue", "nyu-mll/glue", "GLUE {task}"),
    "VTABDataModule": ("vtab-1k", None, "VTAB-1k {task}"),
    "DigitsVTABDataModule": ("vtab-1k-digits", None, "VTAB-1k-style digits"),
    "CommonsenseDataModule": ("commonsense_170k", None, "commonsense reasoning"),
    "TextFilesDataModule": ("text-files", None, "own text files"),
    "TweetSentimentDataModule": ("tweet-sentiment", None, "tweet sentiment"),
}


@dataclass
class ModelCard:
    """A model card: ``README.md`` text and the files it refers to.

    Args:
        data: the front matter (what the Hub reads), as ``yaml.safe_load`` gives it back.
        body: the Markdown after the front matter.
        files: name -> content of the files written next to the card (the heat-map, the training config).
    """

    data: dict[str, Any]
    body: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The whole ``README.md``: front matter between ``---`` lines, then the body."""
        return f"---\n{yaml.safe_dump(self.data, sort_keys=False, allow_unicode=True)}---\n\n{self.body}"

    def write(self, directory: str | Path) -> Path:
        """Write ``README.md`` and its files into ``directory``; a ``README.md`` already there becomes a section.

        Returns:
            The path of the card.
        """
        directory = Path(directory)
        card = directory / CARD_NAME
        text = self.text
        notes = card.read_text().strip() if card.is_file() else ""
        if notes and not notes.startswith("---"):  # the format's notes on its files (e.g. PiSSA's adapter), not a card
            text += f"\n## Notes on these files\n\n{notes}\n"
        for name, content in self.files.items():
            (directory / name).write_bytes(content)
        card.write_text(text)
        return card


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (the part between the first two ``---`` lines); ``{}`` when it has none."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}
    data = yaml.safe_load("\n".join(lines[1:end]))
    return data if isinstance(data, dict) else {}


def find_run_dir(ckpt: str | Path) -> Path | None:
    """The run folder of a checkpoint: ``<run>/checkpoints/x.ckpt``'s ``<run>``, or the checkpoint's own folder when
    it holds a run's files (``config.yaml``, ``metrics.json``, ``rank_pattern.json``); ``None`` otherwise."""
    folder = run_folder_of(ckpt)
    candidates = ([folder.path] if folder is not None else []) + [Path(ckpt).resolve().parent]
    return next((c for c in candidates if any((c / name).is_file() for name in _RUN_FILES)), None)


def export_with_model_card(export_format: ExportFormat, module: nn.Module, out_dir: str | Path, card: ModelCard,
                           overwrite: bool = False, **options: Any) -> Path:
    """Write ``module`` in ``export_format`` with ``card`` into ``out_dir``, atomically, card included.

    The format writes into a fresh folder inside the temporary output (its writer keeps its own checks and
    atomicity); its files move up, the card joins them, and the whole output is renamed into place.

    Args:
        export_format: the registered format (:data:`~flexlora_pl.export.FORMATS`).
        module: what to export (a LightningModule or an adapted model).
        out_dir: output directory; must not exist or be empty unless ``overwrite``.
        card: the card, from :func:`build_model_card`.
        overwrite: replace an existing non-empty ``out_dir``.
        **options: the format's own options, by keyword.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty directory and ``overwrite`` is false.
    """
    out = check_output_dir(out_dir, overwrite)
    with atomic_output(out, overwrite) as tmp:
        inner = tmp / f".format-{secrets.token_hex(4)}"  # a name no format writes into its output
        export_format.write(module, inner, overwrite=False, **options)
        for entry in inner.iterdir():
            entry.rename(tmp / entry.name)
        inner.rmdir()
        card.write(tmp)
    return out


# --------------------------------------------------------------------------- building the card
def build_model_card(
    export_format: str,
    module: nn.Module,
    run_dir: str | Path | None = None,
    location: str | Path | None = None,
    repo_id: str | None = None,
    checkpoint: str | Path | None = None,
) -> ModelCard:
    """The model card of an export of ``module`` in ``export_format``.

    Args:
        export_format: the format's name (``peft``, ``merged``, ``adapter`` or another registered one).
        module: the module being exported (a LightningModule rebuilt from the checkpoint, or an adapted model).
        run_dir: the run folder (:func:`find_run_dir`); ``None``: a card without scores, settings or heat-map.
        location: the export folder, as the loading snippets name it when there is no ``repo_id``.
        repo_id: the Hub repo the export goes to (``--push-to-hub``): the snippets load from there.
        checkpoint: the checkpoint exported, named in the card.

    Returns:
        The card; nothing is written yet.

    Raises:
        ValueError: a file of the run folder is not valid JSON / YAML.
    """
    run = _RunFiles.read(Path(run_dir)) if run_dir is not None else _RunFiles()
    try:
        backbone, method = adapted(module)
    except ValueError:  # no adapter and no method (a format for plain modules): a card without method or ranks
        backbone, method = backbone_of(module), None
    method_name = method.name if method is not None else None
    library, pipeline_tag, auto_class = _library(export_format, backbone)
    base = _base_model(module, run.config)
    on_hub = repo_id is not None
    location = repo_id or (str(location) if location is not None else "path/to/export")
    split, metrics, scored_checkpoint = _scores(run.metrics)
    dataset = _dataset(run.config)
    ranks = dict(method.rank_pattern(backbone)) if method is not None else {}
    capacity = method.max_ranks(backbone) if ranks else {}
    files: dict[str, bytes] = {}
    heatmap = _heatmap(run) if ranks else None
    if heatmap is not None:
        files[HEATMAP_NAME] = heatmap
    if run.config_text is not None:
        files[TRAINING_CONFIG_NAME] = run.config_text.encode()

    data = _card_data(
        library=library, pipeline_tag=pipeline_tag, base=base, method=method_name, dataset=dataset,
        split=split, metrics=metrics, model_name=location.rstrip("/").rsplit("/", 1)[-1],
        license_=_base_license(base),
    )
    context = _Context(export_format, module, backbone, method, library, pipeline_tag, auto_class, base, location,
                       on_hub, checkpoint, run, dataset, split, metrics, scored_checkpoint, ranks, capacity,
                       heatmap is not None)
    return ModelCard(data=data, body=_body(context), files=files)


@dataclass
class _RunFiles:
    """What the run folder holds (each part ``None`` / empty when missing)."""

    config: dict[str, Any] = field(default_factory=dict)
    config_text: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, Any] = field(default_factory=dict)
    heatmap_png: bytes | None = None
    directory: Path | None = None

    @classmethod
    def read(cls, directory: Path) -> _RunFiles:
        found = cls(directory=directory)
        config = directory / "config.yaml"
        if config.is_file():
            found.config_text = config.read_text()
            try:
                found.config = yaml.safe_load(found.config_text) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{config} is not valid YAML ({err}): the model card cannot read the run") from err
        for name, target in (("metrics.json", "metrics"), ("rank_pattern.json", "ranks")):
            path = directory / name
            if path.is_file():
                try:
                    setattr(found, target, json.loads(path.read_text()))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} is not valid JSON ({err}): the model card cannot read it") from err
        png = directory / HEATMAP_NAME  # a logger that takes no image leaves the latest heat-map here
        found.heatmap_png = png.read_bytes() if png.is_file() else None
        return found


@dataclass
class _Context:
    export_format: str
    module: nn.Module
    backbone: nn.Module
    method: AdaptationMethod | None
    library: str | None
    pipeline_tag: str | None
    auto_class: str | None
    base: _Base
    location: str
    on_hub: bool
    checkpoint: str | Path | None
    run: _RunFiles
    dataset: _Dataset | None
    split: str | None
    metrics: dict[str, float]
    scored_checkpoint: str | None
    ranks: dict[str, int]
    capacity: dict[str, int]
    has_heatmap: bool


@dataclass(frozen=True)
class _Base:
    """The base model: as recorded (``recorded``) and as a Hub id (``hub_id``, ``None`` for a local folder)."""

    recorded: str | None
    hub_id: str | None
    folder: str | None = None
    timm: bool = False


@dataclass(frozen=True)
class _Dataset:
    name: str
    type: str
    hub_id: str | None
    config: str | None


def _library(export_format: str, backbone: nn.Module) -> tuple[str | None, str | None, str | None]:
    """``(library_name, pipeline_tag, transformers Auto class)`` of an export of ``backbone``."""
    is_timm = type(backbone).__module__.startswith("timm.")
    auto_class, pipeline_tag = None, "image-classification" if is_timm else None
    if _is_transformers(backbone):
        pipeline_tag, auto_class = next(
            (head for suffix, head in _HEADS.items() if type(backbone).__name__.endswith(suffix)), (None, "AutoModel"))
    if export_format == "peft":
        return "peft", pipeline_tag, auto_class
    if export_format == "merged":
        return ("transformers" if auto_class else "timm" if is_timm else None), pipeline_tag, auto_class
    if export_format == "adapter":
        return "flexlora_pl", pipeline_tag, auto_class
    return None, pipeline_tag, auto_class


def _is_transformers(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # not imported: the model cannot be one of its classes
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _base_model(module: nn.Module, config: Mapping[str, Any]) -> _Base:
    """Where the base came from: the module's hyper-parameters (else the run's config), as a Hub id when it is one."""
    hparams = dict(getattr(module, "hparams", None) or {})
    if not hparams:
        hparams = dict((config.get("model") or {}).get("init_args") or {})
    if "model_name" in hparams and "model_name_or_path" not in hparams:  # timm: a timm name, weights from the Hub
        name = hparams.get("model_name")
        local = hparams.get("pretrained_path")
        hub = f"timm/{name}" if name and not local else None
        return _Base(recorded=local or name, hub_id=hub, folder=local, timm=True)
    if "model_name_or_path" not in hparams:
        return _Base(recorded=None, hub_id=None)
    name = hparams["model_name_or_path"]
    if name is None:
        return _Base(recorded=_DEFAULT_TEXT_BASE, hub_id=_DEFAULT_TEXT_BASE)
    name = str(name)
    if looks_local(name) or os.path.isdir(os.path.expanduser(name)):
        return _Base(recorded=name, hub_id=_hub_id_of_folder(name), folder=name)
    return _Base(recorded=name, hub_id=name if _valid_repo_id(name) else None)


def _hub_id_of_folder(folder: str) -> str | None:
    """The Hub id a local base folder was saved from: its card's ``base_model``, else its config's name."""
    path = Path(os.path.expanduser(folder))
    card = path / CARD_NAME
    if card.is_file():
        named = front_matter(card.read_text()).get("base_model")
        if isinstance(named, str) and _valid_repo_id(named):
            return named
    config = path / "config.json"
    if config.is_file():
        try:
            named = json.loads(config.read_text()).get("_name_or_path")
        except json.JSONDecodeError:
            named = None
        if isinstance(named, str) and named and not looks_local(named) and not os.path.isdir(named) \
                and _valid_repo_id(named):
            return named
    return None


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _base_license(base: _Base) -> str | None:
    """The license the base model's own card names: from its folder, or from the local Hub cache (no download)."""
    text = None
    if base.folder is not None and (Path(os.path.expanduser(base.folder)) / CARD_NAME).is_file():
        text = (Path(os.path.expanduser(base.folder)) / CARD_NAME).read_text()
    elif base.hub_id is not None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base.hub_id, CARD_NAME)
        if isinstance(cached, str) and os.path.isfile(cached):
            text = Path(cached).read_text()
    named = front_matter(text).get("license") if text else None
    return named if isinstance(named, str) and named else None


def _scores(metrics: Mapping[str, Any]) -> tuple[str | None, dict[str, float], str | None]:
    """``(split, {metric: value}, checkpoint)``: the test scores, else validate's, else the best validation scores.

    Losses and non-finite values are left out; the names are those of ``metrics.json`` (``test/accuracy``).
    """
    sections = [("test", metrics.get("test") or {}), ("validation", metrics.get("validate") or {})]
    for split, section in sections:
        scores = _finite(section.get("metrics") or {}) if section.get("status") == "finished" else {}
        if scores:  # a test split with withheld labels has no finite score: the validation scores stand instead
            return split, scores, section.get("ckpt_path")
    best = (metrics.get("fit") or {}).get("best") or {}
    scores = _finite(best.get("metrics") or {})
    return ("validation", scores, best.get("checkpoint")) if scores else (None, {}, None)


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in values.items()
            if name != "step" and not name.endswith("/loss") and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


def _dataset(config: Mapping[str, Any]) -> _Dataset | None:
    data = config.get("data") or {}
    class_path = data.get("class_path") if isinstance(data, dict) else None
    if not class_path:
        return None
    args = data.get("init_args") or {}
    short = class_path.rsplit(".", 1)[-1]
    task = args.get("task_name") or args.get("task")
    kind, hub_id, label = _DATASETS.get(short, (short, None, short))
    if "{task}" in label:
        label = label.format(task=str(task).upper() if short == "GLUEDataModule" else task) if task else short
    return _Dataset(name=label, type=kind, hub_id=hub_id, config=str(task) if task is not None else None)


def _card_data(*, library: str | None, pipeline_tag: str | None, base: _Base, method: str | None,
               dataset: _Dataset | None, split: str | None, metrics: dict[str, float], model_name: str,
               license_: str | None) -> dict[str, Any]:
    """The front matter, built by ``huggingface_hub.ModelCardData`` (its ``model-index`` layout is the Hub's)."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(task_type=pipeline_tag or "other", dataset_type=dataset.type if dataset else "unknown",
                   dataset_name=dataset.name if dataset else "unknown", dataset_config=dataset.config if dataset
                   else None, dataset_split=split, metric_type=name.rsplit("/", 1)[-1], metric_value=value,
                   metric_name=name)
        for name, value in metrics.items()
    ]
    card = ModelCardData(
        library_name=library, base_model=base.hub_id, license=license_, pipeline_tag=pipeline_tag,
        datasets=[dataset.hub_id] if dataset and dataset.hub_id else None,
        tags=["flexlora_pl", *([method] if method else []), *(["lora"] if method and method not in _NO_RANKS else [])],
        model_name=model_name if results else None, eval_results=results or None,
    )
    return yaml.safe_load(card.to_yaml()) or {}


def _heatmap(run: _RunFiles) -> bytes | None:
    """The run's heat-map as PNG: the one a logger left in the run folder, else drawn from ``rank_pattern.json``."""
    if run.heatmap_png is not None:
        return run.heatmap_png
    if not run.ranks.get("events"):
        return None
    from flexlora_pl.figures.rank_heatmap import rank_heatmap

    figure = rank_heatmap(run.ranks)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")
    finally:
        figure.clear()
    return buffer.getvalue()


# --------------------------------------------------------------------------- the Markdown
_FORMAT_WORDS = {
    "peft": "a peft adapter (`adapter_config.json` + `adapter_model.safetensors`)",
    "merged": "the base model with the update merged into its weights (no adapter code needed)",
    "adapter": "a flexlora_pl adapter-only checkpoint (`flexlora_adapter.json` + `flexlora_adapter.safetensors`)",
}


def _body(c: _Context) -> str:
    title = c.location.rstrip("/").rsplit("/", 1)[-1]
    base = f"`{c.base.recorded}`" if c.base.recorded else "its base model"
    on = f" on {c.dataset.name}" if c.dataset else ""
    what = _FORMAT_WORDS.get(c.export_format, f"a `{c.export_format}` export")
    source = f" from `{Path(c.checkpoint).name}`" if c.checkpoint else ""
    parts = [
        f"# {title}\n",
        f"{what[0].upper()}{what[1:]} of {base}, fine-tuned{on} with {_method_words(c)} of flexlora_pl, "
        f"exported by `flexlora-export --format {c.export_format}`{source}.",
    ]
    if c.base.recorded and c.base.hub_id is None:
        parts.append(f"\nThe base model was loaded from the local folder {base}; the card names no `base_model`: set "
                     "it to the base's Hub id if it has one.")
    parts += [_results(c), _method(c), _ranks(c), _training(c), _loading(c)]
    note = _dequantized_note(c)
    if note:
        parts.append(f"\n## Quantization\n\n{note}")
    return "\n".join(parts) + "\n"


def _method_words(c: _Context) -> str:
    return f"the `{c.method.name}` method" if c.method is not None else "the `flexlora` command"


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _results(c: _Context) -> str:
    if not c.metrics:
        return "\n## Results\n\nThe run folder records no scores (no `metrics.json`, or no finished evaluation)."
    where = f" of `{c.scored_checkpoint}`" if c.scored_checkpoint else ""
    return (f"\n## Results\n\nThe {c.split} scores{where}, from the run's `metrics.json`:\n\n"
            + _table(("metric", "value"), [(name, value) for name, value in c.metrics.items()]))


def _method(c: _Context) -> str:
    model = c.run.config.get("model") or {}
    method_cfg = ((model.get("init_args") or {}).get("method") or {}) if isinstance(model, dict) else {}
    settings = method_cfg.get("init_args") or {}
    if c.method is None:
        return "\n## Method\n\nThe exported module records no adaptation method."
    lines = [f"\n## Method\n\n`{c.method.name}` (`{method_cfg.get('class_path') or type(c.method).__name__}`)."]
    if settings:
        lines.append("\n" + _table(("setting", "value"), sorted(settings.items())))
    realloc = c.run.config.get("reallocation")
    if getattr(c.method, "moves_ranks", False) and isinstance(realloc, dict) and realloc:
        lines.append("\nRank reallocation (`reallocation:`):\n\n" + _table(("setting", "value"), list(realloc.items())))
    facts = (c.run.metrics.get("run") or {}).get("method_facts") or {}
    if facts:
        lines.append("\n" + _table(("fact", "value"), list(facts.items())))
    counts = c.run.metrics.get("parameters") or {}
    if counts:
        lines.append("\nParameters: " + ", ".join(f"{key} {value:,}" for key, value in counts.items()
                                                   if isinstance(value, int)) + ".")
    return "\n".join(lines)


def _ranks(c: _Context) -> str:
    if not c.ranks:
        if c.method is None:
            return "\n## Ranks\n\nNo adaptation method, so no ranks: there is no rank table and no rank heat-map."
        return (f"\n## Ranks\n\n`{c.method.name}` trains without ranks (no low-rank adapter): there is no rank table "
                "and no rank heat-map.")
    rows = [(name, rank, c.capacity.get(name, "")) for name, rank in c.ranks.items()]
    lines = [f"\n## Ranks\n\nThe active rank of every adapted matrix in the export (total {sum(c.ranks.values())}; "
             "module paths relative to the base model):\n", _table(("module", "rank", "max rank"), rows)]
    if c.has_heatmap:
        lines.append(f"\n![Rank heat-map: active rank of every adapted matrix after each allocation event]"
                     f"({HEATMAP_NAME})\n\nThe rank of every adapted matrix (rows) after each allocation event "
                     "(columns) over the run.")
    return "\n".join(lines)


def _training(c: _Context) -> str:
    if c.run.config_text is None:
        return "\n## Training\n\nNo `config.yaml` was found next to the checkpoint: the training command is unknown."
    fit = c.run.metrics.get("fit") or {}
    run = c.run.metrics.get("run") or {}
    facts = [f"{fit['global_step']} optimizer steps" if "global_step" in fit else None,
             f"seed {run['seed']}" if run.get("seed") is not None else None,
             f"precision {run['precision']}" if run.get("precision") else None,
             f"flexlora_pl {run['versions'].get('flexlora_pl')}" if isinstance(run.get("versions"), dict) else None]
    said = ", ".join(f for f in facts if f)
    return (f"\n## Training\n\nTrained with flexlora_pl (the run's `config.yaml` is `{TRAINING_CONFIG_NAME}` here)"
            + (f": {said}" if said else "") + ".\n\n```bash\n"
            f"flexlora fit --config {TRAINING_CONFIG_NAME}\n```")


def _loading(c: _Context) -> str:
    where = _q(c.location)
    base = _q(c.base.hub_id or c.base.recorded or "<base model>")
    if c.export_format == "peft":
        if c.auto_class:
            labels = f", num_labels={_num_labels(c)}" if c.auto_class.endswith("Classification") else ""
            code = (f"from peft import PeftModel\nfrom transformers import {c.auto_class}\n\n"
                    f"base = {c.auto_class}.from_pretrained({base}{labels})\n")
        elif c.base.timm:
            code = (f"import timm\nfrom peft import PeftModel\n\n"
                    f"base = timm.create_model({_q(c.base.recorded)}, pretrained=True)\n")
        else:
            code = "from peft import PeftModel\n\nbase = ...  # the base model, built as for training\n"
        code += f"model = PeftModel.from_pretrained(base, {where})"
    elif c.export_format == "merged" and c.library == "transformers":
        code = f"from transformers import {c.auto_class}, pipeline\n\nmodel = {c.auto_class}.from_pretrained({where})"
        if c.pipeline_tag:
            code += f"\npipe = pipeline({_q(c.pipeline_tag)}, model={where})"
    elif c.export_format == "merged" and c.library == "timm":
        prefix = "hf-hub:" if c.on_hub else "local-dir:"
        code = ("import timm\n\n"
                f"model = timm.create_model({_q(prefix + c.location)}, pretrained=True)\n"
                "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))")
    elif c.export_format == "merged":
        code = ("from safetensors.torch import load_model\n\n"
                f"load_model(model, {_q(c.location + '/model.safetensors')})  # model: the base architecture")
    elif c.export_format == "adapter":
        code = (("from huggingface_hub import snapshot_download\n" if c.on_hub else "")
                + "from flexlora_pl.export import load_adapter_checkpoint\n\n"
                f"model = load_adapter_checkpoint(base, {f'snapshot_download({where})' if c.on_hub else where})"
                f"  # base: the plain base model, {base}")
    else:
        return (f"\n## How to load\n\nThis folder holds the `{c.export_format}` export of flexlora-export; see that "
                "format's documentation.")
    return f"\n## How to load\n\nWith {c.library or 'PyTorch'}:\n\n```python\n{code}\n```"


def _q(text: str | None) -> str:
    """A Python string literal in double quotes, as the loading snippets write them."""
    return json.dumps(str(text))


def _num_labels(c: _Context) -> int | str:
    config = getattr(c.backbone, "config", None)
    labels = getattr(config, "num_labels", None)
    return labels if isinstance(labels, int) else "..."


def _dequantized_note(c: _Context) -> str | None:
    """What an export of a run on a quantized base (``quantization: nf4 | fp4``) is: a merged one holds the base
    dequantized with the update added, in bfloat16; an adapter needs the base loaded as in training."""
    hparams = getattr(c.module, "hparams", None) or {}
    quantization = getattr(getattr(c.backbone, "config", None), "quantization_config", None) or hparams.get(
        "quantization")
    if not quantization:
        return None
    if isinstance(quantization, str):  # the causal-LM task's hyper-parameter: nf4 or fp4
        bits: Any = f"4 bits ({quantization})"
    else:
        get = quantization.get if isinstance(quantization, dict) else lambda key: getattr(quantization, key, None)
        bits = get("bits") or (4 if get("load_in_4bit") else None)
        bits = f"{bits} bits" if isinstance(bits, int) else bits
    if c.export_format == "merged":
        return (f"The base model was loaded quantized{f' to {bits}' if bits else ''}; the merged export holds "
                "its weights dequantized, with the update added in float32, saved in bfloat16: it is larger than the "
                "quantized base and needs no bitsandbytes.")
    return (f"The base model was trained quantized{f' to {bits}' if bits else ''}: load the base the same way "
            "before applying this adapter.")
