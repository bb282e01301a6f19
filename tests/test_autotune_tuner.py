"""The tuner end to end under the Triton interpreter (tiny space, CPU timer): it writes a file the lookup finds."""

import json

from tq_serve.autotune import store
from tq_serve.autotune.__main__ import main
from tq_serve.autotune.spaces import TINY_SPACES
from tq_serve.autotune.store import TuningKey
from tq_serve.autotune.tuner import device_name


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
    assert record["config"] in [
        dict(zip(TINY_SPACES["decode"], values, strict=True)) for values in [(16, 4, 1, 2), (32, 4, 1, 2)]
    ]
    assert set(record["stamp"]) >= {"gpu", "triton", "torch", "date", "commit"}
    assert record["timings_us"]["best"] > 0 and record["timings_us"]["default"] > 0
    key = TuningKey(kernel="decode", gpu=device_name(), triton=_triton(), head_dim=64, k_bits=3, v_bits=3, group=2)
    store.load_entries.cache_clear()
    assert store.lookup(key, tmp_path) == (record["config"], "exact")


def test_tune_command_rejects_unsupported_head_dim(capsys):
    assert main(["--tiny", "--head-dims", "100"]) == 2
    assert "unsupported head_dim 100" in capsys.readouterr().err


def _triton() -> str:
    import triton

    return triton.__version__
