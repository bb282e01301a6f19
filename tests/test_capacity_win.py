"""The equal-memory benchmark (tq_serve.bench.capacity_win): its pool sizing, its counts, and one real run."""

import json

import pytest

from tq_serve.bench import capacity_win
from tq_serve.bench.harness import BF16, KVSetting, schedule_settings
from tq_serve.registry import ModelRegistry, ModelShape

SHAPE = ModelShape(num_layers=8, num_kv_heads=2, head_dim=128)


def test_every_setting_gets_the_bytes_of_the_bf16_pool():
    bf16 = capacity_win.bytes_per_token(SHAPE, BF16)
    tq4 = capacity_win.bytes_per_token(SHAPE, KVSetting(bits=4))
    tq3 = capacity_win.bytes_per_token(SHAPE, KVSetting(bits=3))
    assert (bf16, tq4, tq3) == (8 * 2 * 2 * 128 * 2, 8 * 2 * 2 * 66, 8 * 2 * 2 * 50)
    budget = 2000 * bf16
    assert budget // tq4 == 7757  # 3.88x the tokens of the bf16 pool in the same bytes
    schedule = schedule_settings(["tq-tiny-3.0"])[0]
    shape = ModelRegistry.load().shape("tq-tiny")
    average = capacity_win.bytes_per_token(shape, schedule) / shape.num_layers / shape.num_kv_heads / 2
    assert average == pytest.approx(128 * schedule.bits / 8 + 2, abs=0.01)  # codes at the schedule's mean + a norm


def test_evicted_prefixes_count_requests_that_lost_an_earlier_prefix():
    def record(time, user, document, turn, prompt, cached, ok=True):
        keys = ("time", "user", "document", "turn", "prompt_tokens", "cached_tokens", "ok")
        return dict(zip(keys, (time, user, document, turn, prompt, cached, ok), strict=True))

    records = [
        record(1, 0, 5, 0, 300, 0),  # first sight of document 5: a cold miss, not an eviction
        record(2, 0, 5, 1, 340, 320),  # the next turn found the whole previous prompt
        record(3, 1, 5, 0, 300, 10),  # document 5 again, but evicted meanwhile
        record(4, 0, 5, 2, 380, 200),  # user 0's history (340 tokens) was cut
        record(5, 1, 7, 0, 300, 0, ok=False),  # failed requests count for nothing
        record(6, 1, 9, 0, 300, 0),
    ]
    assert capacity_win.evicted_prefixes(records) == 2


def test_server_log_counts_retractions_and_running_requests(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "Decode batch. #running-req: 3, #token: 900\n"
        "KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 410\n"
        "Decode batch. #running-req: 7, #token: 1900\n"
        "KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 200\n"
    )
    assert capacity_win.server_log_counts(log) == {"retractions": 3, "max_running": 7}


def test_agreement_with_the_bf16_completions():
    got = ["def f(x):\n    return x", "abc", "same"]
    want = ["def f(x):\n    return y", "abd", "same"]
    result = capacity_win.agreement(got, want)
    assert result["probes_identical"] == 1
    assert result["probe_prefix_match"] == pytest.approx((21 / 22 + 2 / 3 + 1) / 3)


@pytest.mark.sglang
@pytest.mark.slow
def test_capacity_win_runs_bf16_and_a_packed_pool_at_one_budget(tmp_path, capsys):
    out = tmp_path / "cw.json"
    argv = ["--bf16-pool-tokens", "1500", "--bits", "4", "--schedules", "--users", "4", "--requests", "16"]
    argv += ["--documents", "6", "--probes", "2", "--out", str(out)]
    assert capacity_win.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["setting"]: r for r in report["rows"]}
    assert set(rows) == {"bf16", "tq4-mse"}
    assert rows["tq4-mse"]["pool_tokens"] == 1500 * 8192 // 2112
    for row in rows.values():
        assert row["completed"] == 16 and row["failed"] == 0
        assert 0 <= row["hit_rate"] <= 1 and row["ttft_p50_ms"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_replica_rows_are_compared_with_the_single_bf16_engine_at_their_budget():
    rows = [
        {"setting": "bf16", "router": None, "kv_mib": 9.4, "hit_rate": 0.25, "ttft_p50_ms": 400.0},
        {"setting": "tq4-mse", "router": None, "kv_mib": 9.4, "hit_rate": 0.75, "ttft_p50_ms": 100.0},
        {"setting": "tq4-mse", "router": "affinity", "kv_mib": 9.4, "hit_rate": 0.5, "ttft_p50_ms": 200.0},
        {"setting": "tq4-mse", "router": None, "kv_mib": 18.8, "hit_rate": 0.8, "ttft_p50_ms": 90.0},
    ]
    capacity_win.compare_with_bf16(rows)
    assert [r["hit_rate_vs_bf16"] for r in rows[:3]] == [1.0, 3.0, 2.0]
    assert [r["ttft_p50_vs_bf16"] for r in rows[:3]] == [1.0, 0.25, 0.5]
    assert rows[3]["hit_rate_vs_bf16"] is None and rows[3]["ttft_p50_vs_bf16"] is None  # no bf16 run at 18.8 MiB
