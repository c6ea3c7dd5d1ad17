"""Your own data for supervised fine-tuning, in the dataset types TRL's ``SFTTrainer`` takes.

Layouts (detected from the columns, as TRL does):

- ``language_modeling``: ``text``; loss on every token.
- ``prompt_completion``: ``prompt`` and ``completion`` strings; loss on the completion (TRL's
  ``completion_only_loss``).
- ``conversational``: ``messages`` (a list of ``{"role", "content"}``); loss on the assistant turns (TRL's
  ``assistant_only_loss``). ShareGPT's ``conversations`` (``{"from", "value"}``) is converted to it.
- ``conversational_prompt_completion``: ``prompt`` and ``completion`` as message lists; loss on the completion.

Conversations go through the tokenizer's chat template. A tokenizer without one gets
:data:`DEFAULT_CHAT_TEMPLATE`, plain ``User:``/``Assistant:`` text that adds no token to the vocabulary (the
base and its embeddings are frozen: a new special token would stay untrained). Which tokens an assistant turn
owns comes from the template's ``{% generation %}`` markers where it has them (transformers'
``return_assistant_tokens_mask``), else from rendering each conversation's prefixes: the turn is what
rendering through it adds to rendering up to its generation prompt.

Examples are tokenized here, once, for training and for the held-out eval loss alike (``input_ids`` and
``completion_mask``, the first ``max_length`` tokens kept as TRL's ``keep_start`` does), so the loss the results
table reports is computed on exactly the tokens trained on.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import datasets

from eora_ft.data.sources import _looks_like_hub_id, resolve_path

logger = logging.getLogger(__name__)

# file suffix -> datasets builder
SFT_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
LAYOUTS = {
    "language_modeling": "text",
    "prompt_completion": "prompt + completion (strings)",
    "conversational": "messages (a list of {role, content}), or ShareGPT conversations (a list of {from, value})",
    "conversational_prompt_completion": "prompt + completion (message lists)",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "model": "assistant"}
# Plain text around each turn: no special token beyond the tokenizer's own EOS, which ends an assistant turn so
# the model learns to stop (and separates it from the next turn). `generation` marks what an assistant turn owns
# (the loss mask); nothing follows it inside the turn, so locating turns by prefixes gives the same mask.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _files(resolved: str) -> list[str]:
    if os.path.isdir(resolved):
        files = sorted(str(p) for p in Path(resolved).iterdir() if p.is_file() and p.suffix in SFT_FILE_BUILDERS)
        if not files:
            raise FileNotFoundError(f"directory {resolved!r} holds no {'/'.join(SFT_FILE_BUILDERS)} files")
        return files
    return [resolved]


def load_sft_source(path_or_id: str, split: str | None = "train", name: str | None = None):
    """Records of a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory of them, or a hub dataset id.

    A local source is one split (a :class:`datasets.Dataset`). A hub id with ``split=None`` gives its
    :class:`datasets.DatasetDict` (every split), else the one split. Raises ``FileNotFoundError`` for a path that
    does not exist and ``ValueError`` for a file type that is none of those, or a directory mixing them."""
    resolved = resolve_path(path_or_id)
    if os.path.exists(resolved):
        files = _files(resolved)
        kinds = {SFT_FILE_BUILDERS.get(Path(f).suffix) for f in files}
        if None in kinds:
            raise ValueError(f"{path_or_id!r}: eora_ft reads SFT data from {', '.join(SFT_FILE_BUILDERS)} files; got "
                             f"{Path(files[0]).suffix or 'no suffix'}")
        if len(kinds) > 1:
            raise ValueError(f"{path_or_id!r} mixes file types {sorted(kinds)}; keep one type per directory")
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    if not _looks_like_hub_id(path_or_id):
        raise FileNotFoundError(f"dataset_name {path_or_id!r} is neither a local file or directory (looked relative to "
                                f"{os.getcwd()!r} and to the repository) nor a hub dataset id such as "
                                "'HuggingFaceH4/ultrachat_200k'")
    return datasets.load_dataset(path_or_id, name, split=split)


def _is_message_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def detect_layout(dataset: datasets.Dataset, source: str = "dataset") -> str:
    """The :data:`LAYOUTS` name of ``dataset`` (from its columns and first record); raises ``ValueError`` naming
    its columns and the accepted layouts when none fits."""
    columns = list(dataset.column_names)
    first = dataset[0] if len(dataset) else {}
    if "messages" in columns or "conversations" in columns:
        key = "messages" if "messages" in columns else "conversations"
        if _is_message_list(first.get(key)):
            return "conversational"
    if "prompt" in columns and "completion" in columns:
        prompt, completion = first.get("prompt"), first.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt_completion"
        if _is_message_list(prompt) and _is_message_list(completion):
            return "conversational_prompt_completion"
    if "text" in columns and isinstance(first.get("text"), str):
        return "language_modeling"
    accepted = "; ".join(f"{name}: {columns_}" for name, columns_ in LAYOUTS.items())
    raise ValueError(f"{source} has columns {columns}{' and no records' if not len(dataset) else ''}, which fit none "
                     f"of TRL's dataset types; accepted layouts: {accepted}")


def _chatml(conversation: list[dict]) -> list[dict]:
    """ShareGPT ``{from, value}`` turns as ``{role, content}`` (already-ChatML turns pass through)."""
    turns = []
    for turn in conversation:
        if "role" in turn:
            turns.append({"role": turn["role"], "content": turn["content"]})
            continue
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"conversation turn {turn!r}: 'from' must be one of {sorted(SHAREGPT_ROLES)}")
        turns.append({"role": role, "content": turn["value"]})
    return turns


def normalise(dataset: datasets.Dataset, source: str = "dataset") -> tuple[datasets.Dataset, str]:
    """``(dataset with only its layout's columns, layout)``; ShareGPT conversations become ``messages``."""
    layout = detect_layout(dataset, source)
    if layout == "conversational":
        key = "messages" if "messages" in dataset.column_names else "conversations"
        if key == "messages" and "role" in dataset[0][key][0]:  # already ChatML: no copy of the data
            return dataset.select_columns(["messages"]), layout
        return dataset.map(lambda row: {"messages": _chatml(row[key])}, remove_columns=dataset.column_names,
                           desc="ShareGPT -> messages"), layout
    keep = ["text"] if layout == "language_modeling" else ["prompt", "completion"]
    return dataset.select_columns(keep), layout


def _first(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def load_sft_splits(dataset_name: str, dataset_config: str | None = None, train_split: str = "train",
                    test_split: str | None = "test", eval_dataset_name: str | None = None,
                    eval_split_fraction: float = 0.1, eval_split_seed: int = 0, train_limit: int | None = None,
                    eval_limit: int | None = None) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """``(train, eval, where the eval examples came from)``, both normalised (:func:`normalise`), same layout.

    The eval examples come from ``eval_dataset_name`` when given, else from the hub dataset's ``test_split``
    when it has one, else a seeded ``eval_split_fraction`` of the training examples is held out (and never
    trained on). ``train_limit``/``eval_limit`` keep the first N of each after the split (before any conversion:
    a 200k-conversation dataset with ``train_limit: 20000`` converts 20k)."""
    resolved = resolve_path(dataset_name)
    local = os.path.exists(resolved)
    if local or eval_dataset_name:
        train = load_sft_source(dataset_name, train_split, dataset_config)
        splits = {}
    else:
        splits = load_sft_source(dataset_name, None, dataset_config)
        if train_split not in splits:
            raise ValueError(f"dataset {dataset_name!r} has no split {train_split!r} (dataset_train_split); its "
                             f"splits: {sorted(splits)}")
        train = splits[train_split]
    layout = detect_layout(train, f"dataset_name {dataset_name!r}")  # refused here, before any split or model
    if eval_dataset_name:
        held = load_sft_source(eval_dataset_name, test_split, dataset_config)
        eval_layout = detect_layout(held, f"eval_dataset_name {eval_dataset_name!r}")
        if eval_layout != layout:
            raise ValueError(f"eval_dataset_name {eval_dataset_name!r} is {eval_layout}, the training data "
                             f"{dataset_name!r} is {layout}: give both in one layout")
        origin = f"{eval_dataset_name}"
    elif test_split and test_split in splits:
        held = splits[test_split]
        origin = f"{dataset_name} split {test_split}"
    else:
        if len(train) < 2:
            raise ValueError(f"dataset_name {dataset_name!r} has {len(train)} example(s): too few to hold any out "
                             "for evaluation; give eval_dataset_name")
        if splits:
            logger.warning("dataset %r has no split %r (dataset_test_split; its splits: %s): holding out %g of %r "
                           "for evaluation instead", dataset_name, test_split, sorted(splits), eval_split_fraction,
                           train_split)
        parts = train.train_test_split(test_size=eval_split_fraction, seed=eval_split_seed, shuffle=True)
        train, held = parts["train"], parts["test"]
        origin = (f"{eval_split_fraction:g} of {dataset_name} held out (seed {eval_split_seed}, "
                  f"{len(held)} examples)")
    train = normalise(_first(train, train_limit), f"dataset_name {dataset_name!r}")[0]
    held = normalise(_first(held, eval_limit), f"the evaluation data ({origin})")[0]
    return train, held, origin


def ensure_chat_template(tokenizer, template_path: str | None = None) -> bool:
    """Give ``tokenizer`` the chat template of ``template_path`` (TRL's ``chat_template_path``: a Jinja file, or a
    tokenizer directory / hub id whose template to use), else :data:`DEFAULT_CHAT_TEMPLATE` when it has none;
    True when the template was set here. The default starts with the BOS token exactly when the tokenizer adds
    one to plain text, so conversations begin as the model's other inputs do."""
    if template_path:
        path = Path(template_path).expanduser()
        if path.is_file():
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        else:
            from transformers import AutoTokenizer

            tokenizer.chat_template = AutoTokenizer.from_pretrained(template_path).chat_template
        return True
    if getattr(tokenizer, "chat_template", None):
        return False
    ids = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    tokenizer.chat_template = ("{{ bos_token }}" if adds_bos else "") + DEFAULT_CHAT_TEMPLATE
    logger.info("the tokenizer has no chat template: conversations use eora_ft's plain default (User:/Assistant: "
                "text, no added tokens; saved with the adapter's tokenizer)")
    return True


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, with_mask: bool = False) -> dict:
    output = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           add_generation_prompt=add_generation_prompt,
                                           return_assistant_tokens_mask=with_mask)
    return {key: list(value) for key, value in output.items() if key in ("input_ids", "assistant_masks")}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assistant_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of a conversation; ``mask[i] = 1`` on the tokens of assistant turns.

    Templates with ``{% generation %}`` markers give the mask themselves; for others each assistant turn is
    located by rendering the conversation up to its generation prompt and through the turn. Raises
    ``ValueError`` when the template does not render a conversation's prefixes as prefixes of the whole."""
    if _GENERATION_MARKER.search(tokenizer.chat_template or ""):
        rendered = _render(tokenizer, messages, with_mask=True)
        return rendered["input_ids"], [int(bit) for bit in rendered["assistant_masks"]]
    full = _render(tokenizer, messages)["input_ids"]
    mask = [0] * len(full)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)["input_ids"] if index else []
        through = _render(tokenizer, messages[: index + 1])["input_ids"]
        start, end = _common_prefix(before, full), _common_prefix(through, full)
        if end < len(through):
            raise ValueError("the chat template renders the conversation up to an assistant turn differently from "
                             "the whole conversation (it is not prefix-preserving, e.g. it drops earlier reasoning), so "
                             "the assistant tokens cannot be located; use a template with {% generation %} markers "
                             "(trl.chat_template_utils.get_training_chat_template makes one for common models)")
        mask[start:end] = [1] * (end - start)
    return full, mask


