"""Held-out text for perplexity: which files, and the metric name and table column each one gets.

A run may measure perplexity on several texts (``ppl_dataset`` is comma-separated); each metric is
named after its text (``enwiki_heldout/ppl``, ``c4_heldout/ppl``, ``wikitext2/ppl``), never a generic
``ppl`` that would let one text pass for another. Bundled texts have fixed names; any other file is
named after its file stem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from eora_ft.data.sources import is_text_file, load_records, read_text, resolve_path

_ASSETS = "eora_ft/assets/data"
# file name -> (metric prefix, column label): the bundled held-out texts
BUNDLED_TEXTS = {
    "wiki_49.txt": ("enwiki_heldout", "enwiki held-out ppl"),
    "c4_en_train_heldout100.jsonl": ("c4_heldout", "C4 held-out ppl"),
    "wikitext-2-raw-v1.test.joined.txt": ("wikitext2", "WikiText-2 ppl"),
}
BUNDLED_PATHS = {
    "enwiki_heldout": f"{_ASSETS}/enwiki_heldout/wiki_49.txt",
    "c4_heldout": f"{_ASSETS}/c4/c4_en_train_heldout100.jsonl",
    "wikitext2": f"{_ASSETS}/wikitext2/wikitext-2-raw-v1.test.joined.txt",
}
# in-domain first: the model's own kind of text, then C4, then the out-of-domain WikiText-2
DEFAULT_PPL_DATASETS = ",".join(BUNDLED_PATHS.values())


@dataclass(frozen=True)
class HeldoutText:
    """One perplexity text: ``name`` prefixes its metric key, ``label`` is its table column."""

    name: str
    label: str
    path: str

    @property
    def metric(self) -> tuple[str, str, str]:
        """``(key, label, kind)`` as the results tables take it."""
        return f"{self.name}/ppl", self.label, "ppl"

    def read(self) -> str:
        """The whole text: a .txt file as it is; a .json/.jsonl file's ``text`` records joined by blank lines."""
        return corpus_text(self.path)


def corpus_text(path: str) -> str:
    """A local text corpus as one string (``.txt`` as is, JSON records' ``text`` fields joined by ``"\\n\\n"``)."""
    resolved = resolve_path(path)
    if is_text_file(resolved):
        return read_text(resolved)
    records = load_records(resolved)
    if "text" not in records.column_names:
        raise ValueError(f"perplexity text {path!r} has no 'text' field (columns: {records.column_names}); "
                         "give a .txt file or JSON Lines with a 'text' field")
    return "\n\n".join(t for t in records["text"] if t and t.strip())


def heldout_texts(spec: str | None) -> list[HeldoutText]:
    """Parse ``ppl_dataset`` (comma-separated paths; None or empty = none) into named texts.

    Raises ValueError when two texts would get the same metric name."""
    texts = []
    for part in (spec or "").split(","):
        path = part.strip()
        if not path:
            continue
        base = os.path.basename(path)
        if base in BUNDLED_TEXTS:
            name, label = BUNDLED_TEXTS[base]
        else:
            stem = os.path.splitext(base)[0] or base
            name, label = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_").lower() or "text", f"{stem} ppl"
        texts.append(HeldoutText(name, label, path))
    names = [t.name for t in texts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"ppl_dataset={spec!r} gives two texts the metric name(s) {repeated}; rename one file")
    return texts
