"""The registry of export formats: what ``flexlora-export --format`` offers, and the flags each format takes.

A format is one file in this folder: a writer ``write(module, out_dir, overwrite=..., **options)`` that writes
``out_dir`` atomically (:func:`~flexlora_pl.export.common.atomic_output`), and one registry line at its end::

    register_format(ExportFormat("peft", "adapter_config.json + ...", export_peft_adapter,
                                 options=(FormatOption("--task-type", "peft task type, e.g. SEQ_CLS"),)))

``flexlora-export`` builds its ``--format`` choices, their help, the format flags and the checks of those
flags (a flag of another format is refused, a required one asked for) from :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FORMATS", "ExportFormat", "FormatOption", "register_format"]


@dataclass(frozen=True)
class FormatOption:
    """A flag of ``flexlora-export`` that a format takes; its value reaches the writer as a keyword argument.

    Args:
        flag: the flag, e.g. ``--tokenizer``; the writer's keyword is its name in snake case (``tokenizer``).
        help: what the value means, for ``--help``.
        metavar: the value's name in ``--help`` (default: the flag in capitals).
        required: whether the format needs the flag.
    """

    flag: str
    help: str
    metavar: str | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if not self.flag.startswith("--") or len(self.flag) < 3:
            raise ValueError(f"format option {self.flag!r} must be a long flag such as --tokenizer")

    @property
    def keyword(self) -> str:
        """The writer's keyword argument (and the ``argparse`` destination): ``--task-type`` -> ``task_type``."""
        return self.flag[2:].replace("-", "_")


@dataclass(frozen=True)
class ExportFormat:
    """One output format of ``flexlora-export`` and :mod:`flexlora_pl.export`.

    Args:
        name: the value of ``--format``.
        help: one line for ``--help``: what the output holds and what loads it.
        write: ``write(module, out_dir, overwrite=..., **options)``: writes the export of a LightningModule (or
            adapted model) into the new folder ``out_dir``, atomically; ``options`` are the given flags of
            ``options``, by keyword. What it returns is the caller's (the CLI ignores it).
        options: the flags the format takes besides the common ones (``--ckpt``, ``--out``, ``--overwrite``, …).
    """

    name: str
    help: str
    write: Callable[..., object]
    options: tuple[FormatOption, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"export format name {self.name!r} must be a non-empty word such as 'peft'")
        flags = [option.flag for option in self.options]
        if len(set(flags)) < len(flags):
            raise ValueError(f"export format {self.name!r} declares a flag twice: {flags}")


#: format name -> format; filled by :func:`register_format`, in registration order
FORMATS: dict[str, ExportFormat] = {}


def register_format(export_format: ExportFormat) -> ExportFormat:
    """Make ``export_format`` selectable by its name (``flexlora-export --format <name>``); returns it.

    A flag that several formats take must be declared by the same :class:`FormatOption` in each, so that its
    help and meaning are one.

    Raises:
        ValueError: the name is taken by another format, or a flag is declared otherwise by another format.
    """
    taken = FORMATS.get(export_format.name)
    if taken is not None and taken != export_format:
        raise ValueError(f"export format name {export_format.name!r} is taken (by {taken.write.__qualname__})")
    for other in FORMATS.values():
        for option in export_format.options:
            clash = next((o for o in other.options if o.flag == option.flag and o != option), None)
            if clash is not None and other.name != export_format.name:
                raise ValueError(
                    f"format {export_format.name!r} declares {option.flag} otherwise than format {other.name!r}: "
                    "share one FormatOption between them"
                )
    FORMATS[export_format.name] = export_format
    return export_format
