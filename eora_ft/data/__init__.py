"""Stage 1, data: task items and their SFT formatting (ARC, GSM8K, MathQA, plain text), calibration windows,
held-out perplexity texts, and the loaders and file checks under them (hub ids or local files).
May import ``eora_ft.utils`` only."""

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
