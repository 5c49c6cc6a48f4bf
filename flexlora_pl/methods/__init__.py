"""Adaptation methods, selected in a config by ``model.init_args.method`` (see :mod:`flexlora_pl.methods.base`).

========  ==========================================================================================
name      class
========  ==========================================================================================
flexlora  :class:`FlexLoRA`: masked SVD-form adapters, ranks moved by spectral-entropy importance
lora      :class:`LoRA`: peft's LoRA, rank ``r`` everywhere, fixed (``configs/methods/lora.yaml``), or the fixed
          ranks of a run's ``rank_pattern.json`` (``configs/methods/lora_fixed_pattern.yaml``)
adalora   :class:`AdaLoRA`: peft's AdaLoRA, ``init_rank`` pruned to an average ``target_rank`` by
          sensitivity on the ``reallocation:`` schedule (``configs/methods/adalora.yaml``)
full      :class:`FullFineTuning`: every backbone weight trained, no adapter and no rank
          (``configs/methods/full.yaml``)
bitfit    :class:`BitFit`: only the backbone's bias terms trained (``configs/methods/bitfit.yaml``)
dylora    :class:`DyLoRA`: LoRA factors trained at a rank sampled from 1..r every batch, evaluated at
          ``eval_rank`` (``configs/methods/dylora.yaml``)
rslora    :class:`RSLoRA`: LoRA scaled by α / √r, peft's ``use_rslora`` (``configs/methods/rslora.yaml``)
dora      :class:`DoRA`: weight-decomposed LoRA (Liu et al.), peft's ``use_dora`` (``configs/methods/dora.yaml``)
pissa     :class:`PiSSA`: LoRA from the principal r singular components, the residual frozen
          (``configs/methods/pissa.yaml``)
milora    :class:`MiLoRA`: LoRA from the minor r singular components, the residual frozen
          (``configs/methods/milora.yaml``)
========  ==========================================================================================
"""

from flexlora_pl.methods.adalora import AdaLoRA
from flexlora_pl.methods.base import (
    METHODS,
    AdaptationMethod,
    AllocationDriver,
    StepContext,
    build_method,
    register_method,
)
from flexlora_pl.methods.bitfit import BitFit
from flexlora_pl.methods.dora import DoRA
from flexlora_pl.methods.dylora import DyLoRA
from flexlora_pl.methods.flexlora import FlexLoRA
from flexlora_pl.methods.full import FullFineTuning
from flexlora_pl.methods.lora import LoRA
from flexlora_pl.methods.milora import MiLoRA
from flexlora_pl.methods.pissa import PiSSA
from flexlora_pl.methods.rslora import RSLoRA

__all__ = ["METHODS", "AdaLoRA", "AdaptationMethod", "AllocationDriver", "BitFit", "DoRA", "DyLoRA", "FlexLoRA",
           "FullFineTuning", "LoRA", "MiLoRA", "PiSSA", "RSLoRA", "StepContext", "build_method", "register_method"]
