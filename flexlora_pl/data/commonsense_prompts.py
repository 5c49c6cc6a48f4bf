"""The prompts of the commonsense task: LLM-Adapters' two templates, byte for byte, and the clean Alpaca one.

``llm_adapters`` reproduces the templates of LLM-Adapters' ``finetune.py`` and ``commonsense_evaluate.py``,
including the 16-space indentation their triple-quoted strings carry and the small differences between the
training prompt and the evaluation prompt; the published numbers come from them (``docs/commonsense.md``).
``alpaca`` is the clean Alpaca template (no indentation, the same prompt for training and evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROMPT_TEMPLATES", "PromptTemplate"]

_INDENT = " " * 16  # the indentation of LLM-Adapters' triple-quoted prompt strings


@dataclass(frozen=True)
class PromptTemplate:
    """The training and evaluation prompts of one template, each with and without an ``input``.

    Fields are ``str.format`` patterns over ``instruction``, ``input`` and (training only) ``output``;
    the evaluation prompts end where the model's answer starts.
    """

    train: str
    train_with_input: str
    eval: str
    eval_with_input: str

    def training_prompt(self, instruction: str, input: str, output: str) -> str:
        """The full training text of a record (prompt and answer; EOS is added after tokenisation)."""
        pattern = self.train_with_input if input else self.train
        return pattern.format(instruction=instruction, input=input, output=output)

    def eval_prompt(self, instruction: str, input: str = "") -> str:
        """The prompt the model completes at evaluation."""
        pattern = self.eval_with_input if input else self.eval
        return pattern.format(instruction=instruction, input=input)


_TASK = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_TASK_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.")

PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    # LLM-Adapters' finetune.py and commonsense_evaluate.py, verbatim: the training prompt has 2 trailing spaces
    # after the task line (1 with an input) and indented blank lines; the evaluation prompt has 1 trailing
    # space (none with an input), bare blank lines, and ends with the indentation after "### Response:".
    "llm_adapters": PromptTemplate(
        train=(f"{_TASK}  \n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
               f"{_INDENT}### Response:\n{_INDENT}{{output}}"),
        train_with_input=(f"{_TASK_WITH_INPUT} \n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
                          f"{_INDENT}### Input:\n{_INDENT}{{input}}\n{_INDENT}\n"
                          f"{_INDENT}### Response:\n{_INDENT}{{output}}"),
        eval=f"{_TASK} \n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Response:\n{_INDENT}",
        eval_with_input=(f"{_TASK_WITH_INPUT}\n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
                         f"{_INDENT}### Input:\n{_INDENT}{{input}}\n\n{_INDENT}### Response:\n{_INDENT}"),
    ),
    # The Alpaca template without the artefacts: one prompt for training and evaluation.
    "alpaca": PromptTemplate(
        train=f"{_TASK}\n\n### Instruction:\n{{instruction}}\n\n### Response:\n{{output}}",
        train_with_input=(f"{_TASK_WITH_INPUT}\n\n### Instruction:\n{{instruction}}\n\n### Input:\n{{input}}\n\n"
                          "### Response:\n{output}"),
        eval=f"{_TASK}\n\n### Instruction:\n{{instruction}}\n\n### Response:\n",
        eval_with_input=(f"{_TASK_WITH_INPUT}\n\n### Instruction:\n{{instruction}}\n\n### Input:\n{{input}}\n\n"
                         "### Response:\n"),
    ),
}
"""Template name -> :class:`PromptTemplate`. ``llm_adapters`` (default) gives numbers comparable with the papers."""
