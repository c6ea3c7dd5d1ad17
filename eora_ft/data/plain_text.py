"""Plain text as a task: language-model fine-tuning data (loss on every token), LoftQ's recovery setting.

Items are documents: a .txt file's blank-line-separated parts, or the ``text`` field of JSON Lines /
a hub dataset. The text recipe trains on them packed (TRL's ``packing: true`` with ``packing_strategy:
wrapped``: documents joined by EOS and cut into ``max_length`` blocks, as Hugging Face's ``run_clm``
groups texts), the same contiguous windows that held-out perplexity is measured on.
"""

from __future__ import annotations

import os

import datasets

from eora_ft.data.sources import is_text_file, load_records, read_text, resolve_path


def load_plain_text(path_or_id: str, split: str = "train", name: str | None = None,
                    limit: int | None = None) -> list[str]:
    """The non-empty documents of a local .txt / .json / .jsonl file or of a hub dataset with a ``text``
    column (e.g. ``Salesforce/wikitext`` with ``name="wikitext-2-raw-v1"``); the first ``limit`` if set."""
    resolved = resolve_path(path_or_id)
    if is_text_file(resolved):
        documents = read_text(resolved).split("\n\n")
    else:
        records = load_records(resolved, split=split, name=name)
        if "text" not in records.column_names:
            raise ValueError(f"{path_or_id!r} has no 'text' column (columns: {records.column_names}); the text task "
                             "needs plain text: a .txt file, or JSON Lines / a hub dataset with a 'text' field")
        documents = records["text"]
    documents = [document.strip() for document in documents if document and document.strip()]
    if not documents:
        raise ValueError(f"{os.fspath(path_or_id)!r} holds no text")
    return documents[:limit] if limit is not None else documents


def text_sft_dataset(documents) -> datasets.Dataset:
    """A language-modeling dataset (``text`` column): TRL's SFTTrainer computes the loss on every token."""
    return datasets.Dataset.from_dict({"text": list(documents)})
