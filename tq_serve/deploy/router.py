"""Prefix-affinity routing for Ray Serve: requests that share a prompt prefix go to the same engine replica, so
SGLang's radix cache keeps hitting after scale-out, and new prefixes go where there is room to cache them.

The routing key is the first `prefix_chars` characters of the prompt (for chat, of the JSON of the messages, whose
prefix is the chat template's prefix). A key's home is the replica it was first sent to, for as long as that replica
runs (the router remembers the last MAX_HOMES keys). A new key picks its home by weighted rendezvous hashing over the
replicas (highest weight / -ln(hash)), where a replica's weight is the room it has for more prefixes: its KV pool's
capacity in tokens times the share of it not yet holding cached or running tokens (at least MIN_FREE_SHARE of it,
so that full replicas still take keys in proportion to their capacity). Both numbers come from the replica itself
(`EngineReplica.record_routing_stats`, which Serve polls); a replica that has not reported yet weighs 1, and with
equal weights the rule is plain rendezvous hashing: keys spread evenly, and when a replica leaves only the keys it
was home to move. So a replica whose pool holds 4x the tokens (a 4-bit cache against bf16) is home to about 4x the
prefixes, and a replica whose cache is already full takes fewer new ones.

Load has the last word: when the home replica holds `max_imbalance` or more requests than the least loaded one (from
Serve's queue-length cache), or rejects the request because it is full, the request goes to the less loaded of two
random other replicas, which is Serve's default power-of-two choice.

    choose_replicas -> [[home], [two random others]]    balanced: home first, the others if home rejects
                    -> [[two random others], [home]]     home overloaded
                    -> [[two random]]                    no prompt, one replica, or affinity off
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import OrderedDict
from collections.abc import Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


def prompt_prefix(args: Sequence[object], prefix_chars: int) -> str | None:
    """The routing key of a forwarded request `(method, path, body)`: the start of its prompt, or None."""
    body = args[2] if len(args) > 2 else None
    if not isinstance(body, dict) or prefix_chars <= 0:
        return None
    if "messages" in body:
        text = json.dumps(body["messages"], ensure_ascii=False, separators=(",", ":"))
    else:
        prompt = body.get("prompt")
        # A batch of prompts routes as its first one; token-id prompts route by their ids.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]
        if prompt is None:
            return None
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text[:prefix_chars] or None


# Keys whose home the router remembers; older ones fall back to the hash (with today's weights).
MAX_HOMES = 100_000
# The least share of a replica's pool counted as room: a full replica still takes keys by its capacity.
MIN_FREE_SHARE = 0.1


def affinity_hash(key: str, replica: ReplicaID) -> float:
    """A uniform number in (0, 1) per (key, replica)."""
    digest = hashlib.blake2b(f"{replica.unique_id}\x00{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 1)


def room_for_prefixes(stats: dict | None) -> float:
    """A replica's weight from its routing stats: pool tokens x the free share of the pool (see the docstring)."""
    if not stats or not stats.get("pool_tokens"):
        return 1.0
    pool = float(stats["pool_tokens"])
    free_share = 1.0 - min(float(stats.get("cached_tokens", 0)), pool) / pool
    return pool * max(free_share, MIN_FREE_SHARE)


def power_of_two(replicas: Sequence[RunningReplica]) -> list[RunningReplica]:
    return random.sample(list(replicas), min(2, len(replicas)))


class PrefixAffinityRouter(RequestRouter):
    """A Serve request router (`RequestRouterConfig.request_router_class`) for the engine deployment."""

    def initialize_state(self, prefix_chars: int = 256, max_imbalance: float = 8) -> None:
        """Called by Serve with `RequestRouterConfig.request_router_kwargs`."""
        self._prefix_chars = prefix_chars
        self._max_imbalance = max_imbalance
        self._homes: OrderedDict[str, ReplicaID] = OrderedDict()

    def _queue_len(self, replica: RunningReplica) -> int:
        # Unknown (never probed, or stale) counts as idle: the probe that follows gives the real answer.
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def home_replica(self, candidates: Sequence[RunningReplica], key: str) -> RunningReplica:
        """The key's remembered home if it is among the candidates, else a new one by weighted rendezvous hashing."""
        home_id = self._homes.get(key)
        home = next((r for r in candidates if r.replica_id == home_id), None)
        if home is None:
            # Weighted rendezvous: max of w / -ln(u) gives each replica a share of new keys proportional to w.
            home = max(
                candidates,
                key=lambda r: (
                    room_for_prefixes(getattr(r, "routing_stats", None)) / -math.log(affinity_hash(key, r.replica_id))
                ),
            )
        self._homes[key] = home.replica_id
        self._homes.move_to_end(key)
        if len(self._homes) > MAX_HOMES:
            self._homes.popitem(last=False)
        return home

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        # Without this, a request every replica rejects would be retried in a tight loop instead of with backoff.
        pending_request.routing_context.should_backoff = True
        key = prompt_prefix(pending_request.args, self._prefix_chars)
        if key is None or len(candidate_replicas) == 1:
            return [power_of_two(candidate_replicas)]
        home = self.home_replica(candidate_replicas, key)
        others = [r for r in candidate_replicas if r.replica_id != home.replica_id]
        least = min(self._queue_len(r) for r in candidate_replicas)
        if self._queue_len(home) - least >= self._max_imbalance:
            # Home goes last: Serve picks the lowest cached queue length within a rank, and a replica it has no
            # length for yet would lose to home's known one.
            return [power_of_two(others), [home]]
        # Count the request against its home now: Serve updates the cache only after the request is sent, and a
        # burst is routed in one go before that, which would send every request of it home. The replica's own count
        # replaces this guess when it accepts or rejects the request.
        self.replica_queue_len_cache.update(home.replica_id, self._queue_len(home) + 1)
        return [[home], power_of_two(others)]
