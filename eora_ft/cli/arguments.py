"""Subcommand flags from the recipe dataclasses: one field, one default, one help text for every knob.

``eora-ft compress --group_size 64`` and a recipe's ``group_size: 64`` are the same field of
:class:`~eora_ft.config.CompressionArguments`: a subcommand takes the fields it reads from the recipe
dataclasses (:func:`fields_of`), adds the few that only it has (an output path), and parses them with
TRL's parser (``--config file.yaml`` works too; unknown keys are an error). The parsed values are then
passed to the full dataclasses, so the recipes' validation runs unchanged.

The spellings of eora_ft 0.1 (``--group-size``, ``--method``, ``--output``, ...) are translated with a
deprecation message for one release (:class:`LegacyFlags`).
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from typing import Callable

from trl import TrlParser

from eora_ft.config import parse_strictly

REMOVED_IN = "0.2"


def fields_of(source: type, names: list[str], name: str | None = None) -> type:
    """A dataclass holding ``names`` of dataclass ``source``: the same types, defaults and help (the
    fields are copied, not re-declared). Raises if ``source`` lacks one of ``names``."""
    hints = typing.get_type_hints(source)
    declared = {f.name: f for f in dataclasses.fields(source)}
    missing = [n for n in names if n not in declared]
    if missing:
        raise AttributeError(f"{source.__name__} has no field {missing}")
    specs = []
    for n in names:
        original = declared[n]
        kwargs = {"metadata": dict(original.metadata)}
        if original.default is not dataclasses.MISSING:
            kwargs["default"] = original.default
        if original.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = original.default_factory
        specs.append((n, hints[n], field(**kwargs)))
    return dataclasses.make_dataclass(name or f"{source.__name__}Fields", specs)


@dataclass(frozen=True)
class LegacyFlag:
    """An eora_ft 0.1 flag and the field flag it becomes. ``values`` rewrites the values that followed it;
    ``switch`` (for 0.1's value-less switches) is the value the field flag gets instead; ``merge``: a
    repeated 0.1 flag (``--data a=x --data b=y``) becomes one list flag (``--data a=x b=y``)."""

    new: str
    values: Callable[[list[str]], list[str]] = lambda values: values
    switch: str | None = None
    merge: bool = False


def split_commas(values: list[str]) -> list[str]:
    """``--targets q_proj,k_proj`` -> ``--lora_target_modules q_proj k_proj``."""
    return [part for value in values for part in value.split(",") if part]


class LegacyFlags:
    """Translate a subcommand's 0.1 spellings in ``argv`` to the field flags, with a FutureWarning each."""

    def __init__(self, command: str, table: dict[str, LegacyFlag]) -> None:
        self.command, self.table = command, table

    def _warn(self, what: str, instead: str) -> None:
        warnings.warn(f"eora-ft {self.command}: {what} and goes in eora_ft {REMOVED_IN}; {instead}", FutureWarning,
                      stacklevel=4)

    def translate(self, argv: list[str]) -> list[str]:
        segments: list[list] = []  # [flag or None, values]
        i = 0
        while i < len(argv):
            flag, eq, inline = argv[i].partition("=")
            legacy = self.table.get(flag) if flag.startswith("--") else None
            if legacy is None:
                segments.append([None, [argv[i]]])
                i += 1
                continue
            if legacy.switch is not None:
                values, i = [legacy.switch], i + 1
            elif eq:
                values, i = legacy.values([inline]), i + 1
            else:
                j = i + 1
                while j < len(argv) and not argv[j].startswith("--"):
                    j += 1
                values, i = legacy.values(argv[i + 1:j]), j
            earlier = [seg for seg in segments if seg[0] == legacy.new] if legacy.merge else []
            if flag != legacy.new:
                self._warn(f"{flag} is deprecated", f"use {legacy.new}" + (f" {legacy.switch}" if legacy.switch else ""))
            elif earlier:
                self._warn(f"repeating {flag} is deprecated", f"give every value after one {flag}")
            if earlier:
                earlier[0][1].extend(values)
            else:
                segments.append([legacy.new, values])
        return [token for flag, values in segments for token in ([flag] if flag else []) + values]


def dashed(*names: str) -> dict[str, LegacyFlag]:
    """``--group-size`` for field ``group_size``: 0.1 spelled multi-word flags with dashes."""
    return {"--" + n.replace("_", "-"): LegacyFlag("--" + n) for n in names if "_" in n}


def parse_command(prog: str, dataclass_types: tuple, argv: list[str], legacy: LegacyFlags,
                  description: str) -> tuple:
    """Parse ``argv`` (legacy spellings translated) into instances of ``dataclass_types``."""
    parser = TrlParser(dataclass_types, prog=prog, description=description)
    return parse_strictly(parser, legacy.translate(list(argv)), prog)

