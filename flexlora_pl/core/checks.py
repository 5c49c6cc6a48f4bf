"""Argument checks shared by every layer: one wording for "an integer ≥ n", "true or false", "one of …".

Each check raises ``ValueError`` naming the key, what it must be, and the value given; ``owner`` (a class or
config group, e.g. ``"RankReallocation"``) prefixes the message so the user knows where to look.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["require_bool", "require_choice", "require_int"]


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def require_int(name: str, value: Any, minimum: int | None = None, owner: str | None = None,
                hint: str | None = None) -> int:
    """``value`` if it is an integer (a bool is not) and at least ``minimum``; else a ``ValueError``.

    Args:
        name: the key, as the user writes it.
        value: the value to check.
        minimum: the smallest allowed value (``None``: any integer).
        owner: what the key belongs to, prefixed to the message.
        hint: what else the user should know about the value, shown in parentheses.
    """
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        note = f" ({hint})" if hint else ""
        raise ValueError(f"{_prefix(owner)}{name} must be an integer{bound}{note}, got {value!r}")
    return value


def require_bool(name: str, value: Any, owner: str | None = None) -> bool:
    """``value`` if it is ``True`` or ``False``; else a ``ValueError`` naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{_prefix(owner)}{name} must be true or false, got {value!r}")
    return value


def require_choice(name: str, value: Any, allowed: Iterable[str], owner: str | None = None) -> str:
    """``value`` if it is one of ``allowed``; else a ``ValueError`` listing them."""
    options = list(allowed)
    if value not in options:
        raise ValueError(f"{_prefix(owner)}{name}={value!r} is not one of {options}")
    return value
