"""The paper's published cells for Tables 1-3, as data, so measured tables can be printed beside them.

Values are as printed (means; the ± columns of Table 1 are left out). Each row keeps the average the paper
prints, and :func:`check_table` recomputes it from the cells: some printed averages do not match their
cells (Table 1's LoRA row prints 81.7 while its eight cells average 87.6; most of Table 3's averages match
neither the mean of the 19 tasks nor the mean of the three group means), and in Table 2 the ARC-e and
ARC-c columns of the LoRA, AdaLoRA and FlexLoRA rows look swapped (ARC-Challenge above ARC-Easy, the
reverse of every other row and of the two sets' difficulty).
"""

from __future__ import annotations

from dataclasses import dataclass

from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.data.vtab import VTAB_GROUPS, VTAB_TASKS

__all__ = ["GLUE_COLUMNS", "PAPER_TABLES", "PaperRow", "PaperTable", "check_table"]

GLUE_COLUMNS = ("glue_cola", "glue_mnli", "glue_mrpc", "glue_rte", "glue_qnli", "glue_sst2", "glue_stsb", "glue_qqp")


@dataclass(frozen=True)
class PaperRow:
    """One printed row.

    Args:
        key: the measured row it corresponds to: a method name (``lora``), or ``<task> <method>`` where a
            table has a row per task and method (Table 2: ``llama3_8b_r8 lora``).
        label: the row as the paper prints it.
        cells: the printed values, in the table's column order.
        printed_average: the printed ``Avg.``.
    """

    key: str
    label: str
    cells: tuple[float, ...]
    printed_average: float


@dataclass(frozen=True)
class PaperTable:
    """A printed table: its columns (task or test-set names as the results use them) and rows."""

    name: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[PaperRow, ...]


def _rows(columns: tuple[str, ...], text: str) -> tuple[PaperRow, ...]:
    rows = []
    for line in text.strip().splitlines():
        key, label, values = (part.strip() for part in line.split("|"))
        numbers = tuple(float(v) for v in values.split())
        if len(numbers) != len(columns) + 1:
            raise AssertionError(f"paper row {label!r}: {len(numbers)} numbers for {len(columns)} columns + Avg.")
        rows.append(PaperRow(key, label, numbers[:-1], numbers[-1]))
    return tuple(rows)


_TABLE1 = """
full | Full FT | 69.2 89.9 90.2 83.8 94.0 95.6 91.6 92.4 88.3
bitfit | BitFit | 67.0 89.4 87.8 78.7 92.2 94.8 91.4 88.4 86.2
h_adapter | H-Adapter | 62.6 86.5 89.9 80.4 92.8 93.7 90.2 90.8 85.9
p_adapter | P-Adapter | 63.9 86.8 89.5 80.5 92.6 93.8 90.7 90.5 86.0
adapterfusion | AdapterFusion | 68.8 90.3 89.5 85.2 94.3 95.6 91.5 92.0 88.4
lora | LoRA r=8 | 68.5 89.8 90.7 84.8 94.1 94.0 91.2 87.9 81.7
adalora | AdaLoRA | 70.0 89.0 90.9 88.1 94.1 94.6 91.2 87.2 88.1
dora | DoRA | 65.4 87.8 90.1 81.7 93.0 91.3 91.3 91.3 86.5
dylora | DyLoRA r=8 | 59.5 86.8 91.4 77.6 93.0 94.4 91.1 89.9 85.5
flexlora | FlexLoRA | 71.8 90.0 90.9 88.8 94.2 95.2 91.5 90.3 89.1
"""

_TABLE2 = """
chatgpt | ChatGPT | 73.1 85.4 68.5 78.5 66.1 89.8 79.9 74.8 77.0
llama3_8b full | LLaMA3-8B Full FT | 75.3 89.9 81.5 95.8 87.6 91.6 79.3 87.4 86.1
llama3_8b_r8 lora | LoRA r=8 | 62.2 86.5 80.3 94.5 84.4 77.7 88.0 85.8 82.4
llama3_8b_r8 adalora | AdaLoRA r=8 | 74.1 88.4 80.3 95.7 84.4 80.1 91.0 87.0 85.1
llama3_8b_r8 flexlora | FlexLoRA r=8 | 74.3 88.6 81.0 95.6 84.9 80.2 90.7 86.4 85.2
llama3_8b_r32 lora | LoRA r=32 | 75.6 89.5 81.2 95.1 85.1 80.1 90.3 86.2 85.4
llama3_8b_r32 adalora | AdaLoRA r=32 | 71.3 88.7 80.1 94.5 86.2 78.8 90.2 85.8 84.5
llama3_8b_r32 lora_dash | LoRA-Dash | 75.3 88.5 80.2 95.7 86.8 90.7 80.2 85.6 85.4
llama3_8b_r32 nora_plus | NoRA+ | 71.2 85.1 79.5 92.2 83.4 85.9 72.3 83.2 81.6
llama3_8b_r32 preclora | PrecLoRA | 70.7 85.8 78.9 91.9 83.7 85.1 71.1 82.4 81.2
llama3_8b_r32 flexlora | FlexLoRA r=32 | 72.8 89.1 80.7 96.0 86.4 81.3 90.8 87.2 85.5
"""

