"""Stage 7, runs: the one sequential pipeline a recipe executes (:mod:`.pipeline`: load, evaluate,
compress + initialize, fine-tune, evaluate again), the content-keyed artifact cache and the files a run
writes (:mod:`.cache`, :mod:`.artifacts`), a checkpoint someone else compressed imported as a base entry
(:mod:`.precompressed`), the comparison of initializations over seeds (:mod:`.compare`,
:mod:`.compare_table`), results tables and plots (:mod:`.report`, :mod:`.plots`) and the shared recipe
entry point (:mod:`.recipe`). May import every lower stage and ``eora_ft.config``."""
