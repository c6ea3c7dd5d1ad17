"""eora_ft's tests. A regular package, so that `tests.recipes._runs` resolves here even where an installed
distribution ships a top-level `tests` package of its own (bitsandbytes 0.45 does)."""
