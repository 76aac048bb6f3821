"""The bad-input suite: generated config files and overrides, data mixtures, price files, Hugging Face
model directories (config.json, index files, safetensors headers) and CLI arguments. Each either works,
or stops with one line (a UserError; exit 2 at the CLI) before any compute. Never another exception (a
traceback), and nothing on disk changes: inputs keep their bytes, no output appears.

Hypothesis generates the inputs (derandomized in the default suite, so it is reproducible, with a
modest number of examples each; the `slow` job runs the same properties with many more, randomized).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from anychip import cli
from anychip.config import ModelConfig, all_keys, load_config, save_config, to_dict
from anychip.cost.hardware import FIELDS
from anychip.data.prepare import prepare
from anychip.data.tokenizer import save_tokenizer, train_tokenizer
from anychip.errors import UserError
from anychip.interop.hf import hf_config, hf_state_dict, import_hf, read_safetensors, weight_files
from anychip.model.params import init_params

# (default suite, slow job) examples per property; the default suite runs all of them in ~10 s.
FEW, MANY = 40, 1500
EXAMPLES = [pytest.param(FEW, id="few"), pytest.param(MANY, id="many", marks=pytest.mark.slow)]


def property_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=examples == FEW,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line(error: BaseException) -> None:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


# Values a person (or a broken generator) might put anywhere.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e400", "-1e400", "nan", ".inf", "-1", "0", "1e-4", "tiny", "350m", "auto", "never",
                     "12", "bfloat16", "stop", "", " ", "~", "null", "true", "[1, 2]", "{a: 1}"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


# ---------------------------------------------------------------------------------------------
# Config files and overrides


KEYS = st.sampled_from([*all_keys(), "model.preset", "train.stesp", "train.log_every", "bogus", "", "."])


def nested(flat: dict[str, object]) -> dict[str, object]:
    """{'train.steps': 3} → {'train': {'steps': 3}}, as a person writes a YAML file (a clash keeps the later key)."""
    out: dict[str, object] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
        node[leaf] = value
    return out


CONFIG_FILES = st.one_of(
    st.dictionaries(KEYS, VALUES, max_size=6).map(lambda d: yaml.safe_dump(nested(d)).encode()),
    st.dictionaries(KEYS, VALUES, max_size=4).map(lambda d: yaml.safe_dump(d).encode()),  # dotted keys
    st.binary(max_size=64),  # not YAML, not UTF-8
    st.text(max_size=64).map(str.encode),
    VALUES.map(lambda v: yaml.safe_dump(v).encode()),  # a list or a scalar at the top
)
OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", KEYS, st.one_of(SCALARS.map(str), st.text(max_size=8))),
                     max_size=3) | st.lists(st.text(max_size=10), max_size=2)


def finite_numbers(tree: object) -> bool:
    if isinstance(tree, dict):
        return all(finite_numbers(v) for v in tree.values())
    return not isinstance(tree, float) or math.isfinite(tree)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_config_files_and_overrides_load_or_fail_in_one_line(tmp_path, examples):
    @property_settings(examples)
    @given(text=CONFIG_FILES, overrides=OVERRIDES)
    @example(text=b"optim:\n  lr: 1e400\n", overrides=[])
    @example(text=b"optim: {eps: -1}\n", overrides=["train.seed=-1"])
    @example(text=b"model: {preset: [1]}\n", overrides=[])
    @example(text=b"\xff\xfeoptim: {}\n", overrides=[])
    @example(text=b"", overrides=["\n"])  # quoted user text with a line break: shown escaped, still one line
    @example(text=b"train: [1, 2]\n", overrides=["run_dir="])
    @example(text=b"", overrides=["train.seed=99999999999999999999", "model.d_model=0"])
    def check(text: bytes, overrides: list[str]) -> None:
        path = tmp_path / "config.yaml"
        path.write_bytes(text)
        before = snapshot(tmp_path)
        try:
            cfg = load_config(path, overrides)
        except UserError as e:
            assert_one_line(e)
        else:  # a config that loads is complete, finite and itself a valid config file
            assert finite_numbers(to_dict(cfg))
            save_config(cfg, tmp_path / "resolved.yaml")
            assert load_config(tmp_path / "resolved.yaml") == cfg
            (tmp_path / "resolved.yaml").unlink()
        assert snapshot(tmp_path) == before

    check()


# ---------------------------------------------------------------------------------------------
# Price and catalog files, through the CLI (in this process: the same code path, without the start-up)


FIELD_VALUES = VALUES | st.fixed_dictionaries({"value": VALUES}, optional={"source": st.text(max_size=5)})
ENTRIES = st.dictionaries(st.sampled_from([*FIELDS, "bogus", "hbm_tb"]), FIELD_VALUES, max_size=4)
CHIPS = st.sampled_from(["h100", "trn2", "tpu-v5p", "inf2", "mychip", "1"])
PRICE_FILES = st.one_of(
    st.dictionaries(CHIPS, ENTRIES | st.floats() | st.integers(-5, 5), max_size=2),
    st.fixed_dictionaries({"chips": st.dictionaries(CHIPS, ENTRIES, max_size=2)}, optional={"date": SCALARS}),
    VALUES,
).map(lambda doc: yaml.safe_dump(doc).encode()) | st.binary(max_size=32)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_outcome(rc: int, out: str, err: str) -> None:
    """Works with made-up-free output, or one line on stderr and exit 2."""
    if rc == 0:
        assert not any(word in out.split() for word in ("inf", "nan", "$inf", "$nan")), out
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("anychip: error: "), err


@pytest.mark.parametrize("examples", EXAMPLES)
def test_price_files_plan_or_fail_in_one_line(tmp_path, capsys, examples):
    @property_settings(examples)
    @given(text=PRICE_FILES, chip=CHIPS)
    @example(text=b"h100:\n  link_gb_s: 0\n", chip="h100")
    @example(text=b"h100:\n  link_gb_s: null\n", chip="h100")
    @example(text=b"h100: {hbm_tb_s: 0, bf16_tflops: {value: 0}}\n", chip="h100")
    @example(text=b"\xffh100: 3\n", chip="h100")
    @example(text=b'? "\\N"\n: null\n', chip="h100")  # a YAML key that is U+0085, a line break
    def check(text: bytes, chip: str) -> None:
        path = tmp_path / "prices.yaml"
        path.write_bytes(text)
        before = snapshot(tmp_path)
        assert_cli_outcome(*run_cli(capsys, "hardware", "--prices", str(path)))
        assert_cli_outcome(*run_cli(capsys, "plan", "--model", "125m", "--tokens", "1B", "--seq-len", "1024",
                                    "--chips", chip, "--num-chips", "16", "--prices", str(path)))
        assert snapshot(tmp_path) == before

    check()


# ---------------------------------------------------------------------------------------------
# Data mixtures and storage URLs, from a config file to the opened datasets


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> Path:
    """Prepared dirs `a` and `b` (one tokenizer), `other` (its own tokenizer), a plain file and an empty folder."""
    root = tmp_path_factory.mktemp("mixture_bad_inputs")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / f"{name}_src").mkdir()
        for i in range(6):
            (root / f"{name}_src" / f"{i}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma", name], 80)))
    quiet = {"val_fraction": 0.3, "log": lambda _: None}
    prepare([str(root / "a_src"), str(root / "b_src")], root / "both", vocab_size=300, **quiet)
    for name in ("a", "b"):
        prepare([str(root / f"{name}_src")], root / name, tokenizer=str(root / "both" / "tokenizer.json"), **quiet)
    prepare([str(root / "b_src")], root / "other", vocab_size=280, **quiet)
    (root / "notes.txt").write_text("not a data dir")
    (root / "empty").mkdir()
    return root


# Names under the fixture's folder (made absolute by the test), URLs of it, and the ways a path goes wrong.
# Remote stores are only in the @examples: each costs a connection attempt.
MIX_NAMES = st.sampled_from(["a", "b", "other", "file://a", "file://b", "missing", "notes.txt", "empty", "",
                             " ", "ftp://host/a", "a/../b", "a/"])
MIX_ENTRIES = st.one_of(
    # well-formed lists over meaningful paths, with positive weights: these reach the datasets
    st.lists(st.fixed_dictionaries({"path": MIX_NAMES, "weight": st.floats(1e-3, 1e3) | st.integers(1, 10)}),
             min_size=1, max_size=3),
    # anything else a YAML list of entries can hold
    st.lists(st.fixed_dictionaries({"path": MIX_NAMES | st.text(max_size=6), "weight": SCALARS},
                                   optional={"extra": SCALARS}) | VALUES, max_size=3),
    VALUES,
)


def _absolute(root: Path, entries: object) -> object:
    """Entries with fixture names turned into absolute paths (URLs and odd values kept as they are)."""
    if not isinstance(entries, list):
        return entries
    out = []
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"].strip():
            path = e["path"]
            e = {**e, "path": f"file://{root / path[7:]}" if path.startswith("file://")
                 else path if "://" in path else str(root / path)}
        out.append(e)
    return out


@pytest.mark.parametrize("examples", EXAMPLES)
def test_mixtures_open_or_fail_in_one_line(data_dirs, tmp_path, monkeypatch, examples):
    """data.mixture (inline in a config file, or a YAML file of its own) opens as train and val datasets whose
    batches hold the tokenizer's ids, or stops in one line; nothing under the data dirs changes."""
    from anychip.train.data import data_dir_for, open_datasets

    # An S3 store that refuses connections at once: `cannot reach`, without waiting on the internet.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    before = snapshot(data_dirs)

    @property_settings(examples)
    @given(entries=MIX_ENTRIES, as_file=st.booleans())
    @example(entries=[{"path": "a", "weight": 3}, {"path": "b", "weight": 1}], as_file=False)
    @example(entries=[{"path": "a", "weight": 1.0e308}, {"path": "b", "weight": 1.0e308}], as_file=True)
    @example(entries=[{"path": "a", "weight": 1}, {"path": "a", "weight": 2}], as_file=False)
    @example(entries=[{"path": "a", "weight": 1}, {"path": "other", "weight": 1}], as_file=False)
    @example(entries=[{"path": "s3://bucket/a", "weight": 1}], as_file=False)
    @example(entries=[{"path": "gs://bucket/a", "weight": 1}], as_file=True)
    @example(entries=[{"path": "a", "weight": float("nan")}], as_file=False)
    def check(entries: object, as_file: bool) -> None:
        assume(entries is not None)  # no mixture: the built-in corpus, not this test's subject
        mixture = _absolute(data_dirs, entries)
        if as_file:
            (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
            mixture = str(tmp_path / "mix.yaml")
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {"mixture": mixture}}))
        try:
            cfg = load_config(tmp_path / "config.yaml")
            train, val = open_datasets(cfg, data_dir_for(cfg))
        except UserError as e:
            assert_one_line(e)
        else:
            assert np.all(train.weights > 0) and train.weights.sum() == pytest.approx(1.0, abs=1e-12)
            for ds in (train, val):
                rows = ds.batch(0, 4, 8, seed=0)
                assert rows.shape == (4, 9) and 0 <= rows.min() and rows.max() < ds.vocab_size
        assert snapshot(data_dirs) == before

    check()


