"""Prometheus metrics: TurboQuant's own gauges (tq_serve.metrics) next to SGLang's, scraped from /metrics.

The unit test publishes into a multiprocess directory in a fresh interpreter (prometheus_client picks multiprocess
mode when it is imported) and reads it back the way SGLang's /metrics does. The server test serves tq-tiny with the
tuned 3.0-bit schedule, so that every layer's bits are checked against a schedule whose layers differ.
"""

import subprocess
import sys
import time

import httpx
import pytest

from tq_serve.bench.harness import running_server
from tq_serve.kv_config import TurboQuantConfig
from tq_serve.metrics import PoolSlots, metric_value, parse_metrics
from tq_serve.schedule import BitSchedule, resolve_schedule_path

POOL_TOKENS = 3000
SCHEDULE = "tq-tiny-3.0"

PUBLISH = """
import sys
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from tq_serve import metrics
from tq_serve.kernels.layout import KVLayout

layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=128, layer_bits=((4, 4), (2, 3), (16, 2.5)))
metrics.publish_layout(layout, capacity_tokens=1000, start_layer=5)
metrics.publish_slots(capacity=1000, available=700, evictable=120)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
sys.stdout.write(generate_latest(registry).decode())
"""


def test_published_gauges_read_back_through_the_multiprocess_collector(tmp_path):
    from tq_serve.kernels.layout import KVLayout

    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", PUBLISH], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    samples = parse_metrics(done.stdout)
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=128, layer_bits=((4, 4), (2, 3), (16, 2.5)))
    bits = {(s.labels["layer"], s.labels["kind"]): s.value for s in samples if s.name == "tq_kv_bits"}
    assert bits == {
        ("5", "k"): 4,
        ("5", "v"): 4,
        ("6", "k"): 2,
        ("6", "v"): 3,
        ("7", "k"): 16,
        ("7", "v"): 2.5,
    }
    assert metric_value(samples, "tq_kv_bytes_per_token") == layout.bytes_per_token
    assert metric_value(samples, "tq_kv_bf16_bytes_per_token") == layout.bf16_bytes_per_token == 3 * 2 * 2 * 256
    assert metric_value(samples, "tq_kv_pool_capacity_tokens") == 1000
    expected_bf16 = 1000 * layout.bytes_per_token // layout.bf16_bytes_per_token
    assert metric_value(samples, "tq_kv_pool_capacity_bf16_equivalent_tokens") == expected_bf16
    assert metric_value(samples, "tq_kv_pool_slots_in_use") == 300
    assert metric_value(samples, "tq_kv_pool_slots_cached") == 120
    assert metric_value(samples, "tq_kv_pool_bytes_in_use") == 300 * layout.bytes_per_token


def test_nothing_is_published_without_metrics(tmp_path):
    script = PUBLISH.split("registry =")[0] + "import os; print(sorted(os.listdir(sys.argv[1])))"
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    flags = ["--enable-metrics", "--max-total-tokens", str(POOL_TOKENS), "--kv-schedule", SCHEDULE]
    with running_server(flags, tmp_path_factory.mktemp("metrics") / "server.log") as base:
        yield base


def scrape(url: str) -> list:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


@pytest.mark.sglang
@pytest.mark.slow
def test_server_serves_sglang_and_turboquant_metrics(url):
    schedule = BitSchedule.load(resolve_schedule_path(SCHEDULE))
    layout = TurboQuantConfig(kv_bits=None, schedule=schedule).kv_layout(num_layers=8, num_kv_heads=2, head_dim=128)
    samples = scrape(url)
    bits = {(int(s.labels["layer"]), s.labels["kind"]): s.value for s in samples if s.name == "tq_kv_bits"}
    assert bits == {(i, kind): pair[j] for i, pair in enumerate(layout.layer_bits) for j, kind in enumerate("kv")}
    assert len(set(bits.values())) > 1, "the schedule's layers should differ"
    assert metric_value(samples, "tq_kv_bytes_per_token") == layout.bytes_per_token
    assert metric_value(samples, "tq_kv_bf16_bytes_per_token") == layout.bf16_bytes_per_token
    # SGLang's capacity is the packed pool's: the same number under both names.
    assert metric_value(samples, "tq_kv_pool_capacity_tokens") == POOL_TOKENS
    assert metric_value(samples, "sglang:max_total_num_tokens") == POOL_TOKENS
    bf16 = metric_value(samples, "tq_kv_pool_capacity_bf16_equivalent_tokens")
    assert bf16 == POOL_TOKENS * layout.bytes_per_token // layout.bf16_bytes_per_token < POOL_TOKENS / 4

    prompt = "".join(f"def helper_{i}(values):\n    return sorted(values)[{i}]\n\n" for i in range(8))
    body = {"model": "tq-tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    used = reply.json()["usage"]["total_tokens"]
    # Once idle, SGLang republishes its pool gauges and the hook ours: the request's tokens stay in the radix cache.
    deadline = time.monotonic() + 90
    while True:
        samples = scrape(url)
        slots = PoolSlots.from_samples(samples)
        in_use = metric_value(samples, "tq_kv_pool_slots_in_use")
        if slots.running == 0 and in_use >= used - 1:
            break
        assert time.monotonic() < deadline, (slots, in_use, used)
        time.sleep(2)
    assert in_use == slots.capacity - slots.free
    assert metric_value(samples, "tq_kv_pool_slots_cached") == slots.cached
    assert metric_value(samples, "tq_kv_pool_bytes_in_use") == in_use * layout.bytes_per_token
    assert metric_value(samples, "sglang:generation_tokens_total") >= 16
    assert metric_value(samples, "sglang:prompt_tokens_total") >= reply.json()["usage"]["prompt_tokens"]


def test_metrics_through_the_ray_ingress_name_their_replica():
    from tq_serve.deploy.app import label_samples

    text = '# HELP g a gauge\n# TYPE g gauge\ng{model_name="tq}tiny",tp_rank="0"} 1.0\ntq_kv_bytes_per_token 2112.0\n'
    labelled = parse_metrics(label_samples(text, "abc123"))
    assert [(s.name, s.labels, s.value) for s in labelled] == [
        ("g", {"replica": "abc123", "model_name": "tq}tiny", "tp_rank": "0"}, 1.0),
        ("tq_kv_bytes_per_token", {"replica": "abc123"}, 2112.0),
    ]
