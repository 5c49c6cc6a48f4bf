"""Every shipped YAML under ``configs/`` parses with the real ``flexlora`` command (or the sweep loader).

Each folder of ``configs/`` has a kind: complete run configs parse alone; overrides parse composed over a run
config of their family and must change it; sweep files load with the sweep loader. A config in a folder this
table does not know fails the test, so a new folder cannot go untested.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).parents[2] / "configs"

# folder (relative to configs/) -> ("run", None) | ("override", the run config it composes over) | ("sweep", None)
FOLDER_KINDS = {
    ".": ("run", None),
    "vtab": ("run", None),
    "commonsense": ("run", None),
    "methods": ("override", "demo.yaml"),
    "ablations": ("override", "demo.yaml"),
    "schedules": ("override", "demo.yaml"),
    "vtab/overrides": ("override", "vtab/cifar.yaml"),
    "commonsense/overrides": ("override", "commonsense/llama3_8b_r8.yaml"),
    "sweeps": ("sweep", None),
}

SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def _folder(config: Path) -> str:
    return str(config.parent.relative_to(CONFIGS).as_posix())


def _printed(capsys, *configs: Path) -> dict:
    from flexlora_pl.cli import main

    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    return yaml.safe_load(out)


def _not_in(parsed, wanted, where: str = "") -> list[str]:
    """The keys of ``wanted`` whose values ``parsed`` does not hold (dicts: a subset; lists: item by item)."""
    if isinstance(wanted, dict):
        if not isinstance(parsed, dict):
            return [where or "(top)"]
        return [miss for key, value in wanted.items()
                for miss in (_not_in(parsed[key], value, f"{where}.{key}".lstrip(".")) if key in parsed
                             else [f"{where}.{key}".lstrip(".")])]
    if isinstance(wanted, list):
        if not isinstance(parsed, list) or len(parsed) != len(wanted):
            return [where]
        pairs = enumerate(zip(parsed, wanted, strict=True))
        return [miss for i, (a, b) in pairs for miss in _not_in(a, b, f"{where}[{i}]")]
    if isinstance(wanted, float) or isinstance(parsed, float):
        return [] if isinstance(parsed, int | float) and abs(float(parsed) - float(wanted)) <= 1e-12 else [where]
    return [] if parsed == wanted else [where]


def test_every_config_folder_has_a_kind():
    unknown = sorted({_folder(c) for c in SHIPPED} - set(FOLDER_KINDS))
    assert not unknown, f"configs/ folders without a kind in tests/integration/test_shipped_configs.py: {unknown}"
    assert len(SHIPPED) > 60


@pytest.mark.parametrize("config", SHIPPED, ids=[str(c.relative_to(CONFIGS)) for c in SHIPPED])
def test_every_shipped_config_parses(config, capsys):
    kind, base = FOLDER_KINDS[_folder(config)]
    if kind == "run":
        printed = _printed(capsys, config)
        assert printed["model"]["class_path"] and printed["data"]["class_path"]
    elif kind == "override":
        composed = _printed(capsys, CONFIGS / base, config)
        override = yaml.safe_load(config.read_text())
        assert override, f"{config.name} is empty"
        missing = _not_in(composed, override)
        assert not missing, f"{config.name} over {base}: these settings did not reach the parsed config: {missing}"
    else:
        from flexlora_pl.experiments.grid import load_sweep

        sweep = load_sweep(config)
        assert sweep.tasks and sweep.methods
