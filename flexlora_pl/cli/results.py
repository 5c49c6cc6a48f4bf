"""The ``flexlora-results`` command: finished runs → Markdown tables (and CSV) laid out like the paper's.

    flexlora-results runs/table1_glue                      # results and cost tables, Markdown
    flexlora-results runs/table1_glue --csv table1.csv     # and a CSV file
    flexlora-results runs/table1_glue --paper table1       # the paper's cells under each measured row
    flexlora-results runs/table1_glue --reference lora     # and each method's seed-paired differences from LoRA
    flexlora-results runs/offline_attribution --contrast static:lora --contrast flexlora:static   # chosen pairs

See :mod:`flexlora_pl.experiments.results` (and docs/experiments.md) for the selection rule per benchmark.
A run that gives no score is counted in its cell by the reason (failed, unfinished, no test yet, other
monitor, no metric, missing), never shown as a number its rule does not report. Each cell carries the 95 %
t-interval of its mean; with ``--reference`` each sweep's table is followed by one of the other methods'
seed-paired differences from the reference (see docs/statistics.md). A tuned sweep's folder adds its search
table: per task × method the selected values, their search score, the trials by state, the searched ranges, the
search's fit time, and a warning for each selected value at an end of its range.
Exit status: 0, or 2 for a bad folder, runs of one task that report different metrics, or a --reference method
no run has.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flexlora_pl.experiments.paper import PAPER_TABLES
from flexlora_pl.experiments.results import MixedMetricsError, collect, paper_markdown, write_csv
from flexlora_pl.experiments.sweep_file import load_sweep

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="flexlora-results",
        description="Collect the run folders a sweep wrote (<sweep>/<task>/<method>/seed<k>/metrics.json) into "
                    "results tables (rows = methods, columns = tasks + averages, cells = mean ± std [95 % interval of "
                    "the mean] (n seeds)) and a cost table.",
    )
    parser.add_argument("runs_dir", help="the folder the runs are in, e.g. runs or runs/table1_glue")
    parser.add_argument("--csv", default=None, help="also write every table to this CSV file")
    parser.add_argument("--paper", choices=sorted(PAPER_TABLES), default=None,
                        help="put the paper's published cells beside the measured rows, and print the paper's "
                             "table with its recomputed averages")
    parser.add_argument("--sweep", default=None,
                        help="the sweep file the runs came from: runs of it with no folder are shown as missing")
    parser.add_argument("--reference", default=None, metavar="METHOD",
                        help="also print, per sweep, every other method's seed-paired difference from this method "
                             "(mean, 95 %% interval, paired t-test p; 'no measurable difference' where the interval "
                             "holds 0); default: the --sweep file's reference, if it names one")
    parser.add_argument("--contrast", action="append", default=[], metavar="METHOD:BASE", type=_contrast,
                        help="also print, per sweep, a table of the seed-paired differences METHOD − BASE, a row "
                             "per --contrast (repeat it; e.g. an attribution: --contrast static:lora --contrast "
                             "flexlora:static)")
    parser.add_argument("--digits", type=int, default=1, help="decimals shown (default 1, as the paper)")
    parser.add_argument("--raw", action="store_true", help="show scores as logged (0-1), not as percentages")
    return parser


def _contrast(text: str) -> tuple[str, str]:
    method, colon, base = text.partition(":")
    if not colon or not method or not base or method == base:
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD:BASE, two different methods, e.g. flexlora:static")
    return method, base


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flexlora-results``; returns the exit status."""
    parser = build_parser()
    options = parser.parse_args(argv)
    scale = 1.0 if options.raw else 100.0
    try:
        sweep = load_sweep(options.sweep, check_files=False) if options.sweep else None
        reference: str | None = options.reference or (sweep.reference if sweep is not None else None)
        tables = collect(options.runs_dir, options.paper, scale, options.digits, sweep, reference,
                         contrasts=options.contrast)
    except (FileNotFoundError, MixedMetricsError, ValueError) as err:
        parser.error(str(err))
    for table in tables:
        print(table.markdown(scale, options.digits if not options.raw else max(options.digits, 3)))
        print()
    if options.paper:
        print(paper_markdown(PAPER_TABLES[options.paper], options.digits))
        print()
    if options.csv:
        write_csv(tables, options.csv, scale)
        print(f"wrote {options.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
