"""Locate and read raw data: local JSON/JSONL/TXT files (bundled assets) or Hugging Face hub ids."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from eora_ft.data.file_checks import check_data_file

# The repository root: the parent of the `eora_ft` package directory. Bundled assets live
# under it, so configs can name `eora_ft/assets/...` and still work from any cwd.
_REPO_ROOT = Path(__file__).resolve().parents[2]

_JSON_SUFFIXES = (".json", ".jsonl")
_LOCAL_SUFFIXES = _JSON_SUFFIXES + (".txt",)


def resolve_path(path: str) -> str:
    """Resolve `path` against the cwd first, then the repository root.

    Returns the path as given if it exists relative to the cwd, else the absolute path under the
    repository root (the parent of the `eora_ft` package) if it exists there, else `path`
    unchanged (it may be a hub id).
    """
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        return expanded
    candidate = _REPO_ROOT / expanded
    if not os.path.isabs(expanded) and candidate.exists():
        return str(candidate)
    return path


def _looks_like_hub_id(path: str) -> bool:
    # Hub ids are `name` or `org/name`; anything with more structure is meant as a local path.
    return (
        bool(path)
        and not path.startswith(("/", ".", "~"))
        and not path.endswith(_LOCAL_SUFFIXES)
        and path.count("/") <= 1
        and "\\" not in path
    )


def _missing(path: str, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"data source {path!r} not found (looked relative to the cwd {os.getcwd()!r} and to the "
        f"repository root {str(_REPO_ROOT)!r}); expected {expected}"
    )


_TABLE_SUFFIXES = (".parquet", ".csv")  # read by `datasets` for the sft task's own data


def local_files(path_or_id: str | None) -> list[str]:
    """The local files ``path_or_id`` names (a file, or a directory's .json/.jsonl/.parquet/.csv files); [] for a hub
    id or None."""
    if not path_or_id:
        return []
    resolved = resolve_path(path_or_id)
    if os.path.isdir(resolved):
        tables = sorted(str(p) for p in Path(resolved).iterdir() if p.is_file() and p.name.endswith(_TABLE_SUFFIXES))
        return tables + _json_files(resolved) if not tables else tables + [
            str(p) for p in sorted(Path(resolved).iterdir()) if p.is_file() and p.name.endswith(_JSON_SUFFIXES)]
    return [resolved] if os.path.isfile(resolved) else []


def _json_files(directory: str) -> list[str]:
    files = sorted(
        str(p) for p in Path(directory).iterdir() if p.is_file() and p.name.endswith(_JSON_SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f"directory {directory!r} holds no .json/.jsonl files")
    return files


def load_records(path_or_id: str, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """Load records from a local .json/.jsonl file, a directory of them, or a hub dataset id.

    Local files are read with the `json` builder (its only split is "train", so `split` and `name`
    only apply to hub ids). A hub id (`org/name` or `name`) goes to `datasets.load_dataset`, which
    needs network access or a populated cache. Raises FileNotFoundError for a missing local path.
    """
    resolved = resolve_path(path_or_id)
    if os.path.isdir(resolved):
        files = _json_files(resolved)
        for file in files:
            check_data_file(file)
        return datasets.load_dataset("json", data_files=files, split="train")
    if os.path.isfile(resolved):
        if not resolved.endswith(_JSON_SUFFIXES):
            raise ValueError(f"{resolved!r} is not a .json/.jsonl file: records come from JSON Lines (.jsonl), a JSON "
                             "list (.json) or a directory of them (plain text goes to ppl_dataset, calib_dataset or "
                             "the text task)")
        check_data_file(resolved)  # names the file and line where the json builder would not
        return datasets.load_dataset("json", data_files=resolved, split="train")
    if not _looks_like_hub_id(path_or_id):
        raise _missing(
            path_or_id,
            "a local .json/.jsonl file (or a directory of them) or a hub dataset id such as 'allenai/ai2_arc'",
        )
    return datasets.load_dataset(path_or_id, name, split=split)


def is_text_file(path: str) -> bool:
    """A local file that is read as plain text: any file that is not ``.json``/``.jsonl`` (``.txt``, ``.md``, no
    suffix at all...). Whether it really is UTF-8 text is checked when it is read (:func:`read_text`)."""
    return os.path.isfile(path) and not path.endswith(_JSON_SUFFIXES)


def read_text(path: str) -> str:
    """Read a local UTF-8 text file (e.g. the joined WikiText-2 test split; any suffix but .json/.jsonl) into one
    string."""
    resolved = resolve_path(path)
    if not os.path.isfile(resolved):
        raise _missing(path, "a local UTF-8 text file")
    check_data_file(resolved)
    return Path(resolved).read_text(encoding="utf-8")