# ---------------------------------------------------------------------------------------------
# Hugging Face model directories


SMALL = ModelConfig(name="small", vocab_size=300, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=64)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A valid one-layer Llama directory written by anychip's own exporter pieces, and next to it a
    second weight file that an escaping index entry could reach."""
    root = tmp_path_factory.mktemp("hf_bad_inputs")
    model = root / "model"
    model.mkdir()
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, 300)
    save_tokenizer(tokenizer, model / "tokenizer.json")
    (model / "config.json").write_text(json.dumps(hf_config(SMALL)))
    tensors = hf_state_dict(init_params(SMALL, jax.random.key(0)), SMALL)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    save_file(tensors, root / "outside.safetensors", metadata={"format": "pt"})
    return model


def copy_model(source: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir()
    for f in source.iterdir():
        if f.name not in skip:
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


CONFIG_KEYS = st.sampled_from(sorted(hf_config(SMALL)) + ["rope_scaling", "partial_rotary_factor", "auto_map",
                                                        "architectures", "num_key_value_heads"])
ROPE = st.fixed_dictionaries({}, optional={
    "rope_type": st.sampled_from(["default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"]),
    "type": st.sampled_from(["default", "linear", "su"]), "rope_theta": SCALARS, "factor": SCALARS,
    "full_attention": st.fixed_dictionaries({"rope_type": st.just("default")})})
CONFIG_EDITS = st.dictionaries(CONFIG_KEYS, VALUES | ROPE, max_size=3)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_hf_configs_import_or_fail_in_one_line(hf_model, tmp_path_factory, examples):
    base = json.loads((hf_model / "config.json").read_text())

    @property_settings(examples)
    @given(edits=CONFIG_EDITS, drop=st.lists(CONFIG_KEYS, max_size=2), top=st.sampled_from(["object", "list", "bytes"]))
    @example(edits={"num_attention_heads": 0}, drop=[], top="object")
    @example(edits={"hidden_size": "32"}, drop=[], top="object")
    @example(edits={"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, drop=[], top="object")
    @example(edits={}, drop=[], top="list")
    def check(edits: dict, drop: list[str], top: str) -> None:
        folder = copy_model(hf_model, tmp_path_factory.mktemp("hf") / "model", skip=("model.safetensors",))
        config = {k: v for k, v in {**base, **edits}.items() if k not in drop}
        text = {"object": json.dumps(config), "list": json.dumps([config]), "bytes": "\udcff"}[top]
        (folder / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        before = snapshot(folder.parent)
        # No weights in this copy: a config that passes reaches the weight files and stops there.
        with pytest.raises(UserError) as e:
            import_hf(folder, folder.parent / "run")
        assert_one_line(e.value)
        # RoPE scaling, however it is written, is refused and never dropped: such a config never gets
        # as far as the weights (transformers 5 reads rope_scaling first, then rope_parameters).
        rope = config.get("rope_scaling") if config.get("rope_scaling") is not None else config.get("rope_parameters")
        if isinstance(config, dict) and isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (
                None, "default"):
            assert "safetensors" not in str(e.value)
        assert snapshot(folder.parent) == before

    check()


INDEX_NAMES = st.one_of(
    st.sampled_from(["model.safetensors", "../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors",
                     "missing.safetensors", "", ".", "..", "./model.safetensors"]),
    st.text(max_size=12), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=1),
)
INDEX_FILES = st.one_of(
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=20), INDEX_NAMES, max_size=3)},
                          optional={"metadata": VALUES}),
    st.fixed_dictionaries({}, optional={"weight_map": VALUES, "metadata": VALUES}),
    VALUES,
)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_index_files_stay_inside_the_model_directory(hf_model, tmp_path_factory, examples):
    @property_settings(examples)
    @given(index=INDEX_FILES)
    @example(index={"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}})
    @example(index={"weight_map": {"model.embed_tokens.weight": str(hf_model.parent / "outside.safetensors")}})
    @example(index={"metadata": {}})
    @example(index={"weight_map": {"x": "missing.safetensors"}})
    def check(index: object) -> None:
        folder = copy_model(hf_model, tmp_path_factory.mktemp("hf") / "model")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        before = snapshot(folder.parent)
        try:
            files = weight_files(folder)
        except UserError as e:
            assert_one_line(e)
        else:
            assert all(f.resolve().is_relative_to(folder.resolve()) and f.is_file() for f in files), files
        names = index.get("weight_map") if isinstance(index, dict) else None
        escaping = isinstance(names, dict) and any(
            isinstance(n, str) and (n.startswith("/") or ".." in Path(n).parts) for n in names.values())
        if escaping:
            with pytest.raises(UserError, match="only files inside"):
                import_hf(folder, folder.parent / "run")
        assert snapshot(folder.parent) == before

    check()


DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "U8", "F64", "X9", ""])
TENSOR_ENTRIES = st.fixed_dictionaries(
    {}, optional={"dtype": DTYPES | SCALARS, "shape": st.lists(st.integers(-2, 2**40), max_size=3) | SCALARS,
                  "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3) | SCALARS})
HEADERS = st.dictionaries(st.text(max_size=8) | st.just("__metadata__"), TENSOR_ENTRIES | VALUES, max_size=3)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_safetensors_headers_read_or_fail_in_one_line(tmp_path, examples):
    @property_settings(examples)
    @given(header=HEADERS | VALUES, claimed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
           data=st.binary(max_size=64))
    @example(header={"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, claimed=10 * 2**30, data=b"0" * 8)
    @example(header={"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, claimed=None, data=b"")
    @example(header={"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, claimed=None, data=b"0" * 8)
    def check(header: object, claimed: int | None, data: bytes) -> None:
        raw = json.dumps(header).encode()
        path = tmp_path / "model.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)
        before = snapshot(tmp_path)
        try:
            tensors = read_safetensors([path])
        except UserError as e:
            assert_one_line(e)
        else:
            assert all(isinstance(t, np.ndarray) and t.dtype == np.float32 for t in tensors.values())
        assert snapshot(tmp_path) == before

    check()


# ---------------------------------------------------------------------------------------------
# CLI counts and sampling parameters: refused by the parser, before a checkpoint is read


@pytest.mark.parametrize("args", [
    ["eval", "RUN", "--batches", "0"], ["eval", "RUN", "--batches", "-3"], ["bench", "--steps", "0"],
    ["bench", "--warmup", "-1"], ["generate", "RUN", "--temperature", "nan"],
    ["generate", "RUN", "--temperature", "-1"], ["generate", "RUN", "--top-p", "0"],
    ["generate", "RUN", "--top-p", "inf"], ["generate", "RUN", "--top-k", "-1"],
    ["generate", "RUN", "--max-new-tokens", "0"], ["generate", "RUN", "--seed", "99999999999999999999"],
    ["data", "prepare", "x", "--out", "y", "--val-fraction", "nan"], ["data", "prepare", "x", "--out", "y",
                                                                       "--vocab-size", "10"],
    ["plan", "--model", "1b", "--tokens", "1T", "--num-chips", "0"],
    ["plan", "--model", "1b", "--tokens", "1T", "--num-chips", "8", "--budget", "nan"],
    ["plan", "--model", "1b", "--tokens", "1T", "--num-chips", "8", "--seq-len", "0"],
    ["import", "hf", "DIR", "--out", "RUN", "--extra-tokens", "-5"], ["check", "--devices", "0"],
])
def test_cli_counts_are_refused_in_one_line(tmp_path, capsys, args):
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert err.startswith("anychip: error: argument ") and "--help" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("a file"), "is a file, not a directory"),
    (lambda p: None, "has no checkpoint"),
])
def test_run_directory_mistakes_are_one_line(tmp_path, capsys, make, fragment):
    path = tmp_path / "run"
    make(path)
    if not path.exists():
        (path / "checkpoints").mkdir(parents=True)
        (path / "config.yaml").write_text("{}\n")
    before = snapshot(tmp_path)
    command = (["train", f"run_dir={path}", "model=tiny", "compute.compile_cache_dir=null"] if path.is_file()
               else ["generate", str(path)])
    rc, _, err = run_cli(capsys, *command)
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before
