"""Export a trained FlexLoRA model: a standard PEFT LoRA adapter, a merged model, or an adapter checkpoint.

A FlexLoRA layer stores its update in SVD form with a rank mask ``m`` (see :mod:`flexlora_pl.core.layer`).
With ``S`` the active directions and ``r = |S|``, the update is an ordinary rank-``r`` LoRA update::

    ΔW = s · P diag(λ ⊙ m) Q = (α_m / r) · B A      A = diag(λ_S) Q_S  (r, d_in)    B = P_S  (d_out, r)
                                                    α_m = s · r = α · r / r_init

so peft's per-module scale ``α_m / r`` equals FlexLoRA's fixed scale ``s = α / r_init``. λ is folded
into ``A``: the PEFT adapter holds ``r (d_in + d_out)`` numbers per module, ``r`` fewer than FlexLoRA's
own count (which has a λ per direction). The ranks differ across modules, so the adapter config carries
``rank_pattern`` / ``alpha_pattern`` keyed by exact module paths.

What this package writes, from a live model or from a Lightning checkpoint (one file per format):

* :func:`export_peft_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads with no flexlora_pl code (peft >= 0.14).
  Modules whose update is exactly zero (no active direction, or all active λ zero) are left out of the
  adapter: peft cannot express rank 0, and leaving them out changes no output.
* :func:`export_merged` / :func:`merged_model`: ΔW added into the base weights and every FlexLoRA layer
  replaced by its plain ``nn.Linear``: the model costs exactly what the base model costs at inference.
* :func:`save_adapter_checkpoint` / :func:`load_adapter_checkpoint`: only what was trained (the active
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

from flexlora_pl.export.adapter_checkpoint import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from flexlora_pl.export.files import check_output_dir
from flexlora_pl.export.load import check_base_model, load_module_from_checkpoint
from flexlora_pl.export.merged import export_merged, merged_model
from flexlora_pl.export.peft_adapter import PEFT_MIN_VERSION, export_peft_adapter

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_MIN_VERSION",
    "check_base_model",
    "check_output_dir",
    "export_merged",
    "export_peft_adapter",
    "load_adapter_checkpoint",
    "load_module_from_checkpoint",
    "merged_model",
    "save_adapter_checkpoint",
]
