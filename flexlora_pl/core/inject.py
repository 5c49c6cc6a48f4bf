"""Put FlexLoRA layers into any PyTorch model: match ``nn.Linear`` modules by name and wrap them."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from flexlora_pl.core.layer import FlexLoRALinear, _check_capacity, _check_ranks

__all__ = ["flexlora_layers", "inject_flexlora", "match_target"]


def match_target(name: str, targets: Sequence[str]) -> str | None:
    """Return the first target that selects module ``name``, else ``None``.

    A target matches when it equals the dotted name, is a dotted-name suffix of it (``"query"`` matches
    ``"encoder.layer.0.attention.self.query"``), or, written ``"re:<pattern>"``, when the regular
    expression fully matches the name.
    """
    for target in targets:
        if target.startswith("re:"):
            if re.fullmatch(target[3:], name):
                return target
        elif name == target or name.endswith("." + target):
            return target
    return None


def inject_flexlora(
    model: nn.Module,
    target_modules: Sequence[str],
    init_rank: int = 8,
    max_rank: int = 12,
    alpha: float = 16.0,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    init_std: float = 0.02,
    seed: int | None = 0,
) -> list[str]:
    """Replace matching ``nn.Linear`` modules of ``model`` by :class:`FlexLoRALinear`, in place.

    Everything but the adapter parameters and the modules named in ``modules_to_save`` is frozen.
    All arguments are checked before the model is touched.

    Args:
        model: the backbone to adapt.
        target_modules: dotted-name suffixes (``"query"``, ``"attention.output.dense"``) or
            ``"re:<regex>"`` patterns selecting the linear layers to adapt.
        init_rank: initial active rank of every adapted layer.
        max_rank: rank capacity of every adapted layer; at most ``min(in_features, out_features)`` of
            each (a larger capacity could never be used).
        alpha: LoRA α; the update is scaled by ``alpha / init_rank``.
        dropout: dropout on the adapter input.
        modules_to_save: names (same matching rules) of modules trained in full, e.g. a classifier.
        init_std: standard deviation of the initial P and Q.
        seed: seed of the initial P and Q draws (``None``: the global RNG).

    Returns:
        The dotted names of the adapted modules, in model order.

    Raises:
        ValueError: a target or ``modules_to_save`` entry that matches nothing (the message lists
            candidate names), a matched module that is not an ``nn.Linear``, bad ranks or α, a
            ``max_rank`` above a matched layer's ``min(in_features, out_features)``.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one nn.Linear to adapt (e.g. ['query'])")
    _check_ranks(init_rank, max_rank)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for target in list(target_modules) + list(modules_to_save):
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as err:
                raise ValueError(f"target {target!r} is not a valid regular expression: {err}") from err
    if any(isinstance(m, FlexLoRALinear) for m in model.modules()):
        raise ValueError("model already holds FlexLoRA layers: inject_flexlora must be called once")

    named = dict(model.named_modules())
    linear_names = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    used: set[str] = set()
    for name in linear_names:
        target = match_target(name, target_modules)
        if target is not None:
            chosen.append(name)
            used.add(target)
    for name, module in named.items():
        # A target naming a container (e.g. "attention") is almost always a mistake: say so.
        container = name and not isinstance(module, nn.Linear) and match_target(name, target_modules)
        if container and not any(c.startswith(name + ".") for c in chosen):
            raise ValueError(
                    f"target_modules entry matches {name!r}, a {type(module).__name__}, not an nn.Linear; "
                    f"name its linear sub-layers instead, e.g. {_candidates(linear_names, name)}"
                )
    missing = [t for t in target_modules if t not in used]
    if missing:
        raise ValueError(
            f"target_modules {missing} match no nn.Linear in {type(model).__name__}. "
            f"Linear layers look like: {_candidates(linear_names)}"
        )
    save_names: list[str] = []
    for target in modules_to_save:
        hits = [n for n in named if n and match_target(n, [target])]
        if not hits:
            raise ValueError(
                f"modules_to_save entry {target!r} matches no module in {type(model).__name__}; "
                f"top-level modules are: {[n for n, _ in model.named_children()]}"
            )
        save_names.extend(hits)
    overlap = [n for n in chosen if any(n == s or n.startswith(s + ".") for s in save_names)]
    if overlap:
        raise ValueError(f"modules {overlap[:5]} are both adapted and in modules_to_save; choose one")
    widths = {n: min(named[n].in_features, named[n].out_features) for n in chosen}
    narrow = [n for n in chosen if max_rank > widths[n]]
    if narrow:  # r_max buffers beyond a layer's rank would be allocated and trained for nothing
        _check_capacity(max_rank, named[narrow[0]], narrow[0], also=narrow[1:], fix=min(widths.values()))

    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = FlexLoRALinear(base, init_rank, max_rank, alpha, dropout, init_std, generator=generator)
        setattr(parent, child, layer)
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)
    return chosen


def flexlora_layers(model: nn.Module) -> Iterator[tuple[str, FlexLoRALinear]]:
    """Yield ``(dotted name, layer)`` for every FlexLoRA layer of ``model`` in a fixed (model) order."""
    for name, module in model.named_modules():
        if isinstance(module, FlexLoRALinear):
            yield name, module


def _candidates(names: Sequence[str], near: str | None = None, k: int = 6) -> list[str]:
    """A few linear-layer names worth suggesting: under ``near`` first, and distinct suffixes."""
    pool = [n for n in names if near and n.startswith(near + ".")] or list(names)
    seen: dict[str, str] = {}
    for n in pool:
        seen.setdefault(re.sub(r"\.\d+\.", ".N.", n), n)  # one example per layer-index pattern
    return list(seen.values())[:k]
