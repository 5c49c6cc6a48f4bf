"""Export a trained model: a standard peft adapter, a merged model, or a FlexLoRA adapter checkpoint.

This package is format plumbing: output folders written atomically, the rebuild of a module from a ``.ckpt``,
and one file per format registered in :data:`FORMATS` (:mod:`flexlora_pl.export.formats`; ``flexlora-export
--format`` offers exactly those). What an export holds is the adapting method's
(:class:`~flexlora_pl.methods.AdaptationMethod`): ``peft_adapter_state`` (FlexLoRA folds λ into a LoRA adapter
with per-module ranks; LoRA and AdaLoRA give peft's own adapter), ``merge`` and
``adapter_checkpoint_layers``; a method refuses, naming itself and the reason, a format that makes no sense for it.

What this package writes, from a live model or from a Lightning checkpoint (one file per format):

* :func:`export_peft_adapter` (``peft``): ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads with no flexlora_pl code (peft >= 0.14).
  Modules whose update is exactly zero (no active direction, or all active λ zero) are left out of the
  adapter: peft cannot express rank 0, and leaving them out changes no output.
* :func:`export_merged` / :func:`merged_model` (``merged``): ΔW added into the base weights and every adapter
  layer replaced by its plain ``nn.Linear``: the model costs exactly what the base model costs at inference.
* :func:`save_adapter_checkpoint` / :func:`load_adapter_checkpoint` (``adapter``): only what was trained (the active
  part of P, λ, Q, the masks, the ``modules_to_save`` weights) plus a small JSON config, far smaller
  than a full ``.ckpt``. Inactive directions are always zero (pruning zeroes them, free slots start at
  zero), so storing the active part alone is lossless.
* :func:`load_module_from_checkpoint`: rebuild the LightningModule from a ``.ckpt`` whose module saved
  its hyper-parameters.

Safety: everything here reads safetensors, JSON, or ``torch.load(..., weights_only=True)``. A Lightning
checkpoint is a pickle; full unpickling can run code from the file, so it only happens when the caller
passes ``weights_only=False`` for a file they trust. Nothing here sets ``trust_remote_code``.
Directory outputs are written to a temporary sibling directory and renamed into place, so a failure
leaves no half-written output; their files and folders get the modes the umask gives (``0o644`` /
``0o755`` under umask ``022``), not those of temporary files.
"""

# The format files register themselves on import: a new format is one file plus its line here.
from flexlora_pl.export.adapter_checkpoint import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from flexlora_pl.export.common import check_output_dir
from flexlora_pl.export.formats import FORMATS, ExportFormat, FormatOption, register_format
from flexlora_pl.export.load import check_base_model, load_module_from_checkpoint
from flexlora_pl.export.merged import export_merged, merged_model
from flexlora_pl.export.peft_adapter import PEFT_MIN_VERSION, export_peft_adapter

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "FORMATS",
    "PEFT_MIN_VERSION",
    "ExportFormat",
    "FormatOption",
    "check_base_model",
    "check_output_dir",
    "export_merged",
    "export_peft_adapter",
    "load_adapter_checkpoint",
    "load_module_from_checkpoint",
    "merged_model",
    "register_format",
    "save_adapter_checkpoint",
]
