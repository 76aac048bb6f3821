"""Configs are data: presets, YAML, dotted overrides, and one-line errors for anything wrong."""

import pytest

from anychip.config import MODEL_PRESETS, Config, load_config, save_config
from anychip.errors import UserError


def test_defaults_are_the_demo_run():
    cfg = load_config()
    assert cfg == Config() and cfg.model == MODEL_PRESETS["demo"] and cfg.data.path is None


def test_dotted_overrides_and_presets():
    cfg = load_config(None, ["model=350m", "train.steps=2000", "run_dir=runs/a", "model.n_layers=2",
                             "optim.lr=1e-4", "data.path=null"])
    assert cfg.model.d_model == 1024 and cfg.model.n_layers == 2 and cfg.model.name == "350m"
    assert cfg.train.steps == 2000 and cfg.run_dir == "runs/a" and cfg.optim.lr == 1e-4


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: afm-3b\ntrain:\n  steps: 7\n  seq_len: 4096\n")
    cfg = load_config(path, ["train.steps=9"])
    assert cfg.model.qk_norm and cfg.model.n_kv_heads == 8 and cfg.train.steps == 9 and cfg.train.seq_len == 4096


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["model=afm-3b", "train.seq_len=512", "optim.schedule=wsd"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("overrides, fragment", [
    (["train.stesp=3"], "did you mean 'train.steps'"),
    (["modle.d_model=3"], "did you mean 'model.d_model'"),
    (["model=351m"], "did you mean '350m'"),
    (["optim.lr=-1"], "optim.lr must be positive"),
    (["model.n_heads=7"], "does not divide model.d_model"),
    (["model.n_kv_heads=4"], "does not divide model.n_heads"),
    (["train.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train.steps=ten"], "expected an integer"),
    (["optim.schedule=linear"], "not one of"),
    (["train.grad_accum=3"], "does not divide train.batch_size"),
    (["compute.loss_chunk=100"], "must be 0 (off) or divide train.seq_len=256"),
    (["steps"], "expected key=value"),
])
def test_bad_values_are_one_line_user_errors(overrides, fragment):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_shipped_example_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.train.seq_len <= cfg.model.max_seq_len


def test_every_setting_is_documented_and_listed():
    import dataclasses
    import typing

    from anychip.config import all_keys, describe, field_docs

    types = typing.get_type_hints(Config)
    sections = {name: cls for name, cls in types.items() if dataclasses.is_dataclass(cls)}
    for cls in [Config, *sections.values()]:
        missing = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"
    listed = "\n".join(describe())
    settings = [key for key in all_keys() if key not in sections]
    assert len(settings) > 60 and all(f"  {key} = " in listed for key in settings)


def test_a_moved_key_names_its_new_place():
    with pytest.raises(UserError, match=r"config key 'train.remat' is now 'compute.remat'"):
        load_config(None, ["train.remat=dots"])


def test_auto_compute_settings_resolve_per_platform():
    auto = Config().compute
    cpu, tpu = auto.for_platform("cpu", n_layers=4, seq_len=256), auto.for_platform("tpu", n_layers=4, seq_len=256)
    # The suite pins ANYCHIP_CPU_BF16=0 (conftest): a CPU without bf16 dots computes in fp32.
    assert (cpu.dtype, cpu.layers, cpu.attention_block, cpu.loss_chunk) == ("float32", "unroll", 128, 32)
    assert (tpu.dtype, tpu.layers, tpu.attention_block, tpu.loss_chunk) == ("bfloat16", "scan", 512, 0)
    assert auto.for_platform("cpu", n_layers=24, seq_len=256).layers == "scan"  # deep models keep compile time flat
    long = auto.for_platform("cpu", n_layers=4, seq_len=4096)
    assert long.attention_block == 512  # 128..512: up to 4 key blocks, tiles not too small for the CPU's matmuls
    assert auto.for_platform("cpu", n_layers=4, seq_len=100).loss_chunk == 0  # 32 does not divide: reference loss
    explicit = load_config(None, ["compute.dtype=bfloat16", "compute.layers=scan", "compute.attention_block=128",
                                  "compute.loss_chunk=0"]).compute
    assert explicit.for_platform("cpu", n_layers=4, seq_len=256) == explicit


@pytest.mark.parametrize("flags, bf16", [
    ("flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n", True),  # Zen 4, Sapphire Rapids
    ("flags\t\t: fpu sse2 avx2 fma amx_bf16 amx_tile\n", True),
    ("Features\t: fp asimd bf16 i8mm sve\n", True),  # Arm (Neoverse V1/V2, Graviton 3/4)
    ("flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n", False),  # AVX-512 without bf16 (Skylake, Zen 3 has none)
    ("flags\t\t: fpu sse2 avx2 fma\n", False),
])
def test_bf16_dots_are_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, bf16):
    from anychip.jaxenv import cpu_has_bf16

    monkeypatch.delenv("ANYCHIP_CPU_BF16")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + flags)
    assert cpu_has_bf16.__wrapped__(str(cpuinfo)) is bf16
    assert cpu_has_bf16.__wrapped__(str(tmp_path / "missing")) is False
    monkeypatch.setenv("ANYCHIP_CPU_BF16", "1")
    assert cpu_has_bf16.__wrapped__(str(cpuinfo)) is True


def test_auto_block_and_chunk_are_values_a_config_may_spell():
    cfg = load_config(None, ["compute.attention_block=auto", "compute.loss_chunk=auto"])
    assert (cfg.compute.attention_block, cfg.compute.loss_chunk) == ("auto", "auto")
    with pytest.raises(UserError, match="expected an integer"):
        load_config(None, ["compute.loss_chunk=fast"])
    with pytest.raises(UserError, match="must be 0 \\(off\\) or divide"):
        load_config(None, ["compute.loss_chunk=48", "train.seq_len=256"])
