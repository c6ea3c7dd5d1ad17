"""Deprecated location of :mod:`eora_ft.adapters.peft_bridge` (moved in 0.1.x; this alias goes in 0.2)."""

import warnings

from eora_ft.adapters.peft_bridge import (  # noqa: F401
    ALL_LINEAR, CompressedLoraLinear, build_lora_model, decoder_linear_names, load_adapter, load_factors,
    load_pretrained, lora_config, save_adapter, trainable_summary,
)

warnings.warn("eora_ft.peft_bridge moved to eora_ft.adapters (e.g. `from eora_ft.adapters import load_pretrained`); "
              "the old path goes in eora_ft 0.2", FutureWarning, stacklevel=2)
