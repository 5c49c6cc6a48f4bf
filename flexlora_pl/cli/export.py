"""``flexlora-export``: turn a FlexLoRA Lightning checkpoint into a PEFT adapter, a merged model or an adapter.

Usage::

    flexlora-export --ckpt runs/last.ckpt --out export/peft --format peft
    flexlora-export --ckpt runs/last.ckpt --out export/merged --format merged
    flexlora-export --ckpt runs/last.ckpt --out export/adapter --format adapter --module-class my.pkg.MyModule
    flexlora-export --ckpt runs/last.ckpt --out export/merged --format merged --base-model /new/home/of/base

Every argument is checked before the checkpoint is read, and the output is written to a temporary
sibling directory renamed into place at the end, so a failure never leaves a half-written ``--out``.
The checkpoint is read with ``weights_only=True`` unless ``--trust-checkpoint`` is given, and a
``trust_remote_code`` hyper-parameter stays off unless ``--trust-remote-code`` is given.

The module is rebuilt from the checkpoint's hyper-parameters, which reloads the base model from the
recorded ``model_name_or_path``; ``--base-model`` points there when the base model folder has moved
(the weights found there must be the ones the checkpoint was trained on). The merged export of a
transformers model also holds its tokenizer (``--tokenizer`` to choose it), so that
``transformers.pipeline(task, model=<out>)`` loads it alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch import LightningModule

from flexlora_pl import export

__all__ = ["FORMATS", "build_parser", "main"]

FORMATS = ("peft", "merged", "adapter")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flexlora-export``."""
    parser = argparse.ArgumentParser(
        prog="flexlora-export",
        description="Export a FlexLoRA Lightning checkpoint as a PEFT LoRA adapter, a merged model, "
        "or a FlexLoRA adapter-only checkpoint.",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="Lightning checkpoint (.ckpt) to export")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; must be new or empty)")
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="peft: adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained; "
        "merged: the base model with the update merged in (no FlexLoRA code needed); "
        "adapter: FlexLoRA adapter-only checkpoint (load_adapter_checkpoint)",
    )
    parser.add_argument(
        "--module-class",
        default=None,
        help="dotted path of the LightningModule class (default: the class LightningCLI recorded)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    parser.add_argument(
        "--base-model",
        default=None,
        metavar="PATH",
        help="where the base model is now, replacing the model_name_or_path recorded in the checkpoint "
        "(a moved folder; it must hold the same weights)",
    )
    parser.add_argument(
        "--base-model-name-or-path",
        default=None,
        help="peft format: base model recorded in adapter_config.json (default: where the base was loaded from)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="merged format: tokenizer folder or hub name saved with the model (default: the base model's own)",
    )
    parser.add_argument("--task-type", default=None, help="peft format: peft task type, e.g. SEQ_CLS or CAUSAL_LM")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint in full (runs code from the file): only for checkpoints you trust",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the rebuilt module run model code from the hub (a checkpoint never turns this on by itself)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flexlora-export``; return the process exit status (0 on success)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _validate(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))  # exits with status 2
    try:
        module = export.load_module_from_checkpoint(
            args.ckpt,
            module_class=args.module_class,
            weights_only=not args.trust_checkpoint,
            trust_remote_code=args.trust_remote_code,
            base_model=args.base_model,
        )
        _exporter(args)(module)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        print(f"flexlora-export: error: {err}", file=sys.stderr)
        return 1
    print(f"flexlora-export: wrote {args.format} export of {args.ckpt} to {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> None:
    """Check what can be checked without reading the checkpoint, before anything is written."""
    if not args.ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {args.ckpt} not found")
    export.check_output_dir(args.out, args.overwrite)
    if args.format != "peft" and (args.base_model_name_or_path or args.task_type):
        raise ValueError("--base-model-name-or-path and --task-type only apply to --format peft")
    if args.format != "merged" and args.tokenizer:
        raise ValueError("--tokenizer only applies to --format merged")
    if args.base_model is not None:
        export.check_base_model(args.base_model)


def _exporter(args: argparse.Namespace) -> Callable[[LightningModule], object]:
    if args.format == "peft":
        return lambda module: export.export_peft_adapter(
            module,
            args.out,
            base_model_name_or_path=args.base_model_name_or_path,
            task_type=args.task_type,
            overwrite=args.overwrite,
        )
    if args.format == "merged":
        return lambda module: export.export_merged(module, args.out, overwrite=args.overwrite,
                                                   tokenizer=args.tokenizer)
    return lambda module: export.save_adapter_checkpoint(module, args.out, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
