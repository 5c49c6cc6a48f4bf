"""RankReallocation inside a real Trainer.fit: when events fire, what they change, and exact resume."""

from __future__ import annotations

import functools
import itertools
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexlora_pl import FlexLoRAModule, LinearWarmupDecay, RankReallocation, event_steps


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 4),
    )


def _module(**kwargs) -> FlexLoRAModule:
    defaults = {
        "backbone": _backbone,
        "target_modules": ["0", "2", "4"],
        "init_rank": 3,
        "max_rank": 6,
        "alpha": 6.0,
        "modules_to_save": ["6"],
        "optimizer": functools.partial(torch.optim.AdamW, lr=5e-2, weight_decay=0.01),
        "lr_scheduler": functools.partial(LinearWarmupDecay, warmup_ratio=0.1),
    }
    return FlexLoRAModule(**{**defaults, **kwargs})


def _loader(batches: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 16, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 5] > 1).long()) % 4
    # a private generator, as flexlora_pl's data modules use: the loader then never draws from the global
    # RNG, which the checkpoint restores for dropout
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, generator=torch.Generator())


def _trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = {
        "default_root_dir": tmp_path, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class _Recorder(Callback):
    """Records the learning rate and the active ranks after every optimizer step."""

    def __init__(self):
        self.lrs: dict[int, float] = {}
        self.ranks: dict[int, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.lrs[step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.ranks[step] = [layer.rank for _, layer in pl_module.flexlora_layers()]


def test_events_fire_at_the_expected_steps_and_ranks_move(tmp_path):
    L.seed_everything(0)
    realloc = RankReallocation(b0=2, t_warmup=4, t_final=6, delta_t=3, b_schedule="constant")
    recorder = _Recorder()
    module = _module()
    trainer = _trainer(tmp_path, [realloc, recorder], max_epochs=5)
    trainer.fit(module, _loader())
    total = 5 * 8
    assert [e["step"] for e in realloc.history] == list(event_steps(4, 6, 3, total)) == [7, 10, 13, 16, 19, 22,
                                                                                        25, 28, 31]
    first = [3, 3, 3]
    assert recorder.ranks[6] == first
    assert recorder.ranks[40] != first, "ranks never moved"
    assert all(sum(r) == 9 for r in recorder.ranks.values()), "total rank must be conserved"
    changes = [s for s in range(2, 41) if recorder.ranks[s] != recorder.ranks[s - 1]]
    assert set(changes) <= {e["step"] for e in realloc.history}
    assert realloc.history[-1]["ranks"] == recorder.ranks[40]


def test_events_count_optimizer_steps_under_gradient_accumulation(tmp_path):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    recorder = _Recorder()
    trainer = _trainer(tmp_path, [realloc, recorder], max_epochs=4, accumulate_grad_batches=3)
    trainer.fit(_module(), _loader(batches=9))
    total = 4 * 9 // 3
    assert trainer.global_step == total
    assert [e["step"] for e in realloc.history] == list(event_steps(2, 2, 2, total)) == [4, 6, 8]


def test_lr_schedule_keeps_decaying_through_events(tmp_path):
    L.seed_everything(0)
    realloc = RankReallocation(b0=2, t_warmup=4, t_final=4, delta_t=2, b_schedule="constant")
    recorder = _Recorder()
    trainer = _trainer(tmp_path, [realloc, recorder], max_epochs=4)
    module = _module()
    trainer.fit(module, _loader())
    lrs = [recorder.lrs[s] for s in sorted(recorder.lrs)]
    peak = max(lrs)
    after_peak = lrs[lrs.index(peak):]
    assert all(b < a for a, b in itertools.pairwise(after_peak)), "LR must decay monotonically to the end"
    assert lrs[-1] < 0.1 * peak
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.01
    assert len(realloc.history) >= 5


def test_resume_between_events_reproduces_the_uninterrupted_run(tmp_path):
    def run(root, ckpt_path=None):
        L.seed_everything(0)
        realloc = RankReallocation(b0=2, t_warmup=4, t_final=6, delta_t=3, b_schedule="cubic", seed=11)
        ckpt = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        trainer = _trainer(root, [realloc, ckpt], max_epochs=6)
        module = _module(dropout=0.2)  # dropout draws from the global RNG: the checkpoint must restore it
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
        return module, realloc

    full, full_realloc = run(tmp_path / "full")
    # epoch=1 ends at step 16, between the events at 16 and 19 (the one at 16 is in the checkpoint)
    resumed, resumed_realloc = run(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert resumed_realloc.history == full_realloc.history
    assert len(full_realloc.history) >= 6
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, name


def test_callback_validates_arguments():
    with pytest.raises(ValueError, match="b0 must be an integer >= 0"):
        RankReallocation(b0=-1)
    with pytest.raises(ValueError, match="delta_t must be an integer >= 1"):
        RankReallocation(delta_t=0)
    with pytest.raises(ValueError, match="importance='entropyy' is not one of"):
        RankReallocation(importance="entropyy")
    with pytest.raises(ValueError, match="mode='both' is not one of"):
        RankReallocation(mode="both")
    with pytest.raises(ValueError, match="init='gaussian' is not one of"):
        RankReallocation(init="gaussian")
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        RankReallocation(total_steps=0)


def test_a_schedule_that_can_never_fire_raises_before_training_or_warns_if_allowed(tmp_path):
    realloc = RankReallocation(t_warmup=30, t_final=20, delta_t=5)
    trainer = _trainer(tmp_path, [realloc], max_epochs=1)
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"never fire: with t_warmup=30, t_final=20 .* run of 8 optimizer steps"):
        trainer.fit(module, _loader())
    assert all(torch.equal(before[k], module.state_dict()[k]) for k in before), "trained before refusing"

    realloc = RankReallocation(t_warmup=30, t_final=20, delta_t=5, allow_no_events=True)
    trainer = _trainer(tmp_path, [realloc], max_epochs=1)
    with pytest.warns(UserWarning, match="will never fire"):
        trainer.fit(_module(), _loader())
    assert realloc.history == []


def test_module_warns_without_the_callback_and_reports_counts(tmp_path):
    module = _module()
    counts = module.parameter_counts()
    per_direction = (16 + 32 + 1) + 2 * (32 + 32 + 1)
    assert counts["active"] == 3 * per_direction
    assert counts["allocated"] == 6 * per_direction
    assert counts["modules_to_save"] == 32 * 4 + 4
    trainer = _trainer(tmp_path, [], max_steps=1)
    with pytest.warns(UserWarning, match="no RankReallocation callback"):
        trainer.fit(module, _loader())


@pytest.mark.parametrize("importance", ["nuclear", "frobenius", "sensitivity", "elem_energy_entropy",
                                        "mat_energy_entropy"])
def test_every_importance_metric_drives_events(tmp_path, importance):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, importance=importance,
                               b_schedule="constant")
    trainer = _trainer(tmp_path, [realloc], max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_module(), _loader())
    assert [e["step"] for e in realloc.history] == [5, 8, 11]
    assert any(e["pruned"] for e in realloc.history)


def test_subclass_overrides_the_importance_score(tmp_path):
    class FavourFirst(FlexLoRAModule):
        def importance_scores(self, metric):
            return torch.tensor([3.0, 2.0, 1.0])

    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    trainer = _trainer(tmp_path, [realloc], max_epochs=2)
    module = FavourFirst(**{k: v for k, v in _module_kwargs().items()})
    trainer.fit(module, _loader())
    ranks = [layer.rank for _, layer in module.flexlora_layers()]
    assert ranks[0] == 6 and ranks[2] < 3 and sum(ranks) == 9


def _module_kwargs() -> dict:
    return {
        "backbone": _backbone, "target_modules": ["0", "2", "4"], "init_rank": 3, "max_rank": 6,
        "alpha": 6.0, "optimizer": functools.partial(torch.optim.AdamW, lr=1e-2),
    }


def test_orth_regulariser_is_logged_and_added(tmp_path):
    module = _module(orth_reg_weight=0.5)
    x, y = next(iter(_loader()))
    module.log = lambda *a, **k: None
    total = module.training_step((x, y), 0)
    expected = torch.nn.functional.cross_entropy(module(x), y) + 0.5 * module.orthogonality_loss()
    torch.testing.assert_close(total, expected)
    assert module.orthogonality_loss().item() > 0


def test_loading_a_history_for_other_layers_is_refused():
    realloc = RankReallocation()
    realloc.layer_names = ["backbone.0", "backbone.2"]
    with pytest.raises(ValueError, match=r"first differ at 'backbone.4' \(checkpoint\) vs None \(model\)"):
        realloc.load_state_dict({"history": [], "last_step": 3,
                                 "layer_names": ["backbone.0", "backbone.2", "backbone.4"]})
    realloc.load_state_dict({"history": [{"step": 3}], "last_step": 3, "layer_names": ["backbone.0", "backbone.2"]})
    assert realloc.history == [{"step": 3}]


def test_bf16_mixed_training_keeps_adapters_fp32_and_moves_ranks(tmp_path):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    trainer = _trainer(tmp_path, [realloc], max_epochs=2, precision="bf16-mixed")
    module = _module()
    trainer.fit(module, _loader())
    assert [e["step"] for e in realloc.history] == [4, 6, 8, 10, 12]
    assert any(e["pruned"] for e in realloc.history)
    for _, layer in module.flexlora_layers():
        assert {p.dtype for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)} == {torch.float32}
        assert torch.isfinite(layer.lora_lambda).all() and torch.all(layer.lora_lambda[~layer.rank_mask] == 0)
