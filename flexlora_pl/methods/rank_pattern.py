"""A fixed rank per module, read from a run's ``rank_pattern.json``: the ranks of LoRA's ``rank_pattern`` option.

At the end of a fit, :class:`~flexlora_pl.RankHeatmap` writes into the run folder::

    {"method": "flexlora", "global_step": T, "rank_pattern": {module: r_m(T)}, "max_rank": {module: r_max},
     "total_rank": Σ_m r_m(T), "events": [...]}

with every adapted module named relative to the LightningModule
(``backbone.bert.encoder.layer.0.attention.self.query``). Only ``rank_pattern`` is read here; a module may also
be named relative to the backbone (peft's names, ``bert.encoder.layer.0.attention.self.query``).
:func:`load_rank_pattern` checks the file; :meth:`FixedRankPattern.assign` checks the pattern against the modules
a backbone adapts. Every error names the option, the file and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora_pl.core.checks import require_int

__all__ = ["OPTION", "PATTERN_FILENAME", "REQUIRED", "FixedRankPattern", "load_rank_pattern"]

#: the option that takes a pattern, as the ``flexlora`` command spells it
OPTION = "--model.init_args.method.init_args.rank_pattern"
#: the file :class:`~flexlora_pl.RankHeatmap` writes into a run folder
PATTERN_FILENAME = "rank_pattern.json"
#: the placeholder of a config that needs a pattern but cannot name one (``configs/methods/lora_fixed_pattern.yaml``)
REQUIRED = "required"
#: the prefix of names relative to a LightningModule (what ``rank_pattern.json`` writes) over the backbone's own
_MODULE_PREFIX = "backbone."


@dataclass(frozen=True)
class FixedRankPattern:
    """A rank per module and where it came from.

    Attributes:
        ranks: module name -> rank (0: the module stays unadapted), as the source names them.
        source: the file read, or ``"inline"`` for a mapping given in the config.
        method: the method of the run that wrote the file (its ``method`` entry), ``None`` when not recorded.
    """

    ranks: dict[str, int] = field(default_factory=dict)
    source: str = "inline"
    method: str | None = None

    @property
    def total(self) -> int:
        """Σ_m r_m, the pattern's total rank."""
        return sum(self.ranks.values())

    def assign(self, targets: Sequence[str]) -> dict[str, int]:
        """The rank of every target module, by its name in the backbone, in the order of ``targets``.

        Args:
            targets: the exact names of the linear layers the backbone adapts.

        Raises:
            ValueError: an entry that names no target (or one that names a target twice), a target without an
                entry, or no rank above 0.
        """
        names = set(targets)
        ranks: dict[str, int] = {}
        unknown = []
        for key, rank in self.ranks.items():
            name = key if key in names else key.removeprefix(_MODULE_PREFIX)
            if name not in names:
                unknown.append(key)
            elif name in ranks:
                raise ValueError(f"{self._where()} names {name!r} twice (with and without {_MODULE_PREFIX!r}); "
                                 "keep one entry")
            else:
                ranks[name] = rank
        if unknown:
            raise ValueError(
                f"{self._where()}: {len(unknown)} of its modules match no target module of the backbone, e.g. "
                f"{unknown[:3]}; the target modules are named like {list(targets)[:4]}. Adapt the target_modules "
                "of the run that wrote the pattern (--model.init_args.method.init_args.target_modules) and the same "
                "base model, or remove those entries"
            )
        missing = [name for name in targets if name not in ranks]
        if missing:
            raise ValueError(
                f"{self._where()} has no rank for {len(missing)} target modules, e.g. {missing[:3]}: every adapted "
                "module takes its rank from the pattern, so that the run's total rank is the pattern's. Adapt the "
                "target_modules of the run that wrote it (--model.init_args.method.init_args.target_modules), or "
                "add their ranks to the pattern"
            )
        if not any(ranks.values()):
            raise ValueError(f"{self._where()} gives every module rank 0, so nothing would be adapted; give a "
                             "pattern with some rank above 0")
        return {name: ranks[name] for name in targets}

    def facts(self) -> dict[str, Any]:
        """What a run records of the pattern it was built with (``metrics.json``'s ``run.method_facts``)."""
        return {"rank_pattern_source": self.source, "rank_pattern_method": self.method,
                "rank_pattern": dict(self.ranks), "total_rank": self.total}

    def _where(self) -> str:
        return f"{OPTION} ({'an inline mapping' if self.source == 'inline' else self.source})"


def load_rank_pattern(source: str | os.PathLike | Mapping[str, int]) -> FixedRankPattern:
    """Read a rank pattern: a ``rank_pattern.json``, a run folder holding one, or a mapping module -> rank.

    Raises:
        ValueError: the :data:`REQUIRED` placeholder; a path that does not exist, a folder without the file, a
            file that is not JSON or has no ``rank_pattern`` mapping; an empty pattern, or a rank that is not an
            integer >= 0.
    """
    if isinstance(source, Mapping):
        return _checked(FixedRankPattern(dict(source)))
    if os.fspath(source) == REQUIRED:
        raise ValueError(
            f"{OPTION} is required by this config (configs/methods/lora_fixed_pattern.yaml): give the "
            f"{PATTERN_FILENAME} of the run whose final ranks to fix, e.g. {OPTION} "
            f"runs/<name>/version_<n>/{PATTERN_FILENAME}"
        )
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise ValueError(
            f"{OPTION}: {os.fspath(source)!r} does not exist; give the {PATTERN_FILENAME} that RankHeatmap wrote "
            f"into a FlexLoRA run folder (runs/<name>/version_<n>/{PATTERN_FILENAME}) or that folder"
        )
    if path.is_dir():
        folder, path = path, path / PATTERN_FILENAME
        if not path.is_file():
            below = sorted(str(p) for p in folder.glob(f"*/{PATTERN_FILENAME}"))[:3]
            fix = (f"give one of the run folders below it: {below}" if below else
                   "give the run folder of a fit with the RankHeatmap callback (the shipped configs add it), or "
                   "the pattern file itself")
            raise ValueError(f"{OPTION}: the folder {os.fspath(folder)!r} holds no {PATTERN_FILENAME}; {fix}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{OPTION}: {os.fspath(path)!r} is not a JSON file ({err}); give the {PATTERN_FILENAME} "
                         "that RankHeatmap wrote") from err
    ranks = record.get("rank_pattern") if isinstance(record, dict) else None
    if not isinstance(ranks, dict):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{OPTION}: {os.fspath(path)!r} has no 'rank_pattern' mapping (found {found}); give the "
            f"{PATTERN_FILENAME} that RankHeatmap wrote: {{\"rank_pattern\": {{module: rank, ...}}, \"max_rank\": "
            "..., \"events\": [...]}"
        )
    method = record.get("method")
    return _checked(FixedRankPattern(ranks, os.fspath(path), method if isinstance(method, str) else None))


def _checked(pattern: FixedRankPattern) -> FixedRankPattern:
    if not pattern.ranks:
        raise ValueError(f"{pattern._where()} lists no module; give the pattern of a run that adapted some")
    for name, rank in pattern.ranks.items():
        require_int(f"the rank of {name!r}", rank, 0, owner=pattern._where(),
                    hint="0 leaves the module unadapted; fix the entry or take the file of another run")
    return pattern
