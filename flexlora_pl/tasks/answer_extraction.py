"""Answer extraction for the 8 commonsense sets: the scoring rule behind the published numbers (SPEC §2.1).

LLM-Adapters' ``commonsense_evaluate.py`` decodes prompt and generation together, keeps the text after
``### Response:``, and takes the **first** match of the set's regex as the prediction; a generation
without a match counts as wrong. The prediction is compared with the record's ``answer`` exactly.

    "... ### Response:\\n the correct answer is solution2. solution1 is wrong"  →  "solution2"

The text is cut after the *last* ``### Response:``: a prompt that quotes the marker cannot shift the cut.
"""

from __future__ import annotations

import re

from flexlora_pl.data.commonsense import COMMONSENSE_SETS

__all__ = ["ANSWER_PATTERNS", "RESPONSE_MARKER", "extract_answer", "response_text"]

RESPONSE_MARKER = "### Response:"
"""The prompt's last line; the model's answer follows it."""

_CHOICE_OF_FIVE = re.compile(r"answer1|answer2|answer3|answer4|answer5")

ANSWER_PATTERNS: dict[str, re.Pattern[str]] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "social_i_qa": _CHOICE_OF_FIVE,
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
    "ARC-Easy": _CHOICE_OF_FIVE,
    "ARC-Challenge": _CHOICE_OF_FIVE,
    "openbookqa": _CHOICE_OF_FIVE,
}
"""Set name -> the regex of its answers, exactly as in LLM-Adapters (case-sensitive, no word boundaries)."""


def response_text(decoded: str) -> str:
    """The text after the last ``### Response:`` of a decoded prompt + generation, stripped.

    Args:
        decoded: the decoded sequence (or the generation alone: without a marker, all of it is the response).
    """
    return decoded.rsplit(RESPONSE_MARKER, 1)[-1].strip()


def extract_answer(set_name: str, decoded: str) -> str | None:
    """The predicted answer: the first match of the set's regex in the response, ``None`` when nothing matches.

    Args:
        set_name: one of the 8 sets (``boolq``, ``piqa``, ``social_i_qa``, ``hellaswag``, ``winogrande``,
            ``ARC-Easy``, ``ARC-Challenge``, ``openbookqa``).
        decoded: the decoded prompt + generation (or the generation alone).

    Raises:
        ValueError: ``set_name`` is not one of the 8 sets.
    """
    pattern = ANSWER_PATTERNS.get(set_name)
    if pattern is None:
        raise ValueError(f"no answer pattern for set {set_name!r}; the commonsense sets are {list(COMMONSENSE_SETS)}")
    found = pattern.search(response_text(decoded))
    return found.group(0) if found else None
