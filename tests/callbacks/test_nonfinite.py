"""A non-finite training loss stops the run with a message naming the step and the last good checkpoint,
before any checkpoint is written from the diverged state."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_mlp import mlp_loader, mlp_module, mlp_trainer

from flexlora_pl import RankReallocation


class DivergesAt:
    """Mixin: the task loss becomes NaN from optimizer step ``bad_step`` on."""

    bad_step = 5

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * float("nan") if self.trainer.global_step >= self.bad_step else loss


@pytest.mark.parametrize("every", [1, 4])
def test_nonfinite_loss_stops_before_overwriting_the_last_good_checkpoint(tmp_path, every):
    module = mlp_module()
    module.__class__ = type("Diverging", (DivergesAt, type(module)), {})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_last=True)
    realloc = RankReallocation(b0=1, t_warmup=1, t_final=1, delta_t=2)
    trainer = mlp_trainer(tmp_path, [realloc, ckpt], max_epochs=3, log_every_n_steps=1)
    L.seed_everything(0)
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(module, mlp_loader())
    message = str(info.value)
    assert "non-finite" in message and "optimizer step 5" in message
    good = tmp_path / "ckpt" / "last.ckpt"
    assert str(good) in message
    state = torch.load(good, weights_only=True)["state_dict"]
    floats = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(torch.isfinite(v).all() for v in floats)
    assert trainer.global_step <= 6  # stopped right away, not at the end of training
