"""``flexlora-export``: turn a Lightning checkpoint of an adapted model into a peft adapter, a merged model, …

Usage::

    flexlora-export --ckpt runs/last.ckpt --out export/peft --format peft
    flexlora-export --ckpt runs/last.ckpt --out export/merged --format merged
    flexlora-export --ckpt runs/last.ckpt --out export/adapter --format adapter --module-class my.pkg.MyModule
    flexlora-export --ckpt runs/last.ckpt --out export/merged --format merged --base-model /new/home/of/base
    flexlora-export --ckpt runs/last.ckpt --out export/peft --format peft --push-to-hub my-user/bert-flexlora --private

Every argument is checked before the checkpoint is read, and the output is written to a temporary
sibling directory renamed into place at the end, so a failure never leaves a half-written ``--out``.
The checkpoint is read with ``weights_only=True`` unless ``--trust-checkpoint`` is given, and a
``trust_remote_code`` hyper-parameter stays off unless ``--trust-remote-code`` is given.

The module is rebuilt from the checkpoint's hyper-parameters, which reloads the base model from the
recorded ``model_name_or_path``; ``--base-model`` points there when the base model folder has moved
(the weights found there must be the ones the checkpoint was trained on). The merged export of a
transformers model also holds its tokenizer (``--tokenizer`` to choose it), so that
``transformers.pipeline(task, model=<out>)`` loads it alone.

The formats, their help and their own flags come from the registry :data:`flexlora_pl.export.FORMATS` (one
file per format in :mod:`flexlora_pl.export`): a flag of another format is refused, a flag the format needs
is asked for, both before the checkpoint is read.

Every export holds a model card, ``README.md`` (:mod:`flexlora_pl.export.model_card`: the Hub's front matter,
the scores of the run's ``metrics.json``, the method, the ranks and their heat-map, the training command and how
to load it). ``--push-to-hub REPO_ID`` then uploads the folder (:mod:`flexlora_pl.export.hub`); a malformed repo
id, offline mode or a missing token is refused before the checkpoint is read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flexlora_pl import export
from flexlora_pl.export import FORMATS, ExportFormat, FormatOption
from flexlora_pl.export.hub import HubUploadError, check_push, push_export
from flexlora_pl.export.model_card import build_model_card, export_with_model_card, find_run_dir

__all__ = ["FORMATS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flexlora-export``, with the formats registered now."""
    parser = argparse.ArgumentParser(
        prog="flexlora-export",
        description="Export a Lightning checkpoint of an adapted model (FlexLoRA, LoRA, AdaLoRA, ...) in one of the "
        f"formats {', '.join(FORMATS)}.",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="Lightning checkpoint (.ckpt) to export")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; must be new or empty)")
    parser.add_argument(
        "--format",
        required=True,
        choices=list(FORMATS),
        help="; ".join(f"{fmt.name}: {fmt.help}" for fmt in FORMATS.values()),
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
    for option, names in _format_options().items():
        try:
            parser.add_argument(option.flag, default=None, metavar=option.metavar,
                                help=f"{', '.join(names)} format: {option.help}")
        except argparse.ArgumentError as err:
            raise ValueError(f"export format {names[0]!r} declares {option.flag}, a flag flexlora-export has "
                             "already: rename it in its FormatOption") from err
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
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="upload the export to this Hugging Face model repo (owner/name; created if new) with the token "
        "huggingface_hub finds (HF_TOKEN or `hf auth login`)",
    )
    parser.add_argument("--private", action="store_true",
                        help="with --push-to-hub: create the repo private (an existing repo keeps its visibility)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flexlora-export``; return the process exit status (0 on success)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = FORMATS[args.format]
    try:
        _validate(args, fmt)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))  # exits with status 2
    options = {o.keyword: getattr(args, o.keyword) for o in fmt.options if getattr(args, o.keyword) is not None}
    try:
        module = export.load_module_from_checkpoint(
            args.ckpt,
            module_class=args.module_class,
            weights_only=not args.trust_checkpoint,
            trust_remote_code=args.trust_remote_code,
            base_model=args.base_model,
        )
        card = build_model_card(args.format, module, run_dir=find_run_dir(args.ckpt),
                                location=args.out, repo_id=args.push_to_hub, checkpoint=args.ckpt)
        export_with_model_card(fmt, module, args.out, card, overwrite=args.overwrite, **options)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        print(f"flexlora-export: error: {err}", file=sys.stderr)
        return 1
    print(f"flexlora-export: wrote {args.format} export of {args.ckpt} to {args.out}")
    if args.push_to_hub is not None:
        try:
            url = push_export(args.out, args.push_to_hub, private=args.private,
                              commit_message=f"flexlora-export --format {args.format} of {args.ckpt.name}")
        except HubUploadError as err:
            print(f"flexlora-export: error: {err}", file=sys.stderr)
            return 1
        print(f"flexlora-export: uploaded {args.out} to {url}")
    return 0


def _format_options() -> dict[FormatOption, list[str]]:
    """Every flag a registered format takes, with the formats that take it."""
    options: dict[FormatOption, list[str]] = {}
    for fmt in FORMATS.values():
        for option in fmt.options:
            options.setdefault(option, []).append(fmt.name)
    return options


def _validate(args: argparse.Namespace, fmt: ExportFormat) -> None:
    """Check what can be checked without reading the checkpoint, before anything is written."""
    if not args.ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {args.ckpt} not found")
    export.check_output_dir(args.out, args.overwrite)
    for option, names in _format_options().items():
        given = getattr(args, option.keyword) is not None
        if given and option not in fmt.options:
            raise ValueError(f"{option.flag} only applies to --format {' / '.join(names)}")
        if option.required and not given and option in fmt.options:
            raise ValueError(f"--format {fmt.name} needs {option.flag}: {option.help}")
    if args.base_model is not None:
        export.check_base_model(args.base_model)
    if args.private and args.push_to_hub is None:
        raise ValueError("--private only applies with --push-to-hub REPO_ID")
    if args.push_to_hub is not None:
        check_push(args.push_to_hub)


if __name__ == "__main__":
    sys.exit(main())
