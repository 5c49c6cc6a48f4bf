"""``flexlora-export … --push-to-hub REPO_ID [--private]``, without ever touching the network.

A malformed repo id, offline mode and a missing token are refused before the checkpoint is read (nothing written,
locally or remotely); the upload goes through ``huggingface_hub.HfApi``, replaced here by a fake that records its
calls; a failed upload says that the local export is complete and where.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import huggingface_hub
import lightning
import pytest
import torch
from huggingface_hub import constants
from tiny_mlp import mlp_backbone

from flexlora_pl import FlexLoRAModule
from flexlora_pl.cli.export import main as export_main
from flexlora_pl.export import load
from flexlora_pl.export.hub import HubUploadError, check_push, push_export
from flexlora_pl.export.model_card import CARD_NAME

REPO = "my-user/tiny-flexlora"


class TinyMLPModule(FlexLoRAModule):
    """FlexLoRA on a tiny MLP whose constructor takes plain values, so a checkpoint rebuilds it."""

    def __init__(self, init_rank: int = 2) -> None:
        super().__init__(mlp_backbone, ["0", "2"], init_rank=init_rank, max_rank=4, alpha=4.0, modules_to_save=["6"])
        self.save_hyperparameters()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    module = TinyMLPModule()
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode off (the test suite runs with HF_HUB_OFFLINE=1) and a fake token in HF_TOKEN."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_FakeTokenForTheHubTests")


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token anywhere huggingface_hub looks: no HF_TOKEN and an empty Hugging Face home."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # read once, when the package loaded
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records its calls and what the folder held at upload time."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    fail_with: ClassVar[Exception | None] = None

    def create_repo(self, repo_id: str, **kwargs) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHub]:
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "calls", [])
    monkeypatch.setattr(FakeHub, "fail_with", None)
    return FakeHub


@pytest.fixture
def never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the checkpoint is read: a refusal must come before any work."""
    def read(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the push was refused")

    monkeypatch.setattr(load, "load_module_from_checkpoint", read)
    monkeypatch.setattr("flexlora_pl.export.load_module_from_checkpoint", read)


def refused(ckpt: Path, out: Path, capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(ckpt), "--out", str(out), "--format", "adapter",
                     "--module-class", f"{__name__}.TinyMLPModule", *flags])
    assert exit_info.value.code == 2
    assert not out.exists() and not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary
    return capsys.readouterr().err


@pytest.mark.parametrize("repo_id", ["my-user/", "a/b/c", "my user/model", "-lead/model", "my-user/mo..del"])
def test_a_malformed_repo_id_is_refused_before_any_work(ckpt, online, fake_hub, never_read, capsys, repo_id) -> None:
    err = refused(ckpt, ckpt.parent / "out", capsys, f"--push-to-hub={repo_id}")
    assert f"--push-to-hub {repo_id!r} is not a Hub repo id" in err and "owner/name" in err
    assert fake_hub.calls == []


def test_offline_mode_is_refused_before_any_work(ckpt, online, fake_hub, never_read, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = refused(ckpt, ckpt.parent / "out", capsys, "--push-to-hub", REPO)
    assert "offline mode (HF_HUB_OFFLINE=1): unset it to upload" in err and "no Hugging Face token" not in err
    assert "Nothing was exported" in err and fake_hub.calls == []


def test_a_missing_token_is_refused_before_any_work(ckpt, online, no_token, fake_hub, never_read, capsys) -> None:
    assert huggingface_hub.get_token() is None
    err = refused(ckpt, ckpt.parent / "out", capsys, "--push-to-hub", REPO)
    assert "no Hugging Face token was found" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert "offline" not in err and fake_hub.calls == []


def test_offline_and_without_a_token_both_are_named(no_token, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"offline mode .*; no Hugging Face token was found"):
        check_push(REPO)


def test_private_needs_push_to_hub(ckpt, never_read, capsys) -> None:
    assert "--private only applies with --push-to-hub" in refused(ckpt, ckpt.parent / "out", capsys, "--private")


@pytest.mark.parametrize("private", [False, True])
def test_push_uploads_the_finished_export(ckpt, online, fake_hub, capsys, private: bool) -> None:
    out = ckpt.parent / "out"
    args = ["--ckpt", str(ckpt), "--out", str(out), "--format", "adapter", "--module-class",
            f"{__name__}.TinyMLPModule", "--push-to-hub", REPO, *(["--private"] if private else [])]
    assert export_main(args) == 0
    (create, create_args), (upload, upload_args) = fake_hub.calls
    assert (create, upload) == ("create_repo", "upload_folder")
    assert create_args == {"repo_id": REPO, "private": private, "repo_type": "model", "exist_ok": True}
    assert upload_args["repo_id"] == REPO and Path(upload_args["folder_path"]) == out
    assert upload_args["files"] == sorted(p.name for p in out.iterdir()) and CARD_NAME in upload_args["files"]
    assert f"uploaded {out} to https://huggingface.co/{REPO}" in capsys.readouterr().out
    assert REPO in (out / CARD_NAME).read_text()  # the card's loading snippet names the repo


def test_a_failed_upload_says_the_local_export_is_complete(ckpt, online, fake_hub, capsys) -> None:
    fake_hub.fail_with = ConnectionError("Failed to resolve 'huggingface.co'")
    out = ckpt.parent / "out"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out), "--format", "adapter", "--module-class",
                        f"{__name__}.TinyMLPModule", "--push-to-hub", REPO]) == 1
    err = capsys.readouterr().err
    assert f"uploading to {REPO} failed (ConnectionError: Failed to resolve 'huggingface.co')" in err
    assert f"the local export in {out} is complete" in err and f"hf upload {REPO} {out}" in err
    assert (out / CARD_NAME).is_file() and (out / "flexlora_adapter.safetensors").is_file()
    with pytest.raises(HubUploadError, match="is complete"):
        push_export(out, REPO)
