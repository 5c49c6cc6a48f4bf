"""Share an export on the Hugging Face Hub: ``flexlora-export … --push-to-hub REPO_ID [--private]``.

:func:`check_push` runs before any work (before the checkpoint is read): the repo id must pass
``huggingface_hub``'s own validator, the Hub must not be in offline mode (``HF_HUB_OFFLINE``), and a token must be
found the way ``huggingface_hub`` finds one (``HF_TOKEN``, else the file ``hf auth login`` writes). The token is
only ever handed to ``huggingface_hub``: flexlora_pl never writes it anywhere (not into ``config.yaml``, the logs,
``metrics.json`` or the model card). :func:`push_export` creates the repo (``exist_ok``) and uploads the finished
local export; when that fails (no network, a refused token) the error says that the local export is complete and
where it is, so that it can be uploaded later.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HubUploadError", "check_push", "push_export"]

_TRUE = {"1", "on", "yes", "true"}


class HubUploadError(RuntimeError):
    """The upload failed after the local export was written (it is complete; the message says where)."""


def check_push(repo_id: str) -> None:
    """Refuse a push that cannot succeed, before any work: a malformed repo id, offline mode, or no token.

    Args:
        repo_id: the Hub repo, ``owner/name`` (or ``name`` for the token's own account).

    Raises:
        ValueError: the repo id is malformed, the Hub is in offline mode, or no token is found (one message names
            every problem and how to fix it).
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--push-to-hub {repo_id!r} is not a Hub repo id ({err}): give owner/name, e.g. "
                         "my-user/bert-flexlora-mrpc") from err
    problems = []
    offline = [name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(name, "").strip().lower() in _TRUE]
    if offline or constants.HF_HUB_OFFLINE:
        named = "=1, ".join(offline) + "=1" if offline else "HF_HUB_OFFLINE"
        problems.append(f"the Hub is in offline mode ({named}): unset it to upload")
    if not huggingface_hub.get_token():
        problems.append("no Hugging Face token was found (HF_TOKEN is unset and no token file exists): run "
                        "`hf auth login` or set HF_TOKEN to a token with write access")
    if problems:
        raise ValueError(f"--push-to-hub {repo_id}: " + "; ".join(problems) + ". Nothing was exported; without "
                         "--push-to-hub the export is written locally and can be uploaded later with "
                         f"`hf upload {repo_id} <out>`")


def push_export(out_dir: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Upload the export folder ``out_dir`` to the model repo ``repo_id``, creating the repo if it is new.

    Args:
        out_dir: the finished local export.
        repo_id: the Hub repo (checked by :func:`check_push` first).
        private: create the repo private (an existing repo keeps its visibility).
        commit_message: the upload's commit message.

    Returns:
        The repo's URL.

    Raises:
        HubUploadError: creating the repo or uploading failed; the local export is complete.
    """
    from huggingface_hub import HfApi

    out = Path(out_dir)
    api = HfApi()  # the token is the one huggingface_hub finds itself; it is never passed around here
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        target = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(repo_id=target, folder_path=str(out), repo_type="model",
                          commit_message=commit_message or "Upload a flexlora_pl export")
    except Exception as err:  # network, HTTP and auth errors of huggingface_hub and httpx alike
        first = str(err).splitlines()[0] if str(err) else ""
        raise HubUploadError(
            f"uploading to {repo_id} failed ({type(err).__name__}: {first}); the local export in {out} is complete: "
            f"upload it later with `hf upload {repo_id} {out}`"
        ) from err
    return str(url)
