"""FlexLoRA fine-tuning of decoder-only language models (LLaMA family) scored by generation.

The backbone is ``AutoModelForCausalLM`` from a hub name or a local folder, frozen, optionally in
bfloat16 (``torch_dtype``) while the adapters stay float32: with ``precision: bf16-mixed`` the matmuls
run in bfloat16, and the optimizer updates float32 adapters. Training minimises the causal-LM loss over
the labelled tokens (the data module labels the whole text, or the response only).

``test`` follows LLM-Adapters' commonsense protocol: every prompt of a set is continued by greedy
decoding (beam search with ``num_beams > 1``) for up to ``max_new_tokens`` tokens, in batches of
left-padded prompts with their attention mask; the answer is the first match of the set's regex in the
response, the text after the last ``### Response:`` (``response_split: last``) or between the first and
the second (``first``; :mod:`flexlora_pl.tasks.answer_extraction`), and a set's accuracy is the share of
records whose answer equals the record's ``answer`` (no match: wrong). Logged per set as
``test/<set>/accuracy`` (with ``test/<set>/examples``, the records scored), and ``test/accuracy`` is
the plain mean over the sets evaluated; the counts are summed over DDP processes, each record once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric
from typing_extensions import override

from flexlora_pl.callbacks.generation_writer import GenerationWriter
from flexlora_pl.core.quantized import QUANTIZATIONS, quantized_linears
from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.methods import METHODS, AdaptationMethod, build_method
from flexlora_pl.module import FlexLoRAModule
from flexlora_pl.sources import require_folder
from flexlora_pl.tasks.answer_extraction import check_response_split, extract_answer, response_text

__all__ = ["LLAMA_TARGETS", "FlexLoRACausalLM", "SetAccuracy", "check_quantization", "generate_continuations"]

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
"""The paper's 5 matrices per LLaMA decoder layer (160 in LLaMA3-8B)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def generate_continuations(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                           pad_token_id: int, eos_token_id: int | Sequence[int], max_new_tokens: int = 32,
                           num_beams: int = 1) -> torch.Tensor:
    """The tokens a causal LM appends to a batch of left-padded prompts: greedy, or beam search.

    Works on any ``transformers`` causal LM: the in-framework backbone, a merged export, a ``PeftModel``.

    Args:
        model: the language model (``generate`` is called on it).
        input_ids: prompts, padded on the left, ``(B, T)``.
        attention_mask: 1 on prompt tokens, 0 on padding, ``(B, T)``.
        pad_token_id: fills the rows that finished early.
        eos_token_id: ends a row.
        max_new_tokens: most tokens appended.
        num_beams: 1 for greedy decoding; more for beam search.

    Returns:
        The new tokens, ``(B, <= max_new_tokens)``, padded with ``pad_token_id`` after a row's EOS.
    """
    from transformers import GenerationConfig

    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("the prompts are padded on the right: generation would continue after the padding. Pad "
                         "them on the left (the commonsense data module does)")
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, use_cache=True,
                              pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return out[:, input_ids.shape[1]:]  # (B, new)


