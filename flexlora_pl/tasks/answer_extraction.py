"""Answer extraction for the 8 commonsense sets: the scoring rule behind the published numbers.

The evaluation decodes prompt and generation together, keeps the response (the text after the prompt's
``### Response:``), and takes the **first** match of the set's regex in it as the prediction; a generation
without a match counts as wrong. The prediction is compared with the record's ``answer`` exactly.

    "... ### Response:\\n the correct answer is solution2. solution1 is wrong"  →  "solution2"

Where the response starts is a choice between two published rules (``response_split``), which differ only
on a generation that repeats the prompt template (writes ``### Response:`` again):

* ``last`` (the default): the text after the **last** marker, as DoRA's copy of the evaluation script
  (``commonsense_evaluate.py``, ``split("### Response:")[-1]``) cuts it. A prompt that quotes the marker
  cannot shift the cut, and an answer written after a repeated marker counts.
* ``first``: the text between the **first** marker and the second (or the end), as LLM-Adapters'
  ``commonsense_evaluate.py`` cuts it (``split("### Response:")[1]``): whatever the model writes after
  repeating the template is ignored.
"""

from __future__ import annotations

import re

from flexlora_pl.data.commonsense import COMMONSENSE_SETS

__all__ = ["ANSWER_PATTERNS", "RESPONSE_MARKER", "RESPONSE_SPLITS", "check_response_split", "extract_answer",
           "response_text"]

RESPONSE_MARKER = "### Response:"
"""The prompt's last line; the model's answer follows it."""

RESPONSE_SPLITS = {
    "last": "DoRA's commonsense_evaluate.py: the text after the last '### Response:'",
    "first": "LLM-Adapters' commonsense_evaluate.py: the text between the first '### Response:' and the second",
}
"""The allowed ``response_split`` values, each with the evaluation script it follows."""

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


def check_response_split(response_split: str, key: str = "response_split") -> str:
    """``response_split`` itself when it is one of :data:`RESPONSE_SPLITS`.

    Args:
        response_split: the value to check.
        key: the setting's name in the message (the config key that holds it).

    Raises:
        ValueError: any other value; the message names ``key`` and the allowed values.
    """
    if response_split not in RESPONSE_SPLITS:
        choices = "; ".join(f"{name!r} ({rule})" for name, rule in RESPONSE_SPLITS.items())
        raise ValueError(f"{key}={response_split!r} is not an answer extraction rule; use one of: {choices}")
    return response_split


def response_text(decoded: str, response_split: str = "last") -> str:
    """The response of a decoded prompt + generation, stripped.

    Args:
        decoded: the decoded sequence (or the generation alone: without a marker, all of it is the response).
        response_split: ``last``: the text after the last ``### Response:``; ``first``: the text between the
            first ``### Response:`` and the second, or to the end when there is no second.

    Raises:
        ValueError: ``response_split`` is neither ``last`` nor ``first``.
    """
    check_response_split(response_split)
    if response_split == "last":
        return decoded.rsplit(RESPONSE_MARKER, 1)[-1].strip()
    pieces = decoded.split(RESPONSE_MARKER)
    return (pieces[1] if len(pieces) > 1 else pieces[0]).strip()


def extract_answer(set_name: str, decoded: str, response_split: str = "last") -> str | None:
    """The predicted answer: the first match of the set's regex in the response, ``None`` when nothing matches.

    Args:
        set_name: one of the 8 sets (``boolq``, ``piqa``, ``social_i_qa``, ``hellaswag``, ``winogrande``,
            ``ARC-Easy``, ``ARC-Challenge``, ``openbookqa``).
        decoded: the decoded prompt + generation (or the generation alone).
        response_split: where the response starts and ends (see :func:`response_text`).

    Raises:
        ValueError: ``set_name`` is not one of the 8 sets, or ``response_split`` is not ``last``/``first``.
    """
    pattern = ANSWER_PATTERNS.get(set_name)
    if pattern is None:
        raise ValueError(f"no answer pattern for set {set_name!r}; the commonsense sets are {list(COMMONSENSE_SETS)}")
    found = pattern.search(response_text(decoded, response_split))
    return found.group(0) if found else None
