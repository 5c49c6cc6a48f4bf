"""Commonsense reasoning in the LLM-Adapters layout: ``commonsense_170k.json`` and 8 test sets."""

from __future__ import annotations

__all__ = ["COMMONSENSE_SETS"]

COMMONSENSE_SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                    "openbookqa")
"""The 8 test sets (``dataset/<set>/test.json``), in the column order of the paper's Table 2."""
