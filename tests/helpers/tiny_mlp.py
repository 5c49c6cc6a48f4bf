"""A tiny MLP under FlexLoRA, its data and a plain Trainer: the callback and allocation tests' shared set-up.

``mlp_module(**changes)`` adapts layers ``0``, ``2`` and ``4`` of a 4-layer MLP at r_init 3 / r_max 6 (the last
layer trained in full), with AdamW and a linear warm-up/decay schedule; ``mlp_loader`` gives a fixed, learnable
4-class problem that never draws from the global RNG; ``mlp_trainer`` a deterministic CPU Trainer without
logger, bar or sanity check.
"""

from __future__ import annotations

import functools

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexlora_pl import FlexLoRAModule, LinearWarmupDecay


def mlp_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 4),
    )


def mlp_module(**kwargs) -> FlexLoRAModule:
    defaults = {
        "backbone": mlp_backbone,
        "target_modules": ["0", "2", "4"],
        "init_rank": 3,
        "max_rank": 6,
        "alpha": 6.0,
        "modules_to_save": ["6"],
        "optimizer": functools.partial(torch.optim.AdamW, lr=5e-2, weight_decay=0.01),
        "lr_scheduler": functools.partial(LinearWarmupDecay, warmup_ratio=0.1),
    }
    return FlexLoRAModule(**{**defaults, **kwargs})


def mlp_loader(batches: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 16, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 5] > 1).long()) % 4
    # a private generator, as flexlora_pl's data modules use: the loader then never draws from the global
    # RNG, which the checkpoint restores for dropout
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, generator=torch.Generator())


def mlp_trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = {
        "default_root_dir": tmp_path, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})
