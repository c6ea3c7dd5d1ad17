"""Registry of tasks: how each is loaded, formatted for SFT (loss on the completion) and scored.

Every question task trains on ``Question: ...\\nAnswer:`` prompts whose completion is what the evaluation
scores (the gold choice for multiple choice, the full solution for GSM8K), so fine-tuning and
evaluation see the same text. Metric keys are ``"<task>/<metric>"``. The ``text`` task trains a language
model on plain text (loss on every token) and is judged by held-out perplexity (``ppl_dataset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import datasets

from eora_ft.data.arc import MultipleChoiceItem, arc_prompt, arc_sft_dataset, load_arc
from eora_ft.data.gsm8k import gsm8k_sft_dataset, load_gsm8k
from eora_ft.data.mathqa import load_mathqa
from eora_ft.data.plain_text import load_plain_text, text_sft_dataset
from eora_ft.data.sft import load_sft_splits, sft_dataset, tokenize_sft
from eora_ft.data.sources import resolve_path
from eora_ft.eval.completion_loss import completion_loss
from eora_ft.eval.scoring import score_multiple_choice
from eora_ft.eval.generation import score_gsm8k


@dataclass(frozen=True)
class Task:
    """One task. ``load(path_or_id, split, name, limit) -> items``; ``score(model, tok, items, pool, opts) -> metrics``.

    ``metrics`` lists ``(key, label, kind)`` for the results table, ``kind`` "pct" or "ppl".
    ``hub_name`` is the dataset config a hub id needs (e.g. ``ARC-Challenge``, ``main``).
    """

    name: str
    load: Callable[..., list]
    sft_dataset: Callable[[Sequence], datasets.Dataset]
    score: Callable[..., dict]
    metrics: tuple[tuple[str, str, str], ...]
    hub_name: str | None = None
    recipe: str = ""
    bundled_train: str = ""  # offline defaults under eora_ft/assets/data (the few-shot pool for GSM8K)
    bundled_eval: str = ""
    packed: bool = False  # trains on running text: needs TRL's packing (packing_strategy "wrapped")
    schema: str | None = "arc"  # the fields each JSON record holds (eora_ft.data.file_checks.RECORD_FIELDS)
    # your own data: both splits from one call (a held-out share of train when there is no test split), and
    # tokenized here (input_ids, completion_mask) for training and scoring alike
    load_splits: Callable[..., tuple] | None = None
    tokenize: Callable[..., datasets.Dataset] | None = None
    # the held-out loss on the evaluation items' completions, formatted and tokenized as trained (what
    # fine-tuning moves first; accuracy of a small model sits at chance)
    scores_completion_loss: bool = False

    def load_items(self, dataset_name: str, eval_dataset_name: str | None = None, *, dataset_config: str | None = None,
                   train_split: str = "train", test_split: str = "validation", train_limit: int | None = None,
                   eval_limit: int | None = None, eval_split_fraction: float = 0.1,
                   eval_split_seed: int = 0) -> tuple[Sequence, Sequence, str]:
        """``(training items, evaluation items, where the evaluation items came from)``: ``eval_dataset_name``'s
        (or ``dataset_name``'s ``test_split``); a task with ``load_splits`` may hold out ``eval_split_fraction`` of
        the training data instead."""
        if self.load_splits is not None:
            return self.load_splits(dataset_name, dataset_config, train_split, test_split, eval_dataset_name,
                                    eval_split_fraction, eval_split_seed, train_limit, eval_limit)
        name = dataset_config or self.hub_name
        train = self.load(resolve_path(dataset_name), split=train_split, name=name, limit=train_limit)
        held = self.load(resolve_path(eval_dataset_name or dataset_name), split=test_split, name=name, limit=eval_limit)
        return train, held, eval_dataset_name or f"{dataset_name} split {test_split}"

    def training_dataset(self, items: Sequence, tokenizer, max_length: int | None, completion_only: bool = True,
                         num_proc: int | None = None, truncation_mode: str = "keep_start") -> datasets.Dataset:
        """The items as a TRL dataset (prompt/completion or text), or tokenized (``input_ids``,
        ``completion_mask``; ``num_proc`` workers, TRL's ``truncation_mode``) for a task that tokenizes itself."""
        dataset = self.sft_dataset(items)
        return dataset if self.tokenize is None else self.tokenize(dataset, tokenizer, max_length, completion_only,
                                                                   num_proc=num_proc, truncation_mode=truncation_mode)

    def evaluate(self, model, tokenizer, items: Sequence, fewshot_pool: Sequence = (), *, batch_size: int = 32,
                 progress: bool = True, max_new_tokens: int = 256, num_fewshot: int = 5) -> dict:
        """Metrics as flat ``"<task>/<metric>"`` keys."""
        raw = self.score(model, tokenizer, items, fewshot_pool, batch_size=batch_size, progress=progress,
                         max_new_tokens=max_new_tokens, num_fewshot=num_fewshot)
        if self.scores_completion_loss:
            tokenized = tokenize_sft(self.sft_dataset(items), tokenizer, None, desc=f"{self.name} completions")
            raw |= _completion_loss(model, tokenizer, tokenized, (), batch_size=batch_size, progress=progress)
        return {f"{self.name}/{key}": value for key, value in raw.items()}


def _multiple_choice(desc: str) -> Callable[..., dict]:
    def score(model, tokenizer, items: Sequence[MultipleChoiceItem], fewshot_pool, *, batch_size, progress,
              **_generation) -> dict:
        return score_multiple_choice(model, tokenizer, items, arc_prompt, batch_size=batch_size, progress=progress,
                                     desc=desc)
    return score


def _gsm8k(model, tokenizer, items, fewshot_pool, *, batch_size, progress, max_new_tokens, num_fewshot,
           **_other) -> dict:
    # Generation batches hold whole few-shot contexts: a quarter of the log-likelihood batch keeps memory flat.
    return score_gsm8k(model, tokenizer, items, fewshot_pool, num_fewshot=num_fewshot, max_new_tokens=max_new_tokens,
                       batch_size=max(1, batch_size // 4), progress=progress)


def _no_task_metrics(model, tokenizer, items, fewshot_pool, **_options) -> dict:
    # plain text is judged by its held-out perplexities (ppl_dataset) and the eval loss curve
    return {}


def _completion_loss(model, tokenizer, items, fewshot_pool, *, batch_size, progress, **_options) -> dict:
    # items: tokenized examples (input_ids, completion_mask), as trained
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return {"eval_loss": completion_loss(model, list(items), batch_size=batch_size, pad_token_id=pad,
                                         progress=progress)["loss"]}


def _mc_metrics(name: str, label: str) -> tuple[tuple[str, str, str], ...]:
    return ((f"{name}/acc", f"{label} acc", "pct"), (f"{name}/acc_norm", f"{label} acc_norm", "pct"),
            _loss_metric(name, label))


def _loss_metric(name: str, label: str) -> tuple[str, str, str]:
    return f"{name}/eval_loss", f"{label} eval loss", "loss"


TASKS: dict[str, Task] = {
    "arc_challenge": Task("arc_challenge", load_arc, arc_sft_dataset, _multiple_choice("arc_challenge"),
                          _mc_metrics("arc_challenge", "ARC-C"), hub_name="ARC-Challenge", recipe="arc",
                          scores_completion_loss=True,
                          bundled_train="arc/ARC-Challenge/ARC-Challenge-Train.jsonl",
                          bundled_eval="arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"),
    "arc_easy": Task("arc_easy", load_arc, arc_sft_dataset, _multiple_choice("arc_easy"),
                     _mc_metrics("arc_easy", "ARC-E"), hub_name="ARC-Easy", recipe="arc", scores_completion_loss=True,
                     bundled_train="arc/ARC-Easy/ARC-Easy-Train.jsonl", bundled_eval="arc/ARC-Easy/ARC-Easy-Dev.jsonl"),
    "mathqa": Task("mathqa", load_mathqa, arc_sft_dataset, _multiple_choice("mathqa"),
                   _mc_metrics("mathqa", "MathQA"), recipe="mathqa", schema="mathqa", scores_completion_loss=True,
                   bundled_train="mathqa/dev_head1000.json", bundled_eval="mathqa/test_head500.json"),
    "gsm8k": Task("gsm8k", load_gsm8k, gsm8k_sft_dataset, _gsm8k,
                  (("gsm8k/strict", "GSM8K strict", "pct"), ("gsm8k/flexible", "GSM8K flexible", "pct"),
                   _loss_metric("gsm8k", "GSM8K")),
                  scores_completion_loss=True, hub_name="main", recipe="gsm8k", schema="gsm8k", bundled_train="gsm8k/train_head1000.jsonl",
                  bundled_eval="gsm8k/test_head500.jsonl"),
    "text": Task("text", load_plain_text, text_sft_dataset, _no_task_metrics, (), hub_name=None, recipe="text", packed=True, schema="text",
                 bundled_train="enwiki_train/wiki_00.txt", bundled_eval="enwiki_heldout/wiki_49.txt"),
    # your own data in any of TRL's dataset types (eora_ft.data.sft), judged by the held-out completion loss
    "sft": Task("sft", None, sft_dataset, _completion_loss, (("sft/eval_loss", "eval loss (completions)", "loss"),),
                recipe="sft", schema=None, load_splits=load_sft_splits, tokenize=tokenize_sft,
                bundled_train="sft/gsm8k_chat.jsonl"),
}


def get_task(name: str) -> Task:
    """The registered task ``name``; raises listing the valid names."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; valid: {sorted(TASKS)}")
    return TASKS[name]
