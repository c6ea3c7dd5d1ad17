"""Check a local data file before anything reads it for real: the error names the file and the line.

``datasets``' JSON builder reports a malformed line as ``DatasetGenerationError: An error occurred while
generating the dataset`` and an empty file as a bare ``StopIteration``; neither names the file, the
line or what was expected. :func:`check_data_file` reads the file once, streaming line by line (a
multi-GB local corpus costs one sequential read, no more memory than its longest line), and raises a
:class:`DataFileError` saying which file, which line, what is wrong there and what would be valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Fields every record of each schema must hold (the loaders read them; checked here with the line number).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "arc": ("question", "answerKey"),
    "gsm8k": ("question", "answer"),
    "mathqa": ("Problem", "options", "Rationale", "correct"),
    "text": ("text",),
}
JSON_SUFFIXES = (".json", ".jsonl")


class DataFileError(ValueError):
    """A local data file that cannot be used: ``path``, where in it (``line 5``, ``record 3``; None: the whole
    file) and why."""

    def __init__(self, path: str | os.PathLike, location: str | None, problem: str, what: str):
        where = os.fspath(path) + (f", {location}" if location else "")
        super().__init__(f"{what} {where}: {problem}")
        self.path, self.location = os.fspath(path), location


def check_data_file(path: str | os.PathLike, what: str = "data file", schema: str | None = None) -> int:
    """Validate one local ``.json`` or ``.jsonl`` file, or a text file (any other suffix); return its number of
    records (or non-blank lines of text).

    ``what`` names the argument the file came from (``calib_dataset``...), ``schema`` a key of
    :data:`RECORD_FIELDS` whose fields each JSON record must hold. Raises :class:`DataFileError` for an
    empty file, bytes that are not UTF-8, a line that is not a JSON object (a truncated last line among
    them), or a record missing a field; ``FileNotFoundError`` for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {os.fspath(path)!r} does not exist or is not a file")
    is_text = path.suffix not in JSON_SUFFIXES  # any other file is plain text (.txt, .md, no suffix...)
    if is_text and schema not in (None, "text"):
        raise DataFileError(path, None, f"is not a .json/.jsonl file; {what} needs {schema} records with fields "
                            f"{list(RECORD_FIELDS[schema])}, one JSON object per line (.jsonl) or a JSON list (.json)",
                            what)
    fields = RECORD_FIELDS.get(schema, ()) if schema else ()
    if path.suffix == ".json" and _starts_with(path, b"["):
        return _check_json_array(path, what, fields)
    count, line_no, last_line_ended = 0, 0, True
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            last_line_ended = raw.endswith(b"\n")
            text = _decode(raw, path, line_no, what, is_text)
            if not text.strip():
                continue
            if is_text:
                count += 1
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                hint = " (the file looks truncated: its last line is cut off)" if not last_line_ended else ""
                if line_no == 1 and text.startswith("\ufeff"):
                    hint = " (it starts with a byte order mark: save it as UTF-8 without BOM)"
                raise DataFileError(path, f"line {line_no}", f"not valid JSON ({err.msg} at column {err.colno}){hint}; "
                                    "expected one JSON object per line (JSON Lines)", what) from None
            _check_record(record, fields, path, f"line {line_no}", what)
            count += 1
    if count == 0:
        kind = "text" if is_text else "records"
        raise DataFileError(path, None, f"holds no {kind} ({'empty' if line_no == 0 else 'only blank lines'})", what)
    return count


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"\xef\xbb\xbf" + prefix) or head.startswith(prefix)


def _decode(raw: bytes, path: Path, line_no: int, what: str, is_text: bool = False) -> str:
    accepted = ("; accepted: UTF-8 text (any suffix but .json/.jsonl; paragraphs separated by blank lines) or "
                ".json/.jsonl records" if is_text else "")
    if is_text and b"\0" in raw:  # valid UTF-8, but no text file holds NUL bytes: an archive, weights, parquet...
        raise DataFileError(path, f"line {line_no}", f"holds NUL bytes: it is a binary file, not text{accepted}", what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFileError(path, f"line {line_no}", f"byte {raw[err.start]:#04x} at column {err.start + 1} is not UTF-8; "
                            f"save the file as UTF-8{accepted}", what) from None


def _check_record(record, fields: tuple[str, ...], path: Path, location: str, what: str) -> None:
    if not isinstance(record, dict):
        raise DataFileError(path, location, f"is a JSON {type(record).__name__}, expected an object "
                            f"({{\"field\": value, ...}})", what)
    missing = [name for name in fields if name not in record]
    if missing:
        raise DataFileError(path, location, f"record lacks field(s) {missing}; each record needs {list(fields)} "
                            f"(it has {sorted(record)[:8]})", what)


def _check_json_array(path: Path, what: str, fields: tuple[str, ...]) -> int:
    # One JSON document (a list of records, as MathQA ships): parsed whole, errors located by line.
    raw = path.read_bytes()
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        _decode(line, path, line_no, what)
    try:
        records = json.loads(raw.decode("utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataFileError(path, f"line {err.lineno}", f"not valid JSON ({err.msg} at column {err.colno}); a truncated "
                            "file ends like this too", what) from None
    if not records:
        raise DataFileError(path, None, "holds no records (an empty JSON list)", what)
    for index, record in enumerate(records):
        _check_record(record, fields, path, f"record {index}", what)
    return len(records)
