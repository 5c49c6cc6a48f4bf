"""RankReallocation inside a real Trainer.fit: when events fire, what they change, and exact resume."""

from __future__ import annotations

import functools
import itertools
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from tiny_mlp import mlp_backbone, mlp_loader, mlp_module, mlp_trainer
from torch.utils.data import DataLoader

from flexlora_pl import FlexLoRAModule, RankReallocation, event_steps


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
    module = mlp_module()
    trainer = mlp_trainer(tmp_path, [realloc, recorder], max_epochs=5)
    trainer.fit(module, mlp_loader())
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
    trainer = mlp_trainer(tmp_path, [realloc, recorder], max_epochs=4, accumulate_grad_batches=3)
    trainer.fit(mlp_module(), mlp_loader(batches=9))
    total = 4 * 9 // 3
    assert trainer.global_step == total
    assert [e["step"] for e in realloc.history] == list(event_steps(2, 2, 2, total)) == [4, 6, 8]


def test_lr_schedule_keeps_decaying_through_events(tmp_path):
    L.seed_everything(0)
    realloc = RankReallocation(b0=2, t_warmup=4, t_final=4, delta_t=2, b_schedule="constant")
    recorder = _Recorder()
    trainer = mlp_trainer(tmp_path, [realloc, recorder], max_epochs=4)
    module = mlp_module()
    trainer.fit(module, mlp_loader())
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
        trainer = mlp_trainer(root, [realloc, ckpt], max_epochs=6)
        module = mlp_module(dropout=0.2)  # dropout draws from the global RNG: the checkpoint must restore it
        trainer.fit(module, mlp_loader(), ckpt_path=ckpt_path)
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
    trainer = mlp_trainer(tmp_path, [realloc], max_epochs=1)
    module = mlp_module()
    before = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"never fire: with t_warmup=30, t_final=20 .* run of 8 optimizer steps"):
        trainer.fit(module, mlp_loader())
    assert all(torch.equal(before[k], module.state_dict()[k]) for k in before), "trained before refusing"

    realloc = RankReallocation(t_warmup=30, t_final=20, delta_t=5, allow_no_events=True)
    trainer = mlp_trainer(tmp_path, [realloc], max_epochs=1)
    with pytest.warns(UserWarning, match="will never fire"):
        trainer.fit(mlp_module(), mlp_loader())
    assert realloc.history == []


def test_module_warns_without_the_callback_and_reports_counts(tmp_path):
    module = mlp_module()
    counts = module.parameter_counts()
    per_direction = (16 + 32 + 1) + 2 * (32 + 32 + 1)
    assert counts["active"] == 3 * per_direction
    assert counts["allocated"] == 6 * per_direction
    assert counts["modules_to_save"] == 32 * 4 + 4
    trainer = mlp_trainer(tmp_path, [], max_steps=1)
    with pytest.warns(UserWarning, match="no RankReallocation callback"):
        trainer.fit(module, mlp_loader())


@pytest.mark.parametrize("importance", ["nuclear", "frobenius", "sensitivity", "elem_energy_entropy",
                                        "mat_energy_entropy"])