_TABLE3 = """
full | Full FT | 68.9 87.7 64.3 97.2 86.9 84.7 38.8 79.7 95.7 84.2 73.9 56.3 58.6 41.7 65.5 57.5 46.7 25.7 29.1 68.9
lora | LoRA r=14 | 49.3 87.7 63.1 98.1 87.5 73.2 47.0 79.4 94.4 80.1 71.5 74.3 60.4 40.4 72.2 67.9 40.8 13.7 29.3 66.7
flora | FLoRA | 50.5 86.5 63.9 98.1 87.4 72.0 49.4 78.6 94.2 78.3 74.0 67.4 57.2 40.4 74.4 65.9 38.0 12.0 30.1 66.4
liera | LieRA | 52.3 86.1 65.8 98.4 89.3 57.7 50.4 78.6 91.6 76.1 72.3 57.7 49.5 38.0 72.7 60.0 36.1 12.3 26.7 64.4
milora | MiLoRA | 39.3 83.6 61.6 97.0 86.2 33.4 48.1 77.0 85.9 66.8 73.9 31.5 29.7 34.0 54.0 12.0 16.7 10.9 21.2 55.2
pissa | PiSSA | 48.8 87.3 62.9 98.0 88.2 67.8 47.2 80.5 94.6 79.2 70.4 73.2 54.2 41.7 74.3 70.7 40.9 12.7 29.8 66.3
moslora | MoSLoRA | 48.0 85.5 60.5 97.7 86.0 74.0 47.7 77.6 94.2 76.6 74.2 74.2 59.9 41.1 74.4 66.6 37.5 13.1 30.2 66.0
adalora | AdaLoRA | 56.9 87.2 63.3 98.4 88.3 69.5 51.2 76.4 92.6 76.5 72.3 56.5 51.8 39.5 75.3 45.1 35.9 12.7 27.1 64.7
mlae | MLAE | 49.0 87.1 62.4 97.9 88.1 69.8 47.6 79.9 94.4 80.0 70.1 73.5 57.4 42.3 74.0 69.2 43.2 13.2 30.2 66.6
flexlora|FlexLoRA| 58.2 88.9 64.3 98.5 89.3 73.7 51.3 80.0 93.4 80.3 73.4 66.9 60.0 41.0 77.8 64.7 39.0 13.6 29.9 67.8
"""

PAPER_TABLES: dict[str, PaperTable] = {
    "table1": PaperTable("table1", "Table 1: GLUE dev set, DeBERTaV3-base, mean of 5 seeds", GLUE_COLUMNS,
                         _rows(GLUE_COLUMNS, _TABLE1)),
    "table2": PaperTable("table2", "Table 2: commonsense reasoning, LLaMA3-8B", COMMONSENSE_SETS,
                         _rows(COMMONSENSE_SETS, _TABLE2)),
    "table3": PaperTable("table3", "Table 3: VTAB-1k, ViT-B/16, test top-1", tuple(VTAB_TASKS),
                         _rows(tuple(VTAB_TASKS), _TABLE3)),
}
"""The paper's Tables 1-3 by name (``--paper table1``)."""

_TOLERANCE = 0.1  # cells printed to 0.1: their mean may differ from the printed average by rounding only


def check_table(table: PaperTable) -> dict[str, tuple[float, list[str]]]:
    """Recompute every row's average from its cells and note what does not add up.

    Returns:
        row key → (the recomputed average, notes): a printed average that differs from the cells' mean
        by more than rounding, and (Table 2) ARC-Easy printed below ARC-Challenge.
    """
    checked = {}
    for row in table.rows:
        average = sum(row.cells) / len(row.cells)
        notes = []
        if table.columns == tuple(VTAB_TASKS):  # VTAB averages are also reported as the mean of the group means
            groups = [[v for v, c in zip(row.cells, table.columns, strict=True) if VTAB_TASKS[c].group == g]
                      for g in VTAB_GROUPS]
            of_groups = sum(sum(g) / len(g) for g in groups) / len(groups)
            if min(abs(average - row.printed_average), abs(of_groups - row.printed_average)) > _TOLERANCE:
                notes.append(f"printed Avg. {row.printed_average:.1f} ≠ mean of its 19 cells {average:.1f} and ≠ "
                             f"mean of its 3 group means {of_groups:.1f}")
        elif abs(average - row.printed_average) > _TOLERANCE:
            notes.append(f"printed Avg. {row.printed_average:.1f} ≠ mean of its cells {average:.1f}")
        if "ARC-Easy" in table.columns:
            easy, challenge = (row.cells[table.columns.index(c)] for c in ("ARC-Easy", "ARC-Challenge"))
            if easy < challenge:
                notes.append(f"ARC-e {easy} < ARC-c {challenge}: the two columns look swapped")
        checked[row.key] = (average, notes)
    return checked
