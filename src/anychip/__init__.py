"""anychip: vendor-neutral pretraining of Llama/AFM-class language models on JAX."""

from anychip.jaxenv import quiet_start

__version__ = "0.1.0"

quiet_start()  # before any backend starts: keeps the `aot` extra's TPU and CUDA compilers quiet (jaxenv.py)