class SetAccuracy(Metric):
    """Correct and scored records per commonsense set, summed over DDP processes.

    Args:
        set_names: the sets, in the order of the indices given to :meth:`update`.
    """

    full_state_update = False

    def __init__(self, set_names: Sequence[str] = COMMONSENSE_SETS) -> None:
        super().__init__()
        self.set_names = list(set_names)
        self.add_state("correct", torch.zeros(len(self.set_names), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.set_names), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, set_index: int, correct: torch.Tensor) -> None:
        """Add the outcomes (``True``: right answer) of records of one set."""
        self.correct[set_index] += correct.sum().to(self.correct.dtype)
        self.total[set_index] += correct.numel()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(correct, total)`` per set."""
        return self.correct, self.total


class FlexLoRACausalLM(FlexLoRAModule):
    """A causal language model (LLaMA family) adapted by FlexLoRA or a baseline, scored by generation.

    Args:
        model_name_or_path: hub name (``meta-llama/Meta-Llama-3-8B``) or local folder of the base model;
            the ``flexlora`` command gives the data module the same path for its tokenizer.
        method: how the model is adapted (:mod:`flexlora_pl.methods`): ``FlexLoRA`` (default), ``LoRA``,
            ``AdaLoRA``, …; a method that names no ``target_modules`` adapts :data:`LLAMA_TARGETS`.
        modules_to_save: modules trained in full (none by default: the LM head stays frozen).
        optimizer: optimizer factory (default AdamW).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
        init_seed: seed of the initial adapter draws; ``None`` follows ``seed_everything``.
        torch_dtype: dtype of the frozen base model: ``float32``, ``bfloat16`` (half the memory; use with
            ``precision: bf16-mixed``) or ``float16``. Trained parameters are always float32.
        gradient_checkpointing: recompute the decoder layers' activations in the backward pass (less memory,
            about a third more compute).
        max_new_tokens: most tokens generated per test prompt (docs/commonsense.md: 32).
        num_beams: 1 for greedy decoding (default); LLM-Adapters' original evaluation used 4 beams.
        response_split: where the scored response lies in the decoded prompt + generation: ``last`` (default)
            the text after the last ``### Response:``, as DoRA's evaluation script cuts it; ``first`` the text
            between the first ``### Response:`` and the second, as LLM-Adapters' script cuts it. They differ
            only on generations that repeat the prompt template.
        trust_remote_code: allow model code from the hub folder to run (off by default).
        quantization: ``nf4`` or ``fp4`` loads the frozen base in 4 bits through bitsandbytes (QLoRA:
            transformers' ``BitsAndBytesConfig`` with double quantization and bfloat16 compute; LLaMA3-8B's base
            then holds about 5.7 GB instead of 16, by parameter count): the adapters wrap the 4-bit linear layers
            and train in float32, the layers left unquantized (embeddings, norms, the LM head) are in
            ``torch_dtype``. ``None`` (default): no quantization. Methods that can adapt a 4-bit base: FlexLoRA,
            LoRA, rsLoRA, AdaLoRA (:attr:`~flexlora_pl.methods.AdaptationMethod.quantized_base`). Needs
            ``pip install -e ".[qlora]"``. Checkpoints never hold the base; a merged export holds it dequantized,
            with the update, in bfloat16.
    """

    prediction_writer_class = GenerationWriter
    """What ``flexlora predict`` writes when the config names no writer: one JSONL of generations per set."""

    def __init__(
        self,
        model_name_or_path: str,
        method: AdaptationMethod | None = None,
        modules_to_save: Sequence[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_seed: int | None = None,
        torch_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        response_split: Literal["last", "first"] = "last",
        trust_remote_code: bool = False,
        quantization: Literal["nf4", "fp4"] | None = None,
    ) -> None:
        check_response_split(response_split, "model.init_args.response_split")
        if torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype={torch_dtype!r} is not one of {list(_DTYPES)}")
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {max_new_tokens} and {num_beams}")
        method = build_method(method).with_default_targets(LLAMA_TARGETS)
        if quantization is not None:
            check_quantization(quantization, method)
        backbone = _load_backbone(model_name_or_path, _DTYPES[torch_dtype], trust_remote_code, quantization)
        for _, layer in quantized_linears(backbone) if quantization is not None else ():
            # bitsandbytes repacks a 4-bit weight into a CPU layout at its first evaluation forward on CPUs with
            # AVX512-BF16 (and back at every state_dict): other kernels, other rounding, so a run's numbers would
            # depend on when it last evaluated or saved, and a resumed run would not repeat the uninterrupted one
            layer.support_avx512bf16_for_cpu = False
        if gradient_checkpointing:
            _enable_checkpointing(backbone)
        super().__init__(backbone=backbone, modules_to_save=list(modules_to_save or []), optimizer=optimizer,
                         lr_scheduler=lr_scheduler, init_seed=init_seed, method=method)
        for param in self.parameters():  # peft builds its layers in the base weight's dtype: train in float32
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        # generation and memory settings are not part of the trained model: `test --ckpt_path` may change them
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "method", "gradient_checkpointing",
                                          "max_new_tokens", "num_beams", "response_split"])
        self.hparams["method"] = self.method.as_config()
        self.max_new_tokens, self.num_beams, self.response_split = max_new_tokens, num_beams, response_split
        self.test_accuracy = SetAccuracy(COMMONSENSE_SETS)
        self._set_names: list[str] = []
        self._tokenizer: Any = None

    # ---------------------------------------------------------------- set-up
    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage not in ("test", "predict"):
            return
        data = getattr(self.trainer, "datamodule", None)
        names = getattr(data, "test_set_names", None)
        tokenizer = getattr(data, "tokenizer", None)
        if not names or tokenizer is None:
            raise ValueError(f"{stage} scores generations per commonsense set: it needs a data module with "
                             "`test_set_names` and a `tokenizer`, such as flexlora_pl.data.CommonsenseDataModule")
        unknown = [name for name in names if name not in COMMONSENSE_SETS]
        if unknown:
            raise ValueError(f"no answer pattern for the sets {unknown}; the commonsense sets are "
                             f"{list(COMMONSENSE_SETS)}")
        self._set_names, self._tokenizer = list(names), tokenizer

    # ------------------------------------------------------------ generation
    def answer_batch(self, batch: dict[str, Any], set_name: str) -> list[dict[str, Any]]:
        """Generate for a batch of prompts of one set and score every row.

        Returns:
            One dict per row: ``id`` (position in ``test.json``), ``set``, ``prompt``, ``generation`` (the
            response that was scored, cut by ``response_split``), ``prediction`` (``None``: no match),
            ``answer``, ``correct``.
        """
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise RuntimeError("answer_batch needs the data module's tokenizer, which setup('test') or "
                               "setup('predict') takes from trainer.datamodule; run it through a Trainer")
        new = generate_continuations(self.backbone, batch["input_ids"], batch["attention_mask"],
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        rows = []
        for index, prompt, text, answer in zip(batch["index"], batch["prompt"], texts, batch["answer"], strict=True):
            decoded = prompt + text  # what LLM-Adapters decodes: prompt and generation
            prediction = extract_answer(set_name, decoded, self.response_split)
            rows.append({"id": int(index), "set": set_name, "prompt": prompt,
                         "generation": response_text(decoded, self.response_split),
                         "prediction": prediction, "answer": answer, "correct": prediction == answer})
        return rows

    @override
    def on_test_epoch_start(self) -> None:
        self.test_accuracy.reset()
        # an empty update: a process that receives no record of some set still has a state to sync
        self.test_accuracy.update(0, torch.zeros(0, dtype=torch.bool, device=self.device))

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        set_name = self._set_names[dataloader_idx]
        rows = self.answer_batch(batch, set_name)
        correct = torch.tensor([row["correct"] for row in rows], dtype=torch.bool, device=self.device)
        self.test_accuracy.update(COMMONSENSE_SETS.index(set_name), correct)

    @override
    def on_test_epoch_end(self) -> None:
        correct, total = self.test_accuracy.compute()  # summed over processes
        self.test_accuracy.reset()
        scores: dict[str, float] = {}
        for name in self._set_names:
            i = COMMONSENSE_SETS.index(name)
            if int(total[i]) == 0:
                continue  # no batch of this set ran (limit_test_batches)
            scores[name] = float(correct[i]) / float(total[i])
            self.log(f"test/{name}/accuracy", scores[name], sync_dist=True, add_dataloader_idx=False)
            self.log(f"test/{name}/examples", float(total[i]), sync_dist=True, add_dataloader_idx=False)
        if scores:
            self.log("test/accuracy", sum(scores.values()) / len(scores), sync_dist=True, add_dataloader_idx=False)
        rank_zero_info(_accuracy_table(scores, {n: int(total[COMMONSENSE_SETS.index(n)]) for n in scores},
                                       self.num_beams, self.response_split))

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One scored row per prompt (see :meth:`answer_batch`); the ``GenerationWriter`` callback saves them."""
        return self.answer_batch(batch, self._set_names[dataloader_idx])


