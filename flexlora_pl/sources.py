"""Where a base model or tokenizer comes from: a folder on disk, or a name on the Hugging Face hub.

Hub names are ``model`` or ``owner/model``. A name that is absolute, starts with ``.`` or ``~``, has more than
one ``/`` or a backslash can only be a folder; when that folder does not exist, the hub's own complaint
("Repo id must be in the form ...") would hide the real mistake, so :func:`require_folder` names it instead.
"""

from __future__ import annotations

import os

__all__ = ["looks_local", "require_folder"]


def looks_local(name: str) -> bool:
    """Whether ``name`` reads as a local path rather than a hub name such as ``owner/model``."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def require_folder(name: str, key: str, holds: str, hub_example: str) -> None:
    """Refuse a ``name`` that reads as a local path but is not an existing folder.

    Args:
        name: the configured value.
        key: the setting it came from, as the message names it (e.g. ``model_name_or_path``).
        holds: what the folder should hold, e.g. ``"the model's config.json and weights"``.
        hub_example: a hub name of the right kind, for the message.
    """
    if looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"{key}={name!r} is not an existing folder; give the folder that holds {holds} (relative "
                         f"paths are resolved from {os.getcwd()!r}) or a hub name such as {hub_example!r}")
