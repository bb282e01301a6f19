"""The serving benchmarks' arithmetic, without a server: capacity estimates, settings, scoring, reports."""

import json

import pytest

from tq_serve.bench import capacity
from tq_serve.bench.harness import BF16, KVSetting, kv_settings, model_flags, server_process, table, write_report
from tq_serve.bench.quality import chunks_of, compare
from tq_serve.registry import ModelShape

LLAMA_8B = ModelShape(num_layers=32, num_kv_heads=8, head_dim=128)


@pytest.mark.parametrize("bits, vector_bytes", [(4, 66), (3, 50), (2, 34)])
def test_capacity_uses_the_packed_bytes_per_token(bits, vector_bytes):
    row = capacity.estimate(LLAMA_8B, KVSetting(bits=bits), memory_bytes=16 << 30)
    assert row["bytes_per_token"] == 32 * 8 * 2 * vector_bytes  # layers * KV heads * (K, V) * bytes per vector
    assert row["max_tokens"] == (16 << 30) // row["bytes_per_token"]


def test_bf16_capacity_is_sglangs_cell_size():
    row = capacity.estimate(LLAMA_8B, BF16, memory_bytes=16 << 30, page_size=64)
    assert row["bytes_per_token"] == 32 * 8 * 128 * 2 * 2 and row["max_tokens"] == 131072 and row["vs_bf16"] == 1


def test_settings_skip_prod_at_fractional_bits():
    assert [s.name for s in kv_settings(["2.5", "3"], ["mse", "prod"])] == ["bf16", "tq2.5-mse", "tq3-mse", "tq3-prod"]
    assert KVSetting(bits=3.5).flags() == ["--kv-bits", "3.5", "--kv-variant", "mse"]
    assert BF16.flags() == ["--kv-cache", "bf16"]


def test_capacity_command_writes_json_with_versions_and_commit(tmp_path, capsys):
    out = tmp_path / "capacity.json"
    assert capacity.main(["--model", "llama-3.1-8b", "--bits", "4", "--variants", "mse", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"sglang", "torch", "git_commit", "device"} <= report["environment"].keys()
    assert [r["setting"] for r in report["rows"]] == ["bf16", "tq4-mse"]
    assert "tq4-mse" in capsys.readouterr().out


def test_quality_scores():
    reference = [([-1.0, -2.0], [5, 6])]
    ours = [([-1.0, -3.0], [5, 7])]
    row = compare(ours, reference)
    assert row["tokens"] == 2 and row["greedy_agreement"] == 0.5
    assert row["perplexity"] == pytest.approx(2.718281828**2)


def test_chunks_are_whole_lines():
    text = "".join(f"line {i}\n" for i in range(100))
    chunks = chunks_of(text, chunk_chars=50, max_chunks=3)
    assert len(chunks) == 3 and all(c.endswith("\n") and len(c) >= 50 for c in chunks)


def test_table_aligns_columns():
    lines = table([{"a": 1.5, "b": "x"}, {"a": 10.25, "b": None}], {"a": ".1f", "b": ""}).splitlines()
    assert lines == ["   a  b", " 1.5  x", "10.2  -"]


def test_report_without_a_path_is_only_returned(tmp_path):
    assert write_report(None, "x", {}, [])["benchmark"] == "x"


def test_model_flags_add_the_path_only_when_given(tmp_path):
    assert model_flags("tq-tiny", None) == ["--model", "tq-tiny"]
    assert model_flags("llama-3.1-8b", tmp_path) == ["--model", "llama-3.1-8b", "--model-path", str(tmp_path)]


def test_a_server_that_cannot_start_fails_with_the_end_of_its_log(tmp_path):
    never_ready = []
    with pytest.raises(RuntimeError, match=r"exited with 2; its log ends:\n.*unknown model 'gpt-9'"):
        with server_process(["--model", "gpt-9"], tmp_path / "server.log", ready=never_ready.append):
            pass
    assert never_ready and never_ready[0].startswith("http://127.0.0.1:")  # the predicate is asked with the URL


def test_serve_rounds_compare_each_setting_with_the_bf16_server_of_its_own_round():
    from tq_serve.bench.serve import summarise, with_ratios

    def round_rows(bf16: float, tq: float) -> list[dict]:
        return [
            {"setting": name, "pool_tokens": 20000, "concurrency": 1, "tokens_per_s": rate}
            for name, rate in ((BF16.name, bf16), ("tq4-mse", tq))
        ]

    rows = []
    for i, (bf16, tq) in enumerate(((100.0, 90.0), (50.0, 60.0), (80.0, 100.0))):
        rows += with_ratios(round_rows(bf16, tq), i, streamed=False)
    assert [r["round"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [round(r["vs_bf16"], 3) for r in rows if r["setting"] == "tq4-mse"] == [0.9, 1.2, 1.25]
    (bf16_row, tq_row) = summarise(rows)
    assert (bf16_row["setting"], bf16_row["vs_bf16"], bf16_row["rounds"]) == (BF16.name, 1.0, 3)
    assert tq_row["tokens_per_s"] == 90.0 and tq_row["vs_bf16"] == 1.2  # medians, each ratio from its own round
    assert tq_row["vs_bf16_per_round"] == [0.9, 1.2, 1.25]


def test_serve_refuses_fewer_than_one_round(capsys):
    from tq_serve.bench import serve

    assert serve.main(["--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
