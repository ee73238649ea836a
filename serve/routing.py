"""Which replica of a model gets a request: homefire's request routers, on Ray Serve's request-router API.

A model's ``routing`` (:class:`~homefire.serve.config.ServedModelBase`) picks one; the router runs where the
caller's handle lives (the ingress replica) and sees the request object the ingress sends, so it reads the prompt
as homefire parsed it (:func:`request_text`):

* ``power_of_two`` (default): two random replicas, the one with the shorter queue (Ray Serve's own procedure).
* ``prefix_affinity``: a request goes to the replica that most recently served the longest common prefix of its
  prompt (a shared system prompt, a few-shot preamble, a conversation so far), so that replica's engine finds the
  prefix in its KV cache and skips its prefill. Prefixes are tracked in the router as chained hashes of
  ``PREFIX_BLOCK_CHARS``-character blocks, a bounded LRU table per replica (no actor, no call off the process, a
  few microseconds a request). The affinity yields to load: when the matched replica's queue is
  ``imbalance`` requests longer than the shortest, or the match covers under ``min_match`` of the prompt, the
  request goes to the least loaded replica, the one holding the fewest prefixes on a tie (new prefixes spread).
* ``session``: a request carrying OpenAI's ``user`` field always goes to the same replica while it lives
  (rendezvous hashing: replicas coming and going move only their own sessions; every ingress replica agrees);
  without ``user``, ``prefix_affinity``.

Every router also keeps the replicas' engine stats (``ModelServer.record_routing_stats``, the engine's ``stats()``:
its queue; for vLLM also KV-cache use and prefix-cache queries and hits, from its scheduler) for ``GET /v1/status``
(:func:`replica_stats`). tests/integration/test_routing.py checks ``prefix_affinity`` against those counters;
benchmarks/routing_bench.py measures it against ``power_of_two``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import OrderedDict
from typing import Any, Literal

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

Routing = Literal["power_of_two", "prefix_affinity", "session"]

#: Granularity of the prefix table: about 32 tokens of English. vLLM caches whole KV blocks (16 tokens on GPU, 128
#: on CPU), so a finer grain only adds hashing.
PREFIX_BLOCK_CHARS = 128
#: Blocks remembered per replica (LRU): 65,536 x 128 chars = 8 M characters, ~2 M tokens, more than a replica's KV
#: cache usually holds; ~6 MiB of table.
PREFIX_TABLE_BLOCKS = 65_536

#: How often Serve asks each replica for its engine stats (``HOMEFIRE_ROUTING_STATS_PERIOD_S``, read when the app
#: is built). Each answer that changes goes out to every handle and proxy (Serve's long poll), so not every
#: second: /v1/status is at most this stale.
STATS_PERIOD_S = 5.0

_MAX_PENDING = 4096

#: Live routers in this process by deployment name (the ingress reads their replicas' stats).
_ROUTERS: dict[str, "_StatsMixin"] = {}


def request_text(args: list[Any] | tuple[Any, ...]) -> str:
    """The text a request's prompt starts with: chat messages (role and content, in order) or a completion prompt,
    from homefire's request models or a :class:`~homefire.serve.protocol.NativeRequest`'s body; "" for anything
    else (token-id prompts too: they route without affinity)."""
    for arg in args:
        body = getattr(arg, "body", None)
        if isinstance(body, dict):  # NativeRequest: the decoded JSON
            messages, prompt = body.get("messages"), body.get("prompt", body.get("input"))
        else:
            messages, prompt = getattr(arg, "messages", None), getattr(arg, "prompt", None)
        if messages is not None:
            return "".join(_message_text(m) for m in messages) if isinstance(messages, list) else _text(messages)
        if prompt is not None:
            return _text(prompt)
    return ""


def _message_text(m: Any) -> str:
    if isinstance(m, dict):
        return f"<{m.get('role', '')}>{_text(m.get('content'))}"
    return f"<{getattr(m, 'role', '')}>{_text(getattr(m, 'content', None))}"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(v) for v in value if not isinstance(v, int))
    if isinstance(value, dict):
        return _text(value.get("text", value.get("content")))
    text = getattr(value, "text", None)
    return text if isinstance(text, str) else ""


def block_hashes(text: str, block_chars: int = PREFIX_BLOCK_CHARS) -> list[int]:
    """Chained hashes of the text's whole blocks: hash ``i`` stands for the first ``i + 1`` blocks, so two texts
    share hash ``i`` exactly when they share that prefix (the idea of vLLM's own prefix cache)."""
    out, prev = [], 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        prev = hash((prev, text[start:start + block_chars]))
        out.append(prev)
    return out


class PrefixTable:
    """Which prefixes (chained block hashes) one replica served, least recently used first, bounded."""

    def __init__(self, capacity: int = PREFIX_TABLE_BLOCKS):
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def matched(self, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` this replica holds (binary search: a chain's prefixes are
        inserted together, so presence is monotone up to eviction)."""
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in self._blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, hashes: list[int]) -> None:
        # Deepest block first, so a chain's shorter prefixes are the more recent: eviction takes a chain from its
        # end, and presence stays monotone along it (what ``matched`` relies on).
        for h in reversed(hashes):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


class _StatsMixin:
    """Registers the router for :func:`replica_stats`."""

    def _register(self) -> None:
        # Through the module as imported here: Serve may hand this class to the replica pickled by value, with
        # globals of its own (a ``_ROUTERS`` that :func:`replica_stats` would never see).
        import homefire.serve.routing as here

        if self._deployment_id is not None:
            here._ROUTERS[self._deployment_id.name] = self

    def replica_stats(self) -> list[dict[str, Any]]:
        return [{"replica": rid.unique_id, **(r.routing_stats or {})} for rid, r in self.curr_replicas.items()]


def replica_stats(deployment: str) -> list[dict[str, Any]] | None:
    """Each replica's last engine stats as this process's router for ``deployment`` last heard them (Serve polls
    them every few seconds); None where no homefire router for it runs here."""
    router = _ROUTERS.get(deployment)
    return router.replica_stats() if router is not None else None


class PowerOfTwoRouter(_StatsMixin, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's power-of-two-choices, plus the replicas' stats for ``/v1/status``."""

    def initialize_state(self, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self._register()


class PrefixAffinityRouter(_StatsMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Longest cached prefix first, within a load bound (see the module's docstring)."""

    def initialize_state(self, imbalance: int = 4, min_match: float = 0.1, sessions: bool = False,
                         block_chars: int = PREFIX_BLOCK_CHARS, table_blocks: int = PREFIX_TABLE_BLOCKS) -> None:
        self._imbalance = imbalance
        self._min_match = min_match
        self._sessions = sessions
        self._block_chars = block_chars
        self._table_blocks = table_blocks
        self._tables: dict[ReplicaID, PrefixTable] = {}
        self._pending_hashes: OrderedDict[str, list[int]] = OrderedDict()  # by internal request id, until routed
        self._register()

    def _table(self, rid: ReplicaID) -> PrefixTable:
        table = self._tables.get(rid)
        if table is None:
            table = self._tables[rid] = PrefixTable(self._table_blocks)
        return table

    def _queue_len(self, r: RunningReplica) -> int:
        q = self._replica_queue_len_cache.get(r.replica_id)
        return 0 if q is None else q

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None or not pending_request.args:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        args = pending_request.args
        if self._sessions and (user := _session_key(args)):
            ranked = sorted(candidate_replicas, key=lambda r: _rendezvous(user, r.replica_id.unique_id),
                            reverse=True)
            return [[ranked[0]], ranked[1:]]
        text = request_text(args)
        hashes = block_hashes(text, self._block_chars)
        self._pending_hashes[pending_request.metadata.internal_request_id] = hashes
        while len(self._pending_hashes) > _MAX_PENDING:  # requests cancelled before they were routed
            self._pending_hashes.popitem(last=False)
        loads = {r.replica_id: self._queue_len(r) for r in candidate_replicas}
        least = min(loads.values())
        by_load = sorted(candidate_replicas, key=lambda r: (loads[r.replica_id], len(self._table(r.replica_id))))
        if hashes:
            matched = {r.replica_id: self._table(r.replica_id).matched(hashes) for r in candidate_replicas}
            best = max(candidate_replicas, key=lambda r: (matched[r.replica_id], -loads[r.replica_id]))
            covered = matched[best.replica_id] * self._block_chars / max(1, len(text))
            if covered >= self._min_match and loads[best.replica_id] - least <= self._imbalance:
                return [[best], [r for r in by_load if r is not best]]
        return [[by_load[0]], by_load[1:]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self._pending_hashes.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            self._table(replica_id).add(hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for rid in [rid for rid in self._tables if rid not in live]:
            del self._tables[rid]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._tables.pop(replica_id, None)


def _session_key(args: list[Any] | tuple[Any, ...]) -> str | None:
    for arg in args:
        body = getattr(arg, "body", None)
        user = body.get("user") if isinstance(body, dict) else getattr(arg, "user", None)
        if isinstance(user, str) and user:
            return user
    return None


def _rendezvous(key: str, replica: str) -> int:
    """Highest-random-weight hashing: stable across processes (every ingress replica ranks alike)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


def router_config(routing: Routing, stats_period_s: float | None = None) -> dict[str, Any]:
    """The deployment's ``request_router_config`` for a model's ``routing``."""
    if stats_period_s is None:
        stats_period_s = float(os.environ.get("HOMEFIRE_ROUTING_STATS_PERIOD_S") or STATS_PERIOD_S)
    cls = {"power_of_two": "PowerOfTwoRouter", "prefix_affinity": "PrefixAffinityRouter",
           "session": "PrefixAffinityRouter"}[routing]
    return {
        "request_router_class": f"homefire.serve.routing:{cls}",
        "request_router_kwargs": {"sessions": True} if routing == "session" else {},
        "request_routing_stats_period_s": stats_period_s,
    }
