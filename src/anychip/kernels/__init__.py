"""Backend-specific fast paths, each behind one function with the portable XLA version as its reference."""
