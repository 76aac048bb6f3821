"""The accelerator catalog: every entry sourced, device_kind detection, user overrides, the cost ledger."""

from __future__ import annotations

import re

import pytest

from anychip.cost import hardware
from anychip.errors import UserError


@pytest.fixture(scope="module")
def catalog() -> hardware.Catalog:
    return hardware.load_catalog()


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_catalog_has_every_chip_with_sources(catalog):
    for chip in catalog.values():
        # Every numeric field given in catalog.yaml names where it came from and when.
        assert {"bf16_tflops", "domain", "price_per_hour"} <= set(chip.sources), chip.key
        for name, source in chip.sources.items():
            assert "(2026-11)" in source and len(source) > len("(2026-11)") + 10, (chip.key, name)
    # A device names one chip: two entries claiming the same device_kind would make detection arbitrary.
    kinds = [k.strip().lower() for chip in catalog.values() for k in chip.device_kinds]
    assert len(kinds) == len(set(kinds))


def test_derived_figures_follow_their_stated_arithmetic(catalog):
    """Per-chip prices are instance prices over chips ("p5.48xlarge $55.04/8"), per-chip scale-out
    bandwidths are NIC rates per chip ("... = 400 Gb/s per GPU"): the number must be the sum shown."""
    checked = 0
    for chip in catalog.values():
        price = re.search(r"\$([\d.]+)/(\d+)\b", chip.sources.get("price_per_hour", ""))
        if price and chip.price_per_hour is not None:
            assert chip.price_per_hour == pytest.approx(float(price[1]) / int(price[2]), abs=0.005), chip.key
            checked += 1
        per_chip = re.search(r"= (\d+) Gb/s per", chip.sources.get("scaleout_gb_s", ""))
        if per_chip:
            assert chip.scaleout_bw == pytest.approx(int(per_chip[1]) / 8 * 1e9), chip.key  # bits → bytes
            checked += 1
    assert checked >= 12  # most of the catalog shows its arithmetic; a refactor that loses it fails here


def test_inference_part_and_cpu_are_marked(catalog):
    assert catalog["inf2"].training is False
    assert all(c.training for k, c in catalog.items() if k != "inf2")
    cpu = catalog["cpu"]
    assert cpu.peak_bf16_flops is None and cpu.price_per_hour is None  # no invented peak or price


@pytest.mark.parametrize("kind, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("TPU v5 lite", "tpu-v5e"), ("TPU v5", "tpu-v5p"),
    ("TPU v6 lite", "tpu-v6e"), ("TPU v4", "tpu-v4"), ("TPU7x", "tpu-7x"), ("cpu", "cpu"),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
])
def test_device_kind_matches(catalog, kind, key):
    assert hardware.match_device_kind(kind, catalog).key == key


def test_device_kind_match_is_exact(catalog):
    # A PCIe H100 is a slower part: it must not be given SXM peaks.
    assert hardware.match_device_kind("NVIDIA H100 PCIe", catalog) is None
    assert hardware.match_device_kind("NVIDIA H100 NVL", catalog) is None
    trn2 = hardware.match_device_kind("NC_v3d", catalog)
    assert trn2.key == "trn2" and trn2.devices_per_chip == 4
    assert trn2.peak_flops_per_device == pytest.approx(667e12 / 4)
    assert hardware.chips_in_use(trn2, 64) == 16
    # libtpu's TPU7x topology shows each of a chip's 2 TensorCores as a device (tpu7x:2x2x1 = 8 devices).
    tpu7x = hardware.match_device_kind("TPU7x", catalog)
    assert tpu7x.devices_per_chip == 2 and hardware.chips_in_use(tpu7x, 8) == 4


def test_detect_on_this_host():
    import jax

    chip = hardware.detect()
    assert chip == hardware.match_device_kind(jax.devices()[0].device_kind) or chip.key == "unknown"
    if jax.default_backend() == "cpu":  # a generic CPU: no invented peak or price
        assert chip.key == "cpu" and chip.peak_bf16_flops is None and chip.price_per_hour is None
    assert hardware.detect(2.5).price_per_hour == 2.5