def _tokenize_one(example: dict, tokenizer, layout: str, completion_only: bool) -> dict:
    eos = tokenizer.eos_token or ""
    if layout == "language_modeling":
        text = example["text"] if example["text"].endswith(eos) else example["text"] + eos
        ids = tokenizer(text)["input_ids"]
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    if layout == "conversational":
        ids, mask = assistant_mask(tokenizer, example["messages"])
    elif layout == "prompt_completion":  # as TRL: EOS ends the completion, the prompt is what both share
        completion = example["completion"] if example["completion"].endswith(eos) else example["completion"] + eos
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        ids = tokenizer(example["prompt"] + completion)["input_ids"]
        start = _common_prefix(prompt_ids, ids)
        mask = [0] * start + [1] * (len(ids) - start)
    else:  # conversational prompt-completion
        prompt_ids = _render(tokenizer, example["prompt"], add_generation_prompt=True)["input_ids"]
        ids = _render(tokenizer, example["prompt"] + example["completion"])["input_ids"]
        start = _common_prefix(prompt_ids, ids)
        mask = [0] * start + [1] * (len(ids) - start)
    return {"input_ids": ids, "completion_mask": mask if completion_only else [1] * len(ids)}


def tokenize_sft(dataset: datasets.Dataset, tokenizer, max_length: int | None, completion_only: bool = True,
                 desc: str = "tokenizing", num_proc: int | None = None,
                 truncation_mode: str = "keep_start") -> datasets.Dataset:
    """``input_ids`` and ``completion_mask`` (1 = in the loss) of every example, its first ``max_length`` tokens
    kept (its last with TRL's ``truncation_mode: keep_end``); an example with no loss token left is dropped (as TRL does), and a dataset left empty raises.

    ``completion_only=False`` puts every token in the loss (TRL with ``completion_only_loss`` /
    ``assistant_only_loss`` off); a language-modeling dataset has every token in it either way. ``num_proc``:
    worker processes (TRL's ``dataset_num_proc``; a template without generation markers renders each
    conversation once per assistant turn, twice)."""
    layout = detect_layout(dataset)
    if layout.startswith("conversational"):
        ensure_chat_template(tokenizer)

    def tokenize(example):
        out = _tokenize_one(example, tokenizer, layout, completion_only)
        if max_length is not None:
            cut = slice(-max_length, None) if truncation_mode == "keep_end" else slice(None, max_length)
            out = {key: value[cut] for key, value in out.items()}
        return out

    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names, desc=desc, num_proc=num_proc)
    kept = tokenized.filter(lambda example: 1 in example["completion_mask"], desc="dropping examples with no loss token",
                            num_proc=num_proc)
    if len(kept) < len(tokenized):
        logger.warning("%d of %d examples have no completion token within max_length=%s and are left out",
                       len(tokenized) - len(kept), len(tokenized), max_length)
    if not len(kept):
        raise ValueError(f"no example keeps a completion token within max_length={max_length}: raise max_length")
    return kept


