"""anychip: vendor-neutral pretraining of Llama/AFM-class language models on JAX."""

__version__ = "0.1.0"
