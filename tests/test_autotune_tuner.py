"""The tuner end to end under the Triton interpreter (tiny space, CPU timer): it writes a file the lookup finds,
checks candidates the way the kernel tests do (flip budget for the write, the dot precision's tolerance for
attention), survives a key that fails, and stores the dot precision it chose."""

import json
from dataclasses import replace

import pytest
import torch
from tq_serve.autotune import store, tuner
from tq_serve.autotune.__main__ import main
from tq_serve.autotune.spaces import TINY_SPACES
from tq_serve.autotune.store import TuningKey
from tq_serve.autotune.tuner import device_name, make_case, tune_keys


def _triton() -> str:
    import triton

    return triton.__version__


KEY = TuningKey(kernel="decode", gpu=device_name(), triton=_triton(), head_dim=64, k_bits=3, v_bits=3, group=2)


def test_tune_command_writes_a_stamped_file_that_lookup_uses(tmp_path, capsys):
    args = [
        "--tiny",
        "--kernels",
        "decode",
        "--head-dims",
        "64",
        "--bits",
        "3",
        "--groups",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert "[decode 2/2]" in capsys.readouterr().out
    files = list((tmp_path / "decode").glob("*.json"))
    assert [f.name for f in files] == [f"{store.slug(device_name())}__triton-{_triton()}__d64_k3_v3_g2_mse.json"]
    record = json.loads(files[0].read_text())
    space = TINY_SPACES["decode"]
    assert record["config"] in [dict(zip(space, v, strict=True)) for v in [(16, 4, 1, "bf16"), (32, 4, 1, "bf16")]]
    assert record["config"]["dot_precision"] == "bf16"
    assert set(record["stamp"]) >= {"gpu", "triton", "torch", "date", "commit", "rejected"}
    assert record["timings_us"]["best"] > 0 and record["timings_us"]["default"] > 0
    store.load_entries.cache_clear()
    assert store.lookup(KEY, tmp_path) == (record["config"], "exact")


def test_tune_command_rejects_unsupported_head_dim(capsys):
    assert main(["--tiny", "--head-dims", "100"]) == 2
    assert "unsupported head_dim 100" in capsys.readouterr().err


def test_a_failing_key_is_reported_and_the_others_are_tuned(tmp_path, monkeypatch):
    real = tuner.make_case

    def broken_for_write(key, size, device):
        if key.kernel == "write":
            raise RuntimeError("no candidate compiles")
        return real(key, size, device)

    monkeypatch.setattr(tuner, "make_case", broken_for_write)
    keys = [replace(KEY, kernel="write", group=1), KEY]
    results = tune_keys(keys, spaces=TINY_SPACES, size="tiny", config_dir=tmp_path, progress=lambda line: None)
    assert "no candidate compiles" in results[0]["error"]
    assert results[1]["path"].endswith("d64_k3_v3_g2_mse.json")


def test_write_candidates_are_held_to_the_flip_budget_not_allclose():
    """The reference's own bytes pass; one code moved by one level among many passes (a boundary flip); a code moved
    two levels, or more flips than the budget, is named."""
    key = replace(KEY, kernel="write", group=1, k_bits=4, v_bits=4)
    case = make_case(key, "tiny", torch.device("cpu"))
    assert case.mismatch({"block_m": 16, "block_k": 32, "num_warps": 4, "num_stages": 1}) is None


def test_attention_candidates_are_held_to_their_dot_precision(tmp_path):
    case = make_case(KEY, "tiny", torch.device("cpu"))
    assert case.mismatch({"block_n": 16, "dot_precision": "ieee"}) is None
    assert case.mismatch({"block_n": 16, "dot_precision": "bf16"}) is None


@pytest.mark.parametrize("levels, count, expect", [(1, 1, None), (2, 1, "moved by 2 levels"), (1, 40, "of the codes")])
def test_write_mismatch_names_what_differs(levels, count, expect):
    from tq_serve.kernels.layout import VectorLayout
    from tq_serve.kernels.packed import PackedVectors
    from tq_serve.kernels.quantizer import get_quantizer
    from tq_serve.kernels.write_budget import write_mismatch

    qz = get_quantizer(VectorLayout(head_dim=64, bits=4))
    want = qz.quantize(torch.randn(200, 2, 64, generator=torch.Generator().manual_seed(0)))
    codes = want.codes.clone()
    # Low nibbles of the first `count` bytes of a row: channel j of each; +levels stays within 4 bits from <= 13.
    rows = torch.arange(count)
    low = codes[rows, 0, 0] & 15
    codes[rows, 0, 0] = (codes[rows, 0, 0] & 0xF0) | torch.where(low <= 13, low + levels, low - levels)
    problem = write_mismatch(PackedVectors(codes, want.norms.clone()), want, qz)
    assert problem is None if expect is None else expect in problem