def check_sft_options(args) -> None:
    """Refuse TRL ``SFTConfig`` settings the sft task would otherwise ignore (it tokenizes here, not in TRL):
    a ``dataset_text_field`` other than ``text``, an ``eos_token`` override."""
    if getattr(args, "dataset_text_field", "text") != "text":
        raise ValueError(f"dataset_text_field={args.dataset_text_field!r}: the sft task reads language-modeling "
                         "text from a 'text' column; rename the column (datasets' rename_column) or drop the setting")
    if getattr(args, "eos_token", None):
        raise ValueError(f"eos_token={args.eos_token!r}: the sft task ends completions with the tokenizer's own EOS "
                         "(the base model's embeddings are frozen: a new EOS would stay untrained); drop the setting")


def completion_only(dataset: datasets.Dataset, completion_only_loss: bool | None, assistant_only_loss: bool) -> bool:
    """Whether training puts only completions / assistant turns in the loss, by TRL's rules: ``messages`` follow
    ``assistant_only_loss`` (default off in TRL), prompt-completion layouts ``completion_only_loss`` (None: on)."""
    layout = detect_layout(dataset)
    if layout == "conversational":
        return bool(assistant_only_loss)
    return completion_only_loss is not False and layout != "language_modeling"


def sft_dataset(items: datasets.Dataset) -> datasets.Dataset:
    """The training examples as they are (already one of TRL's layouts, :func:`normalise`); tokenized later."""
    return items


def rendered_texts(tokenized: datasets.Dataset, tokenizer) -> list[str]:
    """Each tokenized example as the text it was trained on (chat template applied), for the task share of the
    adapter calibration."""
    return [tokenizer.decode(list(ids)) for ids in tokenized["input_ids"]]
