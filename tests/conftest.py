import jax
import pytest

# fp32 matmuls on CPU really are fp32 (XLA CPU may otherwise pick faster, lower-precision paths).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.key(0)
