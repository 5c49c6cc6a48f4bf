"""The rank figure, the rank trajectories and the rank table reach every logger: TensorBoard, MLflow (file and
SQLite stores), Weights & Biases (offline) and CSV, each through the real ``flexlora fit`` on the tiny run, read
back through the logger's own files or client; the run folder stays ``runs/<name>/version_<n>`` under each.
A logger that takes no image gets the PNG in the run folder; a logger whose package is missing is refused first.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_folder
from lightning.pytorch.loggers import Logger
from PIL import Image
from tiny_mlp import mlp_loader, mlp_module, mlp_trainer

from flexlora_pl import RankHeatmap, RankReallocation
from flexlora_pl.callbacks.logger_sinks import TABLE_COLUMNS
from flexlora_pl.cli import build_cli
from flexlora_pl.runs.logger_config import check_logger_installed

# One epoch of the tiny run (6 optimizer steps) with an allocation event at every step, so ranks move.
CHANGES = {"reallocation": {"t_warmup": 1, "delta_t": 1, "t_final": 1},
           "trainer": {"callbacks": [{"class_path": "flexlora_pl.RankHeatmap"},
                                     {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                      "init_args": {"save_last": True}}]}}
MLFLOW = "lightning.pytorch.loggers.MLFlowLogger"
WANDB = "lightning.pytorch.loggers.WandbLogger"


@pytest.fixture
def run_root(tmp_path, tiny_glue_root, monkeypatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return tiny_run_folder(tmp_path, tiny_glue_root, CHANGES)


def fit(root: Path, *flags: str):
    return build_cli(["fit", "--config", str(root / "run.yaml"), *flags])


def rank_record(run_folder: Path) -> dict:
    return json.loads((run_folder / "rank_pattern.json").read_text())


def expected_rows(record: dict) -> list[tuple[int, str, int]]:
    """The (step, module, rank) rows the run's rank_pattern.json implies."""
    names = list(record["rank_pattern"])
    return [(e["step"], name, rank) for e in record["events"] for name, rank in zip(names, e["ranks"], strict=True)]


def csv_rows(text: str) -> list[tuple[int, str, int]]:
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == TABLE_COLUMNS
    return [(int(r["step"]), r["module"], int(r["rank"])) for r in reader]


def assert_run_folder(cli, root: Path) -> Path:
    """The run folder is ``runs/tiny/version_0`` with what every run keeps; returns it."""
    folder = Path(cli.trainer.log_dir)
    assert folder == root / "runs" / "tiny" / "version_0"
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "metrics.json", "rank_pattern.json", "checkpoints"} <= names, names
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    record = rank_record(folder)
    assert len(record["events"]) >= 3
    assert len({tuple(e["ranks"]) for e in record["events"]}) > 1, "the ranks never moved"
    return folder