def test_every_importance_metric_drives_events(tmp_path, importance):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=3, importance=importance,
                               b_schedule="constant")
    trainer = mlp_trainer(tmp_path, [realloc], max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(mlp_module(), mlp_loader())
    assert [e["step"] for e in realloc.history] == [5, 8, 11]
    assert any(e["pruned"] for e in realloc.history)


def test_subclass_overrides_the_importance_score(tmp_path):
    class FavourFirst(FlexLoRAModule):
        def importance_scores(self, metric):
            return torch.tensor([3.0, 2.0, 1.0])

    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    trainer = mlp_trainer(tmp_path, [realloc], max_epochs=2)
    module = FavourFirst(**{k: v for k, v in _module_kwargs().items()})
    trainer.fit(module, mlp_loader())
    ranks = [layer.rank for _, layer in module.flexlora_layers()]
    assert ranks[0] == 6 and ranks[2] < 3 and sum(ranks) == 9


def _module_kwargs() -> dict:
    return {
        "backbone": mlp_backbone, "target_modules": ["0", "2", "4"], "init_rank": 3, "max_rank": 6,
        "alpha": 6.0, "optimizer": functools.partial(torch.optim.AdamW, lr=1e-2),
    }


def test_orth_regulariser_is_logged_and_added(tmp_path):
    module = mlp_module(orth_reg_weight=0.5)
    x, y = next(iter(mlp_loader()))
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
    trainer = mlp_trainer(tmp_path, [realloc], max_epochs=2, precision="bf16-mixed")
    module = mlp_module()
    trainer.fit(module, mlp_loader())
    assert [e["step"] for e in realloc.history] == [4, 6, 8, 10, 12]
    assert any(e["pruned"] for e in realloc.history)
    for _, layer in module.flexlora_layers():
        assert {p.dtype for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)} == {torch.float32}
        assert torch.isfinite(layer.lora_lambda).all() and torch.all(layer.lora_lambda[~layer.rank_mask] == 0)


def test_seed_follows_seed_everything_unless_given(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert RankReallocation().seed == 0
    L.seed_everything(7)
    assert RankReallocation().seed == 7
    assert RankReallocation(seed=3).seed == 3, "an explicit seed overrides seed_everything"
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        RankReallocation(seed=-1)


@pytest.mark.parametrize("mode", ["prune_and_expand", "prune_only"])
@pytest.mark.parametrize("r_min", [3, 7])  # = init_rank, and > max_rank
def test_an_r_min_that_freezes_every_rank_is_refused_when_fitting_starts(tmp_path, mode, r_min):
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, r_min=r_min, mode=mode)
    module = mlp_module()  # init_rank 3, max_rank 6
    before = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    message = (rf"r_min={r_min} is not below the rank of any FlexLoRA layer \(initial rank 3\).*mode='{mode}'.*"
               rf"plain LoRA\. Lower r_min to 2 or less, raise init_rank above {r_min} .*or use mode: expand_only")
    with pytest.raises(ValueError, match=message):
        mlp_trainer(tmp_path, [realloc], max_epochs=1).fit(module, mlp_loader())
    assert all(torch.equal(before[k], module.state_dict()[k]) for k in before), "trained before refusing"


def test_expand_only_ignores_r_min(tmp_path):
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=0, delta_t=2, r_min=7, mode="expand_only",
                               b_schedule="constant")
    module = mlp_module()
    mlp_trainer(tmp_path, [realloc], max_epochs=1).fit(module, mlp_loader())
    assert sum(layer.rank for _, layer in module.flexlora_layers()) == 9 + 2  # events at 4 and 6


def test_a_prune_only_run_resumed_at_the_r_min_floor_is_accepted_but_a_raised_r_min_is_not(tmp_path):
    def fit(root, epochs, r_min, ckpt_path=None):
        realloc = RankReallocation(b0=3, t_warmup=2, t_final=0, delta_t=2, r_min=r_min, mode="prune_only",
                                   b_schedule="constant")
        ckpt = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        module = mlp_module()
        mlp_trainer(root, [realloc, ckpt], max_epochs=epochs).fit(module, mlp_loader(), ckpt_path=ckpt_path)
        return module, realloc

    module, realloc = fit(tmp_path / "a", 1, r_min=1)  # events at 4 and 6 prune every layer from 3 to 1
    assert [layer.rank for _, layer in module.flexlora_layers()] == [1, 1, 1]
    module, resumed = fit(tmp_path / "b", 2, r_min=1, ckpt_path=tmp_path / "a" / "epoch=0.ckpt")
    assert resumed.history[: len(realloc.history)] == realloc.history
    with pytest.raises(ValueError, match=r"r_min=2 is not below .*\(initial rank 3, now 1\).*Lower r_min to 0"):
        fit(tmp_path / "c", 2, r_min=2, ckpt_path=tmp_path / "a" / "epoch=0.ckpt")


