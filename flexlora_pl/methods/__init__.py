"""Adaptation methods, selected in a config by ``model.init_args.method`` (see :mod:`flexlora_pl.methods.base`).

========  ==========================================================================================
name      class
========  ==========================================================================================
flexlora  :class:`FlexLoRA`: masked SVD-form adapters, ranks moved by spectral-entropy importance
========  ==========================================================================================
"""

from flexlora_pl.methods.base import METHODS, AdaptationMethod, build_method, register_method
from flexlora_pl.methods.flexlora import FlexLoRA

__all__ = ["METHODS", "AdaptationMethod", "FlexLoRA", "build_method", "register_method"]
