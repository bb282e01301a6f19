"""TurboQuant's own Prometheus metrics, served next to SGLang's at /metrics (`python -m tq_serve --enable-metrics`).

    tq_kv_bits{layer, kind}                      bits per coordinate of each layer's K and V codes (16: a raw layer)
    tq_kv_bytes_per_token                        packed bytes one token slot costs, all layers, K and V, norms included
    tq_kv_bf16_bytes_per_token                   what the same token costs in SGLang's bf16 pool
    tq_kv_pool_capacity_tokens                   token slots of the packed pool (SGLang's max_total_num_tokens)
    tq_kv_pool_capacity_bf16_equivalent_tokens   tokens a bf16 pool of the same bytes would hold
    tq_kv_pool_slots_in_use                      slots holding K/V: running requests plus the radix cache
    tq_kv_pool_slots_cached                      of those, slots only the radix cache holds (freed on demand)
    tq_kv_pool_bytes_in_use                      slots_in_use * bytes_per_token

SGLang serves /metrics from prometheus_client's multiprocess mode: each process writes its samples to files under
PROMETHEUS_MULTIPROC_DIR and the HTTP server merges them on a scrape. The pool lives in a scheduler process, so the
gauges are written there: layout and capacity when the pool is built, slots each time SGLang publishes its own pool
gauges (every decode log interval, and when the scheduler turns idle). Without that directory (metrics off) every
function here does nothing. This module imports prometheus_client only: the plug-in calls it from SGLang's processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

from tq_serve.kernels.layout import KVLayout

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "tq_kv_"


def metrics_enabled() -> bool:
    """SGLang sets the multiprocess directory before it starts its processes, only when metrics are on."""
    return MULTIPROC_ENV in os.environ


@cache
def _gauges() -> dict:
    # Imported here: prometheus_client chooses multiprocess mode from the environment when a metric is created.
    from prometheus_client import Gauge

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()):
        # mostrecent: one series per label set across processes, without a pid label.
        return Gauge(PREFIX + name, doc, labels, multiprocess_mode="mostrecent")

    return {
        "bits": gauge("bits", "Bits per coordinate of a layer's K or V codes (16: raw bf16 layer)", ("layer", "kind")),
        "bytes_per_token": gauge("bytes_per_token", "Packed bytes per token slot, all layers, K and V"),
        "bf16_bytes_per_token": gauge("bf16_bytes_per_token", "Bytes per token slot of a bf16 KV cache"),
        "capacity": gauge("pool_capacity_tokens", "Token slots of the packed KV pool"),
        "capacity_bf16": gauge(
            "pool_capacity_bf16_equivalent_tokens", "Tokens a bf16 KV pool of the same bytes would hold"
        ),
        "in_use": gauge("pool_slots_in_use", "Packed slots holding K/V (running requests and radix cache)"),
        "cached": gauge("pool_slots_cached", "Packed slots held only by the radix cache (evictable)"),
        "bytes_in_use": gauge("pool_bytes_in_use", "Bytes of the packed slots in use"),
    }


_bytes_per_token: int | None = None


def publish_layout(layout: KVLayout, capacity_tokens: int, start_layer: int = 0) -> None:
    """The static facts of a packed pool of `capacity_tokens` slots over model layers start_layer.. of `layout`."""
    global _bytes_per_token
    if not metrics_enabled():
        return
    g = _gauges()
    for i, (k_bits, v_bits) in enumerate(layout.layer_bits):
        g["bits"].labels(layer=str(start_layer + i), kind="k").set(k_bits)
        g["bits"].labels(layer=str(start_layer + i), kind="v").set(v_bits)
    g["bytes_per_token"].set(layout.bytes_per_token)
    g["bf16_bytes_per_token"].set(layout.bf16_bytes_per_token)
    g["capacity"].set(capacity_tokens)
    g["capacity_bf16"].set(capacity_tokens * layout.bytes_per_token // layout.bf16_bytes_per_token)
    g["in_use"].set(0)
    g["cached"].set(0)
    g["bytes_in_use"].set(0)
    _bytes_per_token = layout.bytes_per_token


def publish_slots(capacity: int, available: int, evictable: int) -> None:
    """Slot use from SGLang's pool accounting: `available` free slots, `evictable` held by the radix cache only."""
    if not metrics_enabled() or _bytes_per_token is None:
        return  # no packed pool in this process (bf16 baseline, or metrics off)
    g = _gauges()
    in_use = capacity - available
    g["in_use"].set(in_use)
    g["cached"].set(evictable)
    g["bytes_in_use"].set(in_use * _bytes_per_token)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (what /metrics returns)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [Sample(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def metric_value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of `name` over the samples whose labels include `labels`; None when there is none."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None


@dataclass(frozen=True)
class PoolSlots:
    """SGLang's accounting of the KV pool's token slots, from its sglang:kv_* gauges."""

    capacity: int
    free: int
    cached: int
    """Held by the radix cache only: freed on demand."""
    running: int
    queued: int

    @property
    def held_by_requests(self) -> int:
        return self.capacity - self.free - self.cached

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> PoolSlots:
        def get(name: str) -> int:
            value = metric_value(samples, f"sglang:{name}")
            if value is None:
                raise KeyError(f"sglang:{name} is not in the metrics (is --enable-metrics on?)")
            return int(value)

        return cls(
            capacity=get("max_total_num_tokens"),
            free=get("kv_available_tokens"),
            cached=get("kv_evictable_tokens"),
            running=get("num_running_reqs"),
            queued=get("num_queue_reqs"),
        )