class _DataInSetup(FlexLoRAModule):
    """Builds its training data in its own ``setup``, which Lightning runs after the callbacks' ``setup``."""

    def setup(self, stage):
        self.train_data = mlp_loader().dataset

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=4)


def test_total_steps_are_read_after_the_modules_own_setup(tmp_path):
    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    module = _DataInSetup(**_module_kwargs())
    mlp_trainer(tmp_path, [realloc], max_epochs=2).fit(module)
    assert [e["step"] for e in realloc.history] == list(event_steps(2, 2, 2, 16)) == [4, 6, 8, 10, 12]

    never = RankReallocation(t_warmup=30, t_final=20, delta_t=5)
    with pytest.raises(ValueError, match="never fire: .* run of 8 optimizer steps"):
        mlp_trainer(tmp_path, [never], max_epochs=1).fit(_DataInSetup(**_module_kwargs()))


def test_a_restored_history_is_checked_against_the_layers_found_at_fit_start():
    # layers built late (in the module's setup or configure_model) are not known when Lightning restores
    # the callback: the check then runs at fit start
    realloc = RankReallocation()
    realloc.load_state_dict({"history": [], "last_step": 3, "layer_names": ["backbone.0", "backbone.9"]})
    with pytest.raises(ValueError, match=r"first differ at 'backbone.9' \(checkpoint\) vs 'backbone.2' \(model\)"):
        realloc.on_fit_start(None, mlp_module())


class _Metrics(Logger):
    """Keeps what the loggers are given."""

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "metrics"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def test_importance_scores_keep_full_precision_in_history_and_loggers(tmp_path):
    class TinyScores(FlexLoRAModule):  # sensitivities are often this small
        def importance_scores(self, metric):
            return torch.tensor([3e-10, 2e-10, 1e-10], dtype=torch.float64)

    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    logger = _Metrics()
    mlp_trainer(tmp_path, [realloc], max_epochs=1, logger=logger).fit(TinyScores(**_module_kwargs()), mlp_loader())
    assert realloc.history and all(e["scores"] == [3e-10, 2e-10, 1e-10] for e in realloc.history)
    events = [m for step, m in logger.metrics if "flexlora/budget" in m]
    assert len(events) == len(realloc.history)
    assert all(m["flexlora_importance/backbone.0"] == 3e-10 for m in events)


def test_an_importance_override_is_called_under_sensitivity_too(tmp_path):
    class FavourFirst(FlexLoRAModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.calls = []

        def importance_scores(self, metric):
            self.calls.append((metric, super().importance_scores(metric)))  # the tracker's scores
            return torch.tensor([3.0, 2.0, 1.0])

    L.seed_everything(0)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, importance="sensitivity",
                               b_schedule="constant")
    module = FavourFirst(**_module_kwargs())
    mlp_trainer(tmp_path, [realloc], max_epochs=2).fit(module, mlp_loader())
    assert len(module.calls) == len(realloc.history) == 5
    assert all(metric == "sensitivity" for metric, _ in module.calls)
    assert all(base.shape == (3,) and bool((base > 0).all()) for _, base in module.calls)
    ranks = [layer.rank for _, layer in module.flexlora_layers()]
    assert ranks[0] == 6 and ranks[2] < 3 and sum(ranks) == 9, "the override decides, not the tracker"
    assert all(e["scores"] == [3.0, 2.0, 1.0] for e in realloc.history)


def test_sensitivity_scores_need_the_callback_that_gathers_them(tmp_path):
    with pytest.raises(ValueError, match=r"RankReallocation\(importance='sensitivity'\) callback, and none is "
                                         r"attached to this module \(it is not attached to a Trainer\)"):
        mlp_module().importance_scores("sensitivity")
