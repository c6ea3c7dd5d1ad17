"""Stage 4, adapters: the bridge to PEFT. Turns an initializer's factors into a PEFT LoRA model over the
compressed base (with eora_ft's fused forward/backward), saves adapters in PEFT's file format, and loads
them back (:func:`load_pretrained` rebuilds base + adapter from a run directory). May import
``eora_ft.utils``, ``eora_ft.compress``, ``eora_ft.init`` and ``eora_ft.kernels``."""

from .peft_bridge import build_lora_model, load_adapter, load_pretrained, lora_config, save_adapter

__all__ = ["build_lora_model", "load_adapter", "load_pretrained", "lora_config", "save_adapter"]
