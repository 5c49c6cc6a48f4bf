"""Opening an Optuna study storage from its URL: a SQLite or server database, or a journal file.

Below every other room so that the search trial's callback (``callbacks/``) and the studies (``experiments/``)
open storages the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["JOURNAL_PREFIX", "StudyStorageError", "open_study_storage"]

JOURNAL_PREFIX = "journal:"


class StudyStorageError(ValueError):
    """A study storage that cannot be opened: the message names the URL, the reason and the fix."""


def open_study_storage(url: str) -> Any:
    """Open (and create, where it is a file) the study storage named by ``url``.

    Args:
        url: ``sqlite:///PATH``, a PostgreSQL or MySQL URL (``postgresql://user@host/db``), or ``journal:PATH`` (also
            any path ending in ``.journal``) for Optuna's journal file, which works on shared file systems where
            SQLite's locks do not.

    Raises:
        StudyStorageError: the storage cannot be opened; the message names the URL, the reason and the fix.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = url[len(JOURNAL_PREFIX):] if url.startswith(JOURNAL_PREFIX) else (url if url.endswith(".journal")
                                                                                  else None)
    try:
        if journal is not None:
            from optuna.storages.journal import JournalFileBackend

            Path(journal).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(journal))
        if "://" not in url:
            raise StudyStorageError(f"--storage {url!r} is neither a database URL (sqlite:///PATH, postgresql://..., "
                              "mysql://...) nor a journal file (journal:PATH); give one of those")
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url)
    except StudyStorageError:
        raise
    except Exception as err:  # a driver that is not installed, a server that does not answer, a bad path
        raise StudyStorageError(f"--storage {url!r} cannot be opened ({type(err).__name__}: {err}); check the URL, "
                                "that the server runs and its driver is installed (e.g. psycopg2 for PostgreSQL), or "
                                "leave --storage out for a SQLite file in the sweep's folder") from err
