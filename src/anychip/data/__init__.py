"""Text → tokens → batches: the tokenizer, `prepare` (files to token shards and a manifest) and the
dataset whose batch of step s is a pure function of (seed, s)."""
