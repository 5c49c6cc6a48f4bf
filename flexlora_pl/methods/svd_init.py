"""LoRA initialised from singular components of the weight it adapts (PiSSA, MiLoRA): what the two share.

For a target weight ``W = U diag(σ) Vᵀ`` (d_out × d_in, σ descending) and a set P of r components — the first
r (PiSSA: the principal ones) or the last r (MiLoRA: the minor ones) — the factors start as

    A₀ = diag(√(σ_P / s)) V_Pᵀ        (r × d_in)          s = α / r (α / √r with rslora)
    B₀ = U_P diag(√(σ_P / s))         (d_out × r)         so that s · B₀ A₀ = U_P diag(σ_P) V_Pᵀ

and the frozen weight keeps the rest, ``W_res = W − s · B₀ A₀``. The layer computes ``W_res x + s · B A x``,
which is ``W x`` at start (to float32 rounding): the model is its base model. This is peft's PiSSA convention
(``LoraConfig(init_lora_weights="pissa")`` divides σ by the scale the same way, so the scale α / r does not
change the initial product); :func:`svd_init` reproduces it and takes the minor end for MiLoRA, which peft lacks.

Three consequences, each handled here:

- **The frozen weight is the residual, not the pretrained weight.** A slim checkpoint drops it and a resumed or
  exported run rebuilds the module from ``model_name_or_path``, which runs this initialisation again on the
  pretrained weight: the SVD of the same tensor on the same machine gives the same residual, bit for bit, so
  resume is exact. (On another machine or library the residual may differ by float32 rounding.)
- **A peft adapter equals the trained model only on the residual base.** ``B₀`` and ``A₀`` are kept as the
  layer's buffers ``svd_init_B`` / ``svd_init_A`` (in checkpoints too), and the peft export is the plain LoRA
  adapter of the trained update on the *original* base: ``W_res + s·B A = W + s·(B A − B₀ A₀)``, i.e. rank 2r with
  ``A' = [A; A₀]``, ``B' = [B, −B₀]`` and α doubled (√2 · α with rslora) so that the scale stays s. It loads with
  ``peft.PeftModel.from_pretrained`` on the base model as downloaded; its folder's README.md says what it is.
  The merged export is ``W_res + s·B A`` itself.
- **The weight must be decomposable.** Targets must be ``nn.Linear`` layers with an untied float32 weight: a
  quantized weight cannot be decomposed in place, and a half-precision residual would round away the identity
  at start (and the export's equality). Both are refused before the run starts, saying what to load instead.

On the meta device (parameter counts of a full-size architecture) there is nothing to decompose: the factors
are left as peft built them, with the same shapes as LoRA's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from flexlora_pl.methods.lora import ADAPTER_NAME, LoRA, peft_tuner_layers, resolve_targets

__all__ = ["INIT_A", "INIT_B", "SVDInitLoRA", "svd_init"]

#: buffer names of the initial factors A₀ (r × d_in) and B₀ (d_out × r) on each peft layer
INIT_A, INIT_B = "svd_init_A", "svd_init_B"
#: which singular components each kind of initialisation takes
COMPONENTS = ("principal", "minor")
_TARGETS_OPTION = "model.init_args.method.init_args.target_modules"


@torch.no_grad()
def svd_init(layer: nn.Module, which: str) -> None:
    """Initialise one peft LoRA ``layer`` from ``which`` r singular components of its base weight, in place.

    Sets ``lora_A`` to A₀ and ``lora_B`` to B₀ (module docstring), subtracts ``s · B₀ A₀`` from the base weight,
    and keeps A₀, B₀ as the buffers :data:`INIT_A`, :data:`INIT_B`. A layer on the meta device gets meta buffers.

    Args:
        layer: a peft ``lora.Linear`` holding the adapter ``default``.
        which: ``"principal"`` (the r largest singular values: PiSSA) or ``"minor"`` (the r smallest: MiLoRA).

    Raises:
        ValueError: ``which`` is neither, or the rank exceeds the weight's smaller side.
    """
    if which not in COMPONENTS:
        raise ValueError(f"svd_init: which must be one of {COMPONENTS}, got {which!r}")
    weight = layer.get_base_layer().weight  # (d_out, d_in)
    lora_a, lora_b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
    r, scale = int(layer.r[ADAPTER_NAME]), float(layer.scaling[ADAPTER_NAME])
    if r > min(weight.shape):
        raise ValueError(f"svd_init: rank {r} exceeds the smaller side of a {tuple(weight.shape)} weight")
    if weight.is_meta:
        layer.register_buffer(INIT_A, torch.empty_like(lora_a))
        layer.register_buffer(INIT_B, torch.empty_like(lora_b))
        return
    u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in); descending
    chosen = slice(0, r) if which == "principal" else slice(sigma.numel() - r, sigma.numel())
    root = torch.sqrt(sigma[chosen] / scale)  # (r,)
    a0 = (root[:, None] * vh[chosen]).to(lora_a.dtype)  # (r, d_in)
    b0 = (u[:, chosen] * root[None, :]).to(lora_b.dtype)  # (d_out, r)
    lora_a.copy_(a0)
    lora_b.copy_(b0)
    weight.copy_((weight.float() - (scale * b0) @ a0).to(weight.dtype))
    layer.register_buffer(INIT_A, a0.clone())
    layer.register_buffer(INIT_B, b0.clone())


class SVDInitLoRA(LoRA):
    """LoRA whose factors start from singular components of each target weight (:func:`svd_init`); the residual
    stays in the frozen weight. Subclasses set :attr:`components` and :attr:`init_marker`.

    peft injects plain LoRA layers (``init_lora_weights=False``: no draws of its own are kept), :func:`svd_init`
    sets them, and the tuner's config then records :attr:`init_marker` as its ``init_lora_weights``, which is how
    :meth:`recognize` tells the variant from LoRA. The peft export is a plain LoRA adapter on the original base.
    """

    #: ``"principal"`` or ``"minor"``: which r singular components the factors start from
    components: ClassVar[str] = "principal"
    quantized_base = False  # the start decomposes the base weight itself, which a 4-bit weight cannot give
    #: the ``init_lora_weights`` the adapted model's peft config records (PiSSA: peft's own "pissa")
    init_marker: ClassVar[str] = ""

    def adapt(self, backbone: nn.Module, modules_to_save: Sequence[str], seed: int | None) -> nn.Module:
        """Check that every target can be decomposed, then inject and initialise (see :class:`~.LoRA`).

        Raises:
            ValueError: besides LoRA's refusals, a target whose weight is quantized, not float32, or tied to
                another module's.
        """
        if self.target_modules and next(peft_tuner_layers(backbone), None) is None:  # else LoRA refuses it
            chosen, _ = resolve_targets(backbone, self.target_modules, modules_to_save)
            self.check_decomposable(backbone, chosen)
        return super().adapt(backbone, modules_to_save, seed)

    def check_decomposable(self, backbone: nn.Module, chosen: Sequence[str]) -> None:
        """Refuse targets whose weight :func:`svd_init` cannot decompose in place, naming the fix."""
        owner = type(self).__name__
        owners: dict[int, list[str]] = {}
        for name, param in backbone.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(name)
        for name in chosen:
            weight = backbone.get_submodule(name).weight
            if type(weight) is not nn.Parameter or not weight.dtype.is_floating_point:
                raise ValueError(
                    f"{owner}: the weight of {name!r} is quantized ({type(weight).__name__} of {weight.dtype}); "
                    f"{owner} starts from the SVD of the base weight and keeps the residual in it, which needs the "
                    "weight itself in float32. Load the base model unquantized in float32, or leave the layer out of "
                    f"{_TARGETS_OPTION}"
                )
            if weight.dtype != torch.float32:
                raise ValueError(
                    f"{owner}: the base weight of {name!r} is {weight.dtype}, and {owner} needs float32: it subtracts "
                    "the initial update from the frozen weight, and a residual rounded to half precision would no "
                    "longer add up to the base model at start (nor make the peft export equal the trained model). "
                    "Load the base model in float32 (model.init_args.torch_dtype: float32 where the task has it) and "
                    "train with trainer.precision: bf16-mixed for half-precision compute"
                )
            tied = [other for other in owners[id(weight)] if not other.startswith(name + ".")]
            if tied:
                raise ValueError(
                    f"{owner}: the weight of {name!r} is tied to {tied[0]!r}; {owner} replaces the frozen weight by "
                    "its residual, which would change the tied module too. Leave the layer out of "
                    f"{_TARGETS_OPTION}, or untie the weights before adapting"
                )

    def peft_config(self, target_modules: list[str] | str) -> Any:
        config = super().peft_config(target_modules)
        config.init_lora_weights = False  # svd_init sets the factors after injection
        return config

    def after_injection(self, model: nn.Module, tuner: Any) -> None:
        super().after_injection(model, tuner)
        for _, layer in self.layers(model):
            svd_init(layer, self.components)
        tuner.peft_config[ADAPTER_NAME].init_lora_weights = self.init_marker

    # ---------------------------------------------------------------- export
    def peft_export_form(self, model: nn.Module, config: Any,
                         tensors: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The trained update as a plain LoRA adapter on the original base: rank 2r, ``A' = [A; A₀]``,
        ``B' = [B, −B₀]``, α scaled so that every layer keeps its scale s (module docstring)."""
        widen = math.sqrt(2.0) if config.use_rslora else 2.0  # α' / (2r) = α / r, or α' / √(2r) = α / √r
        converted = dict(tensors)
        for name, layer in self.layers(model):
            key_a, key_b = f"{name}.lora_A.{ADAPTER_NAME}.weight", f"{name}.lora_B.{ADAPTER_NAME}.weight"
            a0, b0 = getattr(layer, INIT_A), getattr(layer, INIT_B)
            converted[key_a] = torch.cat([tensors[key_a].detach(), a0.to(tensors[key_a].dtype)], dim=0)  # (2r, d_in)
            converted[key_b] = torch.cat([tensors[key_b].detach(), -b0.to(tensors[key_b].dtype)], dim=1)  # (d_out, 2r)
        config.r, config.lora_alpha = 2 * config.r, widen * config.lora_alpha
        config.rank_pattern = {key: 2 * rank for key, rank in (config.rank_pattern or {}).items()}
        config.alpha_pattern = {key: widen * alpha for key, alpha in (config.alpha_pattern or {}).items()}
        config.init_lora_weights = True  # a plain LoRA adapter: peft must not decompose the base it loads onto
        return config, converted

    def peft_adapter_notes(self, model: nn.Module) -> str | None:
        """What the adapter's README.md says: a plain LoRA adapter of twice the run's rank, on the original base."""
        return (
            f"# A {type(self).__name__} run as a plain LoRA adapter\n\n"
            f"Trained with {type(self).__name__}: rank r = {self.r}, the factors initialised as B0, A0 from the "
            f"{self.components} r singular components of each target weight W, the residual W_res = W - s B0 A0 kept "
            "frozen. An adapter of the trained B, A alone is right only on top of W_res. This adapter holds the "
            "trained update on the ORIGINAL base instead: W + s (B A - B0 A0), a LoRA adapter of rank 2r (every rank "
            "of a rank pattern doubled) with lora_A = [A; A0] and lora_B = [B, -B0], and lora_alpha set so that the "
            "scale s is the run's. Load it with "
            "peft.PeftModel.from_pretrained on the base model as downloaded; it is an ordinary LoRA adapter "
            "(init_lora_weights: true) and needs no code of the project.\n"
        )
