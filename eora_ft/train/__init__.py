"""Stage 5, training: TRL's SFTTrainer over the adapters (:mod:`.trainer`; checkpoints that hold the adapters'
state and no part of the frozen base, :mod:`.adapter_trainer`; the checkpoint every rank resumes from and the
refusal of an output_dir some nodes cannot see, :mod:`.checkpoints`; launch checks and DDP options,
:mod:`.launch`), the process layout under Accelerate/DeepSpeed (:mod:`.distributed`: CPU process groups, ZeRO-3
gathers, all cores for the rank that works while the others wait) and the main-process handoff that keeps the
other ranks out of collectives during long single-process work (:mod:`.handoff`). May import every lower stage
(utils, data, compress, init, adapters)."""
