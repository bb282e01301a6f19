"""The Ray deployment's parts that need no running Ray: the routing key, the home replica, the load rule, and the
flags each engine is started with. tests/test_deploy_ray.py runs the whole thing."""

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from tq_serve.deploy import engine_flags
from tq_serve.deploy.app import kv_cache_stats
from tq_serve.deploy.engine import free_loopback_port
from tq_serve.deploy.router import PrefixAffinityRouter, prompt_prefix
from tq_serve.registry import ModelShape, ResolvedModel
from tq_serve.settings import ServeSettings, load_settings, resolve

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="tq_serve")


@dataclass(frozen=True)
class FakeReplica:
    """What the router reads of a RunningReplica."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 32
    routing_stats: dict | None = None


def replicas(n: int, stats: list[dict] | None = None) -> list[FakeReplica]:
    stats = stats or [None] * n
    return [
        FakeReplica(ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT), routing_stats=stats[i]) for i in range(n)
    ]


def router(prefix_chars: int = 16, max_imbalance: float = 4) -> PrefixAffinityRouter:
    r = PrefixAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(prefix_chars=prefix_chars, max_imbalance=max_imbalance)
    return r


def completion(prompt: object) -> PendingRequest:
    return PendingRequest(
        args=["POST", "/v1/completions", {"model": "m", "prompt": prompt}],
        kwargs={},
        metadata=RequestMetadata(request_id="x", internal_request_id="x"),
    )


def choose(r: PrefixAffinityRouter, candidates: list[FakeReplica], prompt: object) -> list[list[str]]:
    """The ranks of replica ids the router returns for a completion of `prompt`."""

    async def run():
        # PendingRequest makes an asyncio.Future, which wants a running loop.
        ranks = await r.choose_replicas(candidates, completion(prompt))
        return [[c.replica_id.unique_id for c in rank] for rank in ranks]

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"prompt": "def fib(n): return n if n < 2 else fib(n - 1)"}, "def fib(n): retu"),
        ({"prompt": ["first prompt of a batch", "second"]}, "first prompt of "),
        ({"prompt": [1, 2, 3]}, "[1, 2, 3]"),
        ({"prompt": "short"}, "short"),
        ({"messages": [{"role": "user", "content": "hi"}]}, '[{"role":"user",'),
        ({"model": "m"}, None),
        (None, None),
    ],
)
def test_routing_key_is_the_start_of_the_prompt(body, key):
    assert prompt_prefix(["POST", "/v1/x", body], 16) == key


def test_no_affinity_when_prefix_chars_is_zero():
    assert prompt_prefix(["POST", "/v1/completions", {"prompt": "abc"}], 0) is None


def test_a_shared_prefix_has_one_home_ranked_first_with_the_others_behind():
    candidates = replicas(3)
    homes = {choose(router(), candidates, f"same sixteen chs then {i}")[0][0] for i in range(20)}
    assert len(homes) == 1
    ranks = choose(router(), candidates, "same sixteen chs")
    assert len(ranks) == 2 and ranks[0] not in ranks[1] and len(ranks[1]) == 2


def test_a_burst_counts_against_home_and_spills_past_the_imbalance():
    # Serve counts a request only after sending it; the router counts its own choices so that a burst routed
    # in one go does not all go home.
    r, candidates = router(max_imbalance=4), replicas(3)
    ranks = [choose(r, candidates, "one shared prefix for all") for _ in range(5)]
    home = ranks[0][0]
    assert all(rank[0] == home for rank in ranks[:4])
    assert len(ranks[4][0]) == 2 and home[0] not in ranks[4][0] and ranks[4][1] == home


def test_distinct_prefixes_spread_over_replicas():
    r, candidates = router(), replicas(4)
    rng = random.Random(0)
    homes = [r.home_replica(candidates, f"{rng.random():.16f}").replica_id.unique_id for _ in range(400)]
    assert all(60 < homes.count(f"r{i}") < 140 for i in range(4))


def test_only_the_keys_of_a_removed_replica_move():
    r, candidates = router(), replicas(4)
    keys = [f"prompt number {i:04d}" for i in range(200)]
    before = {k: r.home_replica(candidates, k).replica_id.unique_id for k in keys}
    after = {k: r.home_replica(candidates[:3], k).replica_id.unique_id for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r3")


def test_an_overloaded_home_goes_last_behind_power_of_two_over_the_others():
    r, candidates = router(max_imbalance=4), replicas(3)
    home = choose(r, candidates, "a long shared system prompt")[0][0]
    home_id = next(c.replica_id for c in candidates if c.replica_id.unique_id == home)
    r.replica_queue_len_cache.update(home_id, 3)
    assert choose(r, candidates, "a long shared system prompt")[0] == [home]
    r.replica_queue_len_cache.update(home_id, 4)
    ranks = choose(r, candidates, "a long shared system prompt")
    assert len(ranks[0]) == 2 and home not in ranks[0] and ranks[1] == [home]
    # Load elsewhere counts: home may run max_imbalance ahead of the least loaded replica, not of zero.
    for c in candidates:
        r.replica_queue_len_cache.update(c.replica_id, 4 if c.replica_id == home_id else 1)
    assert choose(r, candidates, "a long shared system prompt")[0] == [home]


def test_new_prefixes_go_where_the_pool_has_room():
    rng = random.Random(1)
    keys = [f"{rng.random():.16f}" for _ in range(1000)]

    def shares(stats: list[dict]) -> list[int]:
        r, candidates = router(), replicas(2, stats)
        homes = [r.home_replica(candidates, k).replica_id.unique_id for k in keys]
        return [homes.count("r0"), homes.count("r1")]

    # A 4-bit pool holds 3.9x the tokens of a bf16 one in the same memory: it becomes home to about 3.9x the prefixes.
    bigger = shares([{"pool_tokens": 7760, "cached_tokens": 0}, {"pool_tokens": 2000, "cached_tokens": 0}])
    assert 3.3 < bigger[0] / bigger[1] < 4.6
    # Equal pools, one of them nearly full: the empty one takes most new prefixes.
    emptier = shares([{"pool_tokens": 4000, "cached_tokens": 3900}, {"pool_tokens": 4000, "cached_tokens": 0}])
    assert emptier[1] > 8 * emptier[0]
    # Both full: by capacity again, not all to one.
    full = shares([{"pool_tokens": 4000, "cached_tokens": 4000}, {"pool_tokens": 4000, "cached_tokens": 4000}])
    assert 400 < full[0] < 600


def test_a_prefix_keeps_its_home_when_the_weights_change():
    r = router()
    before = replicas(2, [{"pool_tokens": 4000, "cached_tokens": 0}] * 2)
    homes = {k: r.home_replica(before, k).replica_id.unique_id for k in (f"prefix {i}" for i in range(50))}
    after = replicas(2, [{"pool_tokens": 4000, "cached_tokens": 4000}, {"pool_tokens": 4000, "cached_tokens": 0}])
    assert all(r.home_replica(after, k).replica_id.unique_id == home for k, home in homes.items())


def test_kv_cache_stats_read_sglang_gauges():
    metrics = "\n".join(
        [
            "# HELP sglang:kv_available_tokens Number of available token slots.",
            'sglang:kv_available_tokens{model_name="tq-tiny",engine_type="unified"} 1500.0',
            'sglang:kv_evictable_tokens{model_name="tq-tiny",engine_type="unified"} 400.0',
            'sglang:kv_used_tokens{model_name="tq-tiny",engine_type="unified"} 100.0',
            'sglang:num_running_reqs{model_name="tq-tiny"} 2.0',
        ]
    )
    assert kv_cache_stats(metrics) == {"pool_tokens": 2000, "cached_tokens": 500}
    assert kv_cache_stats("sglang:num_running_reqs 1.0") == {}


def test_requests_without_a_prompt_use_power_of_two():
    ranks = choose(router(), replicas(3), None)
    assert len(ranks) == 1 and len(ranks[0]) == 2


def test_engine_flags_forward_the_single_server_settings_with_absolute_paths(tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    settings = ServeSettings(
        model="tq-tiny", kv_bits=3, kv_schedule=Path("sched.yaml"), replicas=2, api_key="k", port=9, seed=3
    )
    cfg = resolve_stub(settings, model_dir)
    monkeypatch.chdir(tmp_path)
    flags = engine_flags(settings, cfg)
    assert flags[:6] == ["--model", "tq-tiny", "--model-path", str(model_dir), "--device", "cpu"]
    engine = load_settings(flags)  # as the engine's own `python -m tq_serve` parses them (boolean flags: one word)
    assert (engine.kv_bits, engine.seed, engine.kv_schedule) == (3, 3, tmp_path / "sched.yaml")
    assert engine.enable_metrics  # the router weighs replicas by their engines' KV-pool gauges
    # The engine gets its own port and key; deployment settings would make it deploy replicas itself.
    assert not {"--port", "--api-key", "--host", "--replicas", "--ray-address"} & set(flags)


def resolve_stub(settings: ServeSettings, model_dir: Path):
    """A ServeConfig without weights on disk (resolve needs a model directory)."""
    model = ResolvedModel(name="tq-tiny", path=model_dir, shape=ModelShape(num_layers=2, num_kv_heads=2, head_dim=64))

    class Registry:
        def resolve(self, name, model_path):
            return model

    return resolve(settings.model_copy(update={"kv_schedule": None, "device": "cpu"}), Registry())


def test_engine_ports_come_from_below_the_ephemeral_range():
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(10000 <= free_loopback_port() < min(22000, ephemeral_low) for _ in range(20))
