"""Packed-weight kernels of eora_ft, imported as ``eora_ft.kernels`` (never as top-level ``kernels``).

The folder is installed under ``eora_ft`` (see pyproject ``package-dir``) so that it cannot shadow
Hugging Face's ``kernels`` package, which transformers probes for. Keep this file free of heavy
imports (no triton): transformers may import it while probing when the repo root is the cwd.
"""
