"""Data sources for eora_ft: ARC items and SFT formatting, calibration windows, raw loaders."""

from eora_ft.data.arc import (
    PROMPT_TEMPLATE,
    MultipleChoiceItem,
    arc_prompt,
    arc_sft_dataset,
    load_arc,
)
from eora_ft.data.calibration import calibration_tokens, describe_calibration, mixed_calibration, text_calibration_tokens
from eora_ft.data.sources import load_records, read_text, resolve_path

__all__ = [
    "PROMPT_TEMPLATE",
    "MultipleChoiceItem",
    "arc_prompt",
    "arc_sft_dataset",
    "calibration_tokens",
    "mixed_calibration",
    "text_calibration_tokens",
    "describe_calibration",
    "load_arc",
    "load_records",
    "read_text",
    "resolve_path",
]
