import jax
import pytest

# fp32 matmuls on CPU really are fp32 (XLA CPU may otherwise pick faster, lower-precision paths).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.key(0)


STDLIB_SAMPLE = ("json", "email", "textwrap.py", "argparse.py", "dataclasses.py", "string.py")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared data dir (vocab 512) from a few standard-library modules: real code, ~0.7 MB, offline."""
    import shutil
    import sysconfig
    from pathlib import Path

    from anychip.data.prepare import prepare

    root = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path_factory.mktemp("corpus_src")
    for name in STDLIB_SAMPLE:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "tests"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("corpus") / "data"
    prepare([str(src)], out, vocab_size=512, val_fraction=0.1, log=lambda _: None)
    return out
