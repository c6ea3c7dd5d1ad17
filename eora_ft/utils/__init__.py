"""Helpers every stage may use: atomic file and directory writes (:mod:`.atomic`), device placement and
streaming for inference (:mod:`.placement`), and the checks run on a model, tokenizer or adapter before
any expensive work (:mod:`.model_checks`). Imports nothing else from eora_ft."""
