"""Stage 6, evaluation: the task registry (:mod:`.tasks`: ARC, MathQA, GSM8K, plain text), log-likelihood
scoring and perplexity (:mod:`.scoring`) and greedy generation (:mod:`.generation`), with
lm-evaluation-harness 0.4 semantics. May import every lower stage (utils, data, compress, init, adapters,
train)."""
