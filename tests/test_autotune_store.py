"""Tuned-config files: naming by key, lookup fallback order, and corrupt or mismatched files."""

import json
import logging
import re
from dataclasses import replace

import pytest
from tq_serve.autotune import spaces, store
from tq_serve.autotune.store import TuningKey

KEY = TuningKey(kernel="decode", gpu="NVIDIA H200", triton="3.6.0", head_dim=128, k_bits=4, v_bits=4, group=4)
STAMP = {"gpu": "NVIDIA H200", "triton": "3.6.0", "torch": "2.11", "date": "2026-11-22"}


def write(config_dir, key, **config):
    config = {**spaces.default_config(key.kernel, key.head_dim), **config}
    return store.save(key, config, timings={"best": 1.0, "default": 2.0}, stamp=STAMP, config_dir=config_dir)


def lookup(config_dir, key):
    store.load_entries.cache_clear()
    store.lookup.cache_clear()
    return store.lookup(key, config_dir)


def test_file_is_named_by_its_key_and_holds_it(tmp_path):
    path = write(tmp_path, KEY, block_n=128)
    assert path == tmp_path / "decode" / "NVIDIA_H200__triton-3.6.0__d128_k4_v4_g4_mse.json"
    record = json.loads(path.read_text())
    assert record["key"]["head_dim"] == 128 and record["config"]["block_n"] == 128 and record["stamp"] == STAMP
    assert replace(KEY, k_bits=2.5).filename.endswith("d128_k2.5_v4_g4_mse.json")


def test_lookup_order_exact_then_other_triton_then_nearest_then_rule(tmp_path, caplog):
    write(tmp_path, replace(KEY, head_dim=64), block_n=16)  # nearest candidate
    write(tmp_path, replace(KEY, triton="3.5.0"), block_n=32)  # same key, older Triton
    write(tmp_path, replace(KEY, gpu="NVIDIA A100"), block_n=64)  # another GPU: never used
    caplog.set_level(logging.INFO, logger=store.__name__)
    assert lookup(tmp_path, KEY) == ({**spaces.default_config("decode", 128), "block_n": 32}, "other-triton")
    assert "python -m tq_serve.autotune" in caplog.text
    write(tmp_path, KEY, block_n=128)
    assert lookup(tmp_path, KEY)[0]["block_n"] == 128 and lookup(tmp_path, KEY)[1] == "exact"
    assert lookup(tmp_path, replace(KEY, head_dim=80, k_bits=3)) == (
        {**spaces.default_config("decode", 128), "block_n": 16},
        "nearest",
    )
    assert lookup(tmp_path, replace(KEY, gpu="NVIDIA L4")) == (spaces.default_config("decode", 128), "rule")
    assert lookup(tmp_path / "missing", KEY)[1] == "rule"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "Expecting property name"),
        (json.dumps({"config": {}}), "'key'"),
        (json.dumps({"key": {"kernel": "decode"}, "config": {}}), "key fields"),
        ("MISMATCH", "its content is the key"),
        ("UNKNOWN_PARAM", "unknown launch parameters \\['block_q'\\]"),
    ],
)
def test_corrupt_or_mismatched_file_is_a_warning_and_a_fallback(tmp_path, caplog, content, reason):
    path = write(tmp_path, KEY, block_n=128)
    if content == "MISMATCH":
        other = write(tmp_path, replace(KEY, head_dim=64))
        path.write_text(other.read_text())
        other.unlink()
    elif content == "UNKNOWN_PARAM":
        record = json.loads(path.read_text())
        record["config"]["block_q"] = 8
        path.write_text(json.dumps(record))
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        assert lookup(tmp_path, KEY) == (spaces.default_config("decode", 128), "rule")
    assert f"ignoring tuned config {path}" in caplog.text
    assert any(re.search(reason, r.getMessage()) for r in caplog.records)


@pytest.mark.parametrize("kernel", list(spaces.KERNEL_PARAMS))
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_search_spaces_hold_only_launcher_params_and_defaults_are_valid(kernel, head_dim):
    """Every candidate sets the same launcher parameters as the rule, the dot precision among them; the decode's split
    count is left to the launcher's rule (it depends on the batch, not on the key)."""
    params = set(spaces.KERNEL_PARAMS[kernel]) - {"num_kv_splits"}
    for space in (None, spaces.GPU_CHECK_SPACES[kernel], spaces.TINY_SPACES[kernel]):
        configs = spaces.candidates(kernel, head_dim, space)
        assert configs and all(set(c) == params for c in configs)
    assert set(spaces.default_config(kernel, head_dim)) == params


def test_shared_memory_estimate_is_near_what_sm90_compiles_to():
    """Measured with Triton 3.8 for sm_90a (bench kernels --static --config block_n=64 num_stages=2): decode 13 KiB
    at d=128 (mse) / 18 KiB (prod) / 22 KiB at d=256, extend 64 x 64 40 KiB."""
    decode = {"block_n": 64, "num_warps": 4, "num_stages": 2}
    extend = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
    for kernel, config, head_dim, variant, measured in [
        ("decode", decode, 128, "mse", 13),
        ("decode", decode, 128, "prod", 18),
        ("decode", decode, 256, "mse", 22),
        ("extend", extend, 128, "mse", 40),
    ]:
        estimate = spaces.shared_memory_estimate(kernel, config, head_dim, variant) / 1024
        assert measured <= estimate <= 1.5 * measured


def test_keep_prunes_what_cannot_fit():
    assert not spaces.keep("write", {"block_m": 16, "block_k": 128, "num_warps": 4, "num_stages": 1}, 64)
    assert not spaces.keep("extend", {"block_m": 1024, "block_n": 512, "num_warps": 8, "num_stages": 3}, 256)
    big_tile = {"block_n": 128, "num_warps": 2, "num_stages": 1}
    assert not spaces.keep("decode", big_tile, 256) and spaces.keep("decode", {**big_tile, "num_warps": 8}, 128)
    assert len(spaces.candidates("decode", 256)) < len(spaces.candidates("decode", 64))
    with pytest.raises(ValueError, match="unknown kernel 'prefill'"):
        spaces.default_config("prefill", 128)