def _accuracy_table(scores: dict[str, float], totals: dict[str, int], num_beams: int = 1,
                    response_split: str = "last") -> str:
    if not scores:
        return "Commonsense accuracy: no set was evaluated"
    width = max(len(name) for name in [*scores, "mean of 8"])
    decoding = "greedy generation" if num_beams == 1 else f"{num_beams}-beam search"
    where = ("after the last '### Response:'" if response_split == "last"
             else "between the first '### Response:' and the second")
    lines = [f"Commonsense accuracy ({decoding}, first regex match {where}):",
             f"  {'set':<{width}}  accuracy  records"]
    lines += [f"  {name:<{width}}  {100 * value:7.2f}%  {totals[name]:>7}" for name, value in scores.items()]
    label = "mean of 8" if len(scores) == len(COMMONSENSE_SETS) else f"mean of {len(scores)}"
    lines.append(f"  {label:<{width}}  {100 * sum(scores.values()) / len(scores):7.2f}%")
    return "\n".join(lines)


def _enable_checkpointing(backbone: nn.Module) -> None:
    """Recompute every decoder layer in the backward pass (transformers 5 renamed the switch)."""
    # non-reentrant: the frozen embeddings give inputs without grad, which the reentrant variant cannot take
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    backbone.config.use_cache = False


def check_quantization(quantization: str, method: AdaptationMethod) -> None:
    """Refuse, before the base is loaded, a 4-bit base that cannot be: another data type, a method that cannot adapt
    one, or bitsandbytes missing (the message names the extra to install)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.init_args.quantization={quantization!r} is not one of {list(QUANTIZATIONS)} (or "
                         "null for an unquantized base)")
    if not method.quantized_base:
        able = sorted(name for name, cls in METHODS.items() if cls.quantized_base)
        raise ValueError(
            f"method {method.name!r} ({type(method).__name__}) cannot adapt a 4-bit base (quantization: "
            f"{quantization}): it trains, decomposes or rescales the base weights themselves. Methods that can: "
            f"{able}; or set model.init_args.quantization: null and load the base in torch_dtype"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantization: {quantization} loads the base through bitsandbytes, which is not installed: "
                         'pip install -e ".[qlora]" (or pip install bitsandbytes)')


def _load_backbone(name: str, dtype: torch.dtype, trust_remote_code: bool,
                   quantization: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    require_folder(name, "model_name_or_path", "the model's config.json and weights", "meta-llama/Meta-Llama-3-8B")
    options: dict[str, Any] = {}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code, **options)
    except OSError as err:
        raise ValueError(
            f"could not load model_name_or_path={name!r}: {str(err).rstrip('.')}. Give a local model folder, or make "
            "the Hugging Face hub reachable (HF_HUB_OFFLINE unset; gated models such as LLaMA 3 need `hf auth login`)"
        ) from err
