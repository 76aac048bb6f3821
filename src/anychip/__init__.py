"""anychip: vendor-neutral pretraining of Llama/AFM-class language models on JAX."""

from anychip.jaxenv import quiet_start, restart_with_huge_pages

__version__ = "0.1.0"

restart_with_huge_pages()  # the `anychip` command only, once, before jax is imported (jaxenv.py)
quiet_start()  # before any backend starts: keeps the `aot` extra's TPU and CUDA compilers quiet (jaxenv.py)
