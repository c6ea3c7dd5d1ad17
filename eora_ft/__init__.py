"""eora_ft: fine-tune compressed LLMs from EoRA-initialised LoRA adapters.

The package reads as the data flow of a run; each stage imports only the stages before it
(``tests/test_layout.py`` checks it):

    utils, kernels -> data -> compress -> init -> adapters -> train -> eval -> config -> run -> cli

``config.py`` declares every knob once (the dataclasses that recipes and ``eora-ft`` subcommands parse).
"""