def test_user_yaml_overrides_and_adds(tmp_path):
    extra = tmp_path / "prices.yaml"
    extra.write_text(
        "date: 2026-12\n"
        "chips:\n"
        "  h100: {price_per_hour: {value: 3.90, source: 'my negotiated rate'}}\n"
        "  tpu-v5e: 0.90\n"  # shorthand: a bare number is a price
        "  mychip: {name: My Chip, bf16_tflops: 100, hbm_gb: 48, domain: 4, device_kinds: ['My Chip 1']}\n"
    )
    cat = hardware.load_catalog([extra])
    assert cat["h100"].price_per_hour == 3.90 and cat["h100"].peak_bf16_flops == pytest.approx(989.4e12)
    assert cat["h100"].sources["price_per_hour"] == "my negotiated rate (2026-12)"
    assert cat["tpu-v5e"].price_per_hour == 0.90
    mine = cat["mychip"]
    assert (mine.name, mine.peak_bf16_flops, mine.hbm_bytes, mine.domain) == ("My Chip", 100e12, 48e9, 4)
    assert hardware.match_device_kind("My Chip 1", cat).key == "mychip"
    assert hardware.load_catalog()["h100"].price_per_hour == 6.88  # the shipped catalog is untouched


@pytest.mark.parametrize("text, expected", [
    ("h100: {bf16_tflop: 1000}", "did you mean 'bf16_tflops'"),
    ("h100: {price_per_hour: cheap}", "expected a number in [0, 1e+09]"),
    ("h100: {price_per_hour: {value: 3, src: x}}", "expected a value or {value, source, date}"),
    ("h100: [1, 2]", "expected a mapping of fields or a price"),
    ("h100: {attention: fast}", "expected 'flash', 'splash', 'blockwise' or 'xla'"),
    ("h100: {domain: 0}", "domain: must be a positive integer"),
    ("h100: {domain: 2.5}", "domain: must be a positive integer"),
    ("h100: {training: 'no'}", "expected true or false"),
    ("- just a list", "expected a mapping of chip keys"),
    ("h100: {price_per_hour: 1", "not valid YAML"),
])
def test_bad_user_yaml_is_one_line_user_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError) as excinfo:
        hardware.load_catalog([path])
    assert expected in one_line_error(excinfo)


def test_missing_catalog_file_and_unknown_chip(catalog, tmp_path):
    with pytest.raises(UserError) as excinfo:
        hardware.load_catalog([tmp_path / "nope.yaml"])
    assert "not found" in one_line_error(excinfo)
    with pytest.raises(UserError) as excinfo:
        hardware.get_chip("h1000", catalog)
    assert "did you mean 'h100'" in one_line_error(excinfo)


def test_cost_summary(catalog):
    h100 = catalog["h100"]
    s = hardware.cost_summary(h100, n_chips=8, elapsed_s=3600, tokens=2e9)
    assert s["chip_hours"] == 8 and s["cost_usd"] == pytest.approx(8 * 6.88)
    assert s["usd_per_mtok"] == pytest.approx(8 * 6.88 / 2000)
    doubled = hardware.cost_summary(h100, 8, 3600, 2e9, price_override=2 * 6.88)
    assert doubled["cost_usd"] == pytest.approx(2 * s["cost_usd"])
    assert doubled["chip_hours"] == s["chip_hours"]
    unknown = hardware.cost_summary(catalog["gb200"], 72, 3600, 1e9)
    assert unknown["chip_hours"] == 72 and unknown["cost_usd"] is None and unknown["usd_per_mtok"] is None
    assert hardware.cost_summary(h100, 8, 10, tokens=0)["usd_per_mtok"] is None


def test_catalog_table_marks_current_device(catalog):
    table = hardware.format_catalog_table(catalog)
    lines = table.splitlines()
    assert "$/PFLOP-h" in lines[0] and "HBM TB/s" in lines[0] and "domain" in lines[0]
    marked = [line for line in lines[1:-1] if line.startswith("*")]
    assert len(marked) == 1 and " cpu " in marked[0]
    h100 = next(line for line in lines if " h100 " in line)
    assert "989" in h100 and "6.88" in h100 and "7.0" in h100
    assert "[no training]" in next(line for line in lines if " inf2 " in line)
    assert hardware.format_catalog_table(catalog, current="h100").count("*  h100") == 1