def assert_png(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.width >= 300 and image.height >= 200


# --------------------------------------------------------------------------- the four loggers
def test_tensorboard_gets_the_image_the_table_and_the_rank_curves(run_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = fit(run_root)
    folder = assert_run_folder(cli, run_root)
    record = rank_record(folder)
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [i.step for i in events.Images("flexlora/rank_heatmap")][-1] == cli.trainer.global_step
    table = events.Tensors("flexlora/rank_history/text_summary")[-1].tensor_proto.string_val[0].decode()
    first = next(iter(record["rank_pattern"]))
    assert f"| {record['events'][0]['step']} | {first} | {record['events'][0]['ranks'][0]} |" in table
    curve = events.Scalars(f"flexlora_rank/{first}")
    assert [(s.step, int(s.value)) for s in curve] == [(e["step"], e["ranks"][0]) for e in record["events"]]


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_mlflow_gets_the_figures_as_artifacts_and_the_ranks_as_metrics(run_root, store, monkeypatch):
    pytest.importorskip("mlflow")  # a [trackers] extra, installed by the dev extra
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens a file store only when asked to

    uri = f"file:{run_root / 'mlruns'}" if store == "file" else f"sqlite:///{run_root / 'mlflow.db'}"
    cli = fit(run_root, "--trainer.logger", MLFLOW, "--trainer.logger.init_args.tracking_uri", uri,
              "--trainer.logger.init_args.experiment_name", "tiny")
    folder = assert_run_folder(cli, run_root)
    record = rank_record(folder)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    if store == "sqlite":  # artifacts beside the database, never in ./mlruns of the folder the command ran in
        assert experiment.artifact_location.endswith(str(run_root / "mlflow-artifacts"))
    (run,) = client.search_runs([experiment.experiment_id])
    figures = [f.path for f in client.list_artifacts(run.info.run_id, "flexlora/rank_heatmap")]
    assert figures and figures[-1] == f"flexlora/rank_heatmap/step_{cli.trainer.global_step:07d}.png"
    assert_png(Path(client.download_artifacts(run.info.run_id, figures[-1], str(run_root))).read_bytes())
    table = Path(client.download_artifacts(run.info.run_id, "flexlora/rank_history.csv", str(run_root)))
    assert [row[:3] for row in csv_rows(table.read_text())] == expected_rows(record)
    first = next(iter(record["rank_pattern"]))
    history = client.get_metric_history(run.info.run_id, f"flexlora_rank/{first}")
    assert sorted((m.step, int(m.value)) for m in history) == [(e["step"], e["ranks"][0]) for e in record["events"]]
    assert client.get_metric_history(run.info.run_id, "val/score"), "the run's own metrics reach MLflow too"


def test_a_tracker_run_keeps_its_run_folder_and_resumes_from_it(run_root, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    flags = ("--trainer.logger", MLFLOW, "--trainer.logger.init_args.tracking_uri", f"file:{run_root / 'mlruns'}",
             "--trainer.logger.init_args.experiment_name", "tiny")
    folder = assert_run_folder(fit(run_root, *flags), run_root)
    saved = yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["logger"]
    assert [entry["class_path"] for entry in saved] == ["lightning.pytorch.loggers.CSVLogger", MLFLOW]
    resumed = fit(run_root, *flags, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert Path(resumed.trainer.log_dir) == folder and resumed.trainer.global_step == 12
    assert sorted(p.name for p in (run_root / "runs" / "tiny").iterdir()) == ["version_0"]


def test_wandb_offline_run_holds_the_images_the_table_and_the_rank_curves(run_root):
    wandb = pytest.importorskip("wandb")  # a [trackers] extra, installed by the dev extra

    try:
        cli = fit(run_root, "--trainer.logger", WANDB, "--trainer.logger.init_args.offline", "true")
        run = cli.trainer.loggers[1].experiment
        run_dir = Path(run.dir)
        run.finish()  # Lightning leaves the run open: close its log (this waits until the log is written)
    finally:
        wandb.finish()
    folder = assert_run_folder(cli, run_root)
    record = rank_record(folder)
    assert run_dir.is_relative_to(run_root / "runs" / "wandb"), run_dir
    images = sorted((run_dir / "media" / "images" / "flexlora").glob("rank_heatmap_*.png"))
    assert images, f"no heat-map in {run_dir}"
    assert_png(images[-1].read_bytes())
    tables = sorted((run_dir / "media" / "table" / "flexlora").glob("rank_history_*.table.json"))
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == list(TABLE_COLUMNS)
    assert [tuple(row[:3]) for row in table["data"]] == expected_rows(record)
    first, expected = next(iter(record["rank_pattern"])), [(e["step"], e["ranks"][0]) for e in record["events"]]
    (log,) = run_dir.parent.glob("*.wandb")
    deadline = time.monotonic() + 20
    while True:  # W&B's writer process may still be flushing the log when finish() returns
        curve = [(int(row["trainer/global_step"]), int(float(row[f"flexlora_rank/{first}"])))
                 for row in wandb_history(log) if f"flexlora_rank/{first}" in row]
        if curve == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert curve == expected


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows (key → JSON value) of an offline run's ``.wandb`` log: a LevelDB-style log of records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # 1 whole, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item})
    return rows


def test_csv_logger_gets_rank_history_csv_beside_its_metrics_and_the_png(run_root, caplog):
    with caplog.at_level(logging.INFO):
        cli = fit(run_root, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger")
    folder = assert_run_folder(cli, run_root)
    record = rank_record(folder)
    assert (folder / "metrics.csv").is_file()
    assert csv_rows((folder / "rank_history.csv").read_text()) == [
        (step, module, rank) for step, module, rank in expected_rows(record)]
    assert_png((folder / "rank_heatmap.png").read_bytes())
    said = [r.getMessage() for r in caplog.records if "rank heat-map is written to" in r.getMessage()]
    assert said == [f"RankHeatmap: CSVLogger takes no image: the rank heat-map is written to "
                    f"{folder / 'rank_heatmap.png'}"], "one line, once, says where the image is"
    first = next(iter(record["rank_pattern"]))
    with open(folder / "metrics.csv") as file:
        curve = [(int(r["step"]), int(float(r[f"flexlora_rank/{first}"]))) for r in csv.DictReader(file)
                 if r.get(f"flexlora_rank/{first}")]
    assert curve == [(e["step"], e["ranks"][0]) for e in record["events"]]


# --------------------------------------------------------------------------- other loggers, missing packages
class RecordingLogger(Logger):
    """A logger that takes only scalars, with a folder of its own."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root, self.metrics = root, []

    name = property(lambda self: "recording")
    version = property(lambda self: 0)
    save_dir = property(lambda self: str(self.root))

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_logger_without_images_gets_the_png_in_the_run_folder_and_one_line(tmp_path, caplog):
    logger = RecordingLogger(tmp_path / "elsewhere")
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, b_schedule="constant")
    trainer = mlp_trainer(tmp_path, [realloc, RankHeatmap()], max_epochs=2, logger=logger)
    with caplog.at_level(logging.INFO):
        trainer.fit(mlp_module(), mlp_loader(), val_dataloaders=mlp_loader(batches=2))
    png, table = tmp_path / "elsewhere" / "rank_heatmap.png", tmp_path / "elsewhere" / "rank_history.csv"
    assert_png(png.read_bytes())
    rows = csv_rows(table.read_text())
    assert [step for step, _, _ in rows] == [e["step"] for e in realloc.history for _ in realloc.layer_names]
    said = [r.getMessage() for r in caplog.records if "takes no image" in r.getMessage()]
    assert said == [f"RankHeatmap: RecordingLogger takes no image: the rank heat-map is written to {png}"]
    assert any("flexlora_rank/backbone.0" in metrics for _, metrics in logger.metrics), "scalars still arrive"


@pytest.mark.parametrize(("logger", "module"), [(MLFLOW, "mlflow"), (WANDB, "wandb")])
def test_a_logger_whose_package_is_missing_is_refused_before_any_run_folder(run_root, monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # import of it fails, as when it is not installed
    with pytest.raises(ValueError, match=rf"trainer.logger: \w+Logger needs the `{module}` package, which is not "
                                         r'installed; install the trackers extra: pip install -e "\.\[trackers\]"'):
        fit(run_root, "--trainer.logger", logger)
    assert not (run_root / "runs").exists()


def test_an_mlflow_file_store_that_mlflow_refuses_is_refused_first(run_root, monkeypatch):
    pytest.importorskip("mlflow.environment_variables")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"file store 'file:.*mlruns'.*--trainer.logger.init_args.tracking_uri "
                                         r"sqlite:///runs/mlflow.db"):
        fit(run_root, "--trainer.logger", MLFLOW, "--trainer.logger.init_args.tracking_uri",
            f"file:{run_root / 'mlruns'}")
    assert not (run_root / "runs").exists() and not (run_root / "mlruns").exists()


def test_installed_and_plain_loggers_pass_the_check():
    check_logger_installed("lightning.pytorch.loggers.TensorBoardLogger")
    check_logger_installed("my_project.loggers.Mine")
    with pytest.raises(ValueError, match="needs the `comet_ml` package.*pip install comet-ml"):
        check_logger_installed("lightning.pytorch.loggers.CometLogger")
